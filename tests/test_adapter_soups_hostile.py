"""Red-team tests of soups that look at data over PEFT LoRA adapters, and of the evaluator's partial reload.

The demanding user's contract: whatever a Pantry and an evaluator did before, the score (here: the logits, bit
for bit) of a soup is the score a FRESH evaluator gives to the weights ``modelsoup.merge`` writes for the same
recipe, and after an evaluation the module holds exactly those weights. Each test
was written by a red-team pass; the bugs it found are fixed (the docstrings say what went wrong before).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from modelsoup import merge

from .lora_fixtures import load_model, make_lora, peft_model, quiet, tiny_bert
from .tolerances import MODEL_OUTPUT

pytest.importorskip("peft")


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT classifier, three LoRA adapters of it, a full fine-tune of it (every tensor changed), and a
    second base of the same architecture."""
    root = tmp_path_factory.mktemp("redteam")
    base = tiny_bert(root / "base")
    ads = [root / f"ad{i}" for i in range(3)]
    for i, ad in enumerate(ads):
        make_lora(base, ad, seed=10 + i)
    model = load_model(base)
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with quiet():
        model.save_pretrained(root / "full")
    base2 = tiny_bert(root / "base2", seed=5)
    return {"root": root, "base": base, "ads": ads, "full": root / "full", "base2": base2}


def _batches(seed: int = 1, n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 8), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, n, 8)]


def _ev(base: Path, seed: int = 1, module: nn.Module | None = None, **kw: Any):  # type: ignore[no-untyped-def]
    from modelsoup.eval import ClassificationEvaluator

    return ClassificationEvaluator(module if module is not None else load_model(base), _batches(seed), progress=False, **kw)


def _off():  # type: ignore[no-untyped-def]
    from modelsoup.eval.cache import EvalCache

    return EvalCache(enabled=False)


_COUNT = [0]


def _merged(recipe: Any, tmp: Path) -> dict[str, torch.Tensor]:
    """The weights modelsoup.merge writes for ``recipe``."""
    _COUNT[0] += 1
    out = tmp / f"merged{_COUNT[0]}"
    merge(recipe, out, progress=False)
    return load_file(out / "model.safetensors")


def _fresh_logits(base: Path, weights: dict[str, torch.Tensor], seed: int = 1) -> torch.Tensor:
    return _ev(base, seed).predict(weights).logits


def _assert_holds(module: nn.Module, weights: dict[str, torch.Tensor], what: str = "") -> None:
    sd = module.state_dict()
    bad = [k for k, v in weights.items() if not torch.equal(sd[k], v.to(sd[k].dtype))]
    assert not bad, f"{what}: the module holds stale values for {bad[:4]} ({len(bad)} tensor(s))"


# -- alternating ingredients and soups on one evaluator ----------------------------------------------------
def test_alternating_adapters_full_models_and_soups_on_one_evaluator_match_fresh(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    sources = [lab["ads"][0], lab["full"], lab["ads"][1], lab["base"], lab["ads"][2]]
    with Pantry([str(s) for s in sources], base=str(lab["base"]), cache=_off()) as p:
        for members in ([0], [1], [0, 2], [3], [2], [0, 1, 2, 3, 4], [4], [1, 4], [0], [3, 4], [2, 4], [1]):
            rec, state = p.soup(members)
            got = ev.predict(state).logits
            want = _merged(rec, tmp_path)
            _assert_holds(ev.module, want, f"soup {members}")
            assert torch.equal(got, _fresh_logits(lab["base"], want)), members
        # the pantry's own per-ingredient predictions agree too, in any order
        for i in (4, 1, 0, 3, 2):
            assert torch.equal(p.predictions(i, ev).logits, _fresh_logits(lab["base"], _merged(p.recipe([i]), tmp_path))), i


def test_two_pantries_on_two_bases_share_one_evaluator(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p1, \
            Pantry([str(lab["ads"][0]), str(lab["ads"][1]), str(lab["full"])], base=str(lab["base2"]), cache=_off()) as p2:
        for p, members in ((p1, [0]), (p2, [0]), (p1, [0, 1]), (p2, [2]), (p1, [1]), (p2, [0, 1]), (p1, [2]), (p2, [1])):
            rec, state = p.soup(members)
            got = ev.predict(state).logits
            want = _merged(rec, tmp_path)
            _assert_holds(ev.module, want)
            assert torch.equal(got, _fresh_logits(lab["base"], want))


def test_same_adapter_under_two_labels(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry, greedy_soup

    ev = _ev(lab["base"])
    with Pantry([str(lab["ads"][0]), str(lab["ads"][0]), str(lab["ads"][1])], labels=["a", "b", "c"], base=str(lab["base"]), cache=_off()) as p:
        assert torch.equal(p.predictions(0, ev).logits, p.predictions(1, ev).logits)
        g = greedy_soup(p, ev, progress=False)
        rec, state = p.soup([0, 1, 2])
        assert torch.equal(ev.predict(state).logits, _fresh_logits(lab["base"], _merged(rec, tmp_path)))
        assert torch.equal(ev.predict(p.state(g.recipe)).logits, _fresh_logits(lab["base"], _merged(g.recipe, tmp_path)))


def test_learned_soup_then_greedy_on_one_evaluator(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry, greedy_soup, learned_soup

    ev = _ev(lab["base"])
    with Pantry([str(lab["ads"][0]), str(lab["full"]), str(lab["ads"][1])], base=str(lab["base"]), cache=_off()) as p:
        lr = learned_soup(p, ev, by="tensor", epochs=2, lr=0.5)
        assert torch.equal(lr.predictions.logits, _fresh_logits(lab["base"], _merged(lr.recipe, tmp_path)))
        g = greedy_soup(p, ev, progress=False)
        assert torch.equal(g.predictions.logits, _fresh_logits(lab["base"], _merged(g.recipe, tmp_path)))
        for i in range(3):
            assert torch.equal(p.predictions(i, ev).logits, _fresh_logits(lab["base"], _merged(p.recipe([i]), tmp_path)))


def test_cook_with_heldout_and_test_sharing_one_module_matches_fresh_evaluators(lab: dict, tmp_path: Path) -> None:
    from modelsoup.cli import main
    from modelsoup.recipes import Pantry, cook

    held = _ev(lab["base"], seed=1)
    test = _ev(lab["base"], seed=2)
    test.share_module(held)
    with Pantry([str(lab["ads"][0]), str(lab["full"]), str(lab["ads"][1])], base=str(lab["base"]), cache=_off()) as p:
        res = cook(p, held, test=test, recipes=["uniform", "greedy", "learned", "ensemble"], output=tmp_path / "cooked", calibrate=False,
                   progress=False, learned_options={"by": "layer", "epochs": 2, "lr": 0.5})
    for name, row in (("uniform", "uniform soup"), ("greedy", "greedy soup"), ("learned", "learned soup")):
        written = load_file(tmp_path / "cooked" / name / "model.safetensors")
        r = res.row(row)
        assert torch.equal(r.heldout_predictions.logits, _fresh_logits(lab["base"], written, seed=1)), name
        assert torch.equal(r.test_predictions.logits, _fresh_logits(lab["base"], written, seed=2)), name
        # the recipe.yaml written beside the soup re-runs with `soup merge` to the very same weights
        assert main(["-q", "merge", str(tmp_path / "cooked" / name / "recipe.yaml"), "-o", str(tmp_path / f"re-{name}"), "--no-progress"]) == 0
        again = load_file(tmp_path / f"re-{name}" / "model.safetensors")
        assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written), name
    for i, label in enumerate(["ad0", "full", "ad1"]):
        one = _merged(_pantry_recipe(lab, i), tmp_path)
        assert torch.equal(res.row(label).test_predictions.logits, _fresh_logits(lab["base"], one, seed=2)), label


def _pantry_recipe(lab: dict, i: int) -> Any:
    from modelsoup.recipes import Pantry

    with Pantry([str(lab["ads"][0]), str(lab["full"]), str(lab["ads"][1])], base=str(lab["base"]), cache=_off()) as p:
        return p.recipe([i])


def test_adapter_soups_manifest_recipe_re_runs_to_the_adapter(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry, cook

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        res = cook(p, ev, recipes=["greedy", "learned"], output=tmp_path / "cooked", calibrate=False, progress=False, as_adapter="cat",
                   learned_options={"by": "tensor", "epochs": 2, "lr": 0.5})
    x = torch.arange(12).view(2, 6)
    for name in ("greedy", "learned"):
        folder = tmp_path / "cooked" / name
        manifest = json.loads((folder / "soup_manifest.json").read_text())
        (tmp_path / f"{name}.yaml").write_text(manifest["recipe"])
        merge(tmp_path / f"{name}.yaml", tmp_path / f"full-{name}", progress=False)
        with torch.no_grad():
            torch.testing.assert_close(peft_model(lab["base"], folder)(input_ids=x).logits, load_model(tmp_path / f"full-{name}")(input_ids=x).logits,
                                       **MODEL_OUTPUT)
        # and the scored soup is that full merge
        got = res.row(f"{name} soup").heldout_predictions.logits
        assert torch.equal(got, _fresh_logits(lab["base"], load_file(tmp_path / f"full-{name}" / "model.safetensors")))


# -- the module changed behind the evaluator's back ------------------------------------------------------
def test_in_place_change_through_dot_data_is_reloaded(lab: dict, tmp_path: Path) -> None:
    """``p.data.mul_(0)`` (or ``p.data.copy_``, a numpy view) writes a parameter without bumping its version
    counter: the skip must not trust the version counter alone."""
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        ev.predict(p.soup([0])[1])
        ev.module.bert.embeddings.word_embeddings.weight.data.mul_(0)
        rec, state = p.soup([1])
        got = ev.predict(state).logits
        want = _merged(rec, tmp_path)
        _assert_holds(ev.module, want, "after .data.mul_(0)")
        assert torch.equal(got, _fresh_logits(lab["base"], want))


def test_in_place_change_under_no_grad_is_reloaded(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        ev.predict(p.soup([0])[1])
        with torch.no_grad():
            torch.nn.init.zeros_(ev.module.bert.embeddings.word_embeddings.weight)
        with torch.inference_mode():
            ev.module.bert.encoder.layer[0].output.dense.weight.mul_(3)
        rec, state = p.soup([1])
        ev.predict(state)
        _assert_holds(ev.module, _merged(rec, tmp_path))


def test_parameter_data_replaced_is_reloaded(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        ev.predict(p.soup([0])[1])
        w = ev.module.bert.embeddings.word_embeddings.weight
        w.data = torch.zeros_like(w.data)
        ev.module.bert.pooler.dense.weight = nn.Parameter(torch.ones_like(ev.module.bert.pooler.dense.weight))
        rec, state = p.soup([1])
        ev.predict(state)
        _assert_holds(ev.module, _merged(rec, tmp_path))


def test_module_moved_to_half_and_back_is_reloaded(lab: dict, tmp_path: Path) -> None:
    """``module.half(); module.float()`` (as any ``.to(dtype)`` / device round trip) replaces each parameter's data with
    ``param.data = new``, which keeps its version counter. When the CPU allocator hands the old storage back (here within
    a few round trips, nearly every run), data_ptr and version both match what _HELD recorded and the skip keeps the
    fp16-rounded weights."""
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        for k in range(12):
            ev.predict(p.soup([k % 3])[1])
            ev.module.half()
            ev.module.float()
            rec, state = p.soup([(k + 1) % 3])
            got = ev.predict(state).logits
            want = _merged(rec, tmp_path)
            _assert_holds(ev.module, want, f"after .half().float() (round trip {k + 1})")
            assert torch.equal(got, _fresh_logits(lab["base"], want))


@pytest.mark.parametrize("how", ["another evaluator on the same module", "load_state_dict", "learned_soup with start_score"])
def test_the_same_soup_state_re_evaluated_after_the_module_changed(lab: dict, tmp_path: Path, how: str) -> None:
    """ModuleEvaluator.load skips the whole load when its slot says it holds this very (immutable) state; but the
    module may have been changed since by a second evaluator built on the same module object (the natural way to
    make a held-out and a test evaluator), by load_state_dict, or by learned_soup (which calls load_weights directly)."""
    from modelsoup.recipes import Pantry, learned_soup

    module = load_model(lab["base"])
    held = _ev(lab["base"], seed=1, module=module)
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as p:
        start = held.evaluate(p.soup([0, 1, 2])[1]) if how.startswith("learned") else None
        rec0, s0 = p.soup([0])
        first = held.predict(s0).logits
        if how == "another evaluator on the same module":
            test = _ev(lab["base"], seed=2, module=module)
            test.predict(p.soup([1])[1])
        elif how == "load_state_dict":
            module.load_state_dict(_merged(p.recipe([2]), tmp_path), strict=False)
        else:
            learned_soup(p, held, epochs=0, start_score=start)  # loads the uniform soup with load_weights
        again = held.predict(s0).logits
        _assert_holds(module, _merged(rec0, tmp_path), how)
        assert torch.equal(again, first)


# -- stale weights across pantries / the evaluation cache --------------------------------------------------
def _replace_file(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_base_file_rewritten_between_two_pantries_on_one_evaluator(lab: dict, tmp_path: Path) -> None:
    """Tokens name a stored tensor by (file path, offset), not by content: after the base is re-saved at the same
    path (same layout), the evaluator that scored the old base keeps its untouched tensors."""
    from modelsoup.recipes import Pantry

    base = tmp_path / "base"
    shutil.copytree(lab["base"], base)
    ev = _ev(base)
    with Pantry([str(lab["ads"][0])], base=str(base), cache=_off()) as p:
        ev.predict(p.soup([0])[1])
    _replace_file(lab["base2"] / "model.safetensors", base / "model.safetensors")
    with Pantry([str(lab["ads"][0])], base=str(base), cache=_off()) as p:
        rec, state = p.soup([0])
        got = ev.predict(state).logits
    want = _merged(rec, tmp_path)
    _assert_holds(ev.module, want, "after the base file changed")
    assert torch.equal(got, _fresh_logits(lab["base"], want))


def test_base_file_rewritten_after_a_cached_run_is_rescored(lab: dict, tmp_path: Path) -> None:
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry

    base = tmp_path / "base"
    shutil.copytree(lab["base"], base)
    cache = EvalCache(tmp_path / "cache")
    with Pantry([str(lab["ads"][0])], base=str(base), cache=cache) as p:
        before = p.predictions(0, _ev(base)).logits
    _replace_file(lab["base2"] / "model.safetensors", base / "model.safetensors")
    with Pantry([str(lab["ads"][0])], base=str(base), cache=cache) as p:
        after = p.predictions(0, _ev(base)).logits
        rec = p.recipe([0])
    assert not torch.equal(before, after)
    assert torch.equal(after, _fresh_logits(lab["base"], _merged(rec, tmp_path)))


def test_one_adapter_on_two_bases_does_not_share_cached_scores(lab: dict, tmp_path: Path) -> None:
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry

    cache = EvalCache(tmp_path / "cache")
    got = {}
    for name in ("base", "base2"):
        with Pantry([str(lab["ads"][0])], base=str(lab[name]), cache=cache) as p:
            got[name] = p.predictions(0, _ev(lab["base"])).logits
            assert torch.equal(got[name], _fresh_logits(lab["base"], _merged(p.recipe([0]), tmp_path))), name
    assert not torch.equal(got["base"], got["base2"])


def test_adapter_config_change_is_not_served_from_the_cache(lab: dict, tmp_path: Path) -> None:
    """The cache key hashes the adapter's weight file only, not adapter_config.json: changing lora_alpha (or
    use_rslora, rank/alpha patterns) changes every adapted weight but the old cached logits come back."""
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry

    ad = tmp_path / "ad"
    shutil.copytree(lab["ads"][0], ad)
    cache = EvalCache(tmp_path / "cache")
    with Pantry([str(ad)], base=str(lab["base"]), cache=cache) as p:
        before = p.predictions(0, _ev(lab["base"])).logits
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with Pantry([str(ad)], base=str(lab["base"]), cache=cache) as p:
        after = p.predictions(0, _ev(lab["base"])).logits
        want = _fresh_logits(lab["base"], _merged(p.recipe([0]), tmp_path))
    assert not torch.equal(before, want)  # the config change does change the model
    assert torch.equal(after, want), "the cache served the logits of the adapter before its config changed"


def test_base_as_a_safetensors_file_scores_like_the_folder(lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry

    ev = _ev(lab["base"])
    with Pantry([str(a) for a in lab["ads"]], base=str(lab["base"]), cache=_off()) as folder, \
            Pantry([str(a) for a in lab["ads"]], base=str(lab["base"] / "model.safetensors"), cache=_off()) as file:
        for members in ([0], [0, 1, 2], [2]):
            a = ev.predict(folder.soup(members)[1]).logits
            b = ev.predict(file.soup(members)[1]).logits
            assert torch.equal(a, b), members


# -- batch norm and tied weights: own tiny modules wrapped with peft -------------------------------------
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 6)
        self.up = nn.Linear(6, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(torch.relu(self.fc(self.embed(x)))).mean(1))


def _peft_adapter(model: nn.Module, out: Path, seed: int, **config: Any) -> None:
    import peft

    with quiet():
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*pm.named_parameters(), *pm.named_buffers()]:
            if not t.is_floating_point():
                continue
            if "lora_" in name or ("modules_to_save" in name and "original_module" not in name):
                t.copy_(t + torch.randn(t.shape, generator=g) * 0.3 if "running_var" not in name else t + torch.rand(t.shape, generator=g))
    with quiet():
        pm.save_pretrained(out)


@pytest.fixture(scope="module")
def bn_lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bn")
    torch.manual_seed(3)
    net = BNNet()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.randn(4, generator=g))
        net.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    save_file(net.state_dict(), root / "bnbase.safetensors")
    ads = []
    for i, extra in enumerate([{}, {"modules_to_save": ["bn"]}, {}]):
        m = BNNet()
        m.load_state_dict(net.state_dict())
        _peft_adapter(m, root / f"bnad{i}", seed=20 + i, target_modules=["head"], **extra)
        ads.append(root / f"bnad{i}")
    full = BNNet()
    full.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        full.bn.running_mean.add_(1.0)
    save_file(full.state_dict(), root / "bnfull.safetensors")
    x = torch.randn(24, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return {"base": root / "bnbase.safetensors", "ads": ads, "full": root / "bnfull.safetensors",
            "batches": [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)], "bn": [torch.randn(16, 1, 4, 4, generator=g) for _ in range(2)]}


def _bn_ev(lab: dict, bn: bool = True):  # type: ignore[no-untyped-def]
    from modelsoup.eval import ClassificationEvaluator

    return ClassificationEvaluator(BNNet(), lab["batches"], bn_loader=lab["bn"] if bn else None, progress=False)


def test_bn_recalibration_with_adapters_and_a_full_model(bn_lab: dict, tmp_path: Path) -> None:
    from modelsoup.recipes import Pantry, greedy_soup

    held = _bn_ev(bn_lab)
    plain = _bn_ev(bn_lab, bn=False)
    plain.share_module(held)
    sources = [str(bn_lab["ads"][0]), str(bn_lab["full"]), str(bn_lab["ads"][1]), str(bn_lab["ads"][2])]
    with Pantry(sources, base=str(bn_lab["base"]), cache=_off()) as p:
        for members in ([0], [2], [1], [0, 2], [3], [0, 1, 2, 3], [2, 3], [0]):
            rec, state = p.soup(members)
            want = _merged(rec, tmp_path)
            got = held.predict(state).logits
            assert torch.equal(got, _bn_ev(bn_lab).predict(want).logits), members
            assert torch.equal(plain.predict(state).logits, _bn_ev(bn_lab, bn=False).predict(want).logits), members
            assert torch.equal(held.predict(state).logits, got), members
        g = greedy_soup(p, held, progress=False)
        assert torch.equal(g.predictions.logits, _bn_ev(bn_lab).predict(_merged(g.recipe, tmp_path)).logits)


def test_tied_weights_in_a_base_file(tmp_path: Path) -> None:
    from modelsoup.eval import ClassificationEvaluator
    from modelsoup.recipes import Pantry

    torch.manual_seed(0)
    net = TiedNet()
    save_model(net, str(tmp_path / "tied.safetensors"))
    ads = []
    for i in range(2):
        m = TiedNet()
        m.load_state_dict(net.state_dict())
        _peft_adapter(m, tmp_path / f"ad{i}", seed=30 + i, target_modules=["fc"])
        ads.append(str(tmp_path / f"ad{i}"))
    full = TiedNet()
    full.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_model(full, str(tmp_path / "full.safetensors"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (8, 5), generator=g), torch.randint(0, 20, (8,), generator=g)) for _ in range(3)]

    def ev():  # type: ignore[no-untyped-def]
        return ClassificationEvaluator(TiedNet(), batches, progress=False)

    e = ev()
    with Pantry([ads[0], str(tmp_path / "full.safetensors"), ads[1]], base=str(tmp_path / "tied.safetensors"), cache=_off()) as p:
        for members in ([0], [1], [2], [0, 2], [0, 1, 2], [0], [1, 2]):
            rec, state = p.soup(members)
            want = _merged(rec, tmp_path)
            got = e.predict(state).logits
            assert e.module.head.weight is e.module.embed.weight
            assert torch.equal(got, ev().predict(want).logits), members


# -- the planner's "one stored tensor" -------------------------------------------------------------------
def test_one_torch_file_read_with_two_prefixes_is_not_one_stored_tensor(tmp_path: Path) -> None:
    """A flat checkpoint holding a model and its EMA (``model.w``, ``model_ema.w``) souped with itself under two
    strip_prefix values: TensorDictCheckpoint.identity is (file, key, name AFTER stripping), so both entries of
    'w' look like one stored tensor and the planner copies the first instead of averaging."""
    torch.save({"model.w": torch.ones(3), "model_ema.w": torch.full((3,), 3.0)}, tmp_path / "two.pt")
    merge(models=[{"path": str(tmp_path / "two.pt"), "strip_prefix": "model."}, {"path": str(tmp_path / "two.pt"), "strip_prefix": "model_ema."}],
          keys="intersection", output=tmp_path / "out", progress=False)
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], torch.full((3,), 2.0))


# -- CLI error paths ------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    from modelsoup.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _csv(tmp_path: Path) -> Path:
    f = tmp_path / "h.csv"
    f.write_text("text,label\nhello world,1\nbad movie,0\ngood film,1\n")
    return f


def _cli_args(cmd: str, lab: dict, tmp_path: Path) -> list[str]:
    ads = [str(a) for a in lab["ads"][:2]]
    out = ["-o", str(tmp_path / "out")] if cmd in ("cook", "greedy", "learn") else []
    return [cmd, *ads, "--heldout", str(_csv(tmp_path)), "--no-progress", "--no-cache", *out]


@pytest.mark.parametrize("cmd", ["cook", "greedy", "learn", "ensemble", "curve", "compare"])
def test_cli_adapters_without_base_say_give_base(lab: dict, tmp_path: Path, cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Adapter folders without --base: exit 2, and the message must name the real problem (an adapter needs --base),
    not only ask for --model (which, given, only leads to the --base message)."""
    rc = _run(_cli_args(cmd, lab, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "out").exists()
    assert "--base" in err and "adapter" in err.lower(), err


@pytest.mark.parametrize("cmd", ["cook", "greedy", "learn", "ensemble", "curve", "compare"])
def test_cli_adapters_without_base_but_with_model(lab: dict, tmp_path: Path, cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run([*_cli_args(cmd, lab, tmp_path), "--model", str(lab["base"])])
    err = capsys.readouterr().err
    assert rc == 2 and "is a PEFT adapter; give the model it was trained on (--base" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_as_adapter_on_ensemble_does_not_exist(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run([*_cli_args("ensemble", lab, tmp_path), "--base", str(lab["base"]), "--as-adapter", "cat"])
    assert rc == 2 and "--as-adapter" in capsys.readouterr().err


@pytest.mark.parametrize("inputs", ["full-only", "mixed"])
def test_cli_as_adapter_with_full_model_ingredients(lab: dict, tmp_path: Path, inputs: str, capsys: pytest.CaptureFixture[str]) -> None:
    ins = [str(lab["full"]), str(lab["base"])] if inputs == "full-only" else [str(lab["ads"][0]), str(lab["full"])]
    rc = _run(["greedy", *ins, "--base", str(lab["base"]), "--heldout", str(_csv(tmp_path)), "-o", str(tmp_path / "out"), "--no-progress",
               "--no-cache", "--as-adapter", "svd"])
    err = capsys.readouterr().err
    assert rc == 2 and "only when every ingredient is an adapter" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_base_given_as_a_file_without_model(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run([*_cli_args("greedy", lab, tmp_path), "--base", str(lab["base"] / "model.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "--model" in err, err
    rc = _run([*_cli_args("greedy", lab, tmp_path), "--base", str(lab["base"] / "model.safetensors"), "--model", str(lab["base"])])
    assert rc == 0, capsys.readouterr().err

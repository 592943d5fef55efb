"""PEFT LoRA adapters as inputs: reading them (checked against peft's own merge_and_unload), refusing what
cannot be merged exactly, and merging adapters (and full fine-tunes) of one base into a full model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge
from modelsoup.errors import AdapterError, AdapterInputError, RecipeError
from modelsoup.io import open_checkpoint
from modelsoup.io.adapters import AdaptedCheckpoint, adapted, open_adapter

from .lora_fixtures import load_model, make_lora, peft_model, tiny_bert, tiny_gpt2
from .tolerances import FP32_VS_LIBRARY, MODEL_OUTPUT

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny BERT classifier and three LoRA adapters of it (r=4 on query/value, the head in modules_to_save)."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_bert(root / "base")
    merged = [make_lora(base, root / f"ad{i}", seed=10 + i) for i in range(3)]
    return {"root": root, "base": base, "ads": [root / f"ad{i}" for i in range(3)], "merged": merged}


def _state(ck: AdaptedCheckpoint) -> dict[str, torch.Tensor]:
    return {n: ck.read(n) for n in ck.names()}


def _assert_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: dict[str, float] = FP32_VS_LIBRARY) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].to(want[k].dtype), want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# -- reading: the adapted model equals peft's merge_and_unload ------------------------------------------
def test_adapted_checkpoint_is_peft_merge_and_unload(bert: dict) -> None:
    with adapted(open_checkpoint(bert["base"]), bert["ads"][0]) as ck:
        assert ck.kind == "adapter"
        assert sorted(ck.adapted) == [f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]
        assert sorted(ck.replaced) == ["classifier.bias", "classifier.weight"]
        _assert_state_close(_state(ck), bert["merged"][0])
        # a tensor the adapter leaves alone is the base's, the same stored tensor
        assert ck.identity("bert.embeddings.word_embeddings.weight") == open_checkpoint(bert["base"]).identity("bert.embeddings.word_embeddings.weight")
        assert ck.identity("bert.encoder.layer.0.attention.self.query.weight") is None


@pytest.mark.parametrize("config", [
    {"use_rslora": True},
    {"rank_pattern": {"value": 2}, "alpha_pattern": {"layer.1.attention.self.query": 32}},
    {"target_modules": ["query", "key", "dense"], "bias": "all"},
    {"target_modules": ["word_embeddings", "query"]},
], ids=["rslora", "rank-alpha-patterns", "bias-all", "embedding"])
def test_lora_variants_read_as_peft_merges_them(tmp_path: Path, config: dict) -> None:
    base = tiny_bert(tmp_path / "base")
    want = make_lora(base, tmp_path / "ad", seed=3, **config)
    with adapted(open_checkpoint(base), tmp_path / "ad") as ck:
        _assert_state_close(_state(ck), want)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    base = tiny_gpt2(tmp_path / "base")
    want = make_lora(base, tmp_path / "ad", seed=4, kind="gpt2", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    with adapted(open_checkpoint(base), tmp_path / "ad") as ck:
        got = _state(ck)
        want = {k: v for k, v in want.items() if k in got}  # transformers' state dict also lists the tied lm_head
        _assert_state_close(got, want)


def test_base_without_the_wrapper_prefix(tmp_path: Path) -> None:
    """An adapter trained on BertForSequenceClassification ('bert.encoder...') applied to a BertModel folder ('encoder...')."""
    base = tiny_bert(tmp_path / "cls")
    body = tmp_path / "body"
    load_model(base).bert.save_pretrained(body)
    want = make_lora(base, tmp_path / "ad", seed=5, modules_to_save=None, task_type=None)
    with adapted(open_checkpoint(body), tmp_path / "ad") as ck:
        assert any("matched to the base's by dropping 1 leading part" in n for n in ck.notes)
        got = _state(ck)
        for k, v in got.items():
            torch.testing.assert_close(v.to(torch.float32), want["bert." + k], **FP32_VS_LIBRARY)


# -- refusals -----------------------------------------------------------------------------------------
def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _copy(bert: dict, tmp_path: Path, i: int = 0) -> Path:
    dst = tmp_path / f"ad{i}"
    shutil.copytree(bert["ads"][i], dst)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "is a DoRA adapter"),
    ({"peft_type": "LOHA"}, "is a LOHA adapter; modelsoup reads LoRA adapters only"),
    ({"lora_bias": True}, "LoRA with a bias on lora_B"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer replication"),
    ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights = 'pissa_niter_4', which changes the base weights"),
    ({"brand_new_option": {"x": 1}}, "sets 'brand_new_option', LoRA option(s) modelsoup does not know"),
    ({"r": 8}, "the factors have rank 4 but adapter_config.json gives r = 8"),
    ({"rank_pattern": {"query": 2}}, "(rank_pattern 'query'); the scaling alpha/r would be wrong"),
    ({"lora_alpha": "eight"}, "lora_alpha = \"eight\", expected a positive number"),
    ({"rank_pattern": {"(": 2}}, "is not a valid pattern as peft matches it"),
], ids=["dora", "loha", "lora-bias", "replication", "alora", "pissa", "unknown", "rank", "rank-pattern", "alpha", "bad-regex"])
def test_adapter_configs_refused(bert: dict, tmp_path: Path, changes: dict, message: str) -> None:
    ad = _copy(bert, tmp_path)
    _edit_config(ad, **changes)
    with pytest.raises(AdapterError, match="ad0: ") as e:
        with adapted(open_checkpoint(bert["base"]), ad):
            pass
    assert message in str(e.value)


def _edit_tensors(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    path = folder / "adapter_model.safetensors"
    tensors = fn(load_file(path))
    save_file(tensors, path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t | {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector": torch.ones(16)}, "is a DoRA magnitude vector"),
    (lambda t: {k: v for k, v in t.items() if "layer.1.attention.self.value.lora_B" not in k}, "has lora_A.weight but not lora_B.weight"),
    (lambda t: t | {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 16, 1, 1)}, "not on convolutions"),
    (lambda t: t | {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(16, 3)}, "the factors do not fit"),
    (lambda t: t | {"base_model.model.bert.encoder.layer.9.attention.self.query.lora_A.weight": torch.zeros(4, 16),
                    "base_model.model.bert.encoder.layer.9.attention.self.query.lora_B.weight": torch.zeros(16, 4)}, "which the base does not have"),
    (lambda t: t | {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 12)}, "makes a delta of shape [16, 12]"),
    (lambda t: t | {"base_model.model.classifier.weight": torch.zeros(3, 16)}, "full tensor 'classifier.weight' is float32 [3, 16]"),
    (lambda t: t | {"base_model.model.bert.pooler.dense.hada_w1_a": torch.zeros(2, 2)}, "a kind modelsoup does not merge ('hada_w1_a')"),
], ids=["dora-tensor", "half-pair", "conv", "rank-mismatch", "unknown-module", "wrong-shape", "head-shape", "loha-tensor"])
def test_adapter_tensors_refused(bert: dict, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, edit)
    with pytest.raises(AdapterError) as e:
        with adapted(open_checkpoint(bert["base"]), ad):
            pass
    assert message in str(e.value)


def test_head_in_modules_to_save_needs_a_base_with_that_head(bert: dict, tmp_path: Path) -> None:
    body = tmp_path / "body"
    load_model(bert["base"]).bert.save_pretrained(body)
    with pytest.raises(AdapterError, match=r"changes 'classifier\.(weight|bias)', which the base does not have.*AutoModelForSequenceClassification"):
        with adapted(open_checkpoint(body), bert["ads"][0]):
            pass


def test_broken_adapter_folders(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    (ad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        open_adapter(ad)
    ad = _copy(bert, tmp_path, 1)
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors or adapter_model.bin; the adapter is incomplete"):
        open_adapter(ad)
    ad = _copy(bert, tmp_path, 2)
    (ad / "adapter_model.safetensors").unlink()
    (ad / "adapter_model.safetensors").symlink_to(bert["base"] / "model.safetensors")
    with pytest.raises(Exception, match="outside the model folder"):
        open_adapter(ad)


def test_an_adapter_is_still_refused_where_a_model_is_expected(bert: dict) -> None:
    with pytest.raises(AdapterInputError):
        open_checkpoint(bert["ads"][0])


# -- merges into a full model -------------------------------------------------------------------------
def _out_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_uniform_soup_of_adapters_is_base_plus_mean_delta(bert: dict, tmp_path: Path) -> None:
    merge(models=[str(a) for a in bert["ads"]], base=str(bert["base"]), output=tmp_path / "soup")
    got = _out_state(tmp_path / "soup")
    for k, v in got.items():
        want = sum(m[k].double() for m in bert["merged"]) / 3
        torch.testing.assert_close(v.double(), want, rtol=0, atol=1e-6)
    base = load_file(bert["base"] / "model.safetensors")
    untouched = [k for k in got if "query" not in k and "value" not in k and "classifier" not in k]
    assert untouched and all(torch.equal(got[k], base[k]) for k in untouched)  # copied, bit for bit
    rec = (tmp_path / "soup" / "recipe.yaml").read_text()
    assert "adapter: ../../" in rec or "adapter: " in rec
    manifest = json.loads((tmp_path / "soup" / "soup_manifest.json").read_text())
    assert any("adapter_model.safetensors" in json.dumps(i) for i in manifest["inputs"])
    # the written folder loads with from_pretrained and computes the averaged model
    model = load_model(tmp_path / "soup")
    ref = load_model(bert["base"])
    ref.load_state_dict({k: sum(m[k] for m in bert["merged"]) / 3 for k in bert["merged"][0]})
    x = torch.randint(0, 60, (3, 7))
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, **MODEL_OUTPUT)


def test_task_arithmetic_and_ties_on_adapter_deltas(bert: dict, tmp_path: Path) -> None:
    merge(models=[str(a) for a in bert["ads"][:2]], base=str(bert["base"]), method="task_arithmetic", weights=[0.7, 0.5], output=tmp_path / "ta")
    got = _out_state(tmp_path / "ta")
    base = load_file(bert["base"] / "model.safetensors")
    for k, v in got.items():
        want = base[k].double() + 0.7 * (bert["merged"][0][k].double() - base[k].double()) + 0.5 * (bert["merged"][1][k].double() - base[k].double())
        torch.testing.assert_close(v.double(), want, rtol=0, atol=1e-6)
    merge(models=[str(a) for a in bert["ads"]], base=str(bert["base"]), method="ties", parameters={"density": 1.0}, output=tmp_path / "ties")
    merge(models=[{"path": str(bert["base"]), "adapter": str(a)} for a in bert["ads"]], base=str(bert["base"]), method="ties",
          parameters={"density": 1.0}, output=tmp_path / "ties2")
    assert _out_state(tmp_path / "ties").keys() == _out_state(tmp_path / "ties2").keys()
    assert all(torch.equal(a, b) for a, b in zip(_out_state(tmp_path / "ties").values(), _out_state(tmp_path / "ties2").values()))


def test_full_fine_tunes_and_adapters_in_one_recipe(bert: dict, tmp_path: Path) -> None:
    full = tmp_path / "full"
    model = load_model(bert["base"])
    model.load_state_dict(bert["merged"][2])
    model.save_pretrained(full)
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(f"method: linear\nbase: {bert['base']}\nmodels:\n  - {bert['ads'][0]}\n  - path: {bert['base']}\n    adapter: {bert['ads'][1]}\n"
                      f"  - {full}\n")
    merge(recipe, tmp_path / "mixed")
    got = _out_state(tmp_path / "mixed")
    for k, v in got.items():
        torch.testing.assert_close(v.double(), sum(m[k].double() for m in bert["merged"]) / 3, rtol=0, atol=1e-6)


def test_mergekit_model_plus_lora(bert: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "mk.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {bert['base']}+{a}\n    parameters: {{weight: 1.0}}\n" for a in bert["ads"])
                      + "dtype: float32\n")
    merge(recipe, tmp_path / "mk")
    merge(models=[str(a) for a in bert["ads"]], base=str(bert["base"]), output=tmp_path / "native")
    a, b = _out_state(tmp_path / "mk"), _out_state(tmp_path / "native")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_adapters_need_their_base(bert: dict, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"models\[0\].path: '.*ad0' is a PEFT adapter: it changes a model, so give the model it was trained on as `base:`"):
        merge(models=[str(a) for a in bert["ads"]], output=tmp_path / "x")
    with pytest.raises(RecipeError, match="is a PEFT adapter, not a model; the base must be the full model"):
        merge(models=[str(bert["base"])], base=str(bert["ads"][0]), output=tmp_path / "x")
    with pytest.raises(RecipeError, match="`adapter:` is a PEFT LoRA adapter folder"):
        merge(models=[{"path": str(bert["base"]), "adapter": str(bert["base"])}], output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_output_never_replaces_an_adapter(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    before = (ad / "adapter_model.safetensors").read_bytes()
    with pytest.raises(Exception, match="input"):
        merge(models=[str(ad)], base=str(bert["base"]), output=ad, overwrite=True)
    assert (ad / "adapter_model.safetensors").read_bytes() == before


def test_peft_model_logits_match_the_merged_single_adapter(bert: dict, tmp_path: Path) -> None:
    merge(models=[str(bert["ads"][0])], base=str(bert["base"]), output=tmp_path / "one")
    x = torch.randint(0, 60, (2, 5))
    torch.testing.assert_close(load_model(tmp_path / "one")(input_ids=x).logits, peft_model(bert["base"], bert["ads"][0])(input_ids=x).logits,
                               **MODEL_OUTPUT)


# -- soups with data over adapters ------------------------------------------------------------------------
def _evaluator(base: Path):  # type: ignore[no-untyped-def]
    from modelsoup.eval import ClassificationEvaluator

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 60, (24, 8), generator=g)
    y = torch.randint(0, 2, (24,), generator=g)
    batches = [{"input_ids": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 24, 8)]
    return ClassificationEvaluator(load_model(base), batches, progress=False)


def test_greedy_and_cook_over_adapters_swap_only_adapted_tensors(bert: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry, cook
    from modelsoup.recipes import pantry as pantry_module

    ev = _evaluator(bert["base"])
    reads: list[str] = []
    real = pantry_module.SoupState.__getitem__

    def counting(self, name):  # type: ignore[no-untyped-def]
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(pantry_module.SoupState, "__getitem__", counting)
    with Pantry([str(a) for a in bert["ads"]], base=str(bert["base"]), cache=EvalCache(enabled=False)) as pantry:
        first = pantry.score(0, ev)
        n_all = len(reads)
        reads.clear()
        pantry.score(1, ev)
        assert sorted(set(reads)) == sorted([f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]
                                            + ["classifier.bias", "classifier.weight"])  # 6 of the model's tensors, not all of them
        assert n_all > 3 * len(reads)
        # each score is the score of the merged adapted model, as a fresh evaluator sees it
        fresh = _evaluator(bert["base"])
        fresh.module.load_state_dict(bert["merged"][0])
        assert fresh.evaluate({k: v for k, v in bert["merged"][0].items()}).value == first.value
        res = cook(pantry, ev, recipes=["uniform", "greedy"], output=tmp_path / "cooked", calibrate=False, progress=False)
    uniform = load_file(next((tmp_path / "cooked").rglob("uniform*/model.safetensors")))
    for k, v in uniform.items():
        torch.testing.assert_close(v.double(), sum(m[k].double() for m in bert["merged"]) / 3, rtol=0, atol=1e-6)
    assert "greedy" in res.to_markdown()


def test_pantry_refuses_an_adapter_without_base(bert: dict) -> None:
    from modelsoup.errors import OptionError
    from modelsoup.recipes import Pantry

    with pytest.raises(OptionError, match="is a PEFT adapter; give the model it was trained on"):
        Pantry([str(bert["ads"][0])])


def test_skipped_tensors_are_reloaded_after_an_in_place_change(bert: dict) -> None:
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry

    ev = _evaluator(bert["base"])
    with Pantry([str(a) for a in bert["ads"]], base=str(bert["base"]), cache=EvalCache(enabled=False)) as pantry:
        s0 = pantry.score(0, ev).value
        with torch.no_grad():
            ev.module.bert.embeddings.word_embeddings.weight.mul_(0)  # someone changes an untouched tensor in place
        _, state = pantry.soup([0])
        assert ev.evaluate(state).value == s0


def test_inspect_on_adapters_compares_their_deltas(bert: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelsoup.cli import main

    rc = main(["inspect", *map(str, bert["ads"][:2]), "--base", str(bert["base"]), "-o", str(tmp_path / "insp"), "--no-progress", "--no-plots"])
    assert rc == 0, capsys.readouterr().err
    total = json.loads((tmp_path / "insp" / "inspect.json").read_text())["result"]["total"]
    # the task-vector cosine is the cosine of the two adapted models' changes (the adapters' deltas and heads), over every tensor
    base = load_file(bert["base"] / "model.safetensors")
    d = [{k: m[k].double() - base[k].double() for k in base} for m in bert["merged"][:2]]
    dot = sum(float((d[0][k] * d[1][k]).sum()) for k in base)
    norms = [sum(float((x[k] ** 2).sum()) for k in base) ** 0.5 for x in d]
    assert abs(total["task_cosine"][0][1] - dot / (norms[0] * norms[1])) < 1e-5
    assert abs(total["task_norm"][0] - norms[0]) < 1e-4
    assert 0 < total["sign_conflicts"][0][1] < 1
    assert main(["inspect", *map(str, bert["ads"][:2]), "--no-progress"]) == 2
    assert "give the model it was trained on (--base BASE)" in capsys.readouterr().err


def test_soups_of_adapters_written_as_adapters(bert: dict, tmp_path: Path) -> None:
    from modelsoup.eval.cache import EvalCache
    from modelsoup.errors import OptionError
    from modelsoup.recipes import Pantry, cook

    ev = _evaluator(bert["base"])
    with Pantry([str(a) for a in bert["ads"]], base=str(bert["base"]), cache=EvalCache(enabled=False)) as pantry:
        res = cook(pantry, ev, recipes=["uniform", "greedy", "learned"], output=tmp_path / "cooked", calibrate=False, progress=False,
                   as_adapter="cat", learned_options={"by": "tensor", "epochs": 2})
        for name in ("uniform", "greedy", "learned"):
            folder = tmp_path / "cooked" / name
            assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
            # the adapter computes the very soup that was scored: the full merge of its recipe
            merge(res.recipes[name], tmp_path / f"full-{name}")
            torch.testing.assert_close(peft_model(bert["base"], folder)(input_ids=torch.arange(12).view(2, 6)).logits,
                                       load_model(tmp_path / f"full-{name}")(input_ids=torch.arange(12).view(2, 6)).logits, **MODEL_OUTPUT)
        with pytest.raises(OptionError, match="rank is the output rank"):
            cook(pantry, ev, recipes=["uniform"], output=tmp_path / "x", as_adapter="cat", rank=2)
    # an adapter soup's recipe.yaml re-runs: as the same adapter, or as the full model it stands for
    from modelsoup.cli import main

    rec = tmp_path / "cooked" / "learned" / "recipe.yaml"
    assert main(["merge", str(rec), str(tmp_path / "again"), "--as-adapter", "cat", "--no-progress"]) == 0
    a, b = load_file(tmp_path / "cooked" / "learned" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["merge", str(rec), str(tmp_path / "again-full"), "--no-progress"]) == 0
    assert all(torch.equal(x, y) for x, y in zip(load_file(tmp_path / "again-full" / "model.safetensors").values(),
                                                  load_file(tmp_path / "full-learned" / "model.safetensors").values()))
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "full-uniform", full)
    with Pantry([str(bert["ads"][0]), str(full)], base=str(bert["base"]), cache=EvalCache(enabled=False)) as mixed:
        with pytest.raises(OptionError, match="every ingredient is an adapter; full is a full model"):
            cook(mixed, ev, recipes=["uniform"], output=tmp_path / "y", as_adapter="svd")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_learned_soup_of_adapters_by_layer(bert: dict) -> None:
    """One coefficient per adapter and layer: the tensors of one layer share theirs; only adapted tensors are learned."""
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry, learned_soup

    ev = _evaluator(bert["base"])
    with Pantry([str(a) for a in bert["ads"]], base=str(bert["base"]), cache=EvalCache(enabled=False)) as pantry:
        res = learned_soup(pantry, ev, by="layer", epochs=2, lr=0.5)
    w = res.weights
    assert sorted(w) == sorted([f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]
                               + ["classifier.bias", "classifier.weight"])
    assert all(len(v) == 3 and abs(sum(v) - 1) < 1e-6 for v in w.values())
    for i in (0, 1):
        assert w[f"bert.encoder.layer.{i}.attention.self.query.weight"] == w[f"bert.encoder.layer.{i}.attention.self.value.weight"]
    assert res.history[-1]["epoch"] == 2


def test_learned_soup_layer_groups() -> None:
    from modelsoup.recipes.learned import _groups

    names = ["model.layers.0.q.weight", "model.layers.0.v.weight", "model.layers.1.q.weight", "lm_head.weight", "model.norm.weight",
             "model.layers.10.q.weight", "model.layers.1.v.weight"]
    assert _groups(names) == [0, 0, 1, 2, 3, 4, 1]

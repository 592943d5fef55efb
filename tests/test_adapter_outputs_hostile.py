"""Hostile tests of the adapter OUTPUTS (merge_adapters cat/svd/linear, recipe_adapter, extract_lora).

Every written adapter is judged by what peft makes of it: ``PeftModel.from_pretrained(base, OUT).merge_and_unload()``
must hold the weights the output claims (the full-model merge of the same soup, the fine-tune, the input adapter).
The first section pins bugs a red-team pass found (each fixed; its docstring says what went wrong before the fix);
the second pins cases that behaved from the start.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from modelsoup import merge
from modelsoup.adapters import extract_lora, merge_adapters, recipe_adapter
from modelsoup.cli import main
from modelsoup.errors import AdapterError, OptionError, SoupError
from modelsoup.io import open_checkpoint
from modelsoup.io.adapters import adapted

from .lora_fixtures import load_model, make_lora, quiet, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 2e-5


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile-out")
    base = tiny_bert(root / "base")
    make_lora(base, root / "a0", seed=1)  # query, value, classifier saved whole
    make_lora(base, root / "a1", seed=2, r=2, lora_alpha=3)
    make_lora(base, root / "qk", seed=3, target_modules=["query", "key"], modules_to_save=None)  # key only here, no head
    make_lora(base, root / "rs", seed=4, use_rslora=True, rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 5})
    make_lora(base, root / "emb", seed=5, target_modules=["word_embeddings", "query"])
    gbase = tiny_gpt2(root / "gbase")
    make_lora(gbase, root / "g0", seed=6, kind="gpt2", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    make_lora(gbase, root / "g1", seed=7, kind="gpt2", target_modules=["c_attn"], fan_in_fan_out=True, r=2)
    return {"root": root, "base": base, "gbase": gbase}


def _peft_weights(base: Path, adapter: Path, kind: str = "bert") -> dict[str, torch.Tensor]:
    """What peft makes of ``adapter`` on ``base``: the merge_and_unload state dict."""
    with quiet():
        pm = peft.PeftModel.from_pretrained(load_model(base, kind), adapter).eval()
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _dense(lab: dict, ads: list[str], out: Path, kind: str = "bert", **kw) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    base = lab["gbase" if kind == "gpt2" else "base"]
    merge(models=[str(lab["root"] / a) for a in ads], base=str(base), output=out, **kw)
    return {k: v.detach().clone() for k, v in load_model(out, kind).state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    bad = [k for k in want if k in got and not torch.allclose(got[k].float(), want[k].float(), rtol=1e-4, atol=atol)]
    assert not bad, f"{len(bad)} tensor(s) differ, e.g. {bad[:4]}"


# ================================================================================================
# found by the red-team pass of the outputs; each was a bug, fixed
# ================================================================================================

def test_linear_of_a_single_adapter_is_that_adapter(lab: dict, tmp_path: Path) -> None:
    """--as-adapter linear with the default (normalised) linear method divided the factor-wise sums by the sum of
    the weights sqrt(w*s), which cancelled each adapter's scaling s: one adapter 'merged' came out as B@A instead of
    s*B@A (here s = 2), exit 0. Now the factor-wise combination takes the weights as given (peft's convention,
    default 1/n). Copies of one adapter show what factor-wise averaging is (documented, not the mean of the
    updates): with weights 1/2 each, A and B each grow by sqrt(2), so the update doubles."""
    ad = lab["root"] / "a0"
    merge_adapters([ad], tmp_path / "lin", base=lab["base"], combination="linear")
    _assert_same(_peft_weights(lab["base"], tmp_path / "lin"), _peft_weights(lab["base"], ad))
    merge_adapters([ad, ad], tmp_path / "lin2", base=lab["base"], combination="linear")
    base = load_model(lab["base"]).state_dict()
    one, two = _peft_weights(lab["base"], ad), _peft_weights(lab["base"], tmp_path / "lin2")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(two[name] - base[name], 2 * (one[name] - base[name]), rtol=1e-4, atol=ATOL)


@pytest.fixture(scope="module")
def saved_layer(lab: dict) -> Path:
    """A real peft adapter saved with save_embedding_layers=True: its file holds the embedding layer's own weight
    (base_layer.weight, e.g. rows of added tokens initialised), and the LoRA delta adds to that, not to the base's."""
    model = load_model(lab["base"])
    with quiet():
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"],
                                                        modules_to_save=["classifier"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.base_model.model.bert.embeddings.word_embeddings.base_layer.weight[-5:] = torch.randn(5, 16, generator=g)
    out = lab["root"] / "saved-layer"
    with quiet():
        pm.save_pretrained(out, save_embedding_layers=True)
    return out


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_combining_keeps_an_adapters_saved_layer_weight(lab: dict, saved_layer: Path, tmp_path: Path, combination: str) -> None:
    """modelsoup reads such an adapter right (W = saved layer weight + delta, as peft), but cat/svd write only the
    factors: the saved embedding weight is dropped, so the output adapter silently computes another model."""
    want = _peft_weights(lab["base"], saved_layer)
    merge_adapters([saved_layer], tmp_path / "o", base=lab["base"], combination=combination, **({"rank": 16} if combination == "svd" else {}))
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), want)


@pytest.mark.parametrize("method, ads", [("karcher", ["a0", "a1"]), ("arcee_fusion", ["a0"])])
def test_svd_with_a_method_that_is_not_translation_invariant(lab: dict, tmp_path: Path, method: str, ads: list[str]) -> None:
    """svd applies the method to the deltas with a zero base; for karcher (no base: a mean on the sphere of the full
    weights) and arcee_fusion (importance from the full weights) that is not the merge of the models, so
    `soup merge --base B ... --method karcher --as-adapter svd` at full rank differs from the same merge written as a
    full model, exit 0. Want: the same model, or a refusal."""
    try:
        merge_adapters([lab["root"] / a for a in ads], tmp_path / "o", base=lab["base"], combination="svd", method=method, rank=16)
    except (OptionError, AdapterError):
        return
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), _dense(lab, ads, tmp_path / "dense", method=method))


@pytest.mark.parametrize("method, params", [("slerp", {"t": 0.3}), ("model_stock", None)])
def test_svd_with_a_weightless_method_is_not_refused_for_weights_never_given(lab: dict, tmp_path: Path, method: str, params: dict | None) -> None:
    """merge_adapters fills in weights [1, 1] when none are given, so every method that takes no weights (slerp,
    model_stock, ema) is refused with 'slerp takes no weights' although the user gave none (the full merge works).
    Want: the merge (equal to the full merge at full rank) or a refusal that says what is really wrong."""
    ads = ["a0", "a1"]
    try:
        merge_adapters([lab["root"] / a for a in ads], tmp_path / "o", base=lab["base"], combination="svd", method=method, parameters=params, rank=16)
    except SoupError as e:
        assert "takes no weights" not in str(e), f"refused for weights the user never gave: {e}"
        return
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), _dense(lab, ads, tmp_path / "dense", method=method, parameters=params))


def test_svd_random_method_draws_the_masks_of_the_full_merge(lab: dict, tmp_path: Path) -> None:
    """(Low severity.) With one seed, a random method (dare_ties) through svd draws its masks from
    tensor_seed(seed, module name) while the full merge uses tensor_seed(seed, tensor name) (and the (out, in) layout
    even for Conv1D), so `--as-adapter svd` at full rank is not the full merge with the same --seed."""
    ads, p = ["a0", "a1"], {"density": 0.5}
    merge_adapters([lab["root"] / a for a in ads], tmp_path / "o", base=lab["base"], combination="svd", method="dare_ties", parameters=p, rank=16, seed=0)
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), _dense(lab, ads, tmp_path / "dense", method="dare_ties", parameters=p, seed=0))


# -- recipe_adapter (cook/greedy/learn --as-adapter) --------------------------------------------------
def _recipe(lab: dict, extra: str):  # type: ignore[no-untyped-def]
    from modelsoup.recipe import recipe_from_yaml_text

    r = lab["root"]
    return recipe_from_yaml_text(f"method: linear\nbase: {r}/base\nmodels:\n  - {r}/a0\n  - {r}/a1\n" + extra)


@pytest.mark.parametrize("override", ["  - match: '*query*'\n    take: base\n", "  - match: '*query.weight'\n    parameters: {normalize: false}\n"],
                         ids=["take-base", "per-tensor-normalize"])
def test_recipe_adapter_honours_overrides(lab: dict, tmp_path: Path, override: str) -> None:
    """Before the fix recipe_adapter planned the merge without the base, so `take: base` on adapted weights fell back
    to `merge` (the adapter carried the soup's query delta while modelsoup.merge keeps the base's query), and it read
    `normalize` from the top-level parameters only, so a `normalize: false` override on '*query.weight' (weights 1, 1:
    the full merge gives W0 + W1, the base counted twice) was written as base + mean delta, exit 0. Want: the full
    merge's weights, or a refusal."""
    rec = _recipe(lab, "overrides:\n" + override)
    try:
        recipe_adapter(rec, tmp_path / "o")
    except OptionError:
        return
    merge(rec, tmp_path / "dense")
    want = {k: v.detach() for k, v in load_model(tmp_path / "dense").state_dict().items()}
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), want)


def test_recipe_adapter_refuses_take_skip(lab: dict, tmp_path: Path) -> None:
    """`take: skip` on classifier.weight: the job is gone, recipe_adapter writes classifier.bias alone with
    modules_to_save ['classifier'], and PeftModel.from_pretrained crashes (KeyError 'base_model.model.classifier.weight').
    An adapter cannot leave a tensor out of the model: refuse."""
    rec = _recipe(lab, "overrides:\n  - match: 'classifier.weight'\n    take: skip\n")
    with pytest.raises(OptionError):
        recipe_adapter(rec, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -- extract_lora -----------------------------------------------------------------------------------
def _save(model: torch.nn.Module, path: Path) -> Path:
    with quiet():
        model.save_pretrained(path)
    return path


def _nudge(model: torch.nn.Module, which, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if which(n):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _extract_and_load(ft: Path, base: Path, cls, out: Path) -> dict[str, torch.Tensor] | None:  # type: ignore[no-untyped-def]
    """extract at full rank; None if refused with a named error; else peft's merged weights of the output."""
    try:
        extract_lora(ft, out, base=base, rank=64)
    except (AdapterError, OptionError):
        assert not out.exists()
        return None
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(cls.from_pretrained(base).eval(), out)  # must load
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def test_extract_when_only_biases_changed_loads_in_peft(lab: dict, tmp_path: Path) -> None:
    """Only biases (and LayerNorms) changed: every changed module is saved whole, target_modules is [], and
    PeftModel.from_pretrained raises NoMatchingPeftModuleError on the written adapter (extract exits 0)."""
    ft = _save(_nudge(load_model(lab["base"]), lambda n: n.endswith("bias")), tmp_path / "ft")
    got = _extract_and_load(ft, lab["base"], transformers.BertForSequenceClassification, tmp_path / "ex")
    if got is not None:
        _assert_same(got, {k: v.detach() for k, v in load_model(ft).state_dict().items()})


def _neo(tmp_path: Path) -> tuple[Path, object]:
    cfg = transformers.GPTNeoConfig(vocab_size=60, hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
                                    max_position_embeddings=32, intermediate_size=32)
    torch.manual_seed(0)
    return _save(transformers.GPTNeoForCausalLM(cfg), tmp_path / "neo-base"), cfg


@pytest.mark.parametrize("emb", ["wpe", "wte"])
def test_extract_from_an_embedding_not_named_embed(tmp_path: Path, emb: str) -> None:
    """GPT-Neo (nn.Linear, not Conv1D) names its embeddings wte / wpe: the 'embed' name test misses them, so they are
    written as lora_A.weight / lora_B.weight of a linear layer. peft makes them LoRA Embedding layers, finds its
    lora_embedding_A/B missing and silently leaves them unchanged (wte is moreover tied to lm_head). modelsoup's own
    adapted() reads the file as the fine-tune, peft does not. Want: peft's model is the fine-tune, or a refusal."""
    base, cfg = _neo(tmp_path)
    torch.manual_seed(0)
    ft_model = _nudge(transformers.GPTNeoForCausalLM(cfg), lambda n: emb in n or "q_proj" in n)
    ft = _save(ft_model, tmp_path / "ft")
    got = _extract_and_load(ft, base, transformers.GPTNeoForCausalLM, tmp_path / "ex")
    if got is not None:
        _assert_same(got, {k: v.detach() for k, v in ft_model.state_dict().items()})


def test_extract_masked_lm_head_loads_in_peft(tmp_path: Path) -> None:
    """BERT MLM fine-tune whose head changed (transform.dense and the prediction bias): 'cls.predictions' goes into
    modules_to_save (for its bias, with only that bias saved) while 'cls.predictions.transform.dense' is a LoRA target
    inside it; PeftModel.from_pretrained fails on the written adapter (NoMatchingPeftModuleError here; KeyError
    'base_model.model.cls.predictions.transform.dense.weight' when encoder layers changed too)."""
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    base = _save(transformers.BertForMaskedLM(cfg), tmp_path / "mlm-base")
    torch.manual_seed(0)
    ft_model = _nudge(transformers.BertForMaskedLM(cfg), lambda n: n.startswith("cls.predictions") and "decoder.weight" not in n)
    ft = _save(ft_model, tmp_path / "ft")
    got = _extract_and_load(ft, base, transformers.BertForMaskedLM, tmp_path / "ex")
    if got is not None:
        _assert_same(got, {k: v.detach() for k, v in ft_model.state_dict().items()})


# ================================================================================================
# Cases that behaved from the start
# ================================================================================================

@pytest.mark.parametrize("ads, combination, kw", [
    (["a0", "qk"], "cat", {}),                        # different target modules; a head in one adapter only
    (["a0", "qk"], "svd", {"rank": 16}),
    (["a0", "rs"], "cat", {}),                        # rslora + rank_pattern + alpha_pattern
    (["a0", "rs"], "svd", {"rank": 16}),
    (["emb", "a0"], "cat", {}),                       # embedding LoRA
    (["emb", "a0"], "svd", {"rank": 16}),
    (["a0", "a1"], "cat", {"weights": [1.5, -0.5]}),  # negative weights
    (["a0", "a1"], "svd", {"weights": [1.5, -0.5], "rank": 6}),
    (["a0"], "cat", {}),                              # a single adapter
])
def test_outputs_compute_the_full_merge(lab: dict, tmp_path: Path, ads: list[str], combination: str, kw: dict) -> None:
    merge_adapters([lab["root"] / a for a in ads], tmp_path / "o", base=lab["base"], combination=combination, **kw)
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    dense_kw = {"weights": kw["weights"]} if "weights" in kw else {}
    _assert_same(_peft_weights(lab["base"], tmp_path / "o"), _dense(lab, ads, tmp_path / "dense", **dense_kw))


@pytest.mark.parametrize("combination, kw", [("cat", {}), ("svd", {"rank": 6})])
def test_gpt2_conv1d_outputs_compute_the_full_merge(lab: dict, tmp_path: Path, combination: str, kw: dict) -> None:
    merge_adapters([lab["root"] / "g0", lab["root"] / "g1"], tmp_path / "o", base=lab["gbase"], combination=combination, **kw)
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    _assert_same(_peft_weights(lab["gbase"], tmp_path / "o", "gpt2"), _dense(lab, ["g0", "g1"], tmp_path / "dense", kind="gpt2"))


def test_zero_sum_weights_and_bad_outputs_are_refused_cleanly(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ads = [lab["root"] / "a0", lab["root"] / "a1"]
    for combination in ("cat", "svd"):  # the factor-wise linear takes weights as given (peft's convention): nothing to normalise
        with pytest.raises(SoupError, match="sum to zero"):
            merge_adapters(ads, tmp_path / "z", base=lab["base"], combination=combination, weights=[1, -1])
    assert not (tmp_path / "z").exists()
    rc = main(["merge", "--base", str(lab["base"]), *map(str, ads), "--as-adapter", "cat", "--weights", "1,-1", "-o", str(tmp_path / "z"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and not (tmp_path / "z").exists()
    for out in (ads[0], lab["base"] / "sub", ads[1] / "x"):  # an input, inside the base, inside an adapter
        with pytest.raises(SoupError):
            merge_adapters(ads, out, base=lab["base"])
    assert not (lab["base"] / "sub").exists() and not (ads[1] / "x").exists()
    res = merge_adapters(ads, tmp_path / "big", base=lab["base"], combination="svd", rank=1000)  # capped at what the weights allow
    assert res.rank == 16 and res.worst_error < 1e-6


def test_extract_refusals_and_bf16(lab: dict, tmp_path: Path) -> None:
    # GPT-2's Conv1D layers (weights stored (in, out)) were refused; the model's own layer types now say how to extract
    gft_model = _nudge(load_model(lab["gbase"], "gpt2"), lambda n: ".attn." in n or ".mlp." in n, scale=0.05)
    gft = _save(gft_model, tmp_path / "gft")
    got = _extract_and_load(gft, lab["gbase"], transformers.GPT2LMHeadModel, tmp_path / "gex")
    assert got is not None
    _assert_same(got, {k: v.detach() for k, v in gft_model.state_dict().items()})
    with adapted(open_checkpoint(lab["gbase"]), tmp_path / "gex") as ck:  # and modelsoup reads it back as the fine-tune
        _assert_same({n: ck.read(n) for n in ck.names()}, {k: v.detach() for k, v in gft_model.state_dict().items()})
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    other_vocab = _save(transformers.BertForSequenceClassification(cfg), tmp_path / "v64")
    with pytest.raises(SoupError, match="shape"):
        extract_lora(other_vocab, tmp_path / "x", base=lab["base"], rank=2)
    assert not (tmp_path / "x").exists()
    # bf16 base and fine-tune: the full-rank extract loads in peft and gives the fine-tune (to bf16 precision)
    bf_base = _save(load_model(lab["base"]).to(torch.bfloat16), tmp_path / "bf-base")
    ft_model = _nudge(load_model(lab["base"]).to(torch.bfloat16), lambda n: "attention.self" in n or "classifier" in n, scale=0.05)
    ft = _save(ft_model, tmp_path / "bf-ft")
    got = _extract_and_load(ft, bf_base, transformers.BertForSequenceClassification, tmp_path / "ex")
    assert got is not None
    _assert_same(got, {k: v.detach() for k, v in ft_model.state_dict().items()}, atol=2e-2)
    shutil.rmtree(tmp_path / "ex")

"""Hostile PEFT LoRA adapters: inputs where reading an adapter must either give exactly peft's
``merge_and_unload`` model or refuse with a named modelsoup error (never a wrong model with exit 0, a raw
Python exception, a hang, partial output or a modified input).

The first section pins bugs a red-team pass found (each fixed; its docstring says what went wrong before the fix);
the second pins refusals and agreements that held from the start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge
from modelsoup.errors import (
    AdapterError,
    CheckpointError,
    NonFiniteError,
    SoupError,
    UnsafeCheckpointError,
)
from modelsoup.io import open_checkpoint
from modelsoup.io.adapters import adapted, open_adapter

from .lora_fixtures import (
    load_model,
    make_lora,
    peft_model,
    quiet,
    tiny_bert,
    tiny_gpt2,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
TOL = {"rtol": 1e-5, "atol": 1e-5}


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    base = tiny_bert(root / "base")
    want = make_lora(base, root / "ad", seed=11)
    return {"root": root, "base": base, "ad": root / "ad", "want": want}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def _copy(bert: dict, tmp_path: Path, name: str = "ad") -> Path:
    dst = tmp_path / name
    shutil.copytree(bert["ad"], dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    path = folder / "adapter_model.safetensors"
    save_file(fn(load_file(path)), path)


def _peft_merged(model: torch.nn.Module, adapter: Path) -> dict[str, torch.Tensor]:
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapter).eval()
        merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _ours(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    with adapted(open_checkpoint(base), adapter) as ck:
        return {n: ck.read(n).to(torch.float32) for n in ck.names()}


def _assert_like_peft_or_refused(base: Path, adapter: Path, want: dict[str, torch.Tensor]) -> None:
    """The adapted model equals peft's merge, or the adapter is refused with a named AdapterError."""
    try:
        got = _ours(base, adapter)
    except AdapterError:
        return
    wrong = [k for k in got if k in want and not torch.allclose(got[k], want[k].to(torch.float32), **TOL)]
    assert not wrong, f"silently differs from peft's merge_and_unload in {wrong}"


def _seeded_lora(model: torch.nn.Module, out: Path, seed: int, **config: Any) -> dict[str, torch.Tensor]:
    """A peft LoRA of ``model`` with random factors saved at ``out``; returns peft's merged state dict."""
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(out)
        merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# == found by the red-team pass, fixed ============================================================================
@pytest.mark.parametrize("field", ["r", "lora_alpha", "rank_pattern"])
def test_huge_integer_r_or_alpha_is_refused_by_name(bert: dict, tmp_path: Path, field: str) -> None:
    """An integer too large for a float (JSON allows it) raises a raw OverflowError from math.isfinite before the fix."""
    ad = _copy(bert, tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    big = "1" * 400
    if field == "rank_pattern":
        cfg["rank_pattern"] = {"query": 7}
        text = json.dumps(cfg).replace('"query": 7', f'"query": {big}')
    else:
        cfg[field] = 7
        text = json.dumps(cfg).replace(f'"{field}": 7', f'"{field}": {big}')
    (ad / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match="expected a positive number"):
        open_adapter(ad)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_with_inline_flags_is_refused_by_name(bert: dict, tmp_path: Path, field: str) -> None:
    """'(?i)QUERY' compiles alone (so the validation passes) but not inside peft's '(.*\\.)?(KEY)$': a raw re.error before the fix."""
    ad = _copy(bert, tmp_path)
    _edit_config(ad, **{field: {"(?i)QUERY": 4}})
    with pytest.raises(AdapterError, match=field):
        open_adapter(ad)


def test_catastrophic_rank_pattern_does_not_hang(bert: dict, tmp_path: Path) -> None:
    """An 8-character rank_pattern key with exponential backtracking ('(.|..)+!') makes opening the adapter take
    minutes (about 2.5x longer per two characters of module name). It must be refused or finish promptly."""
    ad = _copy(bert, tmp_path)
    _edit_config(ad, rank_pattern={"(.|..)+!": 4})
    code = ("import sys\nfrom modelsoup.io.adapters import open_adapter\nfrom modelsoup.errors import SoupError\n"
            "try:\n    open_adapter(sys.argv[1])\nexcept SoupError as e:\n    print('refused', e)\n")
    try:
        subprocess.run([sys.executable, "-c", code, str(ad)], timeout=6, check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("opening an adapter whose rank_pattern key backtracks catastrophically hangs (no time or complexity bound)")


@pytest.mark.parametrize("value", [True, "false"], ids=["true", "string-false"])
def test_fan_in_fan_out_on_linear_layers_matches_peft(bert: dict, tmp_path: Path, value: object) -> None:
    """peft decides the transpose from the layer type (nn.Linear: never, Conv1D: always) whatever the config says;
    modelsoup transposes every delta when fan_in_fan_out is truthy, so BERT's square query/value weights get
    (B@A).T silently before the fix."""
    ad = _copy(bert, tmp_path)
    _edit_config(ad, fan_in_fan_out=value)
    want = _peft_merged(load_model(bert["base"]), ad)
    assert all(torch.allclose(want[k], bert["want"][k], **TOL) for k in want)  # peft ignores the flag
    _assert_like_peft_or_refused(bert["base"], ad, want)


def test_gpt2_adapter_on_conv1d_and_linear_layers_matches_peft(tmp_path: Path) -> None:
    """A real peft adapter of a GPT-2 classifier on attn.c_proj (Conv1D, transposed) and score (nn.Linear): peft saves
    fan_in_fan_out: false (the last layer it wrapped set it), so modelsoup leaves the square c_proj deltas untransposed
    and writes a wrong model with exit 0 before the fix."""
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=16, pad_token_id=0)
    torch.manual_seed(0)
    with quiet():
        transformers.GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
        model = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    want = _seeded_lora(model, tmp_path / "ad", seed=7, r=4, lora_alpha=8, target_modules=["attn.c_proj", "score"])
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    _assert_like_peft_or_refused(tmp_path / "base", tmp_path / "ad", want)


def test_full_tensors_that_collide_after_the_prefix_rewrite_are_refused(bert: dict, tmp_path: Path) -> None:
    """Two different full tensors ('bert.pooler.dense.weight', 'zzz.pooler.dense.weight') both map to the body
    model's 'pooler.dense.weight' when one leading part is dropped; before the fix the last one silently won."""
    body = tmp_path / "body"
    with quiet():
        load_model(bert["base"]).bert.save_pretrained(body)
    ad = _copy(bert, tmp_path)

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = {k: v for k, v in t.items() if "classifier" not in k}
        t["base_model.model.bert.pooler.dense.weight"] = torch.ones(16, 16)
        t["base_model.model.zzz.pooler.dense.weight"] = torch.full((16, 16), 7.0)
        return t

    _edit_tensors(ad, edit)
    with pytest.raises(AdapterError, match="pooler.dense.weight"), adapted(open_checkpoint(body), ad):
        pass


def test_stray_base_layer_tensor_of_an_unadapted_module_matches_peft(bert: dict, tmp_path: Path) -> None:
    """'bert.pooler.dense.base_layer.weight' where pooler.dense has no LoRA: peft ignores it on load (no such
    parameter), modelsoup silently replaces the pooler weight with it before the fix."""
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, lambda t: t | {"base_model.model.bert.pooler.dense.base_layer.weight": torch.zeros(16, 16)})
    want = _peft_merged(load_model(bert["base"]), ad)
    _assert_like_peft_or_refused(bert["base"], ad, want)


def test_lora_on_an_untied_lm_head_matches_peft(tmp_path: Path) -> None:
    """A plain peft LoRA on an untied lm_head: peft saves 'lm_head.base_layer.weight' (the base's own weight) next to
    the factors; modelsoup refuses it as 'both adapted by LoRA factors and saved whole; ambiguous' before the fix, though
    peft's meaning is exact (base_layer weight + scaling * B @ A)."""
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    with quiet():
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    want = make_lora(tmp_path / "base", tmp_path / "ad", seed=5, kind="gpt2", target_modules=["lm_head"])
    got = _ours(tmp_path / "base", tmp_path / "ad")
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], **TOL)


def test_lora_on_a_tied_lm_head_is_merged_or_refused_as_tied(gpt2: Path, tmp_path: Path) -> None:
    """GPT-2's lm_head is tied to transformer.wte (only wte is stored). peft merges an lm_head LoRA into the shared
    weight (so wte changes too). modelsoup refuses it saying the base 'does not have' lm_head.weight and suggesting
    a classifier head, which is wrong advice: the base has it, tied. Either merge as peft does or name the tie."""
    want = make_lora(gpt2, tmp_path / "ad", seed=3, kind="gpt2", target_modules=["lm_head"])
    try:
        got = _ours(gpt2, tmp_path / "ad")
    except AdapterError as e:
        why = str(e).replace(str(tmp_path), "")  # the label (a path under tmp_path) may itself say "tied"
        assert "tied" in why, f"refused with a misleading message: {e}"
        return
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], **TOL)


# == refusals and agreements that already work well ===========================================================
@pytest.mark.parametrize("text, message", [
    (lambda c: json.dumps(c).replace('"r": 4', '"r": NaN'), "r = NaN, expected a positive number"),
    (lambda c: json.dumps(c).replace('"r": 4', '"r": Infinity'), "r = Infinity, expected a positive number"),
    (lambda c: "\ufeff" + json.dumps(c), "is not valid JSON"),
    (lambda c: "[" * 100000 + "]" * 100000, "is not valid JSON"),
    (lambda c: "[1]", "holds a list, not an object"),
    (lambda c: json.dumps(c | {"r": 4.5}), "gives r = 4.5"),
    (lambda c: json.dumps(c | {"lora_alpha": 0}), "lora_alpha = 0, expected a positive number"),
    (lambda c: json.dumps(c | {"lora_alpha": -8}), "lora_alpha = -8, expected a positive number"),
    (lambda c: json.dumps(c | {"rank_pattern": [1]}), "rank_pattern is a list"),
    (lambda c: json.dumps(c | {"use_dora": "false"}), "is a DoRA adapter"),
    (lambda c: json.dumps(c | {"peft_type": "lora"}), "modelsoup reads LoRA adapters only"),
], ids=["nan", "inf", "bom", "deep", "list", "float-rank", "alpha-0", "alpha-neg", "pattern-list", "dora-string", "lowercase-type"])
def test_hostile_configs_refused(bert: dict, tmp_path: Path, text, message: str) -> None:  # type: ignore[no-untyped-def]
    ad = _copy(bert, tmp_path)
    (ad / "adapter_config.json").write_text(text(json.loads((ad / "adapter_config.json").read_text())), encoding="utf-8")
    with pytest.raises(AdapterError) as e, adapted(open_checkpoint(bert["base"]), ad):
        pass
    assert message in str(e.value)


def test_harmless_config_variants_agree_with_peft(bert: dict, tmp_path: Path) -> None:
    """r as 4.0, an alpha_pattern key that matches nothing, odd target_modules: the same model as peft."""
    ad = _copy(bert, tmp_path)
    _edit_config(ad, r=4.0, alpha_pattern={"nothing_like_this": 99}, target_modules="query|value")
    got = _ours(bert["base"], ad)
    for k, v in got.items():
        torch.testing.assert_close(v, bert["want"][k], **TOL)


@pytest.mark.parametrize("edit, message", [
    (lambda t: {(k.replace("base_model.model.", "") if "classifier" in k else k): v for k, v in t.items()}, "which the base does not have"),
    (lambda t: t | {k.replace("model.bert.", "model."): v.clone() * 2 for k, v in t.items() if "layer.0.attention.self.query" in k},
     "which the base does not have"),
    (lambda t: t | {"base_model.model.bert.embeddings.LayerNorm.lora_A.weight": torch.zeros(4, 16),
                    "base_model.model.bert.embeddings.LayerNorm.lora_B.weight": torch.zeros(1, 4)}, "but the base's 'bert.embeddings.LayerNorm.weight' is [16]"),
    (lambda t: t | {"base_model.model.classifier.bias": torch.zeros(2, dtype=torch.int64)}, "is int64 [2] but the base's 'classifier.bias' is float32"),
    (lambda t: t | {"base_model.model.classifier.modules_to_save.weight": t["base_model.model.classifier.weight"] * 2}, "two copies of one tensor but differ"),
    (lambda t: {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in t.items()}, "a kind modelsoup does not merge"),
], ids=["mixed-prefix", "duplicate-module-other-prefix", "lora-on-1d", "int-full", "two-copies-differ", "adapter-name-in-key"])
def test_hostile_tensors_refused(bert: dict, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, edit)
    with pytest.raises(AdapterError) as e, adapted(open_checkpoint(bert["base"]), ad):
        pass
    assert message in str(e.value)


def test_modules_colliding_after_the_prefix_rewrite_are_refused(bert: dict, tmp_path: Path) -> None:
    body = tmp_path / "body"
    with quiet():
        load_model(bert["base"]).bert.save_pretrained(body)
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, lambda t: {k: v for k, v in t.items() if "classifier" not in k}
                  | {k.replace("model.bert.", "model.zzz."): v.clone() * 2 for k, v in t.items() if "layer.0.attention.self.query" in k})
    with pytest.raises(AdapterError, match="both change 'encoder.layer.0.attention.self.query.weight'"), adapted(open_checkpoint(body), ad):
        pass


def test_adapter_in_bf16_agrees_with_peft(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, lambda t: {k: (v.to(torch.bfloat16) if "lora" in k else v) for k, v in t.items()})
    want = _peft_merged(load_model(bert["base"]), ad)
    got = _ours(bert["base"], ad)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], **TOL)


def test_adapter_without_the_peft_prefix_reads_as_with_it(bert: dict, tmp_path: Path) -> None:
    """(peft itself cannot load this one: a KeyError on the modules_to_save head.)"""
    ad = _copy(bert, tmp_path)
    _edit_tensors(ad, lambda t: {k.replace("base_model.model.", ""): v for k, v in t.items()})
    a, b = _ours(bert["base"], ad), _ours(bert["base"], bert["ad"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("how", ["nan-factor", "overflowing-alpha"])
def test_non_finite_adapters_are_refused_without_output(bert: dict, tmp_path: Path, how: str) -> None:
    ad = _copy(bert, tmp_path)
    if how == "nan-factor":
        def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t[Q0 + ".lora_B.weight"][0, 0] = float("nan")
            return t
        _edit_tensors(ad, edit)
    else:
        _edit_config(ad, lora_alpha=1e300)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        merge(models=[str(ad)], base=str(bert["base"]), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_adapter_with_code_is_refused_and_not_run(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    (ad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, ad / "adapter_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        merge(models=[str(ad)], base=str(bert["base"]), output=tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bin_adapter_equals_safetensors_adapter(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    t = load_file(ad / "adapter_model.safetensors")
    (ad / "adapter_model.safetensors").unlink()
    torch.save(t, ad / "adapter_model.bin")
    a, b = _ours(bert["base"], ad), _ours(bert["base"], bert["ad"])
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("which", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_files_linked_outside_the_folder_are_refused(bert: dict, tmp_path: Path, which: str) -> None:
    ad = _copy(bert, tmp_path)
    (ad / which).rename(tmp_path / which)
    (ad / which).symlink_to(tmp_path / which)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_adapter(ad)


@pytest.mark.parametrize("damage", ["truncated", "empty", "directory"])
def test_damaged_adapter_weights_are_refused(bert: dict, tmp_path: Path, damage: str) -> None:
    ad = _copy(bert, tmp_path)
    f = ad / "adapter_model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()
        f.mkdir()
    with pytest.raises(CheckpointError):
        merge(models=[str(ad)], base=str(bert["base"]), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_of_a_different_base_size_is_refused(bert: dict, tmp_path: Path) -> None:
    big = tiny_bert(tmp_path / "big", hidden=32)
    with pytest.raises(AdapterError, match=r"makes a delta of shape \[16, 16\] but the base's .* is \[32, 32\]"):
        merge(models=[str(bert["ad"])], base=str(big), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_adapter_as_base_exits_2_without_output(bert: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelsoup.cli import main

    rc = main(["merge", "--base", str(bert["ad"]), str(bert["ad"]), "-o", str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "is a PEFT adapter, not a model" in err and "Traceback" not in err


def test_same_adapter_twice_inputs_untouched_and_untouched_tensors_bit_identical(bert: dict, tmp_path: Path) -> None:
    ad = _copy(bert, tmp_path)
    shutil.copy(bert["base"] / "model.safetensors", ad / "model.safetensors")  # an adapter folder that also holds a model
    files = [*ad.iterdir(), *bert["base"].iterdir()]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    merge(models=[str(ad), str(ad)], base=str(bert["base"]), output=tmp_path / "twice")
    merge(models=[str(bert["ad"])], base=str(bert["base"]), output=tmp_path / "once")
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    twice, once = load_file(tmp_path / "twice" / "model.safetensors"), load_file(tmp_path / "once" / "model.safetensors")
    assert twice.keys() == once.keys() and all(torch.equal(twice[k], once[k]) for k in once)
    base = load_file(bert["base"] / "model.safetensors")
    for k, v in once.items():
        if "query" in k or "value" in k or "classifier" in k:
            torch.testing.assert_close(v, bert["want"][k], **TOL)
        else:
            assert torch.equal(v, base[k]), k


def test_embedding_lora_on_gpt2_tied_wte_keeps_the_adapted_models_output(gpt2: Path, tmp_path: Path) -> None:
    """LoRA on GPT-2's wte, which is tied to lm_head. peft applies the embedding LoRA only on the input side: the
    PeftModel the adapter was trained as computes its logits with the *base* lm_head. Folding the delta into the one
    tied tensor (what modelsoup writes before the fix, equal to peft's merge_and_unload) also changes the output head, so the
    written model's logits differ from the adapted model's by several units, with exit 0 and no note. Either keep the
    adapted model's function (write lm_head untied) or refuse naming the tie."""
    make_lora(gpt2, tmp_path / "ad", seed=3, kind="gpt2", target_modules=["wte"])
    try:
        merge(models=[str(tmp_path / "ad")], base=str(gpt2), output=tmp_path / "out")
    except AdapterError as e:
        assert "tied" in str(e).replace(str(tmp_path), "")
        return
    x = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    ours = load_model(tmp_path / "out", "gpt2")
    ref = peft_model(gpt2, tmp_path / "ad", "gpt2")
    with torch.no_grad():
        got, unmerged = ours(input_ids=x).logits, ref(input_ids=x).logits
        folded = ref.merge_and_unload()(input_ids=x).logits
    torch.testing.assert_close(got, folded, rtol=1e-4, atol=1e-4)  # it is peft's merge_and_unload ...
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-4)  # ... but not the model the adapter makes


def test_every_failure_here_is_a_soup_error() -> None:
    """The named errors used above are SoupError subclasses (CLI exit code 2)."""
    assert all(issubclass(e, SoupError) for e in (AdapterError, CheckpointError, NonFiniteError, UnsafeCheckpointError))

"""Adapter soups on the shipped MiniLM (all-MiniLM-L6-v2 with a two-class head) with real peft adapters: r=4
on query/value and the classifier head in modules_to_save, the cases the adapter issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoup import merge
from modelsoup.adapters import extract_lora, merge_adapters
from modelsoup.cli import main
from modelsoup.io import open_checkpoint
from modelsoup.io.adapters import adapted, open_adapter

from .conftest import REVIEWS
from .lora_fixtures import load_model, make_lora, peft_model, quiet
from .tolerances import MODEL_OUTPUT

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lab(minilm_classifier: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("minilm-lora")
    ads = [root / f"ad{i}" for i in range(3)]
    merged = [make_lora(minilm_classifier, ad, seed=40 + i, scale=0.05) for i, ad in enumerate(ads)]
    plain = [root / f"plain{i}" for i in range(2)]
    for i, ad in enumerate(plain):
        make_lora(minilm_classifier, ad, seed=50 + i, scale=0.05, modules_to_save=None, task_type=None)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_classifier, local_files_only=True)
    batch = tok([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
    return {"root": root, "base": minilm_classifier, "ads": ads, "merged": merged, "plain": plain, "batch": dict(batch)}


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_dense_merge_is_base_plus_mean_delta(lab: dict, tmp_path: Path) -> None:
    merge(models=[str(a) for a in lab["ads"]], base=str(lab["base"]), output=tmp_path / "dense")
    got = load_file(tmp_path / "dense" / "model.safetensors")
    for k, v in got.items():
        torch.testing.assert_close(v.double(), sum(m[k].double() for m in lab["merged"]) / 3, rtol=0, atol=1e-6)
    assert (tmp_path / "dense" / "tokenizer.json").exists()  # a full HF folder: loads with from_pretrained
    with quiet():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    ref = load_model(lab["base"])
    ref.load_state_dict({k: sum(m[k] for m in lab["merged"]) / 3 for k in lab["merged"][0]})
    torch.testing.assert_close(_logits(model, lab["batch"]), _logits(ref, lab["batch"]), **MODEL_OUTPUT)


def test_cat_adapter_gives_the_dense_merges_logits_and_svd_full_rank_is_cat(lab: dict, tmp_path: Path) -> None:
    merge(models=[str(a) for a in lab["ads"]], base=str(lab["base"]), output=tmp_path / "dense")
    merge_adapters(lab["ads"], tmp_path / "cat", base=lab["base"], combination="cat")
    dense = load_model(tmp_path / "dense")
    torch.testing.assert_close(_logits(peft_model(lab["base"], tmp_path / "cat"), lab["batch"]), _logits(dense, lab["batch"]), **MODEL_OUTPUT)
    res = merge_adapters(lab["ads"], tmp_path / "svd", base=lab["base"], combination="svd", rank=12)
    assert res.worst_error < 1e-5
    with open_adapter(tmp_path / "cat") as a, open_adapter(tmp_path / "svd") as b:
        for m in a.modules:
            torch.testing.assert_close(b.delta(m), a.delta(m), rtol=1e-4, atol=1e-6)


def test_peft_add_weighted_adapter_refuses_heads_and_agrees_on_plain_adapters(lab: dict, tmp_path: Path) -> None:
    with quiet():
        pm = peft.PeftModel.from_pretrained(load_model(lab["base"]), lab["ads"][0], adapter_name="a0")
        pm.load_adapter(lab["ads"][1], adapter_name="a1")
    with pytest.raises(ValueError, match="modules_to_save"):  # the case modelsoup handles (test above)
        pm.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "m", combination_type="cat")
    w = [0.6, 0.4]
    with quiet():
        pm = peft.PeftModel.from_pretrained(load_model(lab["base"]), lab["plain"][0], adapter_name="a0")
        pm.load_adapter(lab["plain"][1], adapter_name="a1")
        pm.add_weighted_adapter(["a0", "a1"], w, "cat", combination_type="cat")
        pm.add_weighted_adapter(["a0", "a1"], w, "svd", combination_type="svd")
    for combination in ("cat", "svd"):
        merge_adapters(lab["plain"], tmp_path / combination, base=lab["base"], combination=combination, method="task_arithmetic", weights=w)
        pm.set_adapter(combination)
        theirs = peft_model(lab["base"], tmp_path / combination)
        torch.testing.assert_close(_logits(theirs, lab["batch"]), _logits(pm, lab["batch"]), rtol=1e-4, atol=1e-5)


def test_extract_lora_at_full_rank_reproduces_the_fine_tune(lab: dict, tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    model = load_model(lab["base"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder.layer.0." in name or "classifier" in name:  # a fine-tune of part of the model, norms and biases included
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    with quiet():
        model.save_pretrained(ft)
    res = extract_lora(ft, tmp_path / "ex", base=lab["base"], rank=384)
    assert res.worst_error < 1e-6
    with adapted(open_checkpoint(lab["base"]), tmp_path / "ex") as ck, open_checkpoint(ft) as full:
        for n in full.names():
            torch.testing.assert_close(ck.read(n).to(torch.float32), full.read(n).to(torch.float32), rtol=0, atol=1e-5)
    low = extract_lora(ft, tmp_path / "ex8", base=lab["base"], rank=8)
    assert 0 < min(v["retained_energy"] for v in low.modules.values()) < 1


def test_cli_greedy_soup_of_adapters_with_text_evaluator(lab: dict, reviews_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "greedy", *map(str, lab["ads"]), "--base", str(lab["base"]), "--heldout", str(reviews_csv), "-o", str(tmp_path / "g"),
               "--no-progress", "--no-cache", "--as-adapter", "svd", "--rank", "4"])
    assert rc == 0, capsys.readouterr().err
    assert "greedy soup" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "g" / "greedy" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]

"""Adapters out: --as-adapter cat / svd / linear (checked against the dense merge and against peft's own
add_weighted_adapter under its conventions), and extract-lora (full rank reproduces the fine-tune)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoup import merge
from modelsoup.adapters import extract_lora, merge_adapters, truncate
from modelsoup.cli import main
from modelsoup.errors import AdapterError, OptionError
from modelsoup.io import open_checkpoint
from modelsoup.io.adapters import adapted

from .lora_fixtures import load_model, make_lora, peft_model, quiet, tiny_bert
from .tolerances import FP32_VS_LIBRARY, MODEL_OUTPUT

peft = pytest.importorskip("peft")

X = torch.randint(0, 60, (4, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora-out")
    base = tiny_bert(root / "base")
    ads = [root / f"ad{i}" for i in range(3)]
    for i, ad in enumerate(ads):
        make_lora(base, ad, seed=20 + i, r=4 if i < 2 else 2)
    plain = [root / f"plain{i}" for i in range(2)]  # no modules_to_save: what peft's add_weighted_adapter takes
    for i, ad in enumerate(plain):
        make_lora(base, ad, seed=30 + i, modules_to_save=None, task_type=None)
    return {"root": root, "base": base, "ads": ads, "plain": plain}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> B @ A * scaling of a written adapter."""
    from modelsoup.io.adapters import open_adapter

    with open_adapter(folder) as ad:
        return {m: ad.delta(m) for m in ad.modules}


def test_cat_is_exact_and_loads_with_peft(lab: dict, tmp_path: Path) -> None:
    res = merge_adapters(lab["ads"], tmp_path / "cat", base=lab["base"], combination="cat")
    assert res.rank == 10 and json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 10
    merge(models=[str(a) for a in lab["ads"]], base=str(lab["base"]), output=tmp_path / "dense")
    dense = load_model(tmp_path / "dense")
    torch.testing.assert_close(_logits(peft_model(lab["base"], tmp_path / "cat")), _logits(dense), **MODEL_OUTPUT)
    # the head (modules_to_save in every adapter) is the mean of the three heads, as in the dense merge
    head = load_file(tmp_path / "cat" / "adapter_model.safetensors")["base_model.model.classifier.weight"]
    torch.testing.assert_close(head, dense.classifier.weight.detach(), **FP32_VS_LIBRARY)


def test_svd_at_full_rank_equals_cat_and_reports_errors(lab: dict, tmp_path: Path) -> None:
    merge_adapters(lab["ads"], tmp_path / "cat", base=lab["base"], combination="cat")
    full = merge_adapters(lab["ads"], tmp_path / "svd", base=lab["base"], combination="svd", rank=10)
    assert full.worst_error < 1e-6
    a, b = _deltas(tmp_path / "cat"), _deltas(tmp_path / "svd")
    for m in a:
        torch.testing.assert_close(b[m], a[m], rtol=1e-5, atol=1e-6)
    low = merge_adapters(lab["ads"], tmp_path / "svd2", base=lab["base"], combination="svd", rank=2)
    assert low.rank == 2 and 0.05 < low.worst_error < 1
    for m, v in low.modules.items():  # the reported error is the error of the written factors
        want = torch.linalg.norm(b[m] - _deltas(tmp_path / "svd2")[m]) / torch.linalg.norm(b[m])
        assert abs(v["relative_error"] - float(want)) < 1e-4


def test_truncate_closed_form() -> None:
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2)))
    s = torch.tensor([4.0, 3.0, 0.0, 0.0, 0.0])
    d = u[:, :5] @ torch.diag(s) @ v.T
    b, a, err, energy = truncate(d, 1)
    assert abs(err - 3 / 5) < 1e-6 and abs(energy - 16 / 25) < 1e-6
    torch.testing.assert_close(b @ a, 4.0 * torch.outer(u[:, 0], v[:, 0]), rtol=1e-5, atol=1e-6)


def _peft_weighted(lab: dict, combination: str, weights: list[float], **kw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """peft's add_weighted_adapter of the two plain adapters: module -> (A, B)."""
    with quiet():
        pm = peft.PeftModel.from_pretrained(load_model(lab["base"]), lab["plain"][0], adapter_name="a0")
        pm.load_adapter(lab["plain"][1], adapter_name="a1")
        pm.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type=combination, **kw)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            out[name] = (mod.lora_A["m"].weight.detach().clone(), mod.lora_B["m"].weight.detach().clone())
    return out


def _ours(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_file(folder / "adapter_model.safetensors")
    mods = {k[len("base_model.model."): -len(".lora_A.weight")] for k in t if k.endswith("lora_A.weight")}
    return {m: (t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]) for m in mods}


W = [0.7, 0.4]


def test_cat_and_linear_agree_with_peft_factor_for_factor(lab: dict, tmp_path: Path) -> None:
    for combination, method in (("cat", "task_arithmetic"), ("linear", "linear")):  # peft's weights are task arithmetic's: not normalised
        merge_adapters(lab["plain"], tmp_path / combination, base=lab["base"], combination=combination, method=method, weights=W)
        want, got = _peft_weighted(lab, combination, W), _ours(tmp_path / combination)
        assert sorted(got) == sorted(want)
        for m in want:
            torch.testing.assert_close(got[m][0], want[m][0], **FP32_VS_LIBRARY)
            torch.testing.assert_close(got[m][1], want[m][1], **FP32_VS_LIBRARY)


@pytest.mark.parametrize("combination, method, params, kw", [
    ("svd", "task_arithmetic", {}, {}),
    ("ties_svd", "ties", {"density": 0.5, "sign_from": "unweighted", "divide_by": "count"}, {"density": 0.5}),
])
def test_svd_family_agrees_with_peft_on_the_product(lab: dict, tmp_path: Path, combination: str, method: str, params: dict, kw: dict) -> None:
    merge_adapters(lab["plain"], tmp_path / "o", base=lab["base"], combination="svd", method=method, weights=W, parameters=params)
    want, got = _peft_weighted(lab, combination, W, **kw), _ours(tmp_path / "o")
    for m in want:  # singular vectors are defined up to sign: compare the products
        torch.testing.assert_close(got[m][1] @ got[m][0], want[m][1] @ want[m][0], rtol=1e-4, atol=1e-5)


def test_dare_linear_factor_wise_agrees_with_peft(lab: dict, tmp_path: Path) -> None:
    merge_adapters(lab["plain"], tmp_path / "d1", base=lab["base"], combination="linear", method="dare_linear", weights=W,
                   parameters={"density": 1.0})
    want, got = _peft_weighted(lab, "dare_linear", W, density=1.0), _ours(tmp_path / "d1")
    for m in want:  # density 1 drops nothing: exactly peft's linear
        torch.testing.assert_close(got[m][0], want[m][0], **FP32_VS_LIBRARY)
    # density 0.5: random masks (peft draws from the global RNG, modelsoup per module from its seed), compared in distribution
    merge_adapters(lab["plain"], tmp_path / "d5", base=lab["base"], combination="linear", method="dare_linear", weights=W,
                   parameters={"density": 0.5}, seed=3)
    torch.manual_seed(0)
    want, got = _peft_weighted(lab, "dare_linear", W, density=0.5), _ours(tmp_path / "d5")
    lin = _peft_weighted(lab, "linear", W)
    for m in want:
        for k in (0, 1):
            zeros_peft = float((want[m][k] == 0).float().mean())
            zeros_ours = float((got[m][k] == 0).float().mean())
            assert abs(zeros_ours - zeros_peft) < 0.2  # both drop each entry of each factor with probability 1/2
            # the survivors are rescaled by 1/density around peft's linear factors
            assert float((got[m][k] - lin[m][k]).abs().mean()) < 2 * float(lin[m][k].abs().mean()) + 1e-6


def test_refusals(lab: dict, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="cat is exact only for a weighted sum"):
        merge_adapters(lab["ads"], tmp_path / "x", base=lab["base"], combination="cat", method="ties", parameters={"density": 0.5})
    with pytest.raises(OptionError, match="needs one rank, got ranks \\[2, 4\\]"):
        merge_adapters(lab["ads"], tmp_path / "x", base=lab["base"], combination="linear")
    with pytest.raises(OptionError, match="--rank is the output rank of --as-adapter svd"):
        merge_adapters(lab["ads"], tmp_path / "x", base=lab["base"], combination="cat", rank=3)
    with pytest.raises(OptionError, match="2 given for 3 adapter"):
        merge_adapters(lab["ads"], tmp_path / "x", base=lab["base"], weights=[1, 2])
    assert not (tmp_path / "x").exists()


def test_cli_as_adapter_and_extract(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "svd"
    rc = main(["merge", "--base", str(lab["base"]), *map(str, lab["ads"]), "--as-adapter", "svd", "--rank", "3", "-o", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "PEFT adapter" in capsys.readouterr().out and (out / "adapter_config.json").exists()
    rc = main(["merge", str(lab["base"]), "--rank", "3", "-o", str(tmp_path / "y")])
    assert rc == 2 and "add --as-adapter svd" in capsys.readouterr().err


# -- extract-lora -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetune(lab: dict) -> Path:
    """A 'full fine-tune' of the tiny base: every tensor moved, biases and norms included."""
    model = load_model(lab["base"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = lab["root"] / "ft"
    with quiet():
        model.save_pretrained(out)
    return out


def test_extract_at_full_rank_reproduces_the_fine_tune(lab: dict, finetune: Path, tmp_path: Path) -> None:
    res = extract_lora(finetune, tmp_path / "ex", base=lab["base"], rank=64)
    assert res.worst_error < 1e-6 and min(v["retained_energy"] for v in res.modules.values()) > 1 - 1e-9
    assert any("LayerNorm" in n for n in res.full) and any(n.endswith("base_layer.bias") for n in res.full)
    with adapted(open_checkpoint(lab["base"]), tmp_path / "ex") as ck, open_checkpoint(finetune) as ft:
        for n in ft.names():
            torch.testing.assert_close(ck.read(n).to(torch.float32), ft.read(n).to(torch.float32), rtol=0, atol=1e-5)
    # and peft itself loads it into the same model
    torch.testing.assert_close(_logits(peft_model(lab["base"], tmp_path / "ex")), _logits(load_model(finetune)), **MODEL_OUTPUT)


def test_extract_low_rank_and_refusals(lab: dict, finetune: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["extract-lora", str(finetune), "--base", str(lab["base"]), "--rank", "2", "-o", str(tmp_path / "r2"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "retained energy" in out and "saved whole" in out
    with pytest.raises(AdapterError, match="not weights of linear layers or embeddings.*--others save"):
        extract_lora(finetune, tmp_path / "x", base=lab["base"], rank=2, others="refuse")
    with pytest.raises(AdapterError, match="no tensor differs from the base"):
        extract_lora(lab["base"], tmp_path / "x", base=lab["base"], rank=2)
    assert not (tmp_path / "x").exists()


def test_adapter_files_get_the_users_umask(lab: dict, tmp_path: Path) -> None:
    import os

    merge_adapters(lab["ads"], tmp_path / "cat", base=lab["base"])
    mask = os.umask(0)
    os.umask(mask)
    for f in (tmp_path / "cat").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name

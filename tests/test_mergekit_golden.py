"""modelsoup against mergekit's own numbers: the recipes under tests/golden/mergekit/recipes, run here, give the
tensors mergekit 0.1.5 wrote for them (tests/golden/mergekit/outputs, made by tests/golden/make_mergekit_golden.py).

The fixtures are rebuilt from seeds and checked byte for byte against the hashes mergekit saw. Deterministic methods
must agree to float32 rounding; the random ones (DARE, DELLA) draw their masks from a different generator, so they
are compared in distribution: how many entries keep a change, and how large the merged change is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoup import merge

from .golden.mergekit_fixtures import build_fixtures
from .tolerances import FP32_VS_LIBRARY

GOLDEN = Path(__file__).parent / "golden" / "mergekit"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
SINGLE = sorted(n for n, r in MANIFEST["recipes"].items() if (GOLDEN / "outputs" / f"{n}.safetensors").exists() and r.get("command", "").startswith("mergekit-yaml"))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("mergekit-fixtures")
    assert build_fixtures(r) == MANIFEST["fixtures"], "the fixtures differ from those mergekit's outputs were computed from"
    shutil.copytree(GOLDEN / "recipes", r / "recipes")
    return r


def _run(root: Path, name: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    monkeypatch.chdir(root)  # a mergekit recipe's paths are taken from the working directory, as mergekit takes them
    merge(root / MANIFEST["recipes"][name]["recipe"], out)
    return load_file(out / "model.safetensors" if out.is_dir() else out)


@pytest.mark.parametrize("name", [n for n in SINGLE if n not in RANDOM])
def test_same_tensors_as_mergekit(root: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _run(root, name, tmp_path / "out", monkeypatch)
    theirs = load_file(GOLDEN / "outputs" / f"{name}.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], **FP32_VS_LIBRARY, msg=lambda m, k=k: f"{name}: {k}: {m}")
    config = GOLDEN / "outputs" / f"{name}.config.json"
    if config.exists():
        mine, want = json.loads((tmp_path / "out" / "config.json").read_text()), json.loads(config.read_text())
        assert mine["num_hidden_layers"] == want["num_hidden_layers"]


def _change_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of all entries left at the base's value, L1 norm of the whole merged change)."""
    unchanged = sum(int((merged[k] == base[k]).sum()) for k in merged)
    total = sum(merged[k].numel() for k in merged)
    return unchanged / total, sum(float((merged[k] - base[k]).abs().sum(dtype=torch.float64)) for k in merged)


@pytest.mark.parametrize("name", sorted(RANDOM & set(SINGLE)))
def test_random_methods_match_mergekit_in_distribution(root: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mergekit draws masks from torch's global generator in tensor order; modelsoup seeds one generator per tensor
    # (results independent of order and threads), so masks differ and only their statistics can agree. Over the
    # ~12k entries of the fixtures, mergekit and modelsoup leave 13-17% of entries unchanged, within 0.02 of each other
    # (sd of the difference ~0.005), and the L1 norms of the changes agree within 3%.
    ours = _run(root, name, tmp_path / "out", monkeypatch)
    theirs = load_file(GOLDEN / "outputs" / f"{name}.safetensors")
    base = load_file(root / "models" / "base" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    (u_ours, l1_ours), (u_theirs, l1_theirs) = _change_stats(ours, base), _change_stats(theirs, base)
    assert abs(u_ours - u_theirs) < 0.02, (u_ours, u_theirs)
    assert abs(l1_ours / l1_theirs - 1) < 0.05, (l1_ours, l1_theirs)
    # and the masks are really random: not mergekit's draws, not all kept
    assert 0.05 < u_ours < 0.5 and any(not torch.equal(ours[k], theirs[k]) for k in theirs)


def test_multi_stage_recipe_matches_mergekit_multi(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mergekit-multi: stage ab_ties (ties of ft_a, ft_b), then the final linear of ab_ties and ft_c
    assert MANIFEST["recipes"]["multistage"]["command"].startswith("mergekit-multi")
    ours = _run(root, "multistage", tmp_path / "out", monkeypatch)
    theirs = load_file(GOLDEN / "outputs" / "multistage.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], **FP32_VS_LIBRARY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup-stages-")]  # the intermediate stage is removed


def test_entries_tied_at_the_trim_cut_are_the_ones_mergekit_keeps() -> None:
    # 20k entries of 41 distinct magnitudes: most of the cut falls among exact ties. mergekit keeps the tied entries
    # torch's (unstable) sort puts first; the mergekit translation asks for the same order (tie_break: torch_sort).
    import numpy as np

    from modelsoup.methods.ops import trim_outliers, trim_top_k, trim_top_k_torch_order

    want = json.loads((GOLDEN / "ties_at_the_cut.json").read_text())
    d = torch.randint(-20, 21, (20000,), generator=torch.Generator().manual_seed(0)).float() * 0.001

    def mask(key: str) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(want[key]), dtype=np.uint8))[: d.numel()].astype(bool))

    assert torch.equal(trim_top_k_torch_order(d, 0.5, at_least_one=True) != 0, mask("magnitude_density_0.5"))
    assert torch.equal(trim_outliers(d, 0.6, 0.05, "torch_sort") != 0, mask("magnitude_outliers_density_0.6_gamma_0.05"))
    # the native default breaks ties by index: the same count, other entries
    assert int((trim_top_k(d, 0.5) != 0).sum()) == int(mask("magnitude_density_0.5").sum()) == 10000
    assert not torch.equal(trim_top_k(d, 0.5) != 0, mask("magnitude_density_0.5"))

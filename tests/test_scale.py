"""Soups at scale give exactly what the small, serial versions give: the greedy soup's running sum (O(N) reads)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge
from modelsoup.eval.cache import EvalCache
from modelsoup.io.checkpoints import SafetensorsCheckpoint
from modelsoup.recipes import greedy_soup
from modelsoup.recipes.pantry import Pantry
from modelsoup.recipes.running import RunningSoup


def _noisy(src: Path, out: Path, scale: float, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(src).items()}, out)
    return out


@pytest.fixture(scope="module")
def ingredients(digits_run, tmp_path_factory) -> list[Path]:
    """The five digits fine-tunes and three near-copies of the best (so that greedy both keeps and skips)."""
    folder = tmp_path_factory.mktemp("greedy-scale")
    extra = [_noisy(digits_run.paths[3], folder / f"near-{i}.safetensors", 0.01 * (i + 1), i) for i in range(3)]
    return [*digits_run.paths, *extra]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_greedy_with_the_running_sum_equals_greedy_by_rebuilding(digits_run, ingredients, tmp_path, store):
    val = digits_run.evaluator("val")
    off = greedy_soup(ingredients, val, running_sum="off", allow_equal=True, progress=False, cache=EvalCache(enabled=False))
    run = greedy_soup(ingredients, val, running_sum=store, spill_dir=str(tmp_path), allow_equal=True, progress=False,
                      cache=EvalCache(enabled=False))
    assert run.members == off.members
    assert [(h.ingredient, h.kept, h.score) for h in run.history] == [(h.ingredient, h.kept, h.score) for h in off.history]
    assert (run.score.value, run.score.metrics["loss"]) == (off.score.value, off.score.metrics["loss"])
    assert any(h.kept for h in run.history[1:]) and any(not h.kept for h in run.history), "the fixture should both keep and skip"
    assert torch.equal(run.predictions.logits, off.predictions.logits)
    assert list(tmp_path.iterdir()) == []  # the spilled running sum is removed
    # the written soup has the scored soup's bits
    merge(run.recipe, tmp_path / "soup", progress=False)
    written = load_file(tmp_path / "soup" / "model.safetensors")
    again = val.evaluate(written)
    assert (again.value, again.metrics["loss"]) == (run.score.value, run.score.metrics["loss"])


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_candidate_from_the_running_sum_has_the_bits_of_the_planned_soup(ingredients, tmp_path, store):
    with Pantry(ingredients, cache=EvalCache(enabled=False)) as pantry:
        soup = RunningSoup(pantry, 2, store=store, spill_dir=tmp_path)
        try:
            for added in (0, 5, 1):
                for cand in range(len(ingredients)):
                    if cand in soup.members:
                        continue
                    got = soup.candidate(cand)
                    _, want = pantry.soup([*soup.members, cand])
                    assert list(got) == list(want)
                    for name in want:
                        a, b = got[name], want[name]
                        assert a.dtype == b.dtype and torch.equal(a, b), (soup.members, cand, name)
                soup.add(added)
        finally:
            soup.close()


def _count_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    original = SafetensorsCheckpoint.read

    def counted(self, name):
        reads[self.label] += 1
        return original(self, name)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", counted)
    return reads


@pytest.mark.parametrize("n", [4, 8])
def test_greedy_reads_each_checkpoint_a_number_of_times_independent_of_n(digits_run, tmp_path, monkeypatch, n):
    # n near-copies of one model: every one improves the soup a little or not, but all are tried
    paths = [_noisy(digits_run.paths[3], tmp_path / f"m{i}.safetensors", 0.002, i) for i in range(n)]
    tensors = len(load_file(paths[0]))
    val = digits_run.evaluator("val")
    reads = _count_reads(monkeypatch)
    greedy_soup(paths, val, running_sum="memory", progress=False, cache=EvalCache(enabled=False))
    per_file = [reads[str(p)] / tensors for p in paths]
    # scored alone (1), tried as a candidate (1), and, if kept, added to the sum (1); the first member is read
    # once more to start the sum: at most 3 whole reads per checkpoint, whatever n is
    assert max(per_file) <= 3, per_file
    reads.clear()
    greedy_soup(paths, val, running_sum="off", progress=False, cache=EvalCache(enabled=False))
    rebuilt = [reads[str(p)] / tensors for p in paths]
    assert sum(rebuilt) > sum(per_file) or n <= 2

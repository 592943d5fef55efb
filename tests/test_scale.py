"""Soups at scale give exactly what the small, serial versions give: the greedy soup's running sum (O(N) reads)."""

from __future__ import annotations

import json
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
    """Whole-tensor reads per checkpoint: read() and read_mapped() count 1, a chunk read by the merge engine its share."""
    reads: Counter = Counter()

    def counting(method: str):
        original = getattr(SafetensorsCheckpoint, method)

        def counted(self, name, *args):
            if method == "read_range":
                start, stop = args[0], args[1]
                reads[self.label] += (stop - start) / max(torch.Size(self.meta(name)[1]).numel(), 1)
            else:
                reads[self.label] += 1
            return original(self, name, *args)

        monkeypatch.setattr(SafetensorsCheckpoint, method, counted)

    for method in ("read", "read_mapped", "read_range"):
        counting(method)
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


# -- learned soup: streaming = resident, and a start that is never below greedy ---------------------------------------

from modelsoup.errors import InsufficientMemoryError, OptionError  # noqa: E402
from modelsoup.recipes import learned_soup  # noqa: E402


@pytest.fixture(scope="module")
def one_clearly_best(digits_run, tmp_path_factory) -> list[Path]:
    """The best digits fine-tune between two noisy copies of the pre-trained start (the issue's case: one clearly best)."""
    folder = tmp_path_factory.mktemp("learned-scale")
    bad = [_noisy(digits_run.base, folder / f"bad{i}.safetensors", 0.15, i) for i in range(2)]
    return [bad[0], digits_run.paths[3], bad[1]]


def _coefficients(res) -> torch.Tensor:
    w = res.weights
    return torch.tensor(w if isinstance(w, list) else [w[k] for k in sorted(w)], dtype=torch.float64)


@pytest.mark.parametrize("by,start,accumulate", [("model", "uniform", 2), ("layer", "greedy", 3), ("tensor", "uniform", 1)])
def test_streaming_learned_soup_reaches_the_resident_coefficients(digits_run, one_clearly_best, by, start, accumulate):
    val = digits_run.evaluator("val")
    kw = dict(by=by, epochs=3, lr=0.1, start=start, accumulate=accumulate, progress=False, cache=EvalCache(enabled=False))
    resident = learned_soup(one_clearly_best, val, memory="resident", **kw)
    streaming = learned_soup(one_clearly_best, val, memory="streaming", **kw)
    assert (resident.memory, streaming.memory) == ("resident", "streaming")
    assert resident.epoch == streaming.epoch
    assert [h["score"] for h in resident.history] == [h["score"] for h in streaming.history]
    assert [h["loss"] for h in resident.history] == pytest.approx([h["loss"] for h in streaming.history], rel=1e-5)
    assert torch.allclose(_coefficients(resident), _coefficients(streaming), atol=1e-5, rtol=0)
    # and it learned something (the check is not of two soups that never moved)
    assert (_coefficients(resident) - _coefficients(resident).mean()).abs().max() > 1e-3


def test_learned_soup_by_default_starts_from_the_better_of_uniform_and_greedy(digits_run, one_clearly_best):
    val = digits_run.evaluator("val")
    greedy = greedy_soup(one_clearly_best, val, progress=False, cache=EvalCache(enabled=False))
    res = learned_soup(one_clearly_best, val, epochs=3, lr=0.1, progress=False, cache=EvalCache(enabled=False))
    assert res.greedy_score is not None and res.uniform_score is not None
    assert res.greedy_score.value == greedy.score.value > res.uniform_score.value  # one clearly best: greedy wins
    assert res.start == "greedy" and res.start_score.value == greedy.score.value
    assert res.score.value >= greedy.score.value
    if res.epoch == 0:  # nothing beat the start: the greedy soup itself is returned
        assert [m.label() for m in res.recipe.models] == [m.label() for m in greedy.recipe.models]
        assert res.members == greedy.members
    else:
        assert res.members == [0, 1, 2]
    uniform = learned_soup(one_clearly_best, val, epochs=3, lr=0.1, start="uniform", progress=False, cache=EvalCache(enabled=False))
    assert uniform.start == "uniform" and uniform.greedy_score is None


def test_learned_soup_memory_choice_follows_the_estimate(digits_run, one_clearly_best):
    val = digits_run.evaluator("val")
    model_bytes = sum(4 * t.numel() for t in load_file(one_clearly_best[0]).values())
    kw = dict(epochs=1, start="uniform", progress=False, cache=EvalCache(enabled=False))
    assert learned_soup(one_clearly_best, val, max_memory=10 * model_bytes, **kw).memory == "resident"  # (3 + 4) x fits
    assert learned_soup(one_clearly_best, val, max_memory=4 * model_bytes, **kw).memory == "streaming"  # only 3 x fits
    with pytest.raises(InsufficientMemoryError, match="streams the ingredients"):
        learned_soup(one_clearly_best, val, max_memory=2 * model_bytes, **kw)
    with pytest.raises(InsufficientMemoryError, match="--learn-memory streaming"):
        learned_soup(one_clearly_best, val, memory="resident", max_memory=4 * model_bytes, **kw)


# -- the cost of a cook run, before it starts ------------------------------------------------------------------------

def test_cook_dry_run_counts_evaluations_and_writes_nothing(digits_run, tmp_path, capsys):
    from modelsoup.cli import main

    out = tmp_path / "out"
    args = ["cook", *map(str, digits_run.paths), "--eval", f"{Path(__file__).parent / 'digits_scoring.py'}:accuracy",
            "--heldout", str(digits_run.folder / "val.safetensors"), "--test", str(digits_run.folder / "test.safetensors"),
            "--soups", "uniform,greedy,learned,ensemble", "--epochs", "3", "-o", str(out), "--no-cache", "--dry-run"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "5 ingredients" in text and "dry run: nothing was evaluated or written" in text
    assert "  ingredients: 10" in text  # 5 on held-out, 5 on test
    assert "  greedy soup (one per candidate): 5" in text  # 4 candidates and the result on test
    assert "learned soup (uniform start, one per epoch, the result on test): 5" in text
    assert "disk for the saved soups" in text
    assert not out.exists()
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out.split("dry run:")[0])
    assert data["ingredients"] == 5 and data["evaluations"]["uniform soup"] == 2
    assert data["disk"] == 3 * data["model_bytes"]  # uniform, greedy and learned soups are written


@pytest.mark.slow
def test_streaming_learned_soup_reaches_the_resident_coefficients_on_minilm(minilm_classifier, reviews_csv, tmp_path):
    from modelsoup.eval.text import TextClassificationEvaluator

    base = load_file(minilm_classifier / "model.safetensors")
    paths = []
    for i, scale in enumerate((0.0, 0.02, 0.05)):  # the classifier and two noisier copies of it
        g = torch.Generator().manual_seed(i)
        sd = {k: (v + scale * torch.randn(v.shape, generator=g) * v.float().std().clamp_min(1e-3) if v.is_floating_point() and v.dim() > 1 else v)
              for k, v in base.items()}
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    ev = TextClassificationEvaluator(minilm_classifier, reviews_csv, batch_size=3, progress=False)
    kw = dict(by="layer", epochs=2, lr=0.2, start="uniform", accumulate=2, progress=False, cache=EvalCache(enabled=False))
    resident = learned_soup(paths, ev, memory="resident", **kw)
    streaming = learned_soup(paths, ev, memory="streaming", **kw)
    assert resident.epoch == streaming.epoch
    assert torch.allclose(_coefficients(resident), _coefficients(streaming), atol=1e-5, rtol=0)
    assert (_coefficients(resident) - 1 / 3).abs().max() > 1e-3  # it moved


def test_evaluation_device_defaults_to_cuda_when_present_and_a_missing_gpu_is_refused(monkeypatch):
    from modelsoup.devices import default_device
    from modelsoup.eval.factory import make_evaluators

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    with pytest.raises(OptionError, match="--device cuda: CUDA is not available"):
        make_evaluators("text-classification", heldout="x.csv", model=Path(__file__).parent, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert default_device() == torch.device("cuda", 0)


def _tiny_pantry(tmp_path, dtype=torch.float32, batchnorm=False, n=3):
    """n perturbed copies of a small classifier (with batch norm, or in bf16), random data, and its evaluator."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from modelsoup.eval.module import ClassificationEvaluator

    torch.manual_seed(0)
    layers = [nn.Linear(16, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [nn.ReLU(), nn.Linear(32, 4)]
    net = nn.Sequential(*layers)
    x = torch.randn(96, 16)
    y = (x[:, :4].argmax(1))
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).to(dtype if v.is_floating_point() else v.dtype)
              for k, v in net.state_dict().items()}
        save_file(sd, tmp_path / f"t{i}.safetensors")
        paths.append(tmp_path / f"t{i}.safetensors")
    net = net.to(dtype)
    loader = DataLoader(TensorDataset(x.to(dtype), y), batch_size=16)
    return paths, ClassificationEvaluator(net, loader, progress=False)


@pytest.mark.parametrize("case", ["batchnorm", "bfloat16"])
def test_streaming_equals_resident_with_batch_norm_buffers_and_in_bf16(tmp_path, case):
    paths, ev = _tiny_pantry(tmp_path, dtype=torch.bfloat16 if case == "bfloat16" else torch.float32, batchnorm=case == "batchnorm")
    for by in ("model", "tensor"):
        kw = dict(by=by, epochs=2, lr=0.2, start="uniform", accumulate=2, progress=False, cache=EvalCache(enabled=False))
        resident = learned_soup(paths, ev, memory="resident", **kw)
        streaming = learned_soup(paths, ev, memory="streaming", **kw)
        assert resident.epoch == streaming.epoch, by
        assert torch.allclose(_coefficients(resident), _coefficients(streaming), atol=1e-5, rtol=0), by
        assert (_coefficients(resident) - 1 / 3).abs().max() > 1e-3, by


def test_no_epoch_needs_no_memory_to_learn(tmp_path):
    paths, ev = _tiny_pantry(tmp_path)
    res = learned_soup(paths, ev, epochs=0, start="uniform", max_memory=1, progress=False, cache=EvalCache(enabled=False))
    assert res.epoch == 0 and res.start == "uniform"


def test_a_tie_in_the_module_stored_twice_in_the_files_is_learned_once(tmp_path):
    """The module shares one weight between two layers; the files hold two copies (safetensors stores no shared tensors)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from modelsoup.eval.module import ClassificationEvaluator

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Tied()
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {k: v.detach() + 0.3 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
        sd["b.weight"] = sd["a.weight"].clone()
        save_file(sd, tmp_path / f"tied{i}.safetensors")
        paths.append(tmp_path / f"tied{i}.safetensors")
    x = torch.randn(64, 8)
    ev = ClassificationEvaluator(net, DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16), progress=False)
    for by in ("model", "tensor"):
        kw = dict(by=by, epochs=2, lr=0.2, start="uniform", accumulate=2, progress=False, cache=EvalCache(enabled=False))
        resident = learned_soup(paths, ev, memory="resident", **kw)
        streaming = learned_soup(paths, ev, memory="streaming", **kw)
        assert torch.allclose(_coefficients(resident), _coefficients(streaming), atol=1e-5, rtol=0), by
        if by == "tensor":  # the copy follows the tensor it is tied to, so the written soup keeps them equal
            assert resident.weights["b.weight"] == resident.weights["a.weight"]
        merge(resident.recipe, tmp_path / f"soup-{by}", progress=False)
        written = load_file(tmp_path / f"soup-{by}" / "model.safetensors")
        assert torch.equal(written["a.weight"], written["b.weight"])

"""Streaming pairwise similarity: against element-by-element loops, hand-worked sign conflicts, per-layer
grouping, what is left out and why, and the one-tensor-per-model memory bound."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from modelsoup.analysis.similarity import group_of, natural_key, similarity
from modelsoup.errors import AnalysisError
from modelsoup.io import open_checkpoint
from modelsoup.io.checkpoints import Checkpoint

from . import reference
from .tolerances import FP32_VS_REFERENCE

NAMES = ["embed.weight", "encoder.layer.0.w", "encoder.layer.1.w", "encoder.layer.10.w", "head.weight", "head.bias"]
SHAPES = [(5, 3), (4, 4), (4, 4), (2, 3), (3, 5), (3,)]


def _model(seed: int, zeros: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in zip(NAMES, SHAPES):
        t = torch.randn(shape, generator=g)
        if zeros:  # exact zeros so that some task-vector entries are 0: they carry no sign
            t[torch.rand(shape, generator=g) < 0.25] = 0.0
        sd[name] = t
    sd["step"] = torch.tensor(seed)
    return sd


def _fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        delta = 0.3 * torch.randn(v.shape, generator=g)
        delta[torch.rand(v.shape, generator=g) < 0.3] = 0.0  # untouched entries: zero task-vector entries
        out[k] = v + delta
    return out


def _close(got, want) -> None:
    g = torch.tensor(got, dtype=torch.float64)
    w = torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(g, w, equal_nan=True, **FP32_VS_REFERENCE), (got, want)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_statistics_agree_with_element_by_element_loops(chunk):
    base = _model(0)
    models = [_fine_tune(base, s) for s in (1, 2, 3)]
    sim = similarity(models, base=base, chunk_elements=chunk, progress=False)  # chunk 7 splits tensors mid-way
    floats = [[m[n] for n in NAMES] for m in models]
    ref = reference.similarity_stats(floats, [base[n] for n in NAMES])
    t = sim.total
    _close(t.norms().tolist(), ref["norm"])
    _close(t.cosine().diagonal().tolist(), [1.0, 1.0, 1.0])
    _close(t.cosine().tolist(), ref["cosine"])
    _close(t.distance().tolist(), ref["distance"])
    _close(t.task_cosine().tolist(), ref["task_cosine"])
    _close(t.task_norms().tolist(), ref["task_norm"])
    _close(t.cosine_to_base().tolist(), ref["cosine_to_base"])
    off = [[ref["sign_conflicts"][i][j] if i != j else t.sign_conflicts()[i, i].item() for j in range(3)] for i in range(3)]
    _close(t.sign_conflicts().tolist(), off)
    _close(t.sign_conflict_all(), ref["sign_conflict_all"])
    assert t.numel == sum(math.prod(s) for s in SHAPES)
    assert sim.skipped["nonfloat"] == ["step"]


def test_without_a_base_only_weight_statistics():
    models = [_model(s) for s in (1, 2)]
    sim = similarity(models, progress=False)
    ref = reference.similarity_stats([[m[n] for n in NAMES] for m in models])
    _close(sim.total.cosine().tolist(), ref["cosine"])
    _close(sim.total.distance().tolist(), ref["distance"])
    assert sim.total.task_cosine() is None and sim.total.sign_conflicts() is None
    assert "task_cosine" not in sim.total.summary()


def test_sign_conflicts_by_hand_zeros_cast_no_vote():
    base = {"w": torch.zeros(5)}
    # task vectors = the models (base 0). Coordinates with two or more non-zero entries: 0 (+,-), 1 (+,+,+), 3 (+,-)
    # -> conflicts at 0 and 3: 2 / 3. Coordinates 2 and 4 have one vote each and do not count.
    t1, t2, t3 = torch.tensor([1.0, 1, 0, 0, -1]), torch.tensor([-1.0, 1, 0, 2, 0]), torch.tensor([0.0, 1, 1, -3, 0])
    sim = similarity([{"w": t1}, {"w": t2}, {"w": t3}], base=base, progress=False)
    sc = sim.total.sign_conflicts()
    # pair (1, 2): both non-zero at 0 and 1, opposite at 0 -> 1/2; pair (1, 3): both at 1 -> 0/1; pair (2, 3): at 1 and 3, opposite at 3 -> 1/2
    assert sc[0, 1].item() == pytest.approx(0.5) and sc[0, 2].item() == 0.0 and sc[1, 2].item() == pytest.approx(0.5)
    assert sim.total.sign_conflict_all() == pytest.approx(2 / 3)
    # two models: the all-model fraction is the pair's
    two = similarity([{"w": t1}, {"w": t2}], base=base, progress=False)
    assert two.total.sign_conflict_all() == pytest.approx(0.5)


def test_cosine_and_distance_by_hand():
    a, b = {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}
    t = similarity([a, b], progress=False).total
    assert t.cosine()[0, 1].item() == 0.0
    assert t.distance()[0, 1].item() == pytest.approx(5.0)
    assert t.relative_distance()[0, 1].item() == pytest.approx(5.0 / 3.5)
    c = {"w": torch.tensor([-6.0, 0.0])}
    assert similarity([a, c], progress=False).total.cosine()[0, 1].item() == pytest.approx(-1.0)


def test_close_models_keep_their_distance_digits():
    # |w_i|^2 + |w_j|^2 - 2<w_i, w_j> would lose the 1e-9 difference against norms of 1e3 even in float64
    a = {"w": torch.full((1000,), 30.0, dtype=torch.float64)}
    b = {"w": a["w"] + 1e-9}
    t = similarity([a, b], progress=False).total
    assert t.distance()[0, 1].item() == pytest.approx(1e-9 * math.sqrt(1000), rel=1e-6)


def test_groups_are_layers_then_modules_in_natural_order_and_sum_to_the_total():
    assert group_of("encoder.layer.10.attention.self.query.weight") == "encoder.layer.10"
    assert group_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert group_of("classifier.weight") == "classifier" and group_of("0.weight") == "0" and group_of("scale") == "scale"
    assert sorted(["layer.10", "layer.2", "embed"], key=natural_key) == ["embed", "layer.2", "layer.10"]
    base = _model(0)
    models = [_fine_tune(base, s) for s in (1, 2)]
    sim = similarity(models, base=base, progress=False)
    assert list(sim.groups) == ["embed", "encoder.layer.0", "encoder.layer.1", "encoder.layer.10", "head"]
    head = sim.groups["head"]
    ref = reference.similarity_stats([[m["head.weight"], m["head.bias"]] for m in models], [base["head.weight"], base["head.bias"]])
    _close(head.task_cosine().tolist(), ref["task_cosine"])
    _close(head.sign_conflicts()[0, 1].item(), ref["sign_conflicts"][0][1])
    total = torch.zeros_like(sim.total.delta)
    for s in sim.groups.values():
        total += s.delta
    assert torch.equal(total, sim.total.delta)
    assert sum(s.tensors for s in sim.groups.values()) == sim.total.tensors == len(NAMES)


def test_what_is_left_out_and_why():
    a, b = _model(1), _model(2)
    b["extra"] = torch.ones(2)                 # missing from a
    b["head.bias"] = torch.ones(4)             # shape differs
    a["encoder.layer.1.w"] = a["encoder.layer.1.w"].clone()
    b["encoder.layer.1.w"] = b["encoder.layer.1.w"].clone()
    b["encoder.layer.1.w"][0, 0] = float("nan")  # non-finite in one model
    sim = similarity([a, b], progress=False)
    assert sim.skipped["missing"] == ["extra"]
    assert sim.skipped["shape"] == ["head.bias"]
    assert sim.skipped["nonfinite"] == ["encoder.layer.1.w"]
    assert sim.skipped["nonfloat"] == ["step"]
    assert sim.total.tensors == 4
    md = sim.to_markdown()
    assert "1 shape (head.bias)" in md and "1 nonfinite (encoder.layer.1.w)" in md


def test_tied_weights_are_counted_once():
    emb = torch.randn(4, 3)
    tied = {"embed.weight": emb, "head.weight": emb}
    other = {"embed.weight": torch.randn(4, 3), "head.weight": torch.randn(4, 3)}
    sim = similarity([tied, other], progress=False)
    assert sim.skipped["tied"] == ["head.weight"] and sim.total.numel == 12


def test_refusals_name_the_fix():
    with pytest.raises(AnalysisError, match="at least two models, or one model and a base"):
        similarity([_model(1)], progress=False)
    with pytest.raises(AnalysisError, match="different architectures and cannot be souped"):
        similarity([{"a": torch.ones(2)}, {"b": torch.ones(2)}], progress=False)
    with pytest.raises(AnalysisError, match="one label per model"):
        similarity([_model(1), _model(2)], labels=["x"], progress=False)


class CountingCheckpoint(Checkpoint):
    """Wraps a checkpoint: counts reads and how many tensors it handed out are still alive at each read."""

    def __init__(self, inner: Checkpoint) -> None:
        super().__init__(inner.label)
        self.inner = inner
        self._meta = {n: inner.meta(n) for n in inner.names()}
        self.reads: dict[str, int] = {}
        self.alive: list[weakref.ref] = []
        self.most_alive_at_read = 0

    def read(self, name: str) -> torch.Tensor:
        self.alive = [r for r in self.alive if r() is not None]
        self.most_alive_at_read = max(self.most_alive_at_read, len(self.alive))
        self.reads[name] = self.reads.get(name, 0) + 1
        t = self.inner.read(name).clone()
        self.alive.append(weakref.ref(t))
        return t


def test_each_tensor_is_read_once_and_one_tensor_per_model_is_alive(tmp_path):
    from safetensors.torch import save_file

    base = _model(0)
    paths = []
    for i, sd in enumerate([base, _fine_tune(base, 1), _fine_tune(base, 2), _fine_tune(base, 3)]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    cks = [CountingCheckpoint(open_checkpoint(p)) for p in paths]
    sim = similarity(cks[1:], base=cks[0], chunk_elements=5, progress=False)
    assert sim.total.tensors == len(NAMES)
    for ck in cks:
        assert ck.reads == {n: 1 for n in NAMES}                 # every floating tensor read exactly once
        assert ck.most_alive_at_read == 0                         # the previous tensor was dropped before the next read
        assert all(r() is None for r in ck.alive)                 # and nothing is kept afterwards
        ck.inner.close()

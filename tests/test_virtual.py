"""The virtual checkpoint (tensors drawn on demand from (seed, name)) and the null sink, through the real plan and engine."""

from __future__ import annotations

import math

import pytest
import torch

from modelsoup.engine import collect, run_jobs
from modelsoup.errors import CheckpointError
from modelsoup.io import Checkpoint, VirtualCheckpoint, llama_shapes
from modelsoup.io.sinks import NullSink, Sink
from modelsoup.io.virtual import LLAMA_PRESETS
from modelsoup.plan import plan_merge
from modelsoup.recipe import recipe_from_dict


def _recipe(method: str, n: int, base: bool = False, **params):
    data = {"method": method, "models": [{"source": {}} for _ in range(n)], "parameters": params}
    if base:
        data["base"] = {"source": {}}
    return recipe_from_dict(data)


def test_same_seed_and_name_give_the_same_bits_and_anything_else_differs():
    shapes = {"a": (33, 17), "b": (33, 17), "c.norm.weight": (40,)}
    one, again = VirtualCheckpoint(shapes, seed=3), VirtualCheckpoint(shapes, seed=3)
    other = VirtualCheckpoint(shapes, seed=4)
    a = one.read("a")
    assert a.dtype == torch.bfloat16 and a.shape == (33, 17)
    assert torch.equal(a.view(torch.int16), again.read("a").view(torch.int16)) and torch.equal(a, one.read("a"))
    assert not torch.equal(a, one.read("b")) and not torch.equal(a, other.read("a"))
    assert abs(float(a.float().std()) - 0.02) < 0.003 and abs(float(one.read("c.norm.weight").float().mean()) - 1) < 0.01
    assert one.reads == 4
    f32 = VirtualCheckpoint(shapes, seed=3, dtype=torch.float32)
    assert f32.read("a").dtype == torch.float32 and f32.meta("a") == (torch.float32, (33, 17))


def test_a_tiled_block_is_as_deterministic_and_cheap():
    v = VirtualCheckpoint({"w": (1000, 100), "x": (10,)}, seed=1, block=4096)
    w = v.read("w").reshape(-1)
    assert torch.equal(w[:4096], w[4096:8192]) and torch.equal(w, v.read("w").reshape(-1))
    assert not torch.equal(w[:4096], VirtualCheckpoint({"w": (1000, 100)}, seed=2, block=4096).read("w").reshape(-1)[:4096])
    assert v.read("x").shape == (10,)


def test_llama_70b_preset_has_llama_70b_shapes():
    v = VirtualCheckpoint.llama("llama-70b")
    names = v.names()
    assert len(names) == 2 + 80 * 9 + 1 and names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert v.meta("model.embed_tokens.weight") == (torch.bfloat16, (128256, 8192))
    assert v.meta("model.layers.79.self_attn.q_proj.weight")[1] == (8192, 8192)
    assert v.meta("model.layers.0.self_attn.k_proj.weight")[1] == (1024, 8192)  # 8 kv heads of 128
    assert v.meta("model.layers.0.mlp.down_proj.weight")[1] == (8192, 28672)
    assert v.meta("model.layers.0.input_layernorm.weight")[1] == (8192,)
    assert 70.5e9 < v.parameters < 70.6e9  # Llama-3-70B: 70.55 B
    assert len(VirtualCheckpoint.llama("llama-70b", layers=2, tie_embeddings=True).names()) == 1 + 2 * 9 + 1
    assert set(LLAMA_PRESETS) >= {"llama-70b", "llama-8b", "llama-tiny"}


def test_refusals_name_the_problem():
    with pytest.raises(CheckpointError, match="unknown virtual model preset 'llama-7'; choose one of llama-70b"):
        VirtualCheckpoint.llama("llama-7")
    with pytest.raises(CheckpointError, match="llama-tiny has 2 layers; give layers from 0 to 2, got 5"):
        VirtualCheckpoint.llama("llama-tiny", layers=5)
    with pytest.raises(CheckpointError, match="heads must divide hidden"):
        llama_shapes(hidden=100, layers=1, intermediate=10, heads=3, kv_heads=1, vocab=10)
    with pytest.raises(CheckpointError, match="dtype torch.int64 is not bfloat16"):
        VirtualCheckpoint({"a": (2,)}, dtype=torch.int64)


def test_identity_and_meta_contract():
    shapes = {"a": (4, 4), "b": (4,)}
    v, same, other = VirtualCheckpoint(shapes, seed=1), VirtualCheckpoint(shapes, seed=1), VirtualCheckpoint(shapes, seed=2)
    assert isinstance(v, Checkpoint) and v.kind == "virtual" and v.files == [] and v.folder is None and v.aliases() == {}
    assert v.identity("a") == same.identity("a") and v.identity("a") != v.identity("b") and v.identity("a") != other.identity("a")
    assert v.identity("zzz") is None
    for name in v.names():
        dtype, shape = v.meta(name)
        t = v.read(name)
        assert (t.dtype, tuple(t.shape)) == (dtype, shape)
    with pytest.raises(KeyError):
        v.read("zzz")
    with v:
        pass  # close() is a no-op; reads still work after
    assert v.read("a").shape == (4, 4)


def test_the_plan_sees_one_virtual_tensor_twice_as_one():
    """Two virtual models of one seed are the same stored tensors, so a mean of them is a copy (as for one file given twice)."""
    shapes = llama_shapes(**LLAMA_PRESETS["llama-tiny"])
    cks = [VirtualCheckpoint(shapes, seed=1), VirtualCheckpoint(shapes, seed=1)]
    plan = plan_merge(_recipe("linear", 2), cks, None)
    assert {j.action for j in plan.jobs} == {"first"}


@pytest.mark.parametrize("method, base, params", [("linear", False, {}), ("ties", True, {"density": 0.5})])
def test_merges_through_plan_and_engine_into_a_null_sink(method, base, params):
    shapes = llama_shapes(**LLAMA_PRESETS["llama-tiny"])
    cks = [VirtualCheckpoint(shapes, seed=s) for s in range(4)]
    base_ck = VirtualCheckpoint(shapes, seed=100) if base else None
    plan = plan_merge(_recipe(method, 4, base, **params), cks, base_ck)
    sink = NullSink(checksum=True)
    as_sink: Sink = sink  # the protocol, checked by a type checker; and by hand here
    assert as_sink.order is None and all(callable(getattr(sink, m)) for m in ("write", "close", "abort"))
    run_jobs(plan, sink.write, workers=3, progress=False, order=sink.order)
    assert sink.close() == {} and sink.closed
    assert sink.tensors == len(shapes) and sink.bytes == sum(math.prod(s) * 2 for s in shapes.values()) == plan.nbytes
    one = NullSink(checksum=True)
    run_jobs(plan, one.write, workers=1, progress=False)
    assert one.digest == sink.digest != 0  # same bits whatever the number of workers and the order
    merged = collect(plan, workers=1, progress=False)
    if method == "linear":
        name = "model.layers.1.mlp.up_proj.weight"
        want = (sum(ck.read(name).float() for ck in cks) / 4).to(torch.bfloat16)
        assert torch.equal(merged[name], want)


def test_null_sink_counts_without_checksum():
    sink = NullSink()
    sink.write("a", torch.zeros(3, 4))
    sink.write("b", torch.zeros(0))
    sink.abort()
    assert (sink.tensors, sink.bytes, sink.digest, sink.closed) == (2, 48, 0, True)

"""The streaming engine and the Python API: equal to in-memory, atomic output, errors before writing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge, merge_modules, merge_state_dicts
from modelsoup.errors import KeyMismatchError, NonFiniteError, OutputError, OutputExistsError, RecipeError, TensorMismatchError
from modelsoup.io import open_checkpoint

from .conftest import TinyNet, make_state
from .tolerances import FP32_VS_LIBRARY, HALF


def _files(tmp_path: Path, states, dtype=None) -> list[Path]:
    paths = []
    for i, sd in enumerate(states):
        p = tmp_path / f"m{i}.safetensors"
        save_file({k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in sd.items()}, p)
        paths.append(p)
    return paths


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {k: ck.read(k) for k in ck.names()}


def test_linear_is_the_mean_and_integer_buffers_are_not_averaged(states, caplog):
    with caplog.at_level(logging.INFO, logger="modelsoup"):
        out = merge_state_dicts(states)
    for k, v in out.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in states) / 3, **FP32_VS_LIBRARY)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 10  # first model's, never averaged
    assert "bn.num_batches_tracked" in caplog.text and "not averaged" in caplog.text


def test_same_checkpoint_twice_counts_twice(states):
    a, b = states[0], states[1]
    out = merge_state_dicts([a, a, b])
    torch.testing.assert_close(out["fc.weight"], (2 * a["fc.weight"] + b["fc.weight"]) / 3, **FP32_VS_LIBRARY)


@pytest.mark.parametrize(
    "method, params, with_base",
    [("linear", {}, False), ("ties", {"density": 0.4}, True), ("dare_ties", {"density": 0.6}, True), ("slerp", {"t": 0.3}, False), ("task_arithmetic", {"scale": 0.7}, True)],
)
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, states, method, params, with_base):
    models = states[:2] if method == "slerp" else states
    base = make_state(7) if with_base else None
    paths = _files(tmp_path, models)
    base_path = None
    if base is not None:
        base_path = tmp_path / "base.safetensors"
        save_file(base, base_path)
    expected = merge_state_dicts(models, method=method, base=base, parameters=params, seed=5)
    # the output keeps the first model's file order, however it is sharded and however many workers write it
    file_order = open_checkpoint(paths[0]).names()
    assert sorted(file_order) == sorted(expected)
    for shard_size, workers, n_files in [("200B", 1, 4), ("400B", 3, 2), ("5GB", 8, 1)]:
        out = tmp_path / f"out-{shard_size}-{workers}"
        recipe = {"method": method, "models": [str(p) for p in paths], "parameters": params, "seed": 5, "output": {"shard_size": shard_size}}
        if base_path is not None:
            recipe["base"] = str(base_path)
        merge(recipe, out, workers=workers, progress=False)
        assert len(list(out.glob("model*.safetensors"))) == n_files, shard_size
        got = _read_all(out)
        assert list(got) == file_order, (shard_size, workers)
        for k in expected:
            assert torch.equal(got[k], expected[k]), (k, shard_size, workers)


def test_random_methods_reproducible_and_seed_dependent(states):
    base = make_state(9)
    a = merge_state_dicts(states, method="dare_linear", base=base, parameters={"density": 0.5}, seed=1, workers=1)
    b = merge_state_dicts(states, method="dare_linear", base=base, parameters={"density": 0.5}, seed=1, workers=4)
    c = merge_state_dicts(states, method="dare_linear", base=base, parameters={"density": 0.5}, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(tmp_path, states, dtype):
    paths = _files(tmp_path, states, dtype)
    merge(models=paths, output=tmp_path / "out", progress=False)
    got = _read_all(tmp_path / "out")
    assert got["fc.weight"].dtype == dtype
    ref = sum(s["fc.weight"].to(dtype).float() for s in states) / 3
    torch.testing.assert_close(got["fc.weight"], ref.to(dtype), **HALF[dtype])
    merge(models=paths, output=tmp_path / "out32", dtype="float32", progress=False)
    assert _read_all(tmp_path / "out32")["fc.weight"].dtype == torch.float32


def test_key_mismatch_lists_missing_and_unexpected_per_model(states):
    a, b = dict(states[0]), dict(states[1])
    del b["fc.bias"]
    b["extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyMismatchError) as e:
        merge_state_dicts([a, b])
    msg = str(e.value)
    assert "model[1]: missing 1 (fc.bias); unexpected 1 (extra.weight)" in msg
    assert "keys: intersection" in msg and "keys: base" in msg
    inter = merge_state_dicts([a, b], keys="intersection")
    assert "fc.bias" not in inter and "extra.weight" not in inter
    base = make_state(5)
    from_base = merge_state_dicts([a, b], base=base, keys="base")
    assert torch.equal(from_base["fc.bias"], base["fc.bias"])
    assert "extra.weight" not in from_base


def test_shape_and_dtype_mismatches_all_reported_with_each_models_value(states):
    a, b = dict(states[0]), dict(states[1])
    b["fc.weight"] = torch.zeros(4, 6)
    b["fc.bias"] = b["fc.bias"].half()
    with pytest.raises(TensorMismatchError) as e:
        merge_state_dicts([a, b])
    msg = str(e.value)
    assert "2 tensor(s) cannot be merged" in msg
    assert "'fc.weight' has different shapes: model[0]: [5, 6], model[1]: [4, 6]" in msg
    assert "'fc.bias' has different dtypes: model[0]: float32, model[1]: float16" in msg and "--dtype" in msg


def test_nonfinite_input_refused_and_no_output_left(tmp_path, states):
    bad = dict(states[2])
    bad["head.weight"] = bad["head.weight"].clone()
    bad["head.weight"][0, 0] = float("nan")
    paths = _files(tmp_path, [states[0], states[1], bad])
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"m2.safetensors: tensor 'head.weight' holds 1 NaN/Inf.*allow_nonfinite"):
        merge(models=paths, output=out, workers=2, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temporary folder removed
    merge(models=paths, output=out, allow_nonfinite=True, progress=False)
    assert torch.isnan(_read_all(out)["head.weight"][0, 0])


def test_nan_allowed_but_not_rankable_is_refused_naming_the_tensor(tmp_path, states):
    """allow_nonfinite merges NaN with methods that carry it, but TIES/breadcrumbs rank magnitudes and NaN has no rank:
    a named error, not a crash or a silently different trim."""
    from modelsoup.errors import MethodError

    bad = dict(states[2])
    bad["head.weight"] = bad["head.weight"].clone()
    bad["head.weight"][0, 0] = float("nan")
    paths = _files(tmp_path, [states[0], states[1], bad])
    for method in ("ties", "breadcrumbs"):
        out = tmp_path / f"out-{method}"
        with pytest.raises(MethodError, match=r"tensor 'head.weight': 1 task-vector entries are NaN.*rank"):
            merge(models=paths[1:], base=paths[0], method=method, output=out, allow_nonfinite=True, progress=False)
        assert not out.exists()


def test_output_exists_refused_unless_overwrite(tmp_path, states):
    paths = _files(tmp_path, states)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        merge(models=paths, output=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier modelsoup output, never a folder of the user's
    with pytest.raises(OutputError, match="without soup_manifest.json, so not an earlier modelsoup output"):
        merge(models=paths, output=out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    soup = tmp_path / "soup"
    merge(models=paths, output=soup, weights=[1, 0, 0], progress=False)
    merge(models=paths, output=soup, overwrite=True, progress=False)
    assert (soup / "model.safetensors").exists()
    assert "weight" not in (soup / "recipe.yaml").read_text()


def test_inputs_never_modified(tmp_path, states):
    paths = _files(tmp_path, states)
    before = [p.read_bytes() for p in paths]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    merge(models=paths, output=tmp_path / "o", method="ties", base=paths[0], progress=False)
    merge_state_dicts(states, method="ties", base=make_state(4))
    assert [p.read_bytes() for p in paths] == before
    assert all(torch.equal(s[k], c[k]) for s, c in zip(states, copies) for k in s)


def test_merge_modules_matches_swa_averaged_model_and_keeps_ties():
    torch.manual_seed(0)
    nets = [TinyNet(tied=True) for _ in range(4)]
    swa = torch.optim.swa_utils.AveragedModel(nets[0])
    for n in nets:  # the first call copies, later calls keep the running mean
        swa.update_parameters(n)
    soup = merge_modules(nets)
    names = [n for n, _ in soup.named_parameters()]
    assert names == [n for n, _ in swa.module.named_parameters()] and names
    for (name, p), (_, q) in zip(soup.named_parameters(), swa.module.named_parameters()):
        torch.testing.assert_close(p, q, **FP32_VS_LIBRARY, msg=lambda m, name=name: f"{name}: {m}")
    assert soup.head.weight is soup.embed.weight


def test_overrides_take_base_and_skip(states):
    base = make_state(8)
    out = merge_state_dicts(states, method="task_arithmetic", base=base,
                            overrides=[{"match": "head.*", "take": "base"}, {"match": "fc.bias", "take": "skip"}])
    assert torch.equal(out["head.weight"], base["head.weight"])
    assert "fc.bias" not in out


def test_slerp_with_three_models_is_refused(states):
    with pytest.raises(RecipeError, match=r"^recipe has 1 problem:\n  - models: method 'slerp' takes 1 to 2 models, got 3$"):
        merge_state_dicts(states, method="slerp")


def test_unknown_method_lists_valid(states):
    with pytest.raises(RecipeError, match=r"^recipe has 1 problem:\n  - method: unknown merge method 'soup'; valid methods: arcee_fusion, breadcrumbs, .*\blinear, .*ties$"):
        merge_state_dicts(states, method="soup")


def test_torch_output_nested_like_lightning_input(tmp_path, states):
    paths = []
    for i, sd in enumerate(states):
        p = tmp_path / f"l{i}.ckpt"
        torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "pytorch-lightning_version": "2.4", "epoch": i}, p)
        paths.append(p)
    merge(models=paths, output=tmp_path / "soup.ckpt", progress=False)
    obj = torch.load(tmp_path / "soup.ckpt", weights_only=True)
    assert set(obj) == {"state_dict"}
    assert set(obj["state_dict"]) == {"model." + k for k in states[0]}
    torch.testing.assert_close(obj["state_dict"]["model.fc.weight"], sum(s["fc.weight"] for s in states) / 3, **FP32_VS_LIBRARY)


def test_single_file_output_records_recipe(tmp_path, states):
    paths = _files(tmp_path, states)
    merge(models=paths, output=tmp_path / "soup.safetensors", weights=[1, 2, 3], progress=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "soup.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["modelsoup_method"] == "linear" and "m2.safetensors" in meta["modelsoup_recipe"]
    torch.testing.assert_close(load_file(tmp_path / "soup.safetensors")["fc.weight"],
                               sum(w * s["fc.weight"] for w, s in zip([1, 2, 3], states)) / 6, **FP32_VS_LIBRARY)


@pytest.mark.parametrize("name", ["wise-ft-0.5", "soup.v2", "run.2024-01-01"])
def test_dotted_folder_name_is_a_folder(tmp_path, states, name):
    # Only a weights suffix (.safetensors, .pt, ...) makes the output a single file: "wise-ft-0.5" is a folder.
    paths = _files(tmp_path, states)
    out = tmp_path / name
    merge(models=paths, output=out, progress=False)
    assert out.is_dir() and (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    torch.testing.assert_close(load_file(out / "model.safetensors")["fc.weight"], sum(s["fc.weight"] for s in states) / 3, **FP32_VS_LIBRARY)
    assert not [p for p in tmp_path.iterdir() if "soup-tmp" in p.name]


def test_hf_round_trip_real_minilm(tmp_path, minilm_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "soup"
    res = merge(models=[minilm_path, minilm_path], output=out, progress=False)
    for f in ("config.json", "tokenizer.json", "vocab.txt", "recipe.yaml", "README.md", "soup_manifest.json", "model.safetensors"):
        assert (out / f).exists(), f
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "- merge" in card and "- model-soup" in card
    manifest = json.loads((out / "soup_manifest.json").read_text())
    from modelsoup.io.output import sha256_file

    assert manifest["outputs"]["model.safetensors"] == sha256_file(out / "model.safetensors") == res.files["model.safetensors"]
    assert manifest["inputs"][0]["files"]["model.safetensors"] == sha256_file(minilm_path / "model.safetensors")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(["a soup of a model with itself is the model"], return_tensors="pt")
    with torch.inference_mode():
        want = transformers.AutoModel.from_pretrained(minilm_path)(**batch).last_hidden_state
        got = transformers.AutoModel.from_pretrained(out)(**batch).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupted_merge_leaves_no_output_and_keeps_the_old_one(tmp_path, states, monkeypatch, workers):
    from modelsoup.io import writer as writer_mod

    paths = _files(tmp_path, states)
    out = tmp_path / "out"
    merge(models=paths, output=out, progress=False)
    before = (out / "model.safetensors").read_bytes()
    real_put, calls = writer_mod.SafetensorsWriter._put, []

    def flaky(self, name, *args, **kwargs):  # every write, whole or a chunk, goes through _put
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_put(self, name, *args, **kwargs)

    monkeypatch.setattr(writer_mod.SafetensorsWriter, "_put", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(models=paths, output=out, overwrite=True, weights=[1, 2, 3], workers=workers, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_mergekit_recipe_runs_unchanged_and_its_notes_reach_the_manifest(tmp_path, states, monkeypatch):
    paths = _files(tmp_path, states)
    save_file(make_state(0), tmp_path / "base.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mk.yaml").write_text(
        "merge_method: ties\nbase_model: base.safetensors\nmodels:\n"
        + "".join(f"  - model: {p.name}\n    parameters: {{weight: {w}, density: 0.5}}\n" for p, w in zip(paths, [1.0, 0.5, 2.0]))
        + "parameters: {int8_mask: true}\ndtype: float32\n"
    )
    merge("mk.yaml", tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out" / "soup_manifest.json").read_text())
    assert any("int8_mask" in n for n in manifest["notes"])
    base = make_state(0)
    want = merge_state_dicts(states, method="ties", base=base, weights=[1.0, 0.5, 2.0], parameters={"density": 0.5})
    got = _read_all(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------- chunked streaming

def _assert_whole_path_bits(rec: dict, written: dict[str, torch.Tensor]) -> None:
    """Every tensor of a recipe's written output has the bytes the engine's whole-tensor path computes for it."""
    from modelsoup.api import _opened
    from modelsoup.engine import MergeRun
    from modelsoup.plan import plan_merge
    from modelsoup.recipe import recipe_from_dict

    recipe = recipe_from_dict(rec)
    with _opened(recipe, ()) as (cks, base_ck, _):
        plan = plan_merge(recipe, cks, base_ck)
        run = MergeRun(plan)
        for job in plan.jobs:
            assert torch.equal(run.compute(job).view(torch.uint8), written[job.name].view(torch.uint8)), job.name


def _pointwise_methods():
    from modelsoup.methods import available_methods

    return sorted(m.name for m in available_methods() if m.pointwise or m.reduction is not None)


_POINTWISE_CASES = {
    "linear": ({"weights": [0.3, -0.2, 1.4]}, False, 3),
    "task_arithmetic": ({"weights": [0.5, 1.5, -0.25], "parameters": {"scale": 0.8, "normalize": True}}, True, 3),
    "ema": ({"parameters": {"decay": 0.7}}, False, 3),
    "nearswap": ({"parameters": {"t": 0.05}}, True, 1),
    "passthrough": ({"parameters": {"scale": 0.5}}, False, 1),
    "slerp": ({"parameters": {"t": 0.3}}, False, 2),
    "nuslerp": ({"weights": [1.0, 3.0]}, True, 2),
    "nuslerp without a base": ({}, False, 2),
    "slerp with a base": ({"parameters": {"t": 0.7}}, True, 1),
    "multislerp": ({"weights": [1.0, 2.5, 0.5]}, False, 3),
    "multislerp with a base": ({"parameters": {"normalize_weights": False}}, True, 2),
    "karcher": ({"weights": [1.0, 2.5, 0.5]}, False, 3),
    "karcher with a tol": ({"parameters": {"tol": 1e-2, "max_iter": 3}}, False, 2),
}


def test_every_pointwise_method_has_a_streaming_case():
    assert _pointwise_methods() == sorted({case.split()[0] for case in _POINTWISE_CASES})


def _edge_tensor(gen: torch.Generator, n: int) -> torch.Tensor:
    """Values that expose kernel differences: signed zeros, subnormals, large and tiny magnitudes, ties."""
    t = torch.randn(n, generator=gen) * 0.02
    t[::97] = 0.0
    t[5::97] = -0.0
    t[7::89] = 1e-40  # float32 subnormal
    t[11::83] = 3e4
    t[13::79] = -1.5
    return t


@pytest.mark.parametrize("method", sorted(_POINTWISE_CASES))
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, "float32"), (torch.float32, "bfloat16")])
def test_streamed_chunks_give_the_whole_tensor_paths_bits(tmp_path, method, in_dtype, out_dtype):
    """The chunked loop (positioned reads into reused buffers, the method on flat slices, chunked writes) writes the
    bits the whole-tensor path computes, for tensors spanning several chunks and a ragged last one."""
    from modelsoup.api import _opened
    from modelsoup.engine import CHUNK, MergeRun, streams
    from modelsoup.plan import plan_merge
    from modelsoup.recipe import recipe_from_dict

    opts, with_base, n_models = _POINTWISE_CASES[method]
    method = method.split()[0]
    gen = torch.Generator().manual_seed(3)
    shapes = {"big": (3, CHUNK + 41), "small": (7, 5), "vec": (CHUNK - 1,), "count": (4,), "huge": (3 << 20) + 7}
    shapes["huge"] = (shapes["huge"],)  # several slices of a reduction's first pass, and a ragged last one
    paths = []
    for i in range(n_models + with_base):
        sd = {k: _edge_tensor(gen, torch.Size(s).numel()).reshape(s).to(in_dtype) for k, s in shapes.items() if k != "count"}
        sd["count"] = torch.arange(4)
        p = tmp_path / f"m{i}.safetensors"
        save_file(sd, p)
        paths.append(p)
    rec = {"method": method, "models": [{"path": str(p)} for p in paths[with_base:]], **({"base": str(paths[0])} if with_base else {})}
    if "weights" in opts:
        for m, w in zip(rec["models"], opts["weights"]):
            m["weight"] = w
    rec["parameters"] = opts.get("parameters", {})
    if out_dtype:
        rec["dtype"] = out_dtype
    out = tmp_path / "out"
    merge(rec, out, progress=False, workers=2)
    written = load_file(out / "model.safetensors")
    recipe = recipe_from_dict(rec)
    with _opened(recipe, ()) as (cks, base_ck, _):
        plan = plan_merge(recipe, cks, base_ck)
        run = MergeRun(plan)
        assert {j.name for j in plan.jobs if streams(plan, j)} == {"big", "small", "vec", "huge"}
        for job in plan.jobs:
            whole = run.compute(job)
            assert whole.dtype == written[job.name].dtype
            assert torch.equal(whole.view(torch.uint8) if whole.is_floating_point() else whole,
                               written[job.name].view(torch.uint8) if whole.is_floating_point() else written[job.name]), job.name


def test_a_nan_in_a_later_chunk_is_named_with_the_whole_tensors_count(tmp_path):
    from modelsoup.engine import CHUNK

    a, b = torch.zeros(2 * CHUNK + 3), torch.ones(2 * CHUNK + 3)
    b[CHUNK + 5] = float("nan")
    b[2 * CHUNK + 1] = float("inf")
    save_file({"w": a}, tmp_path / "a.safetensors")
    save_file({"w": b}, tmp_path / "b.safetensors")
    ins = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(NonFiniteError, match=r"b\.safetensors: tensor 'w' holds 2 NaN/Inf value\(s\) of 262147"):
        merge(models=ins, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merge(models=ins, output=tmp_path / "out", progress=False, allow_nonfinite=True)
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert got[CHUNK + 5].isnan() and got[2 * CHUNK + 1].isinf() and int(torch.isfinite(got).sum()) == 2 * CHUNK + 1


def _kernel_methods():
    from modelsoup.methods import available_methods

    return sorted(m.name for m in available_methods() if m.chunk_kernel is not None or m.carries_nonfinite)


def _case_inputs(method: str, gen: torch.Generator, n: int, dtype: torch.dtype = torch.float32):
    opts, with_base, n_models = _POINTWISE_CASES[method]
    tensors = [_edge_tensor(gen, n).to(dtype) for _ in range(n_models)]
    base = _edge_tensor(gen, n).to(dtype) if with_base else None
    return tensors, base, {"weights": opts.get("weights"), **opts.get("parameters", {})}


@pytest.mark.parametrize("method", _kernel_methods())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_kernel_gives_the_methods_bits_through_stale_buffers(method, dtype):
    """The engine hands a kernel buffers holding the last chunk's values (here: NaN garbage) and of the chunk's length;
    what it returns is what the method's own function computes."""
    from modelsoup.methods import get_method

    m = get_method(method)
    assert m.chunk_kernel is not None
    tensors, base, params = _case_inputs(method, torch.Generator().manual_seed(5), 1000, dtype)
    if not m.takes_half:  # the engine hands such a method float32 chunks
        tensors, base = [t.float() for t in tensors], base.float() if base is not None else None
    bufs: dict = {}

    def buffer(role, dt):
        return bufs.setdefault((role, dt), torch.full((1000,), float("nan"), dtype=dt))

    for _ in range(2):  # the second call finds the first's results in its buffers
        got = m.chunk_kernel(tensors, base=base, buffer=buffer, **params)
        want = m.fn(tensors, base=base, **params)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("method", _kernel_methods())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "inf-inf", "zero-weight"])
def test_a_method_that_carries_nonfinite_never_hides_one(method, bad):
    """The streaming engine leaves such a method's input chunks unchecked: a NaN/Inf in any input, the base included,
    must reach its result, whatever the weights (an Inf times a zero weight, opposite infinities)."""
    from modelsoup.methods import get_method

    m = get_method(method)
    assert m.carries_nonfinite
    opts, with_base, n_models = _POINTWISE_CASES[method]
    for where in range(n_models + with_base):
        tensors, base, params = _case_inputs(method, torch.Generator().manual_seed(where), 8)
        ins = ([base] if base is not None else []) + tensors
        if bad == "inf-inf":
            ins[where][3] = float("inf")
            ins[(where + 1) % len(ins)][3] = -float("inf")
        else:
            ins[where][3] = float("inf") if bad == "zero-weight" else bad
        if bad == "zero-weight" and params.get("weights") is not None and where >= with_base:
            params["weights"] = [0.0 if k == where - with_base else w for k, w in enumerate(params["weights"])]
        out = m.fn(tensors, base=base, **params)
        assert not torch.isfinite(out[3]), (where, out[3])


def test_a_nan_in_the_base_of_a_streamed_task_arithmetic_is_named(tmp_path):
    from modelsoup.engine import CHUNK

    base, ft = torch.zeros(2 * CHUNK + 3), torch.ones(2 * CHUNK + 3)
    base[CHUNK + 5] = float("nan")
    save_file({"w": base}, tmp_path / "base.safetensors")
    save_file({"w": ft}, tmp_path / "ft.safetensors")
    with pytest.raises(NonFiniteError, match=r"base\.safetensors: tensor 'w' holds 1 NaN/Inf value\(s\) of 262147"):
        merge(models=[tmp_path / "ft.safetensors"], base=tmp_path / "base.safetensors", method="task_arithmetic",
              output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_only_a_pointwise_method_takes_a_chunk_kernel():
    from modelsoup.errors import MethodError
    from modelsoup.methods.registry import register

    with pytest.raises(MethodError, match="for pointwise methods"):
        @register("kernel_not_pointwise", summary="x", paper="x", carries_nonfinite=True)
        def _m(tensors, *, base=None, weights=None):
            return tensors[0]


def test_a_result_that_overflows_in_a_later_chunk_is_refused(tmp_path):
    from modelsoup.engine import CHUNK

    a = torch.zeros(CHUNK + 10)
    a[CHUNK + 2] = 6e4
    save_file({"w": a}, tmp_path / "a.safetensors")
    save_file({"w": a.clone()}, tmp_path / "b.safetensors")
    with pytest.raises(NonFiniteError, match=r"merged tensor 'w' holds 1 NaN/Inf value\(s\) of 131082 in float16"):
        merge(models=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"], output=tmp_path / "out", weights=[1.0, 1.0],
              parameters={"normalize": False}, dtype="float16", progress=False)


def test_streamed_shards_hash_what_is_on_disk(tmp_path):
    """Chunked writes arrive out of file order from several threads; every file's digest in the manifest is its sha256."""
    import hashlib

    from modelsoup.engine import CHUNK

    sds = [{f"t{k}": torch.randn(CHUNK + 17 * k) for k in range(6)} | {"half": torch.randn(33).half()} for _ in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    out = tmp_path / "out"
    merge({"method": "linear", "models": [{"path": str(p)} for p in paths], "output": {"shard_size": 3 * 4 * CHUNK}}, out, progress=False, workers=3)
    manifest = json.loads((out / "soup_manifest.json").read_text())
    files = {f: h for f, h in manifest["outputs"].items()} if isinstance(manifest.get("outputs"), dict) else None
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    text = (out / "soup_manifest.json").read_text()
    for f in shards:
        assert hashlib.sha256(f.read_bytes()).hexdigest() in text, f.name
    assert files is None or all(v for v in files.values())


def test_a_torch_output_gets_the_streamed_tensors_whole(tmp_path, states):
    paths = _files(tmp_path, states)
    merge(models=paths, output=tmp_path / "o.safetensors", progress=False)
    merge(models=paths, output=tmp_path / "o.pt", progress=False)
    st, pt = load_file(tmp_path / "o.safetensors"), torch.load(tmp_path / "o.pt", weights_only=True)
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in st)


def test_the_loop_leaves_torch_threads_and_the_collector_as_it_found_them(tmp_path, states):
    import gc

    paths = _files(tmp_path, states)
    threads = torch.get_num_threads()
    merge(models=paths, output=tmp_path / "o", progress=False, workers=3)
    assert torch.get_num_threads() == threads and gc.isenabled()


@pytest.mark.parametrize("method, params", [("slerp", {"t": 0.3}), ("ties", {"density": 0.4}), ("multislerp", {})])
def test_large_tensors_merge_to_the_same_bits_whatever_the_workers(tmp_path, method, params):
    """Each job's torch threads follow the caller's, not the worker count, so reductions split alike."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.randn(600, 700, generator=g), "v": torch.randn(70_001, generator=g)}, p)
        paths.append(p)
    rec = {"method": method, "models": [{"path": str(p)} for p in (paths[1:] if method != "multislerp" else paths)], "parameters": params}
    if method == "ties":
        rec["base"] = str(paths[0])
    if method == "slerp":
        rec["models"] = rec["models"][:2]
    outs = []
    for w in (1, 3):
        merge(rec, tmp_path / f"o{w}", progress=False, workers=w, hash_files=False)
        outs.append((tmp_path / f"o{w}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_streamed_slerp_takes_the_spherical_branch_with_the_whole_tensors_bits(tmp_path):
    """Two passes over the files (the Gram sums over the method's own slices, then the pointwise interpolation)
    give slerp's whole-tensor bits where the ends are far from parallel."""
    from modelsoup.methods.slerp import gram64, slerp

    g = torch.Generator().manual_seed(5)
    ends = [torch.randn((3 << 20) + 7, generator=g) * 0.02 for _ in range(2)]
    for i, t in enumerate(ends):
        save_file({"w": t.view(3, -1) if t.numel() % 3 == 0 else t}, tmp_path / f"m{i}.safetensors")
    sq0, sq1, dot = gram64(*ends)
    assert abs(dot) / (sq0 * sq1) ** 0.5 < 0.1  # the spherical formula, not the linear fallback
    merge(models=[tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], method="slerp", parameters={"t": 0.3},
          output=tmp_path / "o", progress=False)
    got = load_file(tmp_path / "o" / "model.safetensors")["w"]
    assert torch.equal(got.reshape(-1), slerp(ends, t=0.3))


@pytest.mark.parametrize("params", [{"density": 0.4}, {"density": 0.3, "scale": 0.7, "sign_method": "count", "weights_": [1.0, -0.5, 2.0]},
                                    {"density": 0.5, "tie_break": "torch_sort"}, {"density": 0.5, "rescale": "l1"},
                                    {"density": 0.2, "sign_from": "unweighted", "divide_by": "count", "keep_at_least_one": True}])
@pytest.mark.parametrize("out_dtype, in_dtype", [(None, torch.float32), ("bfloat16", torch.float32), (None, torch.bfloat16),
                                                 ("float32", torch.float16)])
def test_streamed_ties_writes_the_whole_tensor_paths_bits(tmp_path, params, out_dtype, in_dtype):
    """TIES' thresholds from the whole inputs, then its result a chunk at a time into the file: the whole path's bits,
    with ties at the cut (heavy rounding), signed weights, and the cases that fall back to the whole path. Half-precision
    inputs reach the streamed path as stored (each chunk widened there) and the whole path as float32 copies; a tensor
    above selection.BRACKET_ABOVE takes the sampled bracket."""
    from modelsoup.engine import CHUNK
    from modelsoup.methods.selection import BRACKET_ABOVE

    params = dict(params)
    weights = params.pop("weights_", None)
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(4):
        sd = {"big": (torch.randn(2, CHUNK + 999, generator=g) * 4).round() / 64, "vec": torch.randn(CHUNK * 3 + 5, generator=g),
              "tiny": torch.randn(3, generator=g)}
        if in_dtype != torch.float32:
            sd["huge"] = torch.randn(BRACKET_ABOVE + 4099, generator=g) * 0.01 + 0.5
        save_file({k: v.to(in_dtype) for k, v in sd.items()}, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    rec = {"method": "ties", "base": str(paths[0]), "models": [{"path": str(p)} for p in paths[1:]], "parameters": params}
    if weights:
        for m, w in zip(rec["models"], weights):
            m["weight"] = w
    if out_dtype:
        rec["dtype"] = out_dtype
    merge(rec, tmp_path / "o", progress=False, workers=2, hash_files=False)
    written = load_file(tmp_path / "o" / "model.safetensors")
    _assert_whole_path_bits(rec, written)


_PREPARED_CASES = {
    "ties": {"density": 0.4},
    "dare_ties": {"density": 0.6},
    "dare_linear": {"density": 0.7, "normalize": True},
    "della": {"density": 0.6, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.2, "rescale": "none"},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.7, "gamma": 0.1},
    "breadcrumbs l1": {"density": 0.8, "gamma": 0.05, "rescale": "l1"},  # l1: whole trimmed vectors, half widened before subtracting
    "dare_ties l1": {"density": 0.6, "rescale": "l1"},
}


def test_every_method_that_prepares_has_a_streaming_case():
    from modelsoup.methods import available_methods

    assert sorted(m.name for m in available_methods() if m.prepare is not None) == sorted({c.split()[0] for c in _PREPARED_CASES})


@pytest.mark.parametrize("method", sorted(_PREPARED_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_streamed_prepared_methods_write_the_whole_tensor_paths_bits(tmp_path, method, dtype):
    """Methods that analyse whole inputs (thresholds, random masks drawn model after model) and stream their result:
    the written bytes are the whole path's, over several chunks, with the random methods' per-tensor generators; a
    method that takes half precision as stored gets bfloat16 inputs there and their float32 copies on the whole path,
    and float64 and float8 inputs as float32 copies on both (not as stored: float64 deltas would round differently,
    float8 has no arithmetic)."""
    from modelsoup.engine import CHUNK

    g = torch.Generator().manual_seed(2)
    paths = []
    for i in range(4):
        save_file({"big": ((torch.randn(2, CHUNK + 999, generator=g) * 4).round() / 64).to(dtype),
                   "vec": torch.randn(CHUNK * 2 + 5, generator=g).to(dtype)},
                  tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    rec = {"method": method.split()[0], "base": str(paths[0]), "models": [{"path": str(p), "weight": w} for p, w in zip(paths[1:], (1.0, 0.5, 1.5))],
           "parameters": _PREPARED_CASES[method], "seed": 3}
    merge(rec, tmp_path / "o", progress=False, workers=2, hash_files=False)
    written = load_file(tmp_path / "o" / "model.safetensors")
    _assert_whole_path_bits(rec, written)


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_streams_flattened_and_runs_whole_row_by_row(tmp_path, flatten):
    """nuslerp's flattened angle is three streamed sums; row by row it is a reduction per row, so the whole path runs.
    Either way the file holds the whole path's bits."""
    from modelsoup.api import _opened
    from modelsoup.engine import CHUNK, streams
    from modelsoup.methods import get_method
    from modelsoup.plan import plan_merge
    from modelsoup.recipe import recipe_from_dict

    g = torch.Generator().manual_seed(6)
    paths = []
    for i in range(3):
        save_file({"w": torch.randn(4, CHUNK // 2 + 7, generator=g)}, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    rec = {"method": "nuslerp", "base": str(paths[0]), "models": [{"path": str(p)} for p in paths[1:]],
           "parameters": {"flatten": flatten, "row_wise": True}}
    merge(rec, tmp_path / "o", progress=False, workers=2, hash_files=False)
    _assert_whole_path_bits(rec, load_file(tmp_path / "o" / "model.safetensors"))
    assert (get_method("nuslerp").streamed_reduction({"flatten": flatten}) is not None) == flatten
    recipe = recipe_from_dict(rec)
    with _opened(recipe, ()) as (cks, base_ck, _):
        plan = plan_merge(recipe, cks, base_ck)
        assert [streams(plan, j) for j in plan.jobs] == [flatten]

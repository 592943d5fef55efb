"""``soup merge --device``: merged on a device, read and written on the CPU; refused cleanly where there is no such device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelsoup import merge
from modelsoup.cli import main
from modelsoup.devices import resolve_device
from modelsoup.engine import CPU, on_device, run_jobs
from modelsoup.errors import OptionError
from modelsoup.io.virtual import VirtualCheckpoint
from modelsoup.methods import available_methods
from modelsoup.plan import plan_merge
from modelsoup.recipe import recipe_from_dict

from .conftest import make_state
from .tolerances import FP32_VS_LIBRARY

CUDA = torch.cuda.is_available()


def _files(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        save_file(make_state(i + 1), p)
        paths.append(p)
    return paths


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_names_the_flag_and_the_fix(monkeypatch):
    assert resolve_device(None) == CPU and resolve_device("cpu") == CPU and resolve_device(torch.device("cpu")) == CPU
    with pytest.raises(OptionError, match=r"--device tpu: not a device; give cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(OptionError, match=r"--device mps: a merge computes on the CPU or an NVIDIA GPU"):
        resolve_device("mps")
    _no_cuda(monkeypatch)
    with pytest.raises(OptionError, match=r"--device cuda:1: CUDA is not available here .*Merge on the CPU \(leave out the flag, or --device cpu\)"):
        resolve_device("cuda:1")
    with pytest.raises(OptionError, match=r"^device='cuda': CUDA is not available"):
        resolve_device("cuda", "device=")


@pytest.mark.parametrize("flags, named", [(["--device", "cuda"], "--device cuda"), (["--cuda"], "--cuda (--device cuda)"),
                                          (["--device", "cuda:0", "--dry-run"], "--device cuda:0")])
def test_cli_refuses_cuda_where_there_is_none_before_reading(tmp_path, monkeypatch, capsys, flags, named):
    _no_cuda(monkeypatch)
    paths = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "-o", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert f"error: {named}: CUDA is not available" in err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_api_refuses_cuda_where_there_is_none(tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(OptionError, match="device='cuda': CUDA is not available"):
        merge(models=_files(tmp_path), output=tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def test_cuda_and_another_device_disagree(tmp_path, capsys):
    paths = _files(tmp_path)
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "o"), "--cuda", "--device", "cpu"]) == 2
    assert "--cuda and --device cpu disagree" in capsys.readouterr().err


@pytest.mark.parametrize("method, extra", [("linear", []), ("ties", ["--set", "density=0.4"]), ("dare_ties", ["--set", "density=0.6", "--seed", "3"]),
                                           ("slerp", ["--set", "t=0.3"])])
def test_device_cpu_equals_the_default_bit_for_bit(tmp_path, method, extra):
    paths = _files(tmp_path)
    models = paths[:2] if method == "slerp" else paths[1:]
    base = [] if method in ("linear", "slerp") else ["--base", str(paths[0])]
    outs = []
    for i, dev in enumerate(([], ["--device", "cpu"])):
        out = tmp_path / f"out{i}.safetensors"
        assert main(["merge", "--method", method, *base, *map(str, models), "-o", str(out), "--no-progress", "--no-hash", *extra, *dev]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def _method_args(m, shape=(64, 48)):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    n = m.min_models if m.max_models is not None and m.max_models < 3 else 3
    n = max(n, 2) if m.max_models is None or m.max_models >= 2 else 1
    ms = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return ms, ({"base": base} if m.base == "required" else {})


@pytest.mark.parametrize("m", available_methods(), ids=lambda m: m.name)
def test_every_method_is_unchanged_under_the_device_context(m):
    """The context that runs a method on a device (factories, CPU generator, numpy) changes nothing on the CPU itself."""
    ms, kw = _method_args(m)
    gen = (lambda: torch.Generator().manual_seed(11)) if m.random else (lambda: None)
    plain = m(ms, generator=gen(), **kw)
    with on_device(CPU):
        inside = m(ms, generator=gen(), **kw)
    assert torch.equal(plain, inside)


def test_the_device_context_is_per_thread_and_routes_generator_calls_to_the_cpu():
    import threading

    seen = {}
    with on_device(CPU):
        t = threading.Thread(target=lambda: seen.setdefault("modes", torch._C._len_torch_function_stack()))
        t.start()
        t.join()
        g = torch.Generator().manual_seed(1)
        r = torch.rand(4, generator=g)  # a factory given a CPU generator is made on the CPU, whatever the default device
    assert seen["modes"] == 0
    assert r.device == CPU and torch.equal(r, torch.rand(4, generator=torch.Generator().manual_seed(1)))


def _virtual_plan(method: str, params: dict | None = None):
    shapes = {"w": (300, 200), "v": (1000,), "big": (1100, 1000)}
    cks = [VirtualCheckpoint(shapes, seed=s, dtype=torch.float32, label=f"v{s}") for s in range(3)]
    base = VirtualCheckpoint(shapes, seed=99, dtype=torch.float32, label="base")
    data = {"method": method, "models": [{"source": {}} for _ in cks], "parameters": params or {}}
    needs_base = method not in ("linear", "slerp", "multislerp", "karcher", "nuslerp", "model_stock", "passthrough", "arcee_fusion", "nearswap")
    if needs_base:
        data["base"] = {"source": {}}
    rec = recipe_from_dict(data)
    return plan_merge(rec, cks, base if needs_base else None)


def _collect(plan, device) -> dict[str, torch.Tensor]:
    got = {}
    run_jobs(plan, lambda n, t: got.__setitem__(n, t), workers=2, progress=False, device=device)
    return got


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, params, exact", [("linear", {}, False), ("task_arithmetic", {}, False), ("ties", {"density": 0.4}, False),
                                                   ("dare_linear", {"density": 0.6}, False), ("dare_ties", {"density": 0.6}, False),
                                                   ("della", {"density": 0.6, "epsilon": 0.1}, False)])
def test_cuda_equals_cpu(method, params, exact):
    plan = _virtual_plan(method, params)
    cpu, gpu = _collect(plan, None), _collect(plan, "cuda")
    for name, t in cpu.items():
        assert gpu[name].device == CPU and gpu[name].dtype == t.dtype
        if exact:
            assert torch.equal(gpu[name], t), name
        else:
            torch.testing.assert_close(gpu[name], t, **FP32_VS_LIBRARY)
        if method.startswith(("dare", "della")):  # the CPU generator's masks, drawn on the CPU
            assert torch.equal(gpu[name] == 0, t == 0), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the wiring where there is no GPU")
def test_a_merge_on_cuda_really_moves_the_inputs_there(tmp_path):
    """Without a GPU, computing on cuda must fail: a device that is silently ignored merges on the CPU and says nothing."""
    from safetensors.torch import save_file

    from modelsoup.engine import MergeRun
    from modelsoup.io import open_checkpoint
    from modelsoup.plan import plan_merge
    from modelsoup.recipe import recipe_from_dict

    for i in range(2):
        save_file({"w": torch.full((4, 4), float(i))}, tmp_path / f"m{i}.safetensors")
    cks = [open_checkpoint(tmp_path / f"m{i}.safetensors") for i in range(2)]
    plan = plan_merge(recipe_from_dict({"method": "linear", "models": [str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors")]}), cks, None)
    job = next(j for j in plan.jobs if j.name == "w")
    assert torch.equal(MergeRun(plan).compute(job), torch.full((4, 4), 0.5))
    with pytest.raises((AssertionError, RuntimeError)):  # torch: "Torch not compiled with CUDA enabled"
        MergeRun(plan, device=torch.device("cuda")).compute(job)

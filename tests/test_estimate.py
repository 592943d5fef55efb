"""Knowing a merge's cost before it starts: ``soup plan``, ``soup merge --dry-run``, and the disk check of a real merge."""

from __future__ import annotations

import json
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelsoup import merge
from modelsoup.cli import main
from modelsoup.engine import CHUNK, job_cost, peak_in_flight
from modelsoup.errors import OptionError, OutputError
from modelsoup.estimate import MergeEstimate, estimate_merge, human_bytes, nearest_existing
from modelsoup.io.checkpoints import SafetensorsCheckpoint
from modelsoup.io.virtual import VirtualCheckpoint
from modelsoup.plan import plan_merge
from modelsoup.recipe import recipe_from_dict

from .conftest import make_state
from .golden.mergekit_fixtures import build_fixtures


def _files(tmp_path: Path, n: int = 3, dtype: torch.dtype = torch.float32) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in make_state(i + 1).items()}, p)
        paths.append(p)
    return paths


def _nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_dry_run_counts_bytes_exactly_and_writes_nothing(tmp_path):
    paths = _files(tmp_path, dtype=torch.bfloat16)
    est = merge(models=paths, output=tmp_path / "out", dry_run=True)
    assert isinstance(est, MergeEstimate)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_state(1).items()}
    assert est.tensors == len(sd) and est.bytes_written == _nbytes(sd)
    assert est.bytes_read == 3 * _nbytes(sd)  # every tensor of every model, the integer buffer included (they are compared)
    assert est.disk_folder == tmp_path and est.disk_free is not None and est.disk_needed > est.bytes_written
    assert est.throughput and est.throughput > 0 and est.seconds is not None and "measured:" in est.measured
    assert _left(tmp_path) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]  # no output, no temporary


def test_a_base_read_by_the_method_is_counted_and_copies_read_one_model(tmp_path):
    paths = _files(tmp_path)
    est = merge(models=paths[1:], base=paths[0], method="task_arithmetic", output=tmp_path / "o", dry_run=True,
                overrides=[{"match": "fc.bias", "take": "base"}])
    sd = make_state(1)
    floats = {k: v for k, v in sd.items() if v.is_floating_point() and k != "fc.bias"}
    ints = {k: v for k, v in sd.items() if not v.is_floating_point()}
    assert est.bytes_read == 3 * _nbytes(floats) + 3 * _nbytes(ints) + sd["fc.bias"].numel() * 4
    assert est.merged == len(floats) and est.computed == len(sd)


def test_peak_memory_is_the_engines_own_rule():
    shapes = {f"t{i}": (256, 256) for i in range(6)} | {"embed": (4096, 256)}
    cks = [VirtualCheckpoint(shapes, seed=s, dtype=torch.bfloat16) for s in range(4)]
    plan = plan_merge(recipe_from_dict({"method": "linear", "models": [{"source": {}} for _ in cks]}), cks, None)
    gpu = torch.device("cuda")  # a device other than the CPU: whole tensors (costs only; nothing runs there)
    small, big = job_cost(plan, plan.jobs[0], gpu), job_cost(plan, plan.jobs[-1], gpu)
    assert small == 256 * 256 * 4 * (4 + 2) and big == 16 * small  # 4 float32 inputs, the result and a temporary
    assert peak_in_flight(plan, workers=1, device=gpu) == big
    assert peak_in_flight(plan, workers=2, memory_budget=1, device=gpu) == big  # above the budget a job runs alone
    assert peak_in_flight(plan, workers=2, memory_budget=3 * small + 1, device=gpu) == big
    assert peak_in_flight(plan, workers=8, memory_budget=1 << 40, device=gpu) == big + 6 * small  # at most 2 x workers in flight: all 7
    assert peak_in_flight(plan, workers=2, memory_budget=1 << 40, device=gpu) == big + 3 * small  # 2 workers: the 4 costliest
    est = estimate_merge(plan, workers=2, measure=False, device=gpu)
    assert est.in_flight == peak_in_flight(plan, workers=2, device=gpu) and est.largest == ("embed", big)
    assert est.read_buffers == 4 * 4096 * 256 * 2 and est.peak_memory == est.in_flight + est.read_buffers  # 4 bfloat16 reads of the embedding
    assert est.output is None and est.disk_folder is None and est.seconds is None and est.bytes_read == 4 * 2 * (6 * 256 * 256 + 4096 * 256)
    # On the CPU the pointwise linear streams chunks: the chunk buffers (2 per float32 input, result and temporary, and
    # two of the method's), plus the inputs read whole, as a format that cannot read part of a tensor gives them.
    streamed = job_cost(plan, plan.jobs[-1])
    assert streamed == CHUNK * 4 * (2 * 6 + 2) + 4 * 4096 * 256 * 2 < big
    assert job_cost(plan, plan.jobs[0]) == 256 * 256 * 4 * (2 * 6 + 2) + 4 * 256 * 256 * 2
    est = estimate_merge(plan, workers=2, measure=False)
    assert est.read_buffers == 0 and est.largest == ("embed", streamed) and est.in_flight == peak_in_flight(plan, workers=2)


def test_streamed_jobs_from_files_cost_chunks_whatever_the_tensor_size(tmp_path):
    for i in range(2):
        save_file({"small": torch.randn(64, 64), "big": torch.randn(1024, 1024)}, tmp_path / f"m{i}.safetensors")
    est = merge(models=[tmp_path / f"m{i}.safetensors" for i in range(2)], output=tmp_path / "out", dry_run=True)
    assert est.largest[1] == CHUNK * 4 * (2 * 4 + 2)  # 2 inputs, the result and a temporary, for one chunk
    assert est.read_buffers == 0


def test_a_torch_output_stores_tied_names_once(tmp_path):
    from .conftest import TinyNet

    sds = []
    for s in (1, 2):
        torch.manual_seed(s)
        sds.append(TinyNet(tied=True).state_dict())
    st = merge(models=sds, output=tmp_path / "o.safetensors", dry_run=True)
    pt = merge(models=sds, output=tmp_path / "o.pt", dry_run=True)
    tied = sds[0]["head.weight"].numel() * 4
    assert st.bytes_written - pt.bytes_written == tied and st.computed == pt.computed == st.tensors - 1


def test_cli_dry_run_and_plan_print_text_and_json(tmp_path, capsys, monkeypatch):
    paths = [str(p) for p in _files(tmp_path)]
    assert main(["merge", *paths, "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for part in ("plan: linear on cpu", "read:", "write:", "memory:", "disk:", "time:", "dry run: nothing was written"):
        assert part in text
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--method", "ties", "--base", paths[0], *paths[1:], "--set", "density=0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "ties" and d["output"] == "merged" and d["fits_disk"] is True and d["tensors"] == len(make_state(1))
    assert {"bytes_read", "bytes_written", "peak_memory", "disk_needed", "disk_free", "seconds", "throughput", "measured"} <= set(d)
    assert _left(tmp_path) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_plan_takes_native_and_mergekit_recipes(tmp_path, capsys, monkeypatch):
    build_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mk.yml").write_text(textwrap.dedent("""\
        merge_method: ties
        base_model: models/base
        models:
          - {model: models/ft_a, parameters: {weight: 1.0, density: 0.5}}
          - {model: models/ft_b, parameters: {weight: 1.0, density: 0.5}}
        """))
    (tmp_path / "native.yaml").write_text("method: linear\nmodels:\n  - path: models/ft_a\n  - path: models/ft_b\n")
    before = _left(tmp_path)
    assert main(["plan", "mk.yml", "out", "--json"]) == 0
    mk = json.loads(capsys.readouterr().out)
    assert main(["plan", "native.yaml", "--json"]) == 0
    native = json.loads(capsys.readouterr().out)
    assert mk["method"] == "ties" and mk["output"] == "out" and native["method"] == "linear" and native["output"] == "merged"
    assert mk["bytes_written"] == native["bytes_written"] and mk["bytes_read"] > native["bytes_read"]  # ties reads the base too
    assert native["disk_needed"] > native["bytes_written"] + (tmp_path / "models/ft_a/config.json").stat().st_size
    assert main(["merge", "native.yaml", "-o", "out", "--dry-run"]) == 0 and "nothing was written" in capsys.readouterr().out
    assert _left(tmp_path) == before


def test_dry_run_of_a_multi_stage_recipe_is_refused(tmp_path, capsys):
    p = tmp_path / "stages.yml"
    p.write_text("name: a\nmerge_method: linear\nmodels: [{model: x}, {model: y}]\n---\nmerge_method: linear\nmodels: [{model: a}, {model: y}]\n")
    assert main(["plan", str(p)]) == 2
    assert "multi-stage recipe has no --dry-run" in capsys.readouterr().err
    with pytest.raises(OptionError, match="multi-stage recipe"):
        merge(p, tmp_path / "o", dry_run=True)


def test_a_merge_that_cannot_fit_is_refused_before_the_first_tensor_is_read(tmp_path, monkeypatch, capsys):
    paths = _files(tmp_path)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("modelsoup.estimate.shutil.disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))

    def no_read(self, name, *args):
        raise AssertionError("a tensor was read")

    for method in ("read", "read_mapped", "read_range"):  # whole, mapped (the engine), and chunks (streamed merges)
        monkeypatch.setattr(SafetensorsCheckpoint, method, no_read)
    out = tmp_path / "deep" / "out"
    with pytest.raises(OutputError, match=rf"needs .* bytes\) but {tmp_path} has 1.0 kB \(1000 bytes\) free; free space there, or write the output to another disk"):
        merge(models=paths, output=out)
    assert main(["merge", *map(str, paths), "-o", str(out), "--no-progress"]) == 2
    assert "free space there, or write the output to another disk (-o)" in capsys.readouterr().err
    assert _left(tmp_path) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]  # no output, no parent made, no temporary


def test_dry_run_estimate_says_when_it_does_not_fit(tmp_path, monkeypatch):
    paths = _files(tmp_path)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("modelsoup.estimate.shutil.disk_usage", lambda p: Usage(10**6, 10**6 - 10, 10))
    est = merge(models=paths, output=tmp_path / "o", dry_run=True)
    assert not est.fits_disk and "DOES NOT FIT" in est.describe()


def test_helpers():
    assert human_bytes(999) == "999 B" and human_bytes(1500) == "1.5 kB" and human_bytes(141.1e9) == "141.1 GB"
    assert nearest_existing(Path("/definitely/not/here/x")) == Path("/")


def test_disk_needed_counts_the_files_the_output_copies_not_a_git_clones_lfs_objects(tmp_path):
    # a git-lfs clone keeps a second copy of the weights under .git/lfs/objects, without a weight suffix
    folders = []
    for i in range(2):
        f = tmp_path / f"m{i}"
        (f / ".git" / "lfs" / "objects" / "ab").mkdir(parents=True)
        save_file({"w": torch.zeros(64, 64)}, f / "model.safetensors")
        (f / "config.json").write_text("{}")
        with open(f / ".git" / "lfs" / "objects" / "ab" / "abcdef", "wb") as fh:
            fh.truncate(1 << 30)  # sparse: 1 GB that takes no disk
        folders.append(f)
    est = merge({"method": "linear", "models": [str(f) for f in folders]}, tmp_path / "out", dry_run=True, progress=False)
    assert est.disk_needed < 1 << 20, est.disk_needed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_prepared_merge_costs_its_inputs_as_held_and_what_its_method_keeps(dtype):
    # the TIES family holds its whole inputs (half precision as stored: mapped, not widened), per model what its prepared
    # form keeps (TIES nothing tensor-sized, or in torch's order of ties a boolean mask and the sort's buffers, DARE a boolean mask, DELLA int16 codes; with rescale: l1 whole float32
    # deltas), and chunk buffers
    shapes = {"w": (4096, 512), "wide": (2, 1 << 15)}
    cks = [VirtualCheckpoint(shapes, seed=s, dtype=dtype) for s in range(4)]
    numel = 4096 * 512
    held = 4 * numel * dtype.itemsize
    chunks = 4 * CHUNK * (2 * (4 + 2) + 2)

    def cost(method: str, name: str = "w", **params) -> int:  # type: ignore[no-untyped-def]
        recipe = {"method": method, "base": {"source": {}}, "models": [{"source": {}} for _ in cks[1:]], "parameters": params, "seed": 0}
        plan = plan_merge(recipe_from_dict(recipe), cks[1:], cks[0])
        return job_cost(plan, next(j for j in plan.jobs if j.name == name))

    assert cost("ties", density=0.5) == held + chunks
    assert cost("ties", density=0.5, tie_break="torch_sort") == held + 3 * (numel + 8 * numel) + chunks  # a mask; keys, places
    assert cost("ties", density=0.5, rescale="l1") == held + 3 * 4 * 4 * numel + chunks
    assert cost("dare_ties", density=0.5) == held + 3 * numel + chunks  # one byte an entry
    assert cost("dare_ties", density=0.5, rescale="l1") == held + 3 * 2 * 4 * numel + chunks
    assert cost("della", density=0.6, epsilon=0.1) == held + 3 * 2 * numel + chunks
    assert cost("della", density=0.6, epsilon=0.1, rescale="l1") == held + 3 * 2 * 4 * numel + chunks
    small_chunks = 4 * (1 << 16) * (2 * (4 + 2) + 2)  # a tensor smaller than a chunk: its own size
    assert cost("della", "wide", density=0.6, epsilon=0.1) == 4 * (1 << 16) * dtype.itemsize + 3 * 2 * 4 * (1 << 16) + small_chunks

"""What a planned merge will cost, known before it starts: bytes read and written, memory, disk, tensors and time.

:func:`estimate_merge` reads a :class:`~modelsoup.plan.MergePlan` (metadata only) and, when asked to
measure, times the engine's own per-tensor code (:meth:`~modelsoup.engine.MergeRun.compute`) on a small
sample of the plan's tensors. Memory is the engine's own admission rule (:func:`~modelsoup.engine.peak_in_flight`),
so the figure moves with the engine. :func:`check_disk_space` refuses an output that cannot fit, before the
first tensor is read. ``soup merge --dry-run`` and ``soup plan`` print :meth:`MergeEstimate.describe`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import DEFAULT_MEMORY_BUDGET, MergeRun, computed_jobs, default_workers, job_cost, peak_in_flight, streams
from .errors import OutputError
from .io.formats import tensor_nbytes
from .io.output import model_files
from .plan import MergePlan, TensorJob

# The sample timed for the wall-time estimate: up to this many bytes read, up to this many tensors, and
# never past SAMPLE_SECONDS (a slow disk stops the sample early; the rate is what was measured by then).
SAMPLE_BYTES = 128 << 20
SAMPLE_TENSORS = 8
SAMPLE_SECONDS = 3.0

# Beyond the tensor data: a safetensors header entry per tensor (name, dtype, shape, offsets in JSON), each
# file's header and metadata (the recipe of a single-file output), and the records of a folder output
# (recipe.yaml, README.md, soup_manifest.json). Generous: the disk check must not pass a merge that then fails.
HEADER_PER_TENSOR = 160
OVERHEAD_PER_FILE = 64 << 10
RECORDS = 256 << 10


@dataclass(frozen=True)
class MergeEstimate:
    """The cost of one planned merge.

    Attributes:
        output: the output file or folder (None when the plan has no output form).
        method: the merge method.
        device: where merged tensors are computed.
        tensors: output tensors written (tied names included).
        computed: tensors computed (a tied name is written from its target's result).
        merged: tensors computed by the method (the rest are copies of one input).
        bytes_read: input tensor bytes the plan reads (each source of each computed tensor, in its stored dtype).
        bytes_written: output tensor bytes (a torch output stores tied names once).
        peak_memory: bytes of tensors held at once: ``in_flight`` plus ``read_buffers``; the process itself
            (torch, ~0.3-0.5 GB) comes on top.
        in_flight: bytes of tensors in flight at once, by the engine's admission rule (float32 inputs and
            results, method buffers: :func:`~modelsoup.engine.peak_in_flight`).
        read_buffers: the largest job's inputs as read, in their stored dtype, before the upcast to float32
            (none for float32 inputs): held beside the float32 copies while the job's inputs are read.
        memory_budget: the engine's budget for tensors in flight.
        largest: the costliest tensor and its bytes in flight (it runs alone when above the budget).
        workers: threads of the run.
        disk_needed: bytes the output needs on its file system: tensors, headers, copied model files, records.
            The output is written into a temporary folder beside it and renamed into place, so no second copy is
            needed; an output replaced with overwrite stays until the new one is in place.
        disk_folder: the existing folder whose file system the output goes to.
        disk_free: free bytes there (None when unknown, or a file system of no size such as /proc).
        throughput: bytes read per second measured on the sample (None when not measured).
        seconds: estimated wall time of the merge (None when not measured).
        measured: how the throughput was measured, in words.
    """

    output: Path | None
    method: str
    device: str
    tensors: int
    computed: int
    merged: int
    bytes_read: int
    bytes_written: int
    peak_memory: int
    in_flight: int
    read_buffers: int
    memory_budget: int
    largest: tuple[str, int]
    workers: int
    disk_needed: int
    disk_folder: Path | None
    disk_free: int | None
    throughput: float | None = None
    seconds: float | None = None
    measured: str = "not measured"
    notes: list[str] = field(default_factory=list)

    @property
    def fits_disk(self) -> bool:
        """Whether the output fits in the free space (True when the free space is unknown)."""
        return self.disk_free is None or self.disk_needed <= self.disk_free

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings, byte counts as ints)."""
        d = asdict(self)
        d["output"] = str(self.output) if self.output is not None else None
        d["disk_folder"] = str(self.disk_folder) if self.disk_folder is not None else None
        d["largest"] = {"tensor": self.largest[0], "bytes": self.largest[1]}
        d["fits_disk"] = self.fits_disk
        return d

    def describe(self) -> str:
        """The estimate as a few lines of text."""
        lines = [
            f"plan: {self.method} on {self.device}, {self.tensors} tensors ({self.computed} computed, {self.merged} by the method, "
            f"{self.computed - self.merged} copied)",
            f"read:    {human_bytes(self.bytes_read)} of input tensors",
            f"write:   {human_bytes(self.bytes_written)} of output tensors" + (f" to {self.output}" if self.output is not None else ""),
            f"memory:  about {human_bytes(self.peak_memory)} of tensors at once: {human_bytes(self.in_flight)} in flight ({self.workers} workers, "
            f"budget {human_bytes(self.memory_budget)}; the largest tensor '{self.largest[0]}' holds {human_bytes(self.largest[1])}"
            + (" and runs alone" if self.largest[1] > self.memory_budget else "") + f") + {human_bytes(self.read_buffers)} read before the "
            "upcast; plus the process itself (~0.5 GB)",
        ]
        free = f", {human_bytes(self.disk_free)} free" if self.disk_free is not None else ""
        lines.append(f"disk:    {human_bytes(self.disk_needed)} needed on {self.disk_folder}{free} (staged beside the output, then renamed: "
                     "no second copy)" + ("" if self.fits_disk else "  ** DOES NOT FIT **"))
        if self.seconds is not None and self.throughput is not None:
            lines.append(f"time:    about {human_seconds(self.seconds)} at {human_bytes(self.throughput)}/s read and merged ({self.measured})")
        else:
            lines.append(f"time:    {self.measured}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1.5 GB``: decimal units, as disks are sold and ``df -H`` prints."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _sources(job: TensorJob) -> list[tuple[int, str]]:
    """Every tensor a job reads: its inputs, its base, and a data-aware method's statistics."""
    return [*job.sources, *([job.base_source] if job.base_source is not None else []), *job.statistic_sources]


def job_reads(plan: MergePlan, job: TensorJob) -> int:
    """Input bytes one job reads: each of its sources, in the dtype it is stored in."""
    inputs = plan.inputs
    return sum(tensor_nbytes(*inputs[i].meta(name)) for i, name in _sources(job))


def read_buffers(plan: MergePlan, job: TensorJob, device: torch.device | None = None) -> int:
    """Bytes of a merged job's inputs as read, before the upcast (the engine keeps a float32 input as it is read);
    none for a streamed job, whose chunk buffers :func:`~modelsoup.engine.job_cost` counts."""
    if job.action != "merge" or streams(plan, job, device):
        return 0
    inputs = plan.inputs
    metas = [inputs[i].meta(name) for i, name in _sources(job)]
    return sum(tensor_nbytes(d, s) for d, s in metas if d.is_floating_point and d not in (torch.float32, torch.float64))


def nearest_existing(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (where the output's file system is)."""
    p = path.absolute()
    while not p.is_dir():
        if p.parent == p:
            break
        p = p.parent
    return p


def _copied_bytes(plan: MergePlan) -> int:
    """Bytes of the model files a folder output copies (config, tokenizer, ...): the non-weight files of the first model folder."""
    out = plan.output
    if out is None or out.as_file or not out.options.copy_files:
        return 0
    folders = [ck.folder for ck in [*([plan.base] if plan.base is not None else []), *plan.models] if ck.folder is not None]
    if not folders:
        return 0
    total = 0
    for _, files in model_files(folders[0]):  # the very files the output copies
        for _, real in files:
            try:
                total += os.stat(real).st_size
            except OSError:
                pass
    return total


def disk_needed(plan: MergePlan, bytes_written: int) -> int:
    """Bytes the output takes on disk: tensor data, headers, copied model files and records."""
    out = plan.output
    files = 1 if out is None or out.as_file or out.torch_format else max(1, math.ceil(bytes_written / max(1, out.options.shard_size)) + 1)
    return bytes_written + HEADER_PER_TENSOR * len(plan.jobs) + OVERHEAD_PER_FILE * files + RECORDS + _copied_bytes(plan)


def _sample(plan: MergePlan, jobs: list[TensorJob]) -> list[TensorJob]:
    """A deterministic sample of merged tensors of typical size: from the median size up, within SAMPLE_BYTES read."""
    merged = sorted((j for j in jobs if j.action == "merge"), key=lambda j: (j.nbytes, j.name))
    pool = merged or sorted(jobs, key=lambda j: (j.nbytes, j.name))
    out: list[TensorJob] = []
    read = 0
    for job in pool[len(pool) // 2:]:
        need = job_reads(plan, job)
        if out and read + need > SAMPLE_BYTES:
            break
        out.append(job)
        read += need
        if len(out) >= SAMPLE_TENSORS:
            break
    return out


def measure_throughput(plan: MergePlan, *, device: torch.device | str | None = None) -> tuple[float, str] | None:
    """Bytes read per second of the engine's own per-tensor code (read, upcast, method, cast back) on a sample of the plan.

    The sample is timed serially, without writing; a real run overlaps reading, merging and writing on
    several threads, so it is usually faster, unless writing is the slower part.

    Returns:
        (bytes per second, how it was measured), or None when the plan reads nothing.
    """
    sample = _sample(plan, computed_jobs(plan))
    if not sample:
        return None
    run = MergeRun(plan, device)
    read = 0
    done = 0
    t0 = time.perf_counter()
    for job in sample:
        if not (run.chunked(job) and run.compute_chunked(job, lambda i, chunk: None)):
            run.compute(job)
        read += job_reads(plan, job)
        done += 1
        if time.perf_counter() - t0 > SAMPLE_SECONDS:
            break
    dt = max(time.perf_counter() - t0, 1e-6)
    how = (f"measured: {done} tensor(s), {human_bytes(read)} read and merged serially in {dt:.2f} s, before writing; "
           "a run overlaps reading, merging and writing, so it is usually faster unless the output disk is slower")
    return read / dt, how


def estimate_merge(
    plan: MergePlan,
    *,
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str | None = None,
    measure: bool = True,
) -> MergeEstimate:
    """The cost of running ``plan`` (with :func:`~modelsoup.engine.run_jobs` and the plan's output form).

    Args:
        plan: a planned merge; its output form (``plan.output``) gives the disk figures.
        workers: threads of the run (default :func:`~modelsoup.engine.default_workers`).
        memory_budget: the engine's budget for tensors in flight.
        device: where merged tensors are computed (also where the sample is timed).
        measure: time a small sample of the plan's tensors (reads real input data) for the wall-time estimate.

    Returns:
        The estimate; nothing is written.
    """
    jobs = computed_jobs(plan)
    n = workers or default_workers()
    reads = sum(job_reads(plan, j) for j in jobs)
    out = plan.output
    written = sum(j.nbytes for j in (jobs if out is not None and out.torch_format else plan.jobs))
    dev = torch.device(device) if device is not None else None
    largest = max(jobs, key=lambda j: job_cost(plan, j, dev))
    folder = nearest_existing(out.path.parent) if out is not None else None
    free: int | None = None
    if folder is not None:
        try:
            usage = shutil.disk_usage(folder)
            free = usage.free if usage.total > 0 else None  # /proc, /sys: no disk behind them; writing there fails on its own
        except OSError:
            free = None
    throughput = seconds = None
    how = "not measured (pass measure=True)"
    if measure:
        got = measure_throughput(plan, device=device)
        if got is not None:
            throughput, how = got
            seconds = reads / throughput if throughput > 0 else None
        else:
            how = "nothing to read"
    in_flight = peak_in_flight(plan, workers=n, memory_budget=memory_budget, device=dev)
    buffers = max(read_buffers(plan, j, dev) for j in jobs)
    return MergeEstimate(
        output=out.path if out is not None else None, method=plan.method.name, device=str(device or "cpu"), tensors=len(plan.jobs),
        computed=len(jobs), merged=sum(1 for j in jobs if j.action == "merge"), bytes_read=reads, bytes_written=written,
        peak_memory=in_flight + buffers, in_flight=in_flight, read_buffers=buffers, memory_budget=memory_budget,
        largest=(largest.name, job_cost(plan, largest, dev)), workers=n, disk_needed=disk_needed(plan, written), disk_folder=folder, disk_free=free,
        throughput=throughput, seconds=seconds, measured=how,
    )


def check_disk_space(estimate: MergeEstimate) -> None:
    """Refuse an output that cannot fit on its file system (call before the first tensor is read).

    Raises:
        OutputError: naming the folder, the bytes needed and the bytes free.
    """
    if estimate.fits_disk:
        return
    assert estimate.disk_free is not None
    raise OutputError(
        f"{estimate.output}: the output needs {human_bytes(estimate.disk_needed)} ({estimate.disk_needed} bytes) but {estimate.disk_folder} "
        f"has {human_bytes(estimate.disk_free)} ({estimate.disk_free} bytes) free; free space there, or write the output to another disk (-o). "
        "Nothing was read or written"
    )

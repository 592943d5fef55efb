"""The per-tensor streaming loop: read -> upcast -> method -> cast back -> write.

Tensors are processed independently on a small thread pool (torch kernels, positioned reads and writes
all release the GIL), with a bounded number in flight so memory stays at about one tensor per model per
worker. Results do not depend on the number of workers or on completion order: each tensor's
computation sees only its own inputs and its own generator, seeded from (seed, tensor name).

Pointwise methods (``register(pointwise=True)``: linear, task arithmetic, EMA, ...) and copies stream each
tensor in flat chunks of :data:`CHUNK` elements instead: every input chunk is read with positioned I/O into
a buffer the worker thread reuses, upcast, merged and cast back into another, and written at its place in
the output, so the steady state allocates no tensor-sized memory (fresh pages, which the kernel must zero,
were most of a linear merge's time) and memory does not grow with the model. Elementwise kernels give the
same bits on a chunk as on the whole tensor, so the output is bit-identical to the whole-tensor path, which
still runs for everything else (and produces the errors, see :meth:`MergeRun.compute_chunked`).

With a ``device`` (``cuda``, ``cuda:N``) each merged tensor's inputs are moved there after reading, the
method runs there and the result comes back to the CPU for the sink: reading and writing stay on the CPU,
as mergekit's ``--cuda`` does. Random methods keep the CPU generator (:func:`tensor_seed`): the random
draws (``torch.bernoulli(..., generator=)``) run on the CPU and their result is moved to the device, so the
masks are the CPU's bit for bit. See :func:`on_device` for how the CPU-written methods run unchanged there.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .errors import MethodError, NonFiniteError
from .io import Checkpoint
from .io.formats import tensor_nbytes
from .methods import kernels
from .methods.ops import all_finite
from .plan import MergePlan, Source, TensorJob
from .progress import progress_on

log = logging.getLogger("modelsoup")


def tensor_seed(seed: int, name: str) -> int:
    """Seed of a tensor's generator: depends on the recipe seed and the tensor name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# Bytes of tensors that jobs in flight may hold together (inputs upcast to float32, plus the result).
# A job larger than this runs alone. Keeps peak memory near max(budget, largest job) for any model size.
DEFAULT_MEMORY_BUDGET = 1 << 30


# Inputs of a tensor at least this large are read concurrently (one read per model), so the few
# embedding-sized tensors that run alone under the memory budget still use every core.
PARALLEL_READ_BYTES = 16 << 20
_READ_POOL = ThreadPoolExecutor(4, thread_name_prefix="soup-read")


# Elements per chunk of a streamed tensor. Method temporaries of a chunk (float64 sums: 1 MiB) stay below
# the 2 MiB at which torch's allocator takes fresh huge pages, so they are recycled from the heap;
# 128K measured as fast as 256K with fused kernels and 2.8x faster than 256K through the methods.
CHUNK = 1 << 17


class _Pool(threading.local):
    """Chunk buffers of one worker thread, by (role, dtype), made once and reused for every chunk."""

    def get(self, role: object, dtype: torch.dtype, size: int = CHUNK) -> torch.Tensor:
        bufs: dict[tuple[object, torch.dtype, int], torch.Tensor] = self.__dict__.setdefault("bufs", {})
        buf = bufs.get((role, dtype, size))
        if buf is None:
            buf = bufs[(role, dtype, size)] = torch.empty(size, dtype=dtype)
        return buf


class _NotFinite(Exception):
    """A chunk held NaN/Inf: the whole-tensor path reruns the job and names the problem."""


def default_workers() -> int:
    """Threads for the streaming loop: enough to overlap reading, computing and writing."""
    return max(2, min(8, (os.cpu_count() or 2) + 1))


CPU = torch.device("cpu")


class _OnDevice(TorchFunctionMode):
    """Runs a method written for CPU tensors on another device, unchanged (see :func:`on_device`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            # the CPU generator draws on the CPU, whatever device the tensors are on: the CPU's masks, bit for bit
            def to_cpu(x: Any) -> Any:
                return x.to(CPU) if isinstance(x, torch.Tensor) and x.device.type != "cpu" else x

            def back(x: Any) -> Any:
                return x.to(self.device) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x

            kwargs = tree_map(to_cpu, kwargs)
            if func in _device_constructors():  # torch.rand(shape, generator=g): made on the generator's CPU, not the default device
                kwargs.setdefault("device", CPU)
            return tree_map(back, func(*tree_map(to_cpu, args), **kwargs))
        if func is torch.Tensor.numpy and args and args[0].device.type != "cpu":
            return func(args[0].to(CPU), *args[1:], **kwargs)  # a copy: the methods read these arrays, never write through them
        return func(*args, **kwargs)


def on_device(device: torch.device) -> ExitStack:
    """A context (of the calling thread only) in which a merge method written for CPU tensors runs on ``device``.

    - tensors made without a ``device=`` (``torch.empty(n)``, ``torch.zeros(shape)``) are made on ``device``
      (``torch.device`` as a context);
    - a call given a CPU ``generator=`` (the per-tensor generator of random methods) runs on the CPU with its
      tensor arguments copied there, and its result is moved to ``device``: the same random draws as on the CPU;
    - ``Tensor.numpy()`` of a device tensor gives an array of a CPU copy (the top-k selection of TIES-like
      methods reads magnitudes through numpy; no method writes through such an array).
    """
    stack = ExitStack()
    stack.enter_context(torch.device(device))
    stack.enter_context(_OnDevice(device))
    return stack


class MergeRun:
    """One run of a plan: computes output tensors, and gathers what it notices while doing so.

    Args:
        plan: the planned merge.
        device: where merged tensors are computed (:func:`resolve_device`); inputs are read and results
            returned on the CPU. Copies (``base``/``first``/``nonfloat`` jobs) never leave the CPU.
    """

    def __init__(self, plan: MergePlan, device: torch.device | str | None = None) -> None:
        self.plan = plan
        self.device = CPU if device is None else torch.device(device)
        self._lock = threading.Lock()
        self._disagreeing: list[tuple[str, str]] = []  # (tensor, the input it was taken from)
        self.inputs = plan.inputs

    def _read(self, ck: Checkpoint, name: str, upcast: bool = False, device: torch.device = CPU, keep_half: bool = False) -> torch.Tensor:
        """Read a tensor (in float32 if ``upcast`` and floating, float16 and bfloat16 kept as stored with ``keep_half``;
        moved to ``device`` first), refusing NaN/Inf unless allowed.

        Large safetensors tensors are mapped, not copied (``read_mapped``): a method's inputs may start at any alignment.
        """
        t = ck.read_mapped(name) if hasattr(ck, "read_mapped") else ck.read(name)
        if not t.is_floating_point():
            return t
        if device.type != "cpu":
            t = t.to(device)  # moved in its stored dtype (half the bytes of float32); the upcast below is exact either way
        half = keep_half and t.dtype in (torch.float16, torch.bfloat16)  # the method widens it itself, exactly
        wide = t if t.dtype in (torch.float32, torch.float64) or half else t.to(torch.float32)
        if not self.plan.allow_nonfinite and not all_finite(wide):  # all_finite reads half precision as stored: no copy
            bad = int((~torch.isfinite(wide)).sum())
            raise NonFiniteError(
                f"{ck.label}: tensor '{name}' holds {bad} NaN/Inf value(s) of {t.numel()}; fix the checkpoint, "
                "or set allow_nonfinite: true (--allow-nonfinite) to merge it anyway"
            )
        if half:
            return t
        return wide.to(torch.float32) if upcast else t

    def _get(self, src: Source, upcast: bool = False, device: torch.device = CPU, keep_half: bool = False) -> torch.Tensor:
        return self._read(self.inputs[src[0]], src[1], upcast, device, keep_half)

    def compute(self, job: TensorJob) -> torch.Tensor:
        """Compute one output tensor (in its output dtype)."""
        plan = self.plan
        if job.action in ("base", "first"):
            return self._get(job.sources[0]).to(job.dtype, copy=True)
        if job.action == "nonfloat":
            ref = self._get(job.sources[0])
            if any(not torch.equal(ref, self._get(s)) for s in job.sources[1:]):
                with self._lock:
                    self._disagreeing.append((job.name, self.inputs[job.sources[0][0]].label))
            return ref.clone()
        dev = self.device
        tensors, base = self._inputs(job, dev, half=plan.method.whole_half)
        gen = self._generator(job)
        extra = self._statistics(job, dev)
        if dev.type != "cpu":
            return self.finish(job, self._on_device(job, tensors, base, gen, extra).to(CPU))
        out = plan.method(tensors, base=base, weights=job.weights, generator=gen, **extra, **job.params)
        return self.finish(job, out)

    def _statistics(self, job: TensorJob, device: torch.device = CPU) -> dict[str, Any]:
        """``statistics=`` for a data-aware method: each ingredient's statistic of the job's tensor, as stored (a Gram
        in float64 stays float64), or None where the tensor has none; nothing for other methods."""
        if self.plan.method.statistic is None:
            return {}
        return {"statistics": [self._get(s, device=device) for s in job.statistic_sources] or None}

    def _inputs(self, job: TensorJob, device: torch.device = CPU, half: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A merge job's whole inputs and base, upcast to float32 (float16 and bfloat16 kept as stored with ``half``) and
        finite-checked (large tensors' models read concurrently)."""
        if job.nbytes >= PARALLEL_READ_BYTES and len(job.sources) > 1:
            tensors = list(_READ_POOL.map(lambda s: self._get(s, upcast=True, device=device, keep_half=half), job.sources))
        else:
            tensors = [self._get(s, upcast=True, device=device, keep_half=half) for s in job.sources]
        base = self._get(job.base_source, upcast=True, device=device, keep_half=half) if job.base_source is not None else None
        return tensors, base

    def _generator(self, job: TensorJob) -> torch.Generator | None:
        """The job's own generator for a random method (seeded from the recipe seed and the tensor name), else None."""
        return torch.Generator().manual_seed(tensor_seed(self.plan.seed, job.name)) if self.plan.method.random else None

    def _as_written(self, job: TensorJob, out: torch.Tensor, out_buf: torch.Tensor) -> torch.Tensor:
        """A result chunk in the output dtype (cast into ``out_buf`` if needed).

        Raises:
            _NotFinite: it holds NaN/Inf and they are not allowed (the whole path then names the problem).
        """
        result = out if out.dtype == job.dtype else out_buf[: out.numel()].copy_(out)
        if not self.plan.allow_nonfinite and not all_finite(result):
            raise _NotFinite
        return result

    def chunked(self, job: TensorJob) -> bool:
        """Whether :meth:`compute_chunked` streams this job (see :func:`streams`)."""
        return streams(self.plan, job, self.device)

    def _chunks(self, src: Source, role: int, pool: _Pool, upcast: bool, size: int = CHUNK, half: bool = False,
                checked: bool = True) -> Callable[[int, int], torch.Tensor]:
        """Reads chunk [i, j) of a source: from the file into this thread's buffer where the format reads ranges
        (else a view of the tensor read once), finite-checked as :meth:`_read` checks it (unless not ``checked``: the
        caller checks what the chunk becomes), in float32 if ``upcast``."""
        ck, name = self.inputs[src[0]], src[1]
        dtype = ck.meta(name)[0]
        read_range = getattr(ck, "read_range", None)
        whole: list[torch.Tensor] = []

        def raw(i: int, j: int) -> torch.Tensor:
            if read_range is not None:
                return read_range(name, i, j, pool.get(("in", role), dtype, size))
            if not whole:
                whole.append(ck.read(name).reshape(-1))
            return whole[0][i:j]

        if not dtype.is_floating_point:
            return raw
        check = checked and not self.plan.allow_nonfinite

        def read(i: int, j: int) -> torch.Tensor:
            t = raw(i, j)
            if half and t.dtype in (torch.float16, torch.bfloat16):  # the method widens it exactly itself
                if check and not all_finite(t):
                    raise _NotFinite
                return t
            wide = t if t.dtype in (torch.float32, torch.float64) else pool.get(("f32", role), torch.float32, size)[: j - i].copy_(t)
            if check and not all_finite(wide):
                raise _NotFinite
            if not upcast or wide.dtype == torch.float32:
                return wide if upcast else t
            return pool.get(("f32", role), torch.float32, size)[: j - i].copy_(wide)

        return read

    def compute_chunked(self, job: TensorJob, emit: Callable[[int, torch.Tensor], None]) -> bool:
        """Compute a streamed job chunk by chunk, handing ``emit(start, chunk)`` each result (in the output dtype, in a
        buffer reused for the next chunk); bit-identical to :meth:`compute`.

        Returns:
            False if an input or result chunk was not finite (and NaN/Inf are not allowed): nothing more is emitted,
            and the caller reruns the job with :meth:`compute`, which raises the error naming the tensor and the count.
        """
        plan, n = self.plan, math.prod(job.shape)
        pool = _POOL
        merging = job.action == "merge"
        out_buf = pool.get("out", job.dtype)
        if merging and plan.method.prepare is not None:
            return self._prepared(job, emit, out_buf)
        half = merging and plan.method.takes_half
        reduction = plan.method.streamed_reduction(job.params) if merging else None
        # unchecked where the result chunk's check covers the inputs, or where a reduction's first pass has checked
        # every entry of every input already (this pass reads the same entries again)
        checked = not (merging and (plan.method.carries_nonfinite or reduction is not None))
        readers = [self._chunks(s, k, pool, upcast=merging, half=half, checked=checked) for k, s in enumerate(job.sources)]
        base = self._chunks(job.base_source, -1, pool, upcast=True, half=half, checked=checked) if merging and job.base_source is not None else None
        method: Callable[..., torch.Tensor] = plan.method
        kernel = plan.method.chunk_kernel if merging else None
        try:
            if reduction is not None:  # first pass: the method's sums over its own slices, in order
                size = reduction.chunk
                wide = [self._chunks(s, k, pool, upcast=True, size=size, half=half) for k, s in enumerate(job.sources)]
                wide_base = self._chunks(job.base_source, -1, pool, upcast=True, size=size, half=half) if job.base_source is not None else None
                sums = reduction.sums(lambda i, j: ([r(i, j) for r in wide], wide_base(i, j) if wide_base else None), n, job.weights, job.params)
                method = functools.partial(reduction.apply, sums)
            for i in range(0, n, CHUNK):
                j = min(i + CHUNK, n)
                if not merging:  # a copy, cast to the output dtype
                    t = readers[0](i, j)
                    emit(i, t if t.dtype == job.dtype else out_buf[: j - i].copy_(t))
                    continue
                ins = [r(i, j) for r in readers]
                if kernel is not None:
                    out = kernel(ins, base=base(i, j) if base is not None else None, weights=job.weights,
                                 buffer=lambda role, dtype, n=j - i: pool.get(("kernel", role), dtype)[:n], **job.params)
                else:
                    out = method(ins, base=base(i, j) if base is not None else None, weights=job.weights, **job.params)
                if tuple(out.shape) != (j - i,):
                    raise RuntimeError(f"pointwise method '{plan.method.name}' returned shape {list(out.shape)} for a chunk of {j - i} of '{job.name}'")
                emit(i, self._as_written(job, out, out_buf))
        except _NotFinite:
            return False
        return True

    def _prepared(self, job: TensorJob, emit: Callable[[int, torch.Tensor], None], out_buf: torch.Tensor) -> bool:
        """A :attr:`~modelsoup.methods.registry.MergeMethod.prepare` method: its whole inputs read as :meth:`compute`
        reads them (large ones mapped, not copied), its result computed and emitted a chunk at a time; False where the
        method needs its whole-tensor path for this tensor (the caller then runs :meth:`compute`)."""
        method = self.plan.method
        tensors, base = self._inputs(job, half=method.takes_half)  # a method that takes half widens each chunk itself
        params = method.filled(job.params)
        if method.random:
            params["generator"] = self._generator(job)
        assert method.prepare is not None
        prepared = method.prepare(tensors, base=base, weights=job.weights, **params)
        if prepared is None:
            return False
        n = math.prod(job.shape)
        try:
            for i in range(0, n, CHUNK):
                emit(i, self._as_written(job, prepared.chunk(i, min(i + CHUNK, n)), out_buf))
        except _NotFinite:
            return False  # the whole path names the overflow
        return True

    def finish(self, job: TensorJob, out: torch.Tensor) -> torch.Tensor:
        """A method's float32 result for ``job`` as written: shape checked, cast to the output dtype, refused if not finite."""
        plan = self.plan
        if tuple(out.shape) != job.shape:
            raise RuntimeError(f"method '{plan.method.name}' returned shape {list(out.shape)} for '{job.name}' {list(job.shape)}")
        result = out.to(job.dtype)
        if not plan.allow_nonfinite and not all_finite(result):
            wide = result.to(torch.float32)
            bad = int((~torch.isfinite(wide)).sum())
            raise NonFiniteError(
                f"merged tensor '{job.name}' holds {bad} NaN/Inf value(s) of {result.numel()} in {str(job.dtype).replace('torch.', '')}: "
                "the method's result overflows the output dtype (weights too large? normalize: false?). Lower the weights, "
                "set normalize: true, or write a wider dtype (--dtype float32 / bfloat16); allow_nonfinite: true (--allow-nonfinite) writes it anyway"
            )
        return result.to(CPU) if result.device.type != "cpu" else result

    def _on_device(self, job: TensorJob, tensors: list[torch.Tensor], base: torch.Tensor | None, gen: torch.Generator | None,
                   extra: dict[str, Any] | None = None) -> torch.Tensor:
        """The method on ``self.device`` (see :func:`on_device`), its failures named with the way out."""
        plan = self.plan
        try:
            with on_device(self.device):
                return plan.method(tensors, base=base, weights=job.weights, generator=gen, **(extra or {}), **job.params)
        except torch.cuda.OutOfMemoryError:
            raise MethodError(f"method '{plan.method.name}' ran out of memory on {self.device} for tensor '{job.name}' {list(job.shape)}: "
                              "lower --workers (fewer tensors at once on the GPU), or merge on the CPU (--device cpu)") from None
        except (RuntimeError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MethodError(f"method '{plan.method.name}' failed on {self.device} for tensor '{job.name}': {first}. Merge on the CPU "
                              "(--device cpu, the default); please report the method and this message") from e

    def finish_notes(self) -> list[str]:
        """Notes gathered while merging (integer buffers that differed), logged once."""
        plan = self.plan
        if self._disagreeing:
            src = " / ".join(dict.fromkeys(label for _, label in self._disagreeing))
            names = sorted(name for name, _ in self._disagreeing)
            msg = f"{len(names)} non-floating tensor(s) differ across models and were taken from {src}, not averaged: " + ", ".join(names[:8])
            log.info(msg)
            plan.notes.append(msg)
            self._disagreeing = []
        return plan.notes


_POOL = _Pool()


def streams(plan: MergePlan, job: TensorJob, device: torch.device | None = None) -> bool:
    """Whether the engine streams ``job`` in chunks (:meth:`MergeRun.compute_chunked`), on the CPU, for a tensor with
    elements: a copy of a floating tensor, or a merge by a method that is pointwise, reduces then combines pointwise
    (``reduction``), or computes its result a chunk at a time from its whole inputs (``prepare``)."""
    if device is not None and device.type != "cpu" or not job.shape or math.prod(job.shape) == 0:
        return False
    if job.action in ("base", "first"):
        return job.dtype.is_floating_point
    method = plan.method
    return job.action == "merge" and (method.pointwise or method.streamed_reduction(job.params) is not None or method.prepare is not None)


def computed_jobs(plan: MergePlan) -> list[TensorJob]:
    """The jobs :func:`run_jobs` computes: a tied name whose target is planned is written from its target's result."""
    planned = {j.name for j in plan.jobs}
    return [j for j in plan.jobs if j.alias_of is None or j.alias_of not in planned]


def job_cost(plan: MergePlan, job: TensorJob, device: torch.device | None = None) -> int:
    """Bytes a job holds while it runs, as :func:`run_jobs` counts them against its memory budget.

    Inputs and result in float32, the method's own buffers (its ``workspace`` per model), and a few temporaries;
    for a streamed job (:func:`streams`) the same counted for one chunk, plus any input whose format cannot read
    part of a tensor (read whole).
    """
    readers = len(job.sources) + (1 if job.base_source is not None else 0)
    buffers = readers + 2 + plan.method.workspace * len(job.sources) + (2 if plan.method.workspace else 0)
    f32 = job.nbytes * 4 // max(job.dtype.itemsize, 1)
    if not streams(plan, job, device):  # a data-aware method also holds its statistics, and as much again to solve with them
        held = sum(tensor_nbytes(*plan.inputs[s[0]].meta(s[1])) for s in job.statistic_sources)
        return f32 * buffers + 2 * held
    numel = math.prod(job.shape)
    if job.action == "merge" and plan.method.prepare is not None:
        # whole inputs (float32, or as stored where the method takes half precision: mapped from the page cache), what
        # the prepared form holds per model, and its chunk buffers; no tensor-sized result
        held = sum(_held_input_bytes(plan, s) for s in (*job.sources, *([job.base_source] if job.base_source else [])))
        chunk_buffers = 4 * min(numel, CHUNK) * (2 * (readers + 2) + 2)  # a row per input, the result, temporaries
        return held + int(f32 * plan.method.prepared_buffers(job.params, job.shape)) * len(job.sources) + chunk_buffers
    reduction = plan.method.streamed_reduction(job.params) if job.action == "merge" else None
    chunk = max(CHUNK, reduction.chunk) if reduction is not None else CHUNK
    whole = sum(tensor_nbytes(*plan.inputs[s[0]].meta(s[1])) for s in (*job.sources, *([job.base_source] if job.base_source else []))
                if not hasattr(plan.inputs[s[0]], "read_range"))
    return f32 * min(numel, chunk) // numel * (2 * buffers + 2) + whole


def _held_input_bytes(plan: MergePlan, src: Source) -> int:
    """Bytes of one whole input of a prepared merge as :meth:`MergeRun._inputs` holds it: float16 and bfloat16 as stored
    where the method takes half precision, any other floating input in float32 (as it is widened)."""
    dtype, shape = plan.inputs[src[0]].meta(src[1])
    kept = plan.method.takes_half and dtype in (torch.float16, torch.bfloat16)
    return math.prod(shape) * (dtype.itemsize if kept or not dtype.is_floating_point else 4)


def peak_in_flight(plan: MergePlan, *, workers: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                   device: torch.device | None = None) -> int:
    """The most bytes of tensors :func:`run_jobs` holds at once, by its own admission rule (:func:`job_cost`).

    Jobs are admitted while at most ``2 * workers`` are in flight and their costs stay within ``memory_budget``;
    a job above the budget runs alone. So the peak is the largest job, or at most the budget (and at most the
    ``2 * workers`` costliest jobs together), whichever is larger. One worker runs one job at a time.
    """
    costs = sorted(job_cost(plan, j, device) for j in computed_jobs(plan))
    if not costs:
        return 0
    n = workers or default_workers()
    if n <= 1:
        return costs[-1]
    return max(costs[-1], min(memory_budget, sum(costs[-2 * n:])))


def run_jobs(
    plan: MergePlan,
    write: Callable[[str, torch.Tensor], None],
    *,
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "merging",
    order: Sequence[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str | None = None,
    write_range: Callable[[str, int, torch.Tensor], None] | None = None,
) -> None:
    """Compute every job of ``plan`` and hand each result to ``write``, on a thread pool.

    Args:
        plan: the planned merge.
        write: called once per output name (thread-safe sink); tied names get the same tensor.
        workers: threads (default :func:`default_workers`); 1 runs inline.
        progress: show a tqdm bar (tensors and bytes); None = only on a terminal.
        desc: bar label.
        order: run jobs in this order of names (the sink's file order) rather than the plan's.
        memory_budget: bytes that jobs in flight may hold together; a larger job runs alone.
        device: where merged tensors are computed (:class:`MergeRun`); None = the CPU.
        write_range: the sink's ``write_range(name, start, chunk)``, if it takes tensors in pieces: streamed jobs
            (:func:`streams`) then hand it each chunk as computed, and nothing tensor-sized is allocated for them;
            without it their chunks are gathered into one tensor for ``write``.

    While it runs, Python's garbage collector is paused (the loop makes no reference cycles; a collection
    costs time in proportion to every object alive), and each job runs torch with the caller's threads divided
    by :func:`default_workers` (one for a streamed job: chunks are too small to split).
    """
    run = MergeRun(plan, device)
    if ((plan.method.prepare is not None or plan.method.reduction is not None) and run.device.type == "cpu"
            and any(j.dtype == torch.bfloat16 for j in plan.jobs)):
        kernels.warm_up()  # the TIES family's chunks and the sphere methods' passes of bfloat16 models run on them
    jobs = computed_jobs(plan)
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        jobs.sort(key=lambda j: rank.get(j.name, len(rank)))
    tied = {j.name: j.alias_of for j in plan.jobs if j not in jobs}
    total = plan.nbytes
    show = progress_on(progress)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show, leave=False)
    by_target: dict[str, list[str]] = {}
    for alias, target in tied.items():
        by_target.setdefault(target, []).append(alias)

    threads = torch.get_num_threads()
    n = workers or default_workers()
    # torch threads of each job (a per-thread setting): the default workers share the caller's threads, since kernels
    # of several workers each spinning up a full team oversubscribe the cores (TIES measured 14% faster this way).
    # Results do not depend on it: the methods' reductions are modelsoup.methods.reduce's, the same on any thread count
    # (except the data-aware methods' linear algebra, which is LAPACK's).
    per_worker = max(1, threads // default_workers())

    def streamed(job: TensorJob, names: list[str]) -> bool:
        """Run a streamed job into the sink; False if it must be rerun whole (see :meth:`MergeRun.compute_chunked`)."""
        torch.set_num_threads(1)  # chunks are too small to split
        try:
            if write_range is not None:
                def emit(i: int, chunk: torch.Tensor) -> None:
                    for name in names:
                        write_range(name, i, chunk)

                return run.compute_chunked(job, emit)
            out = torch.empty(job.shape, dtype=job.dtype)
            flat = out.view(-1)
            if not run.compute_chunked(job, lambda i, chunk: flat[i : i + chunk.numel()].copy_(chunk)):
                return False
            for name in names:
                write(name, out)
            return True
        finally:
            torch.set_num_threads(per_worker)

    def one(job: TensorJob) -> int:
        names = [job.name, *by_target.get(job.name, ())]
        if torch.get_num_threads() != per_worker:
            torch.set_num_threads(per_worker)
        try:
            if not (run.chunked(job) and streamed(job, names)):
                out = run.compute(job)
                for name in names:
                    write(name, out)
        except MethodError as e:
            if f"'{job.name}'" in str(e):
                raise
            raise MethodError(f"tensor '{job.name}': {e}") from e  # a method's own error names the tensor here
        return job.nbytes * len(names)

    done = 0
    collecting = gc.isenabled()
    gc.disable()
    try:
        if n <= 1:
            for job in jobs:
                bar.update(one(job))
                done += 1
                bar.set_postfix_str(f"{done}/{len(jobs)} tensors", refresh=False)
        else:
            def cost(job: TensorJob) -> int:
                return job_cost(plan, job, run.device)

            with ThreadPoolExecutor(n, thread_name_prefix="soup") as pool:
                pending: dict[Future[int], int] = {}

                def drain(block_until_one: bool) -> None:
                    nonlocal done
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED) if block_until_one else (set(), None)
                    for f in finished:
                        bar.update(f.result())
                        del pending[f]
                        done += 1
                    bar.set_postfix_str(f"{done}/{len(jobs)} tensors", refresh=False)

                try:
                    for job in jobs:
                        c = cost(job)
                        while pending and (len(pending) >= 2 * n or sum(pending.values()) + c > memory_budget):
                            drain(True)
                        pending[pool.submit(one, job)] = c
                    while pending:
                        drain(True)
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    finally:
        bar.close()
        torch.set_num_threads(threads)  # this thread's, and the default for threads made later, which a worker's setting changed
        if collecting:
            gc.enable()
    if tied:
        log.info("%d tied tensor name(s) share storage with another; computed once and written under each name", len(tied))
    run.finish_notes()


def collect(plan: MergePlan, *, workers: int | None = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Run a merge into memory: every output tensor by name, in plan order."""
    result: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def keep(name: str, t: torch.Tensor) -> None:
        with lock:
            result[name] = t

    run_jobs(plan, keep, workers=workers, progress=progress)
    return {j.name: result[j.name] for j in plan.jobs}

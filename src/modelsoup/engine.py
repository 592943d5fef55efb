"""The per-tensor streaming loop: read -> upcast -> method -> cast back -> write.

Tensors are processed independently on a small thread pool (torch kernels, positioned reads and writes
all release the GIL), with a bounded number in flight so memory stays at about one tensor per model per
worker. Results do not depend on the number of workers or on completion order: each tensor's
computation sees only its own inputs and its own generator, seeded from (seed, tensor name).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteError
from .io import Checkpoint
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


def default_workers() -> int:
    """Threads for the streaming loop: enough to overlap reading, computing and writing."""
    return max(2, min(8, (os.cpu_count() or 2) + 1))


class MergeRun:
    """One run of a plan: computes output tensors, and gathers what it notices while doing so.

    Args:
        plan: the planned merge.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._disagreeing: list[tuple[str, str]] = []  # (tensor, the input it was taken from)
        self.inputs = plan.inputs

    def _read(self, ck: Checkpoint, name: str, upcast: bool = False) -> torch.Tensor:
        """Read a tensor (in float32 if ``upcast`` and floating), refusing NaN/Inf unless allowed."""
        t = ck.read(name)
        if not t.is_floating_point():
            return t
        wide = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
        if not self.plan.allow_nonfinite and not all_finite(wide):
            bad = int((~torch.isfinite(wide)).sum())
            raise NonFiniteError(
                f"{ck.label}: tensor '{name}' holds {bad} NaN/Inf value(s) of {t.numel()}; fix the checkpoint, "
                "or set allow_nonfinite: true (--allow-nonfinite) to merge it anyway"
            )
        return wide.to(torch.float32) if upcast else t

    def _get(self, src: Source, upcast: bool = False) -> torch.Tensor:
        return self._read(self.inputs[src[0]], src[1], upcast)

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
        if job.nbytes >= PARALLEL_READ_BYTES and len(job.sources) > 1:
            tensors = list(_READ_POOL.map(lambda s: self._get(s, upcast=True), job.sources))
        else:
            tensors = [self._get(s, upcast=True) for s in job.sources]
        base = self._get(job.base_source, upcast=True) if job.base_source is not None else None
        gen = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name)) if plan.method.random else None
        out = plan.method(tensors, base=base, weights=job.weights, generator=gen, **job.params)
        return self.finish(job, out)

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
        return result

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


def run_jobs(
    plan: MergePlan,
    write: Callable[[str, torch.Tensor], None],
    *,
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "merging",
    order: Sequence[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
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
    """
    run = MergeRun(plan)
    planned = {j.name for j in plan.jobs}
    jobs = [j for j in plan.jobs if j.alias_of is None or j.alias_of not in planned]
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

    def one(job: TensorJob) -> int:
        out = run.compute(job)
        write(job.name, out)
        nbytes = job.nbytes
        for alias in by_target.get(job.name, ()):
            write(alias, out)
            nbytes += job.nbytes
        return nbytes

    done = 0
    try:
        n = workers or default_workers()
        if n <= 1:
            for job in jobs:
                bar.update(one(job))
                done += 1
                bar.set_postfix_str(f"{done}/{len(jobs)} tensors", refresh=False)
        else:
            def cost(job: TensorJob) -> int:
                # inputs and result in float32, the method's own buffers, and a few temporaries
                readers = len(job.sources) + (1 if job.base_source is not None else 0)
                buffers = readers + 2 + plan.method.workspace * len(job.sources) + (2 if plan.method.workspace else 0)
                return (job.nbytes * 4 // job.dtype.itemsize) * buffers

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

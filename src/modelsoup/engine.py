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
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import EmptyMergeError, MethodError, NonFiniteError
from .io import Checkpoint
from .methods import MergeMethod, get_method
from .methods.ops import all_finite
from .plan import TensorJob, align_names, build_jobs

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


@dataclass
class MergeSession:
    """Everything needed to compute each output tensor of one merge.

    Attributes:
        models: the listed models (ingredients and possibly the base again).
        base: the base model, if any.
        method: the merge method.
        ingredients: indices into ``models`` of the method's inputs (a listed copy of the base is left
            out for methods that take a base, as mergekit does).
        jobs: the planned output tensors.
        seed: seed of random methods.
        allow_nonfinite: merge inputs holding NaN/Inf instead of refusing them.
    """

    models: list[Checkpoint]
    base: Checkpoint | None
    method: MergeMethod
    ingredients: list[int]
    jobs: list[TensorJob]
    seed: int = 0
    allow_nonfinite: bool = False
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _disagreeing: list[str] = field(default_factory=list)

    @classmethod
    def plan(cls, recipe: Any, models: list[Checkpoint], base: Checkpoint | None, same_as_base: Sequence[bool]) -> MergeSession:
        """Plan a merge from a validated recipe and opened checkpoints (metadata only, no tensor read).

        Raises:
            KeyMismatchError, TensorMismatchError, MethodError: the inputs cannot be merged as asked.
        """
        method = get_method(recipe.method)
        uses_base = method.base != "none" and base is not None
        ingredients = [i for i in range(len(models)) if not (uses_base and same_as_base[i])]
        if uses_base and len(ingredients) < len(models):
            log.info("the base model is also listed among the models; it is not an ingredient of '%s' (as in mergekit)", method.name)
        problem = method.count_problem(len(ingredients), base is not None)
        if problem:
            raise MethodError(problem)
        names, from_base = align_names(models, base, recipe.keys, uses_base)
        rules = recipe.rules(names)
        jobs = build_jobs(names, from_base, models, ingredients, base, method, rules, recipe.dtype)
        if not jobs:
            why = ("the models hold no tensors" if not any(ck.names() for ck in models) else
                   "no tensor name is shared by every model (keys: intersection)" if recipe.keys == "intersection" and not names else
                   "every tensor is left out (take: skip)")
            raise EmptyMergeError(f"the merge would write a model with no tensors: {why}. Check that the inputs are models of one "
                                  "architecture (a wrapper prefix to strip? --strip-prefix), and the recipe's overrides")
        notes = list(recipe.notes) + [f"{ck.label}: {n}" for ck in [*models, *([base] if base else [])] for n in ck.notes]
        for n in notes:
            log.info(n)
        return cls(models, base, method, ingredients, jobs, recipe.seed, recipe.allow_nonfinite, notes)

    def _read(self, ck: Checkpoint, name: str, upcast: bool = False) -> torch.Tensor:
        """Read a tensor (in float32 if ``upcast`` and floating), refusing NaN/Inf unless allowed."""
        t = ck.read(name)
        if not t.is_floating_point():
            return t
        wide = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
        if not self.allow_nonfinite and not all_finite(wide):
            bad = int((~torch.isfinite(wide)).sum())
            raise NonFiniteError(
                f"{ck.label}: tensor '{name}' holds {bad} NaN/Inf value(s) of {t.numel()}; fix the checkpoint, "
                "or set allow_nonfinite: true (--allow-nonfinite) to merge it anyway"
            )
        return wide.to(torch.float32) if upcast else t

    def compute(self, job: TensorJob) -> torch.Tensor:
        """Compute one output tensor (in its output dtype)."""
        if job.action == "base":
            assert self.base is not None
            return self._read(self.base, job.name).to(job.dtype, copy=True)
        if job.action == "first":
            return self._read(self.models[0], job.name).to(job.dtype, copy=True)
        srcs = [self.models[i] for i in self.ingredients]
        if job.action == "nonfloat":
            everyone = srcs + ([self.base] if self.base is not None and self.method.base != "none" else [])
            ref_ck = self.base if self.base is not None and self.method.base != "none" else srcs[0]
            ref = ref_ck.read(job.name)
            if any(not torch.equal(ref, ck.read(job.name)) for ck in everyone if ck is not ref_ck):
                with self._lock:
                    self._disagreeing.append(job.name)
            return ref.clone()
        if job.nbytes >= PARALLEL_READ_BYTES and len(srcs) > 1:
            tensors = list(_READ_POOL.map(lambda ck: self._read(ck, job.name, upcast=True), srcs))
        else:
            tensors = [self._read(ck, job.name, upcast=True) for ck in srcs]
        base = self._read(self.base, job.name, upcast=True) if self.base is not None and self.method.base != "none" else None
        gen = torch.Generator().manual_seed(tensor_seed(self.seed, job.name)) if self.method.random else None
        out = self.method(tensors, base=base, weights=job.weights, generator=gen, **job.params)
        if tuple(out.shape) != job.shape:
            raise RuntimeError(f"method '{self.method.name}' returned shape {list(out.shape)} for '{job.name}' {list(job.shape)}")
        result = out.to(job.dtype)
        if not self.allow_nonfinite and not all_finite(result):
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
        if self._disagreeing:
            src = self.base.label if self.base is not None and self.method.base != "none" else self.models[self.ingredients[0]].label
            msg = f"{len(self._disagreeing)} non-floating tensor(s) differ across models and were taken from {src}, not averaged: " + ", ".join(sorted(self._disagreeing)[:8])
            log.info(msg)
            self.notes.append(msg)
            self._disagreeing = []
        return self.notes


def run_jobs(
    session: MergeSession,
    write: Callable[[str, torch.Tensor], None],
    *,
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "merging",
    order: Sequence[str] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> None:
    """Compute every job of ``session`` and hand each result to ``write``, on a thread pool.

    Args:
        session: the planned merge.
        write: called once per output name (thread-safe sink); tied names get the same tensor.
        workers: threads (default :func:`default_workers`); 1 runs inline.
        progress: show a tqdm bar (tensors and bytes); None = only on a terminal.
        desc: bar label.
        order: run jobs in this order of names (the sink's file order) rather than the plan's.
        memory_budget: bytes that jobs in flight may hold together; a larger job runs alone.
    """
    planned = {j.name for j in session.jobs}
    jobs = [j for j in session.jobs if j.alias_of is None or j.alias_of not in planned]
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        jobs.sort(key=lambda j: rank.get(j.name, len(rank)))
    tied = {j.name: j.alias_of for j in session.jobs if j not in jobs}
    total = sum(j.nbytes for j in session.jobs)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show, leave=False)
    by_target: dict[str, list[str]] = {}
    for alias, target in tied.items():
        by_target.setdefault(target, []).append(alias)

    def one(job: TensorJob) -> int:
        out = session.compute(job)
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
            readers = len(session.ingredients) + (1 if session.base is not None and session.method.base != "none" else 0)

            def cost(job: TensorJob) -> int:
                # inputs and result in float32, the method's own buffers, and a few temporaries
                buffers = readers + 2 + session.method.workspace * len(session.ingredients) + (2 if session.method.workspace else 0)
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
    session.finish_notes()


def collect(session: MergeSession, *, workers: int | None = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Run a merge into memory: every output tensor by name, in plan order."""
    result: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def keep(name: str, t: torch.Tensor) -> None:
        with lock:
            result[name] = t

    run_jobs(session, keep, workers=workers, progress=progress)
    return {j.name: result[j.name] for j in session.jobs}

"""The greedy soup's running sum: trying a candidate reads only the candidate, whatever the soup's size.

A uniform soup of members m_1..m_k is ``sum_j theta_j / k``, which the linear method builds as a float64 sum in
member order (:func:`modelsoup.methods.linear.accumulate`). :class:`RunningSoup` keeps that sum for the current
members, tensor by tensor, so the soup with a candidate added is ``(S + theta_c) / (k + 1)``: the candidate is the
only checkpoint read. It is the same float64 operations in the same order as the linear method's, so the scored
soup has the bits :func:`modelsoup.merge` writes for the same recipe (a test holds both to that).

Every other decision is the merge planner's: each candidate soup is planned as a linear recipe like any other, and
only the tensors it plans as ``merge`` come from the running sum; copies (a tensor every member shares, e.g. one no
adapter changes), integer buffers and checks are computed as in any merge.

The sums take 8 bytes per parameter (twice a float32 model). They are held in memory when that fits in the budget,
and otherwise in a temporary safetensors file (rewritten, tensor by tensor, each time a member is added, removed at
the end).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..devices import available_memory
from ..engine import MergeRun
from ..errors import OptionError
from ..io import open_checkpoint
from ..io.formats import tensor_nbytes
from ..io.writer import SafetensorsWriter
from ..methods.linear import accumulate, finish
from ..methods.ops import normalizing_sum
from ..plan import TensorJob
from .pantry import Pantry, SoupState

log = logging.getLogger("modelsoup")

STORES = ("auto", "memory", "disk")


def running_sum_bytes(jobs: Sequence[TensorJob]) -> int:
    """Bytes of the running sum of a soup planned as ``jobs``: every floating tensor in float64."""
    return sum(tensor_nbytes(torch.float64, j.shape) for j in jobs if j.dtype.is_floating_point and j.alias_of is None)


def spills(need: int, max_memory: int | None = None) -> bool:
    """Whether ``auto`` keeps a running sum of ``need`` bytes on disk: more than ``max_memory`` (default a quarter of the free memory)."""
    have = max_memory if max_memory is not None else available_memory(torch.device("cpu")) // 4
    return need > have


def _uniform(run: MergeRun, job: TensorJob, k: int) -> bool:
    """Whether ``job`` is the uniform linear mean of inputs 0..k-1 in order (what the running sum holds)."""
    return (
        run.plan.method.name == "linear" and job.action == "merge" and job.base_source is None and len(job.sources) == k
        and all(src[0] == j for j, src in enumerate(job.sources))
        and (job.weights is None or all(w == 1.0 for w in job.weights))
        and bool(job.params.get("normalize", True))
    )


class _Sums:
    """float64 sums by tensor name, in memory or in one safetensors file."""

    def __init__(self, on_disk: bool, folder: Path | None) -> None:
        self.on_disk = on_disk
        self._mem: dict[str, torch.Tensor] = {}
        self._folder = folder
        self._file: Path | None = None
        self._ck: Any = None
        self._on_file: set[str] = set()
        self._generation = 0

    def __contains__(self, name: str) -> bool:
        return name in self._on_file if self.on_disk else name in self._mem

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """The sum of ``name``: a tensor the caller may change (``copy=False``: the held one itself, for an update in place)."""
        if self.on_disk:
            return self._ck.read(name)  # a fresh tensor each read
        return self._mem[name].clone() if copy else self._mem[name]

    def replace(self, specs: Sequence[tuple[str, tuple[int, ...]]], compute: Any) -> None:
        """Set the sums to ``compute(name)`` for each (name, shape); the old sums stay readable while the new are computed."""
        if not self.on_disk:  # one tensor at a time: the old sum of a name is dropped as soon as its new one exists
            keep = {name for name, _ in specs}
            for name in [n for n in self._mem if n not in keep]:
                del self._mem[name]
            for name, _ in specs:
                self._mem[name] = compute(name)
            return
        assert self._folder is not None
        self._generation += 1
        folder = self._folder / f"sums-{self._generation}"
        folder.mkdir()
        writer = SafetensorsWriter(folder, [(name, torch.float64, tuple(shape)) for name, shape in specs], 1 << 62, {},
                                   file_name="sums.safetensors", hash_files=False)
        try:
            for name, _ in specs:
                writer.write(name, compute(name))
            files = writer.close()
        except BaseException:
            writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        old_ck, old_folder = self._ck, (self._file.parent if self._file is not None else None)
        self._file = files[0]
        self._ck = open_checkpoint(self._file, label="greedy soup running sum")
        self._on_file = {name for name, _ in specs}
        if old_ck is not None:
            old_ck.close()
        if old_folder is not None:
            shutil.rmtree(old_folder, ignore_errors=True)

    def close(self) -> None:
        self._mem = {}
        if self._ck is not None:
            self._ck.close()
            self._ck = None


class RunningSoup:
    """The current members of a greedy soup, with their running float64 sum.

    Args:
        pantry: the ingredients.
        first: the first member.
        store: ``memory``, ``disk`` (a temporary safetensors file in ``spill_dir``), or ``auto`` (memory when the
            sums fit in ``max_memory``, default a quarter of the free memory).
        spill_dir: where the temporary file goes (default: the system's temporary folder).
        max_memory: bytes the sums may take in memory under ``auto``.
    """

    def __init__(self, pantry: Pantry, first: int, *, store: str = "auto", spill_dir: str | Path | None = None,
                 max_memory: int | None = None) -> None:
        if store not in STORES:
            raise OptionError(f"the running sum's store must be one of {', '.join(STORES)}, got {store!r}")
        self.pantry = pantry
        self.members = [first]
        _, state = pantry.soup([first])
        need = running_sum_bytes(state.run.plan.jobs)
        if store == "auto":
            store = "disk" if spills(need, max_memory) else "memory"
        self.store = store
        self.bytes = need
        self._tmp: Path | None = None
        if store == "disk":
            self._tmp = Path(tempfile.mkdtemp(prefix="soup-greedy-", dir=spill_dir))
            log.info("greedy soup: the running sum (%.2f GB in float64) is kept in %s", need / 1e9, self._tmp)
        self._sums = _Sums(store == "disk", self._tmp)
        self.reads = 0  # checkpoint tensors read for the sums (for tests and logs)
        run = state.run
        firsts = {j.name: j for j in run.plan.jobs if j.dtype.is_floating_point and j.alias_of is None and j.action in ("first", "merge")}

        self._sums.replace([(j.name, j.shape) for j in firsts.values()], lambda name: self.add_source(None, run, firsts[name].sources[0]))

    def add_source(self, acc: torch.Tensor | None, run: MergeRun, src: tuple[int, str]) -> torch.Tensor:
        """``acc`` plus one input tensor (read, checked and upcast by the engine), as the linear method adds it."""
        self.reads += 1
        return accumulate(acc, run._get(src, upcast=True), 1.0)

    def partial(self, run: MergeRun, job: TensorJob, copy: bool = True) -> torch.Tensor:
        """The float64 sum of the current members' tensors for ``job`` (a non-alias job of a soup of them and one more).

        A tensor the members' soup did not sum (e.g. one they all shared, so it was copied) is summed from its sources.
        """
        if job.name in self._sums:
            return self._sums.get(job.name, copy)
        acc = None
        for src in job.sources[:len(self.members)]:
            acc = self.add_source(acc, run, src)
        assert acc is not None
        return acc

    def candidate(self, i: int) -> SoupState:
        """The lazy soup of the members and ``i``: each tensor planned as a uniform merge is ``(S + theta_i) / (k + 1)``."""
        _, state = self.pantry.soup([*self.members, i])
        return _CandidateState(state.run, self)

    def add(self, i: int) -> None:
        """Make ``i`` a member: the sums gain its tensors (it is read once more)."""
        _, state = self.pantry.soup([*self.members, i])
        run = state.run
        k = len(self.members)
        by_name = {j.name: j for j in run.plan.jobs if j.alias_of is None and _uniform(run, j, k + 1)}

        def compute(name: str) -> torch.Tensor:  # in place in memory: each sum is replaced by its update
            job = by_name[name]
            return self.add_source(self.partial(run, job, copy=False), run, job.sources[k])

        self._sums.replace([(j.name, j.shape) for j in by_name.values()], compute)
        self.members.append(i)

    def close(self) -> None:
        self._sums.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class _CandidateState(SoupState):
    """A soup state whose uniform-merge tensors come from the running sum plus the candidate."""

    def __init__(self, run: MergeRun, soup: RunningSoup) -> None:
        super().__init__(run)
        self._soup = soup
        self._k = len(soup.members)

    def __getitem__(self, name: str) -> torch.Tensor:
        job = self._jobs[name]
        k = self._k
        if not _uniform(self.run, job, k + 1):
            return self.run.compute(job)
        if job.alias_of is not None and job.alias_of in self._jobs:
            job = self._jobs[job.alias_of]
        acc = self._soup.add_source(self._soup.partial(self.run, job), self.run, job.sources[k])
        return self.run.finish(job, finish(acc, normalizing_sum([1.0] * (k + 1))))

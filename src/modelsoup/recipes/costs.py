"""What cooking soups will cost, known before any evaluation: evaluations, checkpoint reads, memory and disk.

:func:`soup_costs` reads only metadata (the ingredients' tensor headers, the evaluator's batch count), so
``soup cook/greedy/learn --dry-run`` answers at once. Counts are upper bounds where the run decides (the greedy
soup tries every candidate; the learned soup runs every epoch).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import available_memory
from ..estimate import human_bytes, nearest_existing
from ..eval.base import Evaluator
from .learned import STREAMING_UPDATES_PER_EPOCH, memory_estimate
from .pantry import Pantry
from .running import running_sum_bytes, spills


@dataclass(frozen=True)
class SoupCost:
    """The cost of one cook run.

    Attributes:
        ingredients: how many.
        model_bytes: one ingredient's tensors as stored; ``model_bytes_fp32`` in float32 (what evaluation and learning hold).
        evaluations: full passes over the held-out (and test) data, by what asks for them.
        reads: whole-checkpoint reads per ingredient, by recipe.
        memory: bytes held beyond the evaluator's model, by recipe.
        learned_memory: ``resident`` or ``streaming``, as ``auto`` would choose (or as given).
        updates: learned-soup gradient updates per epoch (None: the evaluator does not say how many batches it has).
        disk: bytes the saved soups take; ``free`` on the output's disk (None without an output).
        notes: what the figures leave out.
    """

    ingredients: int
    model_bytes: int
    model_bytes_fp32: int
    evaluations: dict[str, int] = field(default_factory=dict)
    reads: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    learned_memory: str | None = None
    updates: int | None = None
    disk: int = 0
    free: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"{self.ingredients} ingredients of {human_bytes(self.model_bytes)} ({human_bytes(self.model_bytes_fp32)} in float32)",
                 f"evaluations (full passes over the data), at most: {sum(self.evaluations.values())}"]
        lines += [f"  {k}: {v}" for k, v in self.evaluations.items()]
        if self.reads:
            lines.append("checkpoint reads per ingredient, at most:")
            lines += [f"  {k}: {v:g}" for k, v in self.reads.items()]
        if self.memory:
            lines.append("memory beside the evaluator's model:")
            lines += [f"  {k}: {human_bytes(v)}" for k, v in self.memory.items()]
        if self.learned_memory is not None:
            lines.append(f"learned soup gradient: {self.learned_memory}" + (f", {self.updates} update(s) per epoch" if self.updates is not None else ""))
        if self.disk:
            free = f" ({human_bytes(self.free)} free there)" if self.free is not None else ""
            lines.append(f"disk for the saved soups: {human_bytes(self.disk)}{free}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def soup_costs(pantry: Pantry, evaluator: Evaluator, recipes: list[str], *, test: bool = False, epochs: int = 5, start: str = "best",
               learn_memory: str = "auto", accumulate: int | None = None, max_memory: int | None = None, saved: int = 0,
               output: str | Path | None = None) -> SoupCost:
    """The cost of cooking ``recipes`` (names as :func:`~modelsoup.recipes.cook` takes them) on ``pantry``.

    Args:
        pantry: the ingredients (only their headers are read).
        evaluator: the held-out evaluator (its batch count, if it has one).
        recipes: the soups and ensembles to cook.
        test: whether a test evaluator scores every row too.
        epochs, start, learn_memory, accumulate, max_memory: the learned soup's settings.
        saved: how many soups are written; ``output`` is where.
    """
    n = len(pantry)
    _, state = pantry.soup(list(range(n)))
    jobs = [j for j in state.run.plan.jobs if j.alias_of is None]
    stored = sum(j.nbytes for j in jobs)
    fp32 = sum(4 * j.nbytes // j.dtype.itemsize for j in jobs if j.dtype.is_floating_point)
    twice = 2 if test else 1
    ev: dict[str, int] = {"ingredients": n * twice}
    reads: dict[str, float] = {"scoring the ingredients": 1}
    memory: dict[str, int] = {}
    notes: list[str] = []
    if "uniform" in recipes:
        ev["uniform soup"] = twice
        reads["uniform soup"] = twice
    greedy = "greedy" in recipes or ("learned" in recipes and start != "uniform")
    if greedy:
        ev["greedy soup (one per candidate)"] = max(n - 1, 0) + (1 if test else 0)
        reads["greedy soup (running sum: the first member twice, each candidate once, each kept one again)"] = 3
        sums = running_sum_bytes(jobs)
        on_disk = spills(sums)
        memory["greedy running sum (float64)" + (", spilled to a temporary file" if on_disk else "")] = 0 if on_disk else sums
    learned_memory, updates = None, None
    if "learned" in recipes:
        device = getattr(evaluator, "device", torch.device("cpu"))
        have = max_memory if max_memory is not None else available_memory(device)
        learned_memory = learn_memory if learn_memory != "auto" else ("resident" if memory_estimate(fp32, n, "resident") <= have else "streaming")
        count = evaluator.batch_count() if hasattr(evaluator, "batch_count") else None
        if count is not None:
            step = accumulate or (1 if learned_memory == "resident" else max(1, -(-count // STREAMING_UPDATES_PER_EPOCH)))
            updates = -(-count // step)
        ev["learned soup (uniform start, one per epoch, the result on test)"] = 1 + epochs + (1 if test else 0)
        reads["learned soup" + (" (every update reads every ingredient twice)" if learned_memory == "streaming" else " (stacked once)")] = (
            1 + epochs + (1 if test else 0) + (2 * epochs * updates if learned_memory == "streaming" and updates is not None else 1))
        memory[f"learned soup ({learned_memory})"] = memory_estimate(fp32, n, learned_memory)
        if learned_memory == "streaming" and updates is None:
            notes.append("the evaluator does not say how many batches it has: the streaming updates per epoch are not counted")
    if any(r in recipes for r in ("ensemble", "prob_ensemble", "vote", "greedy_ensemble", "stacking")):
        notes.append("ensembles reuse the ingredients' predictions: no evaluation of their own")
    free = None
    if output is not None:
        free = shutil.disk_usage(nearest_existing(Path(output))).free
    return SoupCost(n, stored, fp32, ev, reads, memory, learned_memory, updates, saved * stored, free, notes)

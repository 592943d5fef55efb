"""Greedy soup (Wortsman et al. 2022, Recipe 1) and the greedy selection rule it shares with the greedy ensemble.

Score every ingredient on held-out data, sort them best first, start from the best one, and try adding
each next one to the running soup: keep it only if the soup's held-out score strictly improves
(``allow_equal=True`` keeps it on a tie too). The soup's score is therefore never below its best
ingredient's, on the held-out data that chose it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ..recipe import Recipe
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, Score, run_evaluator
from ..errors import OptionError
from .pantry import Pantry, as_pantry
from .running import STORES, RunningSoup
from ..progress import progress_on

log = logging.getLogger("modelsoup")


@dataclass(frozen=True)
class GreedyStep:
    """One candidate tried.

    Attributes:
        ingredient: its label.
        ingredient_score: its own held-out score.
        score: held-out score of the soup with it added (for the first, its own score).
        kept: whether it stayed in the soup.
        size: soup size after this step.
        seconds: wall time of the step.
    """

    ingredient: str
    ingredient_score: float
    score: float
    kept: bool
    size: int
    seconds: float


@dataclass
class GreedyResult:
    """A greedy soup (or greedy ensemble).

    Attributes:
        members: ingredient indices in the soup, in the order they were added.
        labels: their labels.
        score: held-out score of the final soup.
        history: every candidate tried, best-scoring ingredient first.
        recipe: the soup as a ``linear`` recipe (write it with :func:`modelsoup.merge`); None for ensembles.
        seconds: wall time, ingredient scoring included.
        predictions: the final soup's held-out predictions, when the evaluator gives them.
    """

    members: list[int]
    labels: list[str]
    score: Score
    history: list[GreedyStep]
    recipe: Recipe | None = None
    seconds: float = 0.0
    predictions: Predictions | None = None


def rank(scores: Sequence[Score]) -> list[int]:
    """Indices best first; equal scores keep their input order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i].value)


def greedy_select(
    labels: Sequence[str],
    scores: Sequence[Score],
    try_with: Callable[[list[int]], Score],
    *,
    allow_equal: bool = False,
    progress: bool | None = None,
    desc: str = "greedy soup",
    on_keep: Callable[[int], None] | None = None,
) -> tuple[list[int], Score, list[GreedyStep]]:
    """The greedy rule over any way of combining members.

    Args:
        labels: names of the candidates.
        scores: each candidate's own held-out score.
        try_with: scores the combination of the given members (the last one is the candidate).
        allow_equal: keep a candidate when the score ties (``>=``) instead of only when it improves.
        progress: tqdm bar over candidates; None = only on a terminal.
        on_keep: called with each candidate kept, before the next is tried.

    Returns:
        (members in the order added, the final score, the history).
    """
    order = rank(scores)
    first = order[0]
    members = [first]
    current = scores[first]
    history = [GreedyStep(labels[first], scores[first].value, scores[first].value, True, 1, 0.0)]
    show = progress_on(progress)
    with tqdm(order[1:], desc=desc, unit="candidate", disable=not show, leave=False) as bar:
        for i in bar:
            t0 = time.perf_counter()
            s = try_with([*members, i])
            better = s.value > current.value or (allow_equal and s.value >= current.value)
            if better:
                members.append(i)
                current = s
                if on_keep is not None:
                    on_keep(i)
            history.append(GreedyStep(labels[i], scores[i].value, s.value, better, len(members), time.perf_counter() - t0))
            log.info("%s: %s %s (with it: %s; %d members)", desc, "kept" if better else "skipped", labels[i], s, len(members))
            bar.set_postfix_str(f"{len(members)} kept, {current}")
    return members, current, history


def greedy_soup(
    ingredients: Pantry | Sequence[Any],
    evaluator: Evaluator,
    *,
    allow_equal: bool = False,
    progress: bool | None = None,
    running_sum: str = "auto",
    spill_dir: str | None = None,
    **pantry_options: Any,
) -> GreedyResult:
    """Greedy soup of checkpoints (paths) or in-memory models, chosen on ``evaluator``'s data.

    Each candidate soup is computed lazily while the evaluator loads it. With the running sum (the default,
    :class:`~modelsoup.recipes.running.RunningSoup`) the members' float64 sum is kept, so trying a candidate
    reads only the candidate: N ingredients take O(N) checkpoint reads, not O(N^2). The score of each soup is
    the score of exactly the weights :func:`modelsoup.merge` writes for ``result.recipe``, bit for bit, either way.

    Args:
        ingredients: a :class:`Pantry`, or paths / state dicts / modules (then ``pantry_options`` are
            passed to :class:`Pantry`: labels, key, strip_prefix, keys, cache).
        evaluator: held-out scorer, higher is better.
        allow_equal: keep a candidate on a tie in score (``>=``) instead of only on a strict improvement.
        progress: progress bars; None = only on a terminal.
        running_sum: where the members' running sum is kept: ``auto`` (memory when twice the float32 model fits
            in a quarter of the free memory, else a temporary file), ``memory``, ``disk``, or ``off`` (rebuild
            each candidate from every member: memory of one tensor per member, k reads for a soup of k).
        spill_dir: folder for the running sum's temporary file (default: the system's temporary folder).

    Returns:
        The soup's members, held-out score, history and recipe.
    """
    t0 = time.perf_counter()
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        pantry.prefetch(range(len(pantry)), evaluator)
        scores = [pantry.score(i, evaluator) for i in range(len(pantry))]
        preds: dict[tuple[int, ...], Predictions] = {}
        running: RunningSoup | None = None
        if running_sum != "off":
            if running_sum not in STORES:
                raise OptionError(f"running_sum must be one of {', '.join((*STORES, 'off'))}, got {running_sum!r}")
            running = RunningSoup(pantry, rank(scores)[0], store=running_sum, spill_dir=spill_dir)

        def try_with(members: list[int]) -> Score:
            if running is not None:
                s, p = run_evaluator(evaluator, running.candidate(members[-1]), f"soup of {len(members)}")
            else:
                s, p = pantry.evaluate(pantry.recipe(members), evaluator, f"soup of {len(members)}")
            if p is not None:
                preds[tuple(members)] = p
            return s

        def kept(i: int) -> None:
            if running is not None:
                running.add(i)

        try:
            members, score, history = greedy_select(pantry.labels, scores, try_with, allow_equal=allow_equal, progress=progress, on_keep=kept)
        finally:
            if running is not None:
                running.close()
        final = preds.get(tuple(members))
        if final is None and len(members) == 1 and isinstance(evaluator, PredictionEvaluator):
            final = pantry.predictions(members[0], evaluator)
        return GreedyResult(members, [pantry.labels[i] for i in members], score, history, pantry.recipe(members), time.perf_counter() - t0, final)
    finally:
        if own:
            pantry.close()

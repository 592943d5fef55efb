"""Output ensembles, the model-soups paper's comparison points: N forward passes per input instead of one.

The logit ensemble averages the ingredients' logits; the greedy ensemble applies the greedy-soup rule to
that average (Wortsman et al. 2022 compare both with soups). Ingredients' logits come from the
pantry's cache, so after their scoring an ensemble costs no model evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import EvaluatorError
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, Score
from .greedy import GreedyResult, as_pantry, greedy_select
from .pantry import Pantry


def _need_predictions(evaluator: Evaluator) -> PredictionEvaluator:
    if not isinstance(evaluator, PredictionEvaluator):
        raise EvaluatorError(
            f"ensembles need per-example predictions, which {type(evaluator).__name__} does not give; use a classification "
            "evaluator (built-in, or a PredictionEvaluator subclass of your own)"
        )
    return evaluator


def ensemble_predictions(pantry: Pantry, evaluator: Evaluator, members: Sequence[int]) -> Predictions:
    """Mean logits of ``members`` (indices, repeats count twice) on the evaluator's data.

    Raises:
        EvaluatorError: the evaluator gives no predictions, or the members' labels disagree (data order changed).
    """
    ev = _need_predictions(evaluator)
    preds = [pantry.predictions(i, ev) for i in members]
    labels = preds[0].labels
    for i, p in zip(members, preds):
        if p.logits.shape != preds[0].logits.shape or not torch.equal(p.labels, labels):
            raise EvaluatorError(f"{pantry.labels[i]}: its predictions do not line up with {pantry.labels[members[0]]}'s (different data or order)")
    acc = torch.zeros_like(preds[0].logits, dtype=torch.float64)
    for p in preds:
        acc += p.logits.double()
    return Predictions((acc / len(preds)).float(), labels)


def ensemble_score(pantry: Pantry, evaluator: Evaluator, members: Sequence[int]) -> Score:
    """Score of the logit ensemble of ``members``."""
    ev = _need_predictions(evaluator)
    return ev.score(ensemble_predictions(pantry, ev, members))


def greedy_ensemble(ingredients: Pantry | Sequence[Any], evaluator: Evaluator, *, allow_equal: bool = False,
                    progress: bool | None = None, **pantry_options: Any) -> GreedyResult:
    """Greedy ensemble: the greedy-soup rule applied to the average of logits instead of weights."""
    t0 = time.perf_counter()
    ev = _need_predictions(evaluator)
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        scores = [pantry.score(i, ev) for i in range(len(pantry))]
        members, score, history = greedy_select(pantry.labels, scores, lambda m: ensemble_score(pantry, ev, m), allow_equal=allow_equal,
                                                progress=progress, desc="greedy ensemble")
        return GreedyResult(members, [pantry.labels[i] for i in members], score, history, None, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

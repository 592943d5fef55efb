"""Output ensembles, the model-soups paper's comparison points: N forward passes per input instead of one.

How the members' outputs are combined (``combine``):
  * ``logits``: mean of the logits (the logit ensemble of Wortsman et al. 2022);
  * ``probs``: mean of the softmax probabilities;
  * ``vote``: majority vote; the ensemble's probability of a class is its share of the votes, and a tie
    goes to the tied class with the highest mean probability.
The greedy ensemble applies the greedy-soup rule to any of these. Ingredients' logits come from the
pantry's cache, so after their scoring an ensemble costs no model evaluation. Probabilities are
carried as log-probabilities in :class:`Predictions`, so every evaluator scores them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import EvaluatorError, OptionError
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, Score, require_predictions
from .greedy import GreedyResult, greedy_select
from .pantry import as_pantry
from .pantry import Pantry


def _need_predictions(evaluator: Evaluator) -> PredictionEvaluator:
    return require_predictions(evaluator, "an ensemble")


COMBINE = ("logits", "probs", "vote")


def combine_predictions(preds: Sequence[Predictions], how: str = "logits") -> Predictions:
    """Combine the predictions of several models on the same data (see the module doc for ``how``).

    Raises:
        OptionError: unknown ``how``.
        EvaluatorError: predictions that do not line up (different shapes or labels).
    """
    if how not in COMBINE:
        raise OptionError(f"combine must be one of {', '.join(COMBINE)}, got {how!r}")
    labels = preds[0].labels
    for p in preds:
        if p.logits.shape != preds[0].logits.shape or not torch.equal(p.labels, labels):
            raise EvaluatorError("the members' predictions do not line up (different data, order or number of classes)")
    acc = torch.zeros_like(preds[0].logits, dtype=torch.float64)
    if how == "logits":
        for p in preds:
            acc += p.logits.double()
        return Predictions((acc / len(preds)).float(), labels)
    probs = [torch.softmax(p.logits.double(), dim=1) for p in preds]
    if how == "probs":
        for q in probs:
            acc += q
        return Predictions(torch.log(acc / len(preds)).float(), labels)
    mean_prob = torch.zeros_like(acc)
    for q in probs:
        acc[torch.arange(len(labels)), q.argmax(1)] += 1.0
        mean_prob += q / len(probs)
    shares = acc / len(preds)
    top = shares == shares.max(dim=1, keepdim=True).values
    winner = torch.where(top, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(1)
    # move a sliver of probability to the tie-breaking winner so that arg-max agrees with the vote
    tied = top.sum(1) > 1
    bump = torch.zeros_like(shares)
    bump[torch.arange(len(labels)), winner] = 1e-9
    shares = torch.where(tied.unsqueeze(1), (shares + bump) / (1 + 1e-9), shares)
    return Predictions(torch.log(shares.clamp_min(1e-12)).float(), labels)


def ensemble_predictions(pantry: Pantry, evaluator: Evaluator, members: Sequence[int], how: str = "logits") -> Predictions:
    """The ensemble of ``members`` (indices, repeats count twice) on the evaluator's data.

    Raises:
        EvaluatorError: the evaluator gives no predictions, or the members' labels disagree (data order changed).
    """
    ev = _need_predictions(evaluator)
    pantry.prefetch(members, ev, predictions=True)
    return combine_predictions([pantry.predictions(i, ev) for i in members], how)


def ensemble_score(pantry: Pantry, evaluator: Evaluator, members: Sequence[int], how: str = "logits") -> Score:
    """Score of the ensemble of ``members``."""
    ev = _need_predictions(evaluator)
    return ev.score(ensemble_predictions(pantry, ev, members, how))


def greedy_ensemble(ingredients: Pantry | Sequence[Any], evaluator: Evaluator, *, allow_equal: bool = False, how: str = "logits",
                    progress: bool | None = None, **pantry_options: Any) -> GreedyResult:
    """Greedy ensemble: the greedy-soup rule applied to the combined outputs instead of the weights."""
    t0 = time.perf_counter()
    ev = _need_predictions(evaluator)
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        pantry.prefetch(range(len(pantry)), ev, predictions=True)
        scores = [pantry.score(i, ev) for i in range(len(pantry))]
        members, score, history = greedy_select(pantry.labels, scores, lambda m: ensemble_score(pantry, ev, m, how), allow_equal=allow_equal,
                                                progress=progress, desc="greedy ensemble")
        return GreedyResult(members, [pantry.labels[i] for i in members], score, history, None, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

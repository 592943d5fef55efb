"""Stacking: a small meta-classifier over the ingredients' predictions, never scored on what it was fitted on.

Features are the ingredients' log-probabilities side by side (N x classes per example); the
meta-classifier is a multinomial logistic regression with an L2 penalty, fitted by L-BFGS in float64.

Held-out scores are out-of-fold: the held-out examples are split into ``folds`` folds, and each fold is
predicted by a meta-classifier fitted on the others. The split is a seeded, stratified shuffle
(:func:`stratified_folds`): each class's examples are shuffled with ``seed`` and dealt round-robin into
the folds, the dealing carrying on from one class to the next, so every fold holds every class in
proportion (within one example) and the folds' sizes differ by at most one. The split depends only on
the labels, ``folds`` and ``seed``, so results are deterministic. (An interleaved split, example i in
fold i mod folds, puts one class in each fold when the labels alternate, and every fold is then
predicted by a meta-classifier that never saw its class.) A class with fewer examples than folds is
missing from some folds; that is allowed, but its examples are then predicted by meta-classifiers that
saw fewer (for a class of one, none) of its examples, so its out-of-fold score is pessimistic; a
warning is logged.

Test predictions come from one meta-classifier fitted on all held-out examples. So no prediction is made
by a model that saw that example, and the test data are never used to fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import EvaluatorError, OptionError
from ..eval.base import Evaluator, Predictions
from .ensemble import _need_predictions
from .pantry import Pantry

log = logging.getLogger(__name__)


@dataclass
class StackingResult:
    """Stacked predictions.

    Attributes:
        heldout: out-of-fold predictions on the held-out data.
        test: predictions on the test data (meta-classifier fitted on all held-out data), if asked for.
        weights: the meta-classifier fitted on all held-out data, (classes, N x classes + 1), bias last.
        fold: the fold of every held-out example (see :func:`stratified_folds`).
    """

    heldout: Predictions
    test: Predictions | None
    weights: torch.Tensor
    fold: torch.Tensor | None = None


def features(preds: Sequence[Predictions]) -> torch.Tensor:
    """The members' log-probabilities side by side: (examples, members x classes), float64."""
    return torch.cat([torch.log_softmax(p.logits.double(), dim=1) for p in preds], dim=1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float = 1e-2, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: (W, b) minimising mean cross-entropy + l2/2 ||W||^2, from zero, by L-BFGS."""
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def stratified_folds(labels: torch.Tensor, folds: int, *, seed: int = 0) -> torch.Tensor:
    """The fold (0 .. folds - 1) of every example: a seeded, stratified shuffle.

    Classes are taken in increasing label order; each class's examples are shuffled by one
    ``torch.Generator`` seeded with ``seed`` and dealt round-robin, the dealing carrying on from where the
    previous class stopped. So each fold holds floor or ceil of n_c / folds examples of a class with n_c
    examples, and the folds' sizes differ by at most one. A class with fewer than ``folds`` examples is
    simply absent from some folds.

    Args:
        labels: (examples,) integer class labels.
        folds: number of folds (at least 1).
        seed: seed of the shuffle; the same labels, folds and seed give the same folds.

    Returns:
        (examples,) int64 fold indices.

    Raises:
        OptionError: ``folds`` below 1.
    """
    if folds < 1:
        raise OptionError(f"folds must be at least 1, got {folds}")
    y = labels.long().reshape(-1)
    g = torch.Generator().manual_seed(int(seed))
    fold = torch.empty(len(y), dtype=torch.long)
    dealt = 0
    for c in torch.unique(y).tolist():  # sorted
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = (dealt + torch.arange(len(idx))) % folds
        dealt += len(idx)
    return fold


def out_of_fold(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, classes: int, *, l2: float = 1e-2) -> torch.Tensor:
    """Logits of every example from a meta-classifier fitted on the examples of the other folds (float64)."""
    oof = torch.empty(len(y), classes, dtype=torch.float64)
    for f in torch.unique(fold).tolist():
        held = fold == f
        w, b = fit_logistic(x[~held], y[~held], classes, l2=l2)
        oof[held] = x[held] @ w.T + b
    return oof


def stack(heldout: Sequence[Predictions], test: Sequence[Predictions] | None = None, *, folds: int = 2, l2: float = 1e-2,
          seed: int = 0) -> StackingResult:
    """Stack members' predictions (see the module doc).

    Args:
        heldout: each member's predictions on the held-out data.
        test: each member's predictions on the test data, or None.
        folds: cross-fitting folds on the held-out data (at least 2).
        l2: L2 penalty of the meta-classifier.
        seed: seed of the stratified shuffle that splits the held-out data into folds
            (:func:`stratified_folds`); the same seed gives the same folds and the same predictions.

    Raises:
        EvaluatorError: fewer than 2 folds, or fewer held-out examples than folds.
    """
    if folds < 2:
        raise EvaluatorError(f"stacking needs at least 2 folds so that no held-out example is scored by a model fitted on it; got {folds}")
    x = features(heldout)
    y = heldout[0].labels.long()
    n, classes = len(y), heldout[0].logits.shape[1]
    if n < folds:
        raise EvaluatorError(f"stacking with {folds} folds needs at least {folds} held-out examples, got {n}")
    fold = stratified_folds(y, folds, seed=seed)
    values, counts = torch.unique(y, return_counts=True)
    rare = [f"{int(c)} ({int(k)})" for c, k in zip(values, counts) if k < folds]
    if rare:
        log.warning("stacking with %d folds: class(es) %s have fewer held-out examples than folds; some folds lack them, "
                    "so their out-of-fold predictions come from meta-classifiers that saw few or none of them", folds, ", ".join(rare))
    oof = out_of_fold(x, y, fold, classes, l2=l2)
    w, b = fit_logistic(x, y, classes, l2=l2)
    test_preds = None
    if test is not None:
        test_preds = Predictions((features(test) @ w.T + b).float(), test[0].labels)
    return StackingResult(Predictions(oof.float(), heldout[0].labels), test_preds, torch.cat([w, b.unsqueeze(1)], dim=1), fold)


def stacking(pantry: Pantry, heldout: Evaluator, test: Evaluator | None = None, *, members: Sequence[int] | None = None,
             folds: int = 2, l2: float = 1e-2, seed: int = 0) -> StackingResult:
    """Stack the pantry's ingredients (all, or ``members``) on the evaluators' data (arguments as for :func:`stack`)."""
    held = _need_predictions(heldout)
    idx = list(members) if members is not None else list(range(len(pantry)))
    test_preds = [pantry.predictions(i, _need_predictions(test)) for i in idx] if test is not None else None
    return stack([pantry.predictions(i, held) for i in idx], test_preds, folds=folds, l2=l2, seed=seed)

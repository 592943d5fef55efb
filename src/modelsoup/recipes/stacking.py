"""Stacking: a small meta-classifier over the ingredients' predictions, never scored on what it was fitted on.

Features are the ingredients' log-probabilities side by side (N x classes per example); the
meta-classifier is a multinomial logistic regression with an L2 penalty, fitted by L-BFGS in float64.

Held-out scores are out-of-fold: the held-out examples are split into ``folds`` interleaved folds
(example i in fold i mod folds), and each fold is predicted by a meta-classifier fitted on the others.
Test predictions come from one meta-classifier fitted on all held-out examples. So no prediction is made
by a model that saw that example, and the test data are never used to fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import EvaluatorError
from ..eval.base import Evaluator, Predictions
from .ensemble import _need_predictions
from .pantry import Pantry


@dataclass
class StackingResult:
    """Stacked predictions.

    Attributes:
        heldout: out-of-fold predictions on the held-out data.
        test: predictions on the test data (meta-classifier fitted on all held-out data), if asked for.
        weights: the meta-classifier fitted on all held-out data, (classes, N x classes).
    """

    heldout: Predictions
    test: Predictions | None
    weights: torch.Tensor


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


def stack(heldout: Sequence[Predictions], test: Sequence[Predictions] | None = None, *, folds: int = 2, l2: float = 1e-2) -> StackingResult:
    """Stack members' predictions (see the module doc).

    Args:
        heldout: each member's predictions on the held-out data.
        test: each member's predictions on the test data, or None.
        folds: cross-fitting folds on the held-out data (at least 2).
        l2: L2 penalty of the meta-classifier.

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
    fold = torch.arange(n) % folds
    oof = torch.empty(n, classes, dtype=torch.float64)
    for f in range(folds):
        train = fold != f
        w, b = fit_logistic(x[train], y[train], classes, l2=l2)
        oof[~train] = x[~train] @ w.T + b
    w, b = fit_logistic(x, y, classes, l2=l2)
    test_preds = None
    if test is not None:
        test_preds = Predictions((features(test) @ w.T + b).float(), test[0].labels)
    return StackingResult(Predictions(oof.float(), heldout[0].labels), test_preds, torch.cat([w, b.unsqueeze(1)], dim=1))


def stacking(pantry: Pantry, heldout: Evaluator, test: Evaluator | None = None, *, members: Sequence[int] | None = None,
             folds: int = 2, l2: float = 1e-2) -> StackingResult:
    """Stack the pantry's ingredients (all, or ``members``) on the evaluators' data."""
    held = _need_predictions(heldout)
    idx = list(members) if members is not None else list(range(len(pantry)))
    test_preds = [pantry.predictions(i, _need_predictions(test)) for i in idx] if test is not None else None
    return stack([pantry.predictions(i, held) for i in idx], test_preds, folds=folds, l2=l2)

"""Statistics of one model's predictions and of two models' agreement, for the soup-vs-ensemble and scaling diagnostics.

* agreement = fraction of examples whose arg-max class (lowest index on a tie) is the same in both;
* confidence = mean over examples of the largest softmax probability;
* entropy = mean over examples of ``-sum_c p_c log p_c`` (nats) of the softmax
  (:func:`modelsoup.eval.calibration.entropy`).

Accuracy and loss come from the evaluator's own :meth:`~modelsoup.eval.PredictionEvaluator.score`, so they
are exactly what the other tables report.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AnalysisError
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, require_predictions
from ..eval.calibration import entropy


def need_predictions(evaluator: Evaluator, what: str) -> PredictionEvaluator:
    """``evaluator`` if it gives per-example predictions, else :class:`AnalysisError` naming ``what``."""
    return require_predictions(evaluator, what, AnalysisError)


def agreement(a: Predictions, b: Predictions) -> float:
    """Fraction of examples on which ``a`` and ``b`` predict the same class.

    Raises:
        AnalysisError: the two are not over the same examples.
    """
    if a.logits.shape != b.logits.shape or not torch.equal(a.labels, b.labels):
        raise AnalysisError(f"predictions of shapes {list(a.logits.shape)} and {list(b.logits.shape)} are not over the same examples in the same order")
    return float((a.logits.argmax(1) == b.logits.argmax(1)).double().mean())


def prediction_stats(evaluator: PredictionEvaluator, predictions: Predictions) -> dict[str, Any]:
    """The evaluator's metrics (its score under ``score``; accuracy and loss for classifiers) plus confidence and entropy."""
    s = evaluator.score(predictions)
    probs = torch.softmax(predictions.logits.double(), dim=1)
    out: dict[str, Any] = {k: v for k, v in s.metrics.items() if k not in ("seconds", "examples_per_s")}
    out.update({"score": s.value, "confidence": float(probs.amax(1).mean()), "entropy": entropy(probs)})
    return out

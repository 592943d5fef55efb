"""The evaluator protocol: something that scores a set of weights on held-out data, higher is better.

Soups only ever ask an evaluator one question, "how good are these weights?", through
:meth:`Evaluator.evaluate`. Evaluators whose score is a function of per-example predictions
(:class:`PredictionEvaluator`) also hand out those predictions, which is what ensembles need; evaluators
that run a module on batches (:class:`modelsoup.eval.module.ModuleEvaluator`) also give a differentiable
loss, which is what the learned soup needs.

Weights arrive as a ``Mapping[str, Tensor]``. A soup under evaluation is a lazy mapping that computes each
tensor when it is asked for (see :class:`modelsoup.recipes.pantry.SoupState`), so an evaluator should read
the tensors one at a time (as :func:`modelsoup.eval.module.load_weights` does) rather than copy the mapping.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import EvaluatorError


@dataclass(frozen=True)
class Score:
    """The result of one evaluation.

    Attributes:
        value: the score that soups compare; higher is better.
        metric: what ``value`` is (``accuracy``, ``neg_perplexity``, a user's name).
        metrics: everything measured, ``value`` included under ``metric`` (e.g. accuracy, loss,
            examples, seconds, examples_per_s).
    """

    value: float
    metric: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "metric": self.metric, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        return cls(float(data["value"]), str(data["metric"]), {str(k): float(v) for k, v in data.get("metrics", {}).items()})

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.4f}"


@dataclass(frozen=True)
class Predictions:
    """Per-example outputs of a model on an evaluator's data, in the data's order.

    Attributes:
        logits: float32 tensor (examples, classes) of unnormalised scores.
        labels: int64 tensor (examples,) of true classes.
    """

    logits: torch.Tensor
    labels: torch.Tensor


class Evaluator(ABC):
    """Scores weights on fixed data. Subclasses set :attr:`metric` and implement :meth:`evaluate` and :meth:`identity`."""

    metric: str = "score"

    @abstractmethod
    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        """Score a set of weights.

        Args:
            state: tensor name -> tensor (possibly a lazy mapping; read each tensor once).
            label: how progress bars and logs name the model.
        """

    @abstractmethod
    def identity(self) -> str:
        """A stable description of what is computed on which data; part of the on-disk cache key.

        Two evaluators with the same identity must give the same score for the same weights.
        """


# modules loaded from a user's file (``--eval file.py:name``) are named with this prefix
USER_MODULE_PREFIX = "modelsoup_user_"


def require_predictions(evaluator: Evaluator, what: str, error: type[Exception] = EvaluatorError) -> PredictionEvaluator:
    """``evaluator`` if it gives per-example predictions, else ``error`` naming ``what`` needs them."""
    if not isinstance(evaluator, PredictionEvaluator):
        raise error(
            f"{what} needs per-example predictions, which {type(evaluator).__name__} does not give; use a classification evaluator "
            "(the built-in text-classification, ClassificationEvaluator, or a PredictionEvaluator of your own)"
        )
    return evaluator


class PredictionEvaluator(Evaluator):
    """An evaluator whose score is a function of per-example logits: it supports ensembles."""

    @abstractmethod
    def predict(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Predictions:
        """Logits of a model for every example, in the data's order."""

    @abstractmethod
    def score(self, predictions: Predictions, *, seconds: float | None = None) -> Score:
        """Score predictions (of one model, or of an ensemble)."""

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        preds = self.predict(state, label=label)
        return self.score(preds, seconds=time.perf_counter() - t0)


def classification_metrics(predictions: Predictions) -> dict[str, float]:
    """Accuracy, mean cross-entropy (``loss``, nats) and the calibration metrics of :mod:`.calibration`."""
    from .calibration import calibration_metrics

    logits = predictions.logits.float()
    labels = predictions.labels.long()
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise EvaluatorError(f"predictions have logits {list(logits.shape)} and labels {list(labels.shape)}; expected (examples, classes) and (examples,)")
    if labels.numel() == 0:
        raise EvaluatorError("the evaluation data has no examples")
    loss = float(torch.nn.functional.cross_entropy(logits.double(), labels))
    metrics = calibration_metrics(torch.softmax(logits.double(), dim=1), labels)
    return {"accuracy": metrics.pop("accuracy"), "loss": loss, "examples": float(labels.numel()), **metrics}


def timing(metrics: dict[str, float], seconds: float | None) -> dict[str, float]:
    """Add wall time and throughput to a metrics dict (in place) and return it."""
    if seconds is not None:
        metrics["seconds"] = seconds
        if seconds > 0 and "examples" in metrics:
            metrics["examples_per_s"] = metrics["examples"] / seconds
    return metrics


def file_digest(path: str | Path) -> str:
    """sha256 of a data file (cached by path, size and mtime across runs)."""
    from ..io.output import cached_sha256

    return cached_sha256(Path(path))


class FunctionEvaluator(Evaluator):
    """A user's own scoring function, called with the weights as a plain dict.

    The function is called as ``fn(state)`` or, if it takes two arguments, ``fn(state, data)`` where
    ``data`` is the data path given on the command line (``--heldout``/``--test``). It returns a number
    (higher is better), a :class:`Score`, or a mapping with a ``score`` key (other keys are kept as
    metrics; an optional ``metric`` key names the score).

    Args:
        fn: the function.
        name: how it is named in tables and in the cache key (e.g. ``mypkg.evals:accuracy``).
        data: passed as the second argument when ``fn`` takes two.
        metric: name of the score when ``fn`` returns a plain number.
    """

    def __init__(self, fn: Callable[..., Any], name: str, *, data: str | None = None, metric: str = "score") -> None:
        self.fn = fn
        self.name = name
        self.data = data
        self.metric = metric
        try:
            params = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        self._takes_data = len(params) >= 2

    def identity(self) -> str:
        parts: dict[str, Any] = {"evaluator": "function", "name": self.name, "metric": self.metric}
        source = inspect.getsourcefile(self.fn) if inspect.isfunction(self.fn) or inspect.ismethod(self.fn) else None
        if source and Path(source).is_file():
            parts["source_sha256"] = file_digest(source)  # editing the function invalidates cached scores
        if self.data is not None:
            parts["data"] = self.data
            if Path(self.data).is_file():
                parts["data_sha256"] = file_digest(self.data)
        return json.dumps(parts, sort_keys=True)

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        weights = dict(state)
        out = self.fn(weights, self.data) if self._takes_data else self.fn(weights)
        seconds = time.perf_counter() - t0
        if isinstance(out, Score):
            self.metric = out.metric
            return Score(out.value, out.metric, timing(dict(out.metrics), seconds))
        if isinstance(out, Mapping):
            if "score" not in out:
                raise EvaluatorError(f"evaluator {self.name} returned a mapping without a 'score' key (keys: {', '.join(map(str, out))}); return a number or {{'score': ...}}")
            metric = str(out.get("metric", self.metric))
            self.metric = metric  # tables name the score as the function does
            value = _number(out["score"], self.name)
            metrics = {str(k): float(v) for k, v in out.items() if k not in ("score", "metric") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            metrics[metric] = value
            return Score(value, metric, timing(metrics, seconds))
        value = _number(out, self.name)
        return Score(value, self.metric, timing({self.metric: value}, seconds))


def _number(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise EvaluatorError(f"evaluator {name} returned {x!r}; it must return a finite number (higher is better), a Score, or {{'score': number, ...}}")
    return float(x)


def load_object(spec: str) -> Any:
    """Import ``package.module:name`` or ``path/to/file.py:name`` (``name`` may be dotted).

    Raises:
        EvaluatorError: the module or the name cannot be found, with what to fix.
    """
    if ":" not in spec:
        raise EvaluatorError(f"evaluator '{spec}' is neither a built-in nor of the form package.module:function or path/to/file.py:function")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_file():
            raise EvaluatorError(f"evaluator '{spec}': no such file {path}")
        mod_id = USER_MODULE_PREFIX + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(mod_id, path)
        if loader_spec is None or loader_spec.loader is None:
            raise EvaluatorError(f"evaluator '{spec}': cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_id] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise EvaluatorError(f"evaluator '{spec}': cannot import module '{mod_name}' ({e}); is it installed or on PYTHONPATH?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EvaluatorError(f"evaluator '{spec}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def function_evaluator(spec: str, *, data: str | None = None) -> Evaluator:
    """An evaluator from ``package.module:name``: an :class:`Evaluator` instance, an Evaluator class
    (instantiated with the data path if its constructor takes an argument, else without), or a scoring
    function (wrapped in :class:`FunctionEvaluator`).

    Raises:
        EvaluatorError: the object cannot be found or is not callable.
    """
    obj = load_object(spec)
    if isinstance(obj, Evaluator):
        return obj
    if isinstance(obj, type) and issubclass(obj, Evaluator):
        try:  # an Evaluator class that takes the data path gets it (held-out or test)
            takes_data = len([p for p in inspect.signature(obj).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 1
        except (TypeError, ValueError):
            takes_data = False
        return obj(data) if takes_data and data is not None else obj()
    if not callable(obj):
        raise EvaluatorError(f"evaluator '{spec}' is a {type(obj).__name__}, not a function or an Evaluator")
    return FunctionEvaluator(obj, spec, data=data)


def run_evaluator(evaluator: Evaluator, state: Any, label: str) -> tuple[Score, Predictions | None]:
    """Score ``state``, keeping the predictions when the evaluator gives them (for ensembles and calibration)."""
    if isinstance(evaluator, PredictionEvaluator):
        t0 = time.perf_counter()
        p = evaluator.predict(state, label=label)
        return evaluator.score(p, seconds=time.perf_counter() - t0), p
    return evaluator.evaluate(state, label=label), None

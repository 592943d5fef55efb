"""Multi-domain evaluation (Branch-Train-Merge style): one held-out set per domain, scored together.

The score of a set of weights is the weighted mean of its per-domain scores (equal weights by default),
so greedy and learned soups optimise the mean across domains; every domain's score and loss are kept in
the metrics as ``domain/<name>`` and ``domain/<name>/loss`` so tables show what a merge costs each domain.

:func:`multi_domain` returns the most capable evaluator the domains allow: per-example predictions when
every domain gives them (ensembles, calibration), and a differentiable loss when every domain also runs
a module (the learned soup), the domains then sharing one copy of the model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..errors import EvaluatorError
from .base import Evaluator, PredictionEvaluator, Predictions, Score, timing
from .module import ModuleEvaluator

DOMAIN_PREFIX = "domain/"


def domain_scores(score: Score) -> dict[str, float]:
    """Domain name -> its score, from a multi-domain :class:`Score` (empty for a single-domain one)."""
    return {k[len(DOMAIN_PREFIX):]: v for k, v in score.metrics.items() if k.startswith(DOMAIN_PREFIX) and k.count("/") == 1}


class MultiDomainEvaluator(Evaluator):
    """Scores on several domains; the score is their weighted mean. Build it with :func:`multi_domain`.

    Args:
        domains: domain name -> evaluator (all with the same metric).
        weights: domain name -> weight of its score in the mean (default: equal).
    """

    def __init__(self, domains: Mapping[str, Evaluator], weights: Mapping[str, float] | None = None) -> None:
        if not domains:
            raise EvaluatorError("multi-domain evaluation needs at least one domain")
        metrics = {ev.metric for ev in domains.values()}
        if len(metrics) != 1:
            raise EvaluatorError(f"the domains' evaluators measure different things ({', '.join(sorted(metrics))}); their mean would mean nothing")
        self.domains = dict(domains)
        unknown = set(weights or {}) - set(domains)
        if unknown:
            raise EvaluatorError(f"domain weights name unknown domain(s) {sorted(unknown)}; domains: {', '.join(domains)}")
        try:
            w = {d: 1.0 for d in domains} if weights is None else {d: float(weights.get(d, 0.0)) for d in domains}
        except (TypeError, ValueError):
            raise EvaluatorError(f"domain weights must be numbers, got {dict(weights or {})}") from None
        if not all(math.isfinite(v) and v >= 0 for v in w.values()) or sum(w.values()) <= 0:
            raise EvaluatorError(f"domain weights must be non-negative with a positive sum, got {w}")
        total = sum(w.values())
        self.weights = {d: v / total for d, v in w.items()}
        self.metric = next(iter(metrics))

    def identity(self) -> str:
        return json.dumps({"evaluator": "multi-domain", "weights": self.weights, "domains": {d: ev.identity() for d, ev in self.domains.items()}},
                          sort_keys=True)

    def combine(self, scores: Mapping[str, Score], seconds: float | None = None) -> Score:
        """The weighted mean of per-domain scores, with every domain's metrics kept under ``domain/<name>``."""
        value = sum(self.weights[d] * s.value for d, s in scores.items())
        self.metric = next(iter(scores.values())).metric  # a user's function names its metric when it first answers
        metrics: dict[str, float] = {self.metric: value}
        for d, s in scores.items():
            metrics[DOMAIN_PREFIX + d] = s.value
            for k, v in s.metrics.items():
                if k != s.metric and k not in ("seconds", "examples_per_s"):
                    metrics[f"{DOMAIN_PREFIX}{d}/{k}"] = v
        if all("loss" in s.metrics for s in scores.values()):
            metrics["loss"] = sum(self.weights[d] * s.metrics["loss"] for d, s in scores.items())
        metrics["examples"] = float(sum(s.metrics.get("examples", 0.0) for s in scores.values()))
        return Score(value, self.metric, timing(metrics, seconds))

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        scores = {d: ev.evaluate(state, label=f"{label or ''} [{d}]".strip()) for d, ev in self.domains.items()}
        return self.combine(scores, time.perf_counter() - t0)


class PredictingDomains(MultiDomainEvaluator, PredictionEvaluator):
    """Multi-domain evaluation whose domains all give predictions: they are concatenated, domain after domain."""

    def predict(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Predictions:
        parts = [ev.predict(state, label=f"{label or ''} [{d}]".strip()) for d, ev in self._predictors()]
        self._seen_sizes = [int(p.labels.numel()) for p in parts]
        classes = {p.logits.shape[1] for p in parts}
        if len(classes) != 1:
            raise EvaluatorError(f"the domains' models have different numbers of classes ({sorted(classes)}); predictions cannot be combined")
        return Predictions(torch.cat([p.logits for p in parts]), torch.cat([p.labels for p in parts]))

    def _predictors(self) -> list[tuple[str, PredictionEvaluator]]:
        return [(d, ev) for d, ev in self.domains.items() if isinstance(ev, PredictionEvaluator)]

    def _sizes(self) -> list[int] | None:
        """Examples per domain: from the evaluators when they know, else as last predicted."""
        known = [getattr(ev, "data_size", lambda: None)() for _, ev in self._predictors()]
        if all(isinstance(n, int) for n in known):
            return known  # type: ignore[return-value]
        return getattr(self, "_seen_sizes", None)

    def score(self, predictions: Predictions, *, seconds: float | None = None) -> Score:
        sizes = self._sizes()
        if sizes is None or sum(sizes) != predictions.labels.numel():
            raise EvaluatorError("these predictions were not made by this multi-domain evaluator (sizes differ); call predict first")
        scores, start = {}, 0
        for (d, ev), n in zip(self._predictors(), sizes):
            scores[d] = ev.score(Predictions(predictions.logits[start : start + n], predictions.labels[start : start + n]))
            start += n
        return self.combine(scores, seconds)

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        return self.score(self.predict(state, label=label), seconds=time.perf_counter() - t0)


class ModuleDomains(PredictingDomains, ModuleEvaluator):
    """Multi-domain evaluation of one module (shared by the domains): predictions and a differentiable loss.

    The learned soup's loss is the weighted mean of the domains' mean losses: each batch's summed loss
    is scaled by weight_d x N / n_d (N examples in all, n_d in the domain), so that the mean over all
    examples equals sum_d weight_d x mean loss_d.
    """

    def __init__(self, domains: Mapping[str, Evaluator], weights: Mapping[str, float] | None = None) -> None:
        MultiDomainEvaluator.__init__(self, domains, weights)
        not_modules = [d for d, ev in self.domains.items() if not (isinstance(ev, ModuleEvaluator) and isinstance(ev, PredictionEvaluator))]
        if not_modules:
            raise EvaluatorError(f"ModuleDomains needs module evaluators with predictions for every domain; {', '.join(not_modules)} "
                                 "is not one; build the evaluator with multi_domain(), which picks the kind the domains support")
        first = next(iter(self.domains.values()))
        assert isinstance(first, ModuleEvaluator)  # checked above, for the type checker
        for ev in self.domains.values():
            assert isinstance(ev, ModuleEvaluator)
            if ev is not first:
                ev.share_module(first)
        self._slot = first._slot
        self.name = None
        self.bn_loader = first.bn_loader
        self.progress = first.progress
        self.ignore_unexpected = first.ignore_unexpected
        self._data_hash = None
        sizes = {d: ev.data_size() for d, ev in self.domains.items()}  # type: ignore[attr-defined]
        if any(n is None or n <= 0 for n in sizes.values()):
            raise EvaluatorError(f"every domain must know its number of examples for the learned soup's weighting; got {sizes}")
        self._n = {d: int(n) for d, n in sizes.items()}  # type: ignore[arg-type]

    def batches(self) -> Iterable[Any]:
        """(domain, batch) pairs, round-robin over the domains so that no stretch of training sees one domain only."""
        iters = [(d, iter(ev.batches())) for d, ev in self.domains.items()]  # type: ignore[attr-defined]
        while iters:
            alive = []
            for d, it in iters:
                batch = next(it, None)
                if batch is not None:
                    yield (d, batch)
                    alive.append((d, it))
            iters = alive

    def batch_loss(self, call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, int]:
        d, inner = batch
        total, n = self.domains[d].batch_loss(call, inner)  # type: ignore[attr-defined]
        factor = self.weights[d] * sum(self._n.values()) / self._n[d]
        return total * factor, n

    def data_size(self) -> int | None:
        return sum(self._n.values())

    def identity(self) -> str:
        return MultiDomainEvaluator.identity(self)

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        return PredictingDomains.evaluate(self, state, label=label)


def multi_domain(domains: Mapping[str, Evaluator], weights: Mapping[str, float] | None = None) -> MultiDomainEvaluator:
    """The most capable multi-domain evaluator for ``domains`` (see the module doc).

    Raises:
        EvaluatorError: no domains, different metrics, or bad weights.
    """
    evs = list(domains.values())
    if evs and all(isinstance(ev, ModuleEvaluator) and isinstance(ev, PredictionEvaluator) for ev in evs):
        return ModuleDomains(domains, weights)
    if evs and all(isinstance(ev, PredictionEvaluator) for ev in evs):
        return PredictingDomains(domains, weights)
    return MultiDomainEvaluator(domains, weights)

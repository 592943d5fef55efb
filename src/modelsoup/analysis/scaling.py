"""Weight-magnitude stability: how predictions change when a model's weights are scaled, for ingredients vs soups.

Averaging weights that point in different directions shrinks them: the soup's weight matrices have a
smaller norm than its ingredients'. Wang et al. 2024 ("Rethinking weight-averaged model-merging",
arXiv 2411.09263) probe this by scaling the parameters by a grid of factors and measuring how
stable the predictions stay. Here every model (each ingredient and the uniform soup of all) is scaled
by each factor and reported with: agreement of its predicted classes with its own unscaled predictions,
the evaluator's metrics (accuracy, loss), mean confidence and entropy.

What is scaled (``scope``):

* ``matrices`` (default): floating tensors with two or more dimensions (linear, convolution and
  embedding weights). These carry the directions that averaging shrinks; biases and normalisation
  gains are one-dimensional, few, and scaling a normalisation gain rescales that layer's output
  outright, which measures something else. For a bias-free ReLU network scaling every matrix by ``c``
  scales the logits by ``c ** depth``: the predicted classes do not change, only the confidence.
* ``all``: every floating tensor.

Integer and boolean buffers are never scaled. The scaled state is lazy: each tensor is scaled when read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import AnalysisError
from ..eval.base import Evaluator
from ..recipes.greedy import as_pantry
from .predictions import agreement, need_predictions, prediction_stats
from ..progress import progress_on

SCOPES = ("matrices", "all")
DEFAULT_FACTORS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)


def in_scope(t: torch.Tensor, scope: str) -> bool:
    """Whether ``scope`` scales tensor ``t``."""
    return t.is_floating_point() and (scope == "all" or t.ndim >= 2)


class ScaledState(Mapping[str, torch.Tensor]):
    """``state`` with the tensors in ``scope`` multiplied by ``factor`` when read (computed in float32, cast back).

    Raises:
        AnalysisError: an unknown scope.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], factor: float, scope: str = "matrices") -> None:
        if scope not in SCOPES:
            raise AnalysisError(f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
        self.state, self.factor, self.scope = state, float(factor), scope
        self.immutable = bool(getattr(state, "immutable", False))

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.state[name]
        if self.factor == 1.0 or not in_scope(t, self.scope):
            return t
        return (t.float() * self.factor).to(t.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def scoped_norm(state: Mapping[str, torch.Tensor], scope: str) -> float:
    """L2 norm of the tensors in ``scope``, read one at a time, summed in float64."""
    total = 0.0
    for name in state:
        t = state[name]
        if in_scope(t, scope):
            total += float(t.double().pow(2).sum())
    return total ** 0.5


@dataclass
class Scaling:
    """Predictions of scaled models.

    Attributes:
        factors: the grid (1 included).
        scope: what was scaled (``matrices`` or ``all``).
        metric: the evaluator's score.
        models: per model ``{"label", "kind" (ingredient | soup), "norm" (of the scaled tensors), "rows"}``,
            one row per factor: ``{"factor", "agreement", <evaluator metrics>, "confidence", "entropy"}``.
        seconds: wall time.
    """

    factors: list[float]
    scope: str
    metric: str
    models: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"factors": self.factors, "scope": self.scope, "metric": self.metric, "models": self.models, "seconds": round(self.seconds, 3)}

    def to_markdown(self) -> str:
        """One table per quantity: agreement with the unscaled predictions, the score, confidence."""
        parts = [f"Weights scaled ({self.scope}: {'tensors with 2+ dimensions' if self.scope == 'matrices' else 'every floating tensor'})."]
        norms = ", ".join(f"{m['label']} {m['norm']:.4g}" for m in self.models)
        parts.append(f"Norm of the scaled tensors: {norms}.")
        for key, title in (("agreement", "agreement with the unscaled predictions"), (self.metric, self.metric), ("confidence", "mean confidence")):
            head = ["model", "kind"] + [f"x{f:g}" for f in self.factors]
            lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(self.factors)]
            for m in self.models:
                lines.append("| " + " | ".join([m["label"], m["kind"], *(f"{r[key]:.4f}" for r in m["rows"])]) + " |")
            parts.append("\n".join(lines))
        return "\n\n".join(parts) + "\n"


def magnitude_stability(ingredients: Any, evaluator: Evaluator, *, factors: Sequence[float] = DEFAULT_FACTORS, scope: str = "matrices",
                        soup: bool = True, progress: bool | None = None, **pantry_options: Any) -> Scaling:
    """Scale each ingredient (and the uniform soup of all of them) by ``factors`` and compare predictions.

    Args:
        ingredients: a :class:`~modelsoup.recipes.Pantry`, or checkpoint paths / in-memory models.
        evaluator: a prediction evaluator (classification).
        factors: scale factors; 1 is added when missing (the reference).
        scope: ``matrices`` or ``all`` (see the module doc).
        soup: also the uniform soup of all ingredients (with at least two).
        progress: progress bar; None = only on a terminal.

    Raises:
        AnalysisError: the evaluator gives no predictions, an unknown scope, or a factor that is not positive.
    """
    t0 = time.perf_counter()
    ev = need_predictions(evaluator, "the weight-scaling diagnostic")
    if scope not in SCOPES:
        raise AnalysisError(f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
    grid = sorted({float(f) for f in factors} | {1.0})
    if grid[0] <= 0:
        raise AnalysisError(f"scale factors must be positive, got {grid[0]:g}")
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        pantry.prefetch(range(len(pantry)), ev, predictions=True)
        models: list[tuple[str, str, Any]] = [(lab, "ingredient", pantry.soup([i])[1]) for i, lab in enumerate(pantry.labels)]
        if soup and len(pantry) > 1:
            models.append((f"uniform soup of {len(pantry)}", "soup", pantry.soup(list(range(len(pantry))))[1]))
        out = []
        show = progress_on(progress)
        with tqdm(total=len(models) * len(grid), desc="scaling", unit="eval", disable=not show, leave=False) as bar:
            for i, (label, kind, state) in enumerate(models):
                ref = pantry.predictions(i, ev) if kind == "ingredient" else ev.predict(state, label=label)
                rows = []
                for f in grid:
                    preds = ref if f == 1.0 else ev.predict(ScaledState(state, f, scope), label=f"{label} x{f:g}")
                    rows.append({"factor": f, "agreement": agreement(preds, ref), **prediction_stats(ev, preds)})
                    bar.update(1)
                out.append({"label": label, "kind": kind, "norm": scoped_norm(state, scope), "rows": rows})
        return Scaling(grid, scope, ev.metric, out, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

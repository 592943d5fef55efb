"""Weight interpolation between two models, scored on held-out data: WiSE-FT and its mixing-value search.

theta(alpha) = (1 - alpha) theta_a + alpha theta_b at a grid of alpha values. With ``a`` the zero-shot
(pre-trained) model and ``b`` a fine-tune this is WiSE-FT (Wortsman et al., CVPR 2022); the best alpha
on held-out data is chosen (on a tie, the smallest alpha, i.e. the one closest to ``a``). Each point is
the exact output of ``soup merge --method linear a b --weights 1-alpha,alpha``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


from ..recipe import Recipe
from ..errors import OptionError
from ..eval.base import Evaluator, Score
from .pantry import as_pantry
from .pantry import Pantry

log = logging.getLogger("modelsoup")

DEFAULT_ALPHAS = tuple(round(0.1 * i, 10) for i in range(11))
MAX_ALPHAS = 10_000  # a grid bigger than this is a typo (0:1:1e-9), not a search


@dataclass
class InterpolationResult:
    """Scores along the line from ``a`` (alpha 0) to ``b`` (alpha 1).

    Attributes:
        labels: (a, b).
        alphas: the grid, ascending.
        scores: held-out score at each alpha.
        test_scores: test score at each alpha (reported only), when a test evaluator was given.
        best_alpha: the chosen mixing value.
        recipe: the chosen point as a ``linear`` recipe.
        seconds: wall time.
    """

    labels: tuple[str, str]
    alphas: list[float]
    scores: list[Score]
    test_scores: list[Score] | None
    best_alpha: float
    recipe: Recipe
    seconds: float

    @property
    def best_score(self) -> Score:
        return self.scores[self.alphas.index(self.best_alpha)]

    def to_markdown(self) -> str:
        """The curve as a Markdown table, the chosen point marked."""
        metric = self.scores[0].metric
        has_loss = all("loss" in s.metrics for s in self.scores)
        head = ["alpha", f"held-out {metric}"] + (["held-out loss"] if has_loss else []) + ([f"test {metric}"] if self.test_scores else [])
        lines = [f"Interpolation from {self.labels[0]} (alpha 0) to {self.labels[1]} (alpha 1)", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
        for k, (a, s) in enumerate(zip(self.alphas, self.scores)):
            row = [f"{a:g}" + (" (chosen)" if a == self.best_alpha else ""), f"{s.value:.4f}"]
            row += [f"{s.metrics['loss']:.4f}"] if has_loss else []
            row += [f"{self.test_scores[k].value:.4f}"] if self.test_scores else []
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "alphas": self.alphas, "heldout": [s.to_dict() for s in self.scores],
                "test": [s.to_dict() for s in self.test_scores] if self.test_scores else None, "best_alpha": self.best_alpha,
                "seconds": round(self.seconds, 3)}


def parse_alphas(text: str) -> list[float]:
    """``0,0.25,0.5`` or ``start:stop:step`` (stop included), e.g. ``0:1:0.1``.

    Raises:
        OptionError: unreadable text, a non-finite value, a step that is not positive, an empty grid, or
            more than ``MAX_ALPHAS`` values.
    """
    how = "give a list like 0,0.5,1 or a range start:stop:step like 0:1:0.1"
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"cannot read mixing values {text!r}; {how}") from None
    if ":" in text:
        if not all(math.isfinite(v) for v in (start, stop, step)):
            raise OptionError(f"mixing values {text!r}: start, stop and step must be finite numbers; {how}")
        if step <= 0:
            raise OptionError(f"mixing values {text!r}: the step must be positive, got {step:g}; {how}")
        n = int(round((stop - start) / step))
        if n + 1 > MAX_ALPHAS:
            raise OptionError(f"mixing values {text!r} make {n + 1} points, more than {MAX_ALPHAS}; use a larger step")
        vals = [round(start + k * step, 10) for k in range(n + 1)]
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise OptionError(f"mixing values {text!r}: {bad[0]} is not a finite number; {how}")
    if not vals:
        raise OptionError(f"no mixing values in {text!r} (is stop below start?); {how}")
    if len(set(vals)) > MAX_ALPHAS:
        raise OptionError(f"{len(set(vals))} mixing values, more than {MAX_ALPHAS}; give fewer")
    return sorted(set(vals))


def interpolate(
    a: Any,
    b: Any,
    evaluator: Evaluator,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    test: Evaluator | None = None,
    progress: bool | None = None,
    **pantry_options: Any,
) -> InterpolationResult:
    """Score theta(alpha) = (1 - alpha) a + alpha b over ``alphas`` and pick the best on held-out data.

    Args:
        a, b: the two models (paths or in-memory; or ``a`` a :class:`Pantry` of both and ``b`` None);
            for WiSE-FT, ``a`` is the zero-shot model.
        evaluator: held-out scorer.
        alphas: mixing values (weight of ``b``); values outside [0, 1] extrapolate.
        test: scores every point on test data too (reported only, never used to choose).
        progress: progress bar; None = only on a terminal.

    Raises:
        OptionError: no mixing value, a non-finite one, or a pantry that does not hold exactly 2 models.
    """
    t0 = time.perf_counter()
    grid = sorted({float(x) for x in alphas})
    if not grid:
        raise OptionError("interpolation needs at least one mixing value (alphas), e.g. 0,0.5,1")
    if not all(math.isfinite(x) for x in grid):
        raise OptionError(f"mixing values must be finite numbers, got {[x for x in grid if not math.isfinite(x)]}")
    if isinstance(a, Pantry):
        if len(a) != 2:
            raise OptionError(f"interpolation takes a pantry of exactly 2 models, got {len(a)}; give the two models to interpolate between")
        pantry, own = a, False
    else:
        pantry, own = as_pantry([a, b], **pantry_options)
    try:
        points = [(f"alpha {alpha:g}", pantry.recipe([0, 1], [1.0 - alpha, alpha])) for alpha in grid]
        scores = [s for s, _ in pantry.evaluate_many(points, evaluator, progress=progress, desc="interpolating")]
        tests = [s for s, _ in pantry.evaluate_many(points, test, progress=progress, desc="interpolating (test)")] if test is not None else []
        for alpha, s in zip(grid, scores):
            log.info("alpha %g: %s", alpha, s)
        best = max(range(len(grid)), key=lambda k: (scores[k].value, -k))
        recipe = pantry.recipe([0, 1], [1.0 - grid[best], grid[best]])
        labels = (pantry.labels[0], pantry.labels[1])
        return InterpolationResult(labels, grid, scores, tests or None, grid[best], recipe, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

"""Scores along the line between two models and across the triangle of three, and the barrier they show.

A point of the line is ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b``; a point of the triangle is
``w_a theta_a + w_b theta_b + w_c theta_c`` with weights on a grid of step ``1 / steps`` that sum to one
(the vertices are the models, the inside is every soup of the three). Each point is the exact output of
``soup merge --method linear`` with those weights.

The barrier (Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis") is the
largest drop of the score below the linear interpolation of the vertices' scores, over the points that
are not vertices: ``max_p (sum_k w_k s_k - s(p))``. For the loss, lower being better, it is
``max_p (L(p) - sum_k w_k L_k)``. A negative barrier means every point beats the interpolation of the
models' scores: the soups improve on their ingredients. Points outside the segment or triangle (weights
below 0 or above 1, e.g. ``--alphas -0.5:1.5:0.1``) are plotted but never count towards the barrier.

:func:`aligned_curves` scores the same line or triangle again after permuting the hidden units of B (and C) to
match A (:func:`modelsoup.align.align`), and optionally with each soup REPAIRed, to show how much of a barrier
is only a matter of unit order (``soup curve --align``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


from ..errors import AnalysisError
from ..eval.base import Evaluator, Score
from ..recipes.greedy import as_pantry
from ..recipes.interpolation import DEFAULT_ALPHAS, interpolate
from ..recipes.pantry import Pantry

log = logging.getLogger("modelsoup")


@dataclass(frozen=True)
class Barrier:
    """The worst drop below the interpolation of the vertices.

    Attributes:
        value: the drop (in the metric's units; negative: every point is above the interpolation).
        at: the weights of the point where it occurs.
        relative: ``value`` over the mean of the vertices' values in absolute terms (None if that is 0).
    """

    value: float
    at: tuple[float, ...]
    relative: float | None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "at": list(self.at), "relative": self.relative}


def barrier(points: Sequence[Sequence[float]], values: Sequence[float], *, lower_is_better: bool = False) -> Barrier | None:
    """Barrier of ``values`` measured at ``points`` (weights of the vertices, each summing to one).

    The vertices (one weight 1, the others 0) must be among the points. Returns None when no point
    lies strictly inside the segment or triangle.

    Raises:
        AnalysisError: a vertex is missing, or the points have different lengths.
    """
    k = len(points[0])
    if any(len(p) != k for p in points) or len(points) != len(values):
        raise AnalysisError("every point needs one weight per vertex and one value")
    vertex = {}
    for p, v in zip(points, values):
        for i in range(k):
            if p[i] == 1.0 and all(p[j] == 0.0 for j in range(k) if j != i):
                vertex[i] = float(v)
    if len(vertex) != k:
        raise AnalysisError(f"the barrier needs the score of each end point; vertices {sorted(set(range(k)) - set(vertex))} were not evaluated")
    worst: tuple[float, tuple[float, ...]] | None = None
    for p, v in zip(points, values):
        if min(p) < 0 or max(p) > 1 or max(p) == 1.0:
            continue
        line = sum(w * vertex[i] for i, w in enumerate(p))
        drop = float(v) - line if lower_is_better else line - float(v)
        if worst is None or drop > worst[0]:
            worst = (drop, tuple(float(w) for w in p))
    if worst is None:
        return None
    scale = abs(sum(vertex.values()) / k)
    return Barrier(worst[0], worst[1], worst[0] / scale if scale > 0 else None)


def _barriers(points: Sequence[Sequence[float]], scores: Sequence[Score]) -> dict[str, Barrier | None]:
    out = {"score": barrier(points, [s.value for s in scores])}
    if all("loss" in s.metrics for s in scores):
        out["loss"] = barrier(points, [s.metrics["loss"] for s in scores], lower_is_better=True)
    return out


@dataclass
class Curve:
    """Scores at points of the line between two models (``len(labels) == 2``) or the triangle of three.

    Attributes:
        labels: the models (the vertices).
        points: weights of the vertices at each point (``(1 - alpha, alpha)`` on a line).
        scores: held-out score at each point.
        test_scores: test score at each point (reported only), when a test evaluator was given.
        seconds: wall time.
    """

    labels: list[str]
    points: list[tuple[float, ...]]
    scores: list[Score]
    test_scores: list[Score] | None
    seconds: float

    @property
    def metric(self) -> str:
        return self.scores[0].metric

    @property
    def alphas(self) -> list[float]:
        """The weight of the last model at each point (alpha on a line)."""
        return [p[-1] for p in self.points]

    def barriers(self, split: str = "heldout") -> dict[str, Barrier | None]:
        """``{"score": ..., "loss": ...}`` (loss when every score has one) on ``heldout`` or ``test`` data."""
        scores = self.scores if split == "heldout" else self.test_scores
        if scores is None:
            raise AnalysisError("no test scores: pass a test evaluator")
        return _barriers(self.points, scores)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": self.labels, "shape": "line" if len(self.labels) == 2 else "triangle", "metric": self.metric,
                               "points": [list(p) for p in self.points], "heldout": [s.to_dict() for s in self.scores],
                               "test": [s.to_dict() for s in self.test_scores] if self.test_scores else None, "seconds": round(self.seconds, 3)}
        out["barriers"] = {split: {k: (b.to_json() if b else None) for k, b in self.barriers(split).items()}
                           for split in (["heldout", "test"] if self.test_scores else ["heldout"])}
        return out

    def to_markdown(self) -> str:
        """The barriers, then every point as a table."""
        lines = []
        for split in ["heldout", "test"] if self.test_scores else ["heldout"]:
            for what, b in self.barriers(split).items():
                name = self.metric if what == "score" else "loss"
                if b is None:
                    lines.append(f"- {split} {name} barrier: no point inside")
                    continue
                rel = f" ({b.relative:+.1%} of the end points' mean)" if b.relative is not None else ""
                lines.append(f"- {split} {name} barrier: {b.value:+.4f}{rel} at weights {', '.join(f'{w:g}' for w in b.at)}")
        has_loss = all("loss" in s.metrics for s in self.scores)
        head = [f"weight of {lab}" for lab in self.labels] if len(self.labels) > 2 else ["alpha"]
        head += [f"held-out {self.metric}"] + (["held-out loss"] if has_loss else []) + ([f"test {self.metric}"] if self.test_scores else [])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for k, (p, s) in enumerate(zip(self.points, self.scores)):
            row = [f"{w:g}" for w in p] if len(self.labels) > 2 else [f"{p[-1]:g}"]
            row += [f"{s.value:.4f}"] + ([f"{s.metrics['loss']:.4f}"] if has_loss else [])
            row += [f"{self.test_scores[k].value:.4f}"] if self.test_scores else []
            lines.append("| " + " | ".join(row) + " |")
        title = f"Line from {self.labels[0]} (alpha 0) to {self.labels[1]} (alpha 1)" if len(self.labels) == 2 else f"Triangle of {', '.join(self.labels)}"
        return title + "\n\n" + "\n".join(lines) + "\n"


def triangle_points(steps: int) -> list[tuple[float, float, float]]:
    """Weights ``(i, j, k) / steps`` with ``i + j + k = steps``: the vertices, edges and inside of the triangle."""
    if steps < 1:
        raise AnalysisError(f"steps must be at least 1, got {steps}")
    return [((steps - j - k) / steps, j / steps, k / steps) for j in range(steps + 1) for k in range(steps + 1 - j)]


def line_curve(a: Any, b: Any, evaluator: Evaluator, *, alphas: Sequence[float] = DEFAULT_ALPHAS, test: Evaluator | None = None,
               progress: bool | None = None, **pantry_options: Any) -> Curve:
    """Score the line from ``a`` (alpha 0) to ``b`` (alpha 1); 0 and 1 are always on the grid.

    Args:
        a, b: the two models (paths or in-memory), or ``a`` a :class:`Pantry` of both and ``b`` None.
        evaluator: held-out scorer.
        alphas: weights of ``b``; values outside [0, 1] extrapolate (plotted, not in the barrier).
        test: scores every point on test data too.
        progress: progress bar; None = only on a terminal.
    """
    t0 = time.perf_counter()
    grid = sorted({float(x) for x in alphas} | {0.0, 1.0})
    res = interpolate(a, b, evaluator, alphas=grid, test=test, progress=progress, **pantry_options)
    return Curve(list(res.labels), [(1.0 - x, x) for x in res.alphas], res.scores, res.test_scores, time.perf_counter() - t0)


def triangle_curve(models: Pantry | Sequence[Any], evaluator: Evaluator, *, steps: int = 6, test: Evaluator | None = None,
                   progress: bool | None = None, **pantry_options: Any) -> Curve:
    """Score every soup of three models on a grid of step ``1 / steps`` ((steps + 1)(steps + 2) / 2 points).

    Args:
        models: three checkpoints (paths or in-memory), or a :class:`Pantry` of three.
        evaluator: held-out scorer.
        steps: grid resolution; 6 gives 28 points.
        test: scores every point on test data too.
        progress: progress bar; None = only on a terminal.

    Raises:
        AnalysisError: not three models.
    """
    t0 = time.perf_counter()
    if len(models) != 3:
        raise AnalysisError(f"the triangle takes exactly three models, got {len(models)}")
    points = triangle_points(steps)
    pantry, own = as_pantry(models, **pantry_options)
    try:
        tasks = [("weights " + ",".join(f"{w:g}" for w in p), pantry.recipe([0, 1, 2], list(p))) for p in points]
        scores: list[Score] = [s for s, _ in pantry.evaluate_many(tasks, evaluator, progress=progress, desc="triangle")]
        tests: list[Score] = [s for s, _ in pantry.evaluate_many(tasks, test, progress=progress, desc="triangle (test)")] if test is not None else []
        for (label, _), s in zip(tasks, scores):
            log.info("%s: %s", label, s)
        return Curve(list(pantry.labels), [tuple(p) for p in points], scores, tests or None, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()


@dataclass
class AlignedCurves:
    """One line (or triangle) scored as given, after aligning the models' hidden units to the first, and after REPAIR.

    Attributes:
        curves: ``before`` (the models as given), ``aligned`` (B and C permuted to match A), ``repaired``
            (the aligned line with every interior point REPAIRed; line only, when asked).
        alignment: the :class:`~modelsoup.align.AlignResult` of B (and C) aligned to A.
    """

    curves: dict[str, Curve]
    alignment: Any

    NAMES: ClassVar[dict[str, str]] = {"before": "before alignment", "aligned": "after alignment", "repaired": "after alignment and REPAIR"}

    @property
    def labels(self) -> list[str]:
        return self.curves["before"].labels

    def to_json(self) -> dict[str, Any]:
        return {"curves": {k: c.to_json() for k, c in self.curves.items()}, "alignment": self.alignment.to_json()}

    def to_markdown(self) -> str:
        """The barriers of each curve side by side, the alignment's summary, then each curve's points."""
        before = self.curves["before"]
        head = ["", *(self.NAMES[k] for k in self.curves)]
        lines = ["| held-out barrier | " + " | ".join(head[1:]) + " |", "|---|" + "---:|" * len(self.curves)]
        for what in before.barriers("heldout"):
            name = before.metric if what == "score" else "loss"
            cells = []
            for c in self.curves.values():
                b = c.barriers("heldout").get(what)
                cells.append("no point inside" if b is None else f"{b.value:+.4f}" + (f" ({b.relative:+.1%})" if b.relative is not None else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        method = f"{self.alignment.method} matching"
        out = [f"Barriers before and after aligning {', '.join(before.labels[1:])} to {before.labels[0]} ({method})", "", *lines, "",
               self.alignment.to_markdown()]
        for k, c in self.curves.items():
            out += [f"### {self.NAMES[k][0].upper()}{self.NAMES[k][1:]}", "", c.to_markdown()]
        return "\n".join(out)


def aligned_curves(pantry: Pantry, evaluator: Evaluator, *, alphas: Sequence[float] = DEFAULT_ALPHAS, steps: int = 6, test: Evaluator | None = None,
                   method: str = "weight", arch: Any = None, data: Any = None, spec: Any = None, input_shape: Sequence[int] | None = None,
                   repair: bool = False, seed: int = 0, progress: bool | None = None) -> AlignedCurves:
    """Score the line (two models) or triangle (three) as given, then with B (and C) aligned to A in memory, and, for a
    line with ``repair``, with every interior point REPAIRed (:func:`modelsoup.align.repair`).

    Args:
        pantry: the two or three models (the first is the reference).
        evaluator: held-out scorer; a module evaluator's module is the default architecture and its batches the default data.
        alphas: line grid (weights of B); steps: triangle grid.
        test: scores every point on test data too.
        method, arch, data, spec, input_shape, seed: see :func:`modelsoup.align.align`.
        repair: also the REPAIRed line (statistics measured on ``data``).
        progress: progress bars; None = only on a terminal.

    Raises:
        AnalysisError: not 2 or 3 models, adapters, or REPAIR of a triangle.
        AlignmentError: the models cannot be aligned (see :func:`modelsoup.align.align`).
    """
    from ..align import align
    from ..align import repair as repair_state
    from ..align.core import aligned_modules
    from ..eval.cache import EvalCache

    n = len(pantry)
    if n not in (2, 3):
        raise AnalysisError(f"alignment curves take 2 models (a line) or 3 (a triangle), got {n}")
    if any(it.base is not None or it.path is None for it in pantry.items):
        raise AnalysisError("--align takes full models given as files or folders (not PEFT adapters or in-memory models)")
    if repair and n == 3:
        raise AnalysisError("REPAIR is measured along a line; give two models with --repair")
    before = line_curve(pantry, None, evaluator, alphas=alphas, test=test, progress=progress) if n == 2 else \
        triangle_curve(pantry, evaluator, steps=steps, test=test, progress=progress)
    it0 = pantry.items[0]
    arch = arch if arch is not None else getattr(evaluator, "module", None) if pantry.checkpoint(0).folder is None else None
    if data is None and hasattr(evaluator, "batches"):
        data = evaluator
    result = align(it0.source, [it.source for it in pantry.items[1:]], method=method, arch=arch, data=data, spec=spec, input_shape=input_shape,
                   seed=seed, labels=[it.label for it in pantry.items[1:]], key=it0.key, strip_prefix=it0.strip_prefix)
    labels = [it0.label] + [f"{it.label} aligned" for it in pantry.items[1:]]
    memory: dict[str, Any] = {"labels": labels, "cache": EvalCache(enabled=False)}
    states = [result.reference_state, *result.states]
    if n == 2:
        aligned = line_curve(states[0], states[1], evaluator, alphas=alphas, test=test, progress=progress, **memory)
    else:
        aligned = triangle_curve(states, evaluator, steps=steps, test=test, progress=progress, **memory)
    curves = {"before": before, "aligned": aligned}
    if repair:
        from ..align.core import as_batches

        batches = as_batches(data)
        if batches is None:
            raise AnalysisError("REPAIR needs data to measure activation statistics on (--align-data)")
        ref, (other,) = aligned_modules(result)
        t0 = time.perf_counter()
        points, scores, tests = [], [], []
        for k, (p, s) in enumerate(zip(aligned.points, aligned.scores)):
            alpha = p[-1]
            if 0.0 < alpha < 1.0:
                state = repair_state(ref, other, alpha, batches, spec=result.spec)
                s = evaluator.evaluate(state, label=f"REPAIR alpha {alpha:g}")
                t = test.evaluate(state, label=f"REPAIR alpha {alpha:g} (test)") if test is not None else None
                log.info("REPAIR alpha %g: %s", alpha, s)
            else:
                t = aligned.test_scores[k] if aligned.test_scores else None
            points.append(p)
            scores.append(s)
            tests.append(t)
        curves["repaired"] = Curve(labels, points, scores, tests if test is not None else None, time.perf_counter() - t0)  # type: ignore[arg-type]
    return AlignedCurves(curves, result)

"""Interpolation lines and triangles: the barrier by hand, and curves of real merges scored in closed form."""

from __future__ import annotations

import pytest
import torch

from modelsoup.analysis.curves import barrier, line_curve, triangle_curve, triangle_points
from modelsoup.errors import AnalysisError
from modelsoup.eval import EvalCache, FunctionEvaluator

NO_CACHE = {"cache": EvalCache(enabled=False)}


def test_barrier_by_hand_on_a_line():
    alphas = [0, 0.25, 0.5, 0.75, 1, 1.5]
    points = [(1 - a, a) for a in alphas]
    # straight line from 0.9 to 0.7: 0.85, 0.8, 0.75 inside; drops 0.05, 0.3, -0.1; alpha 1.5 extrapolates and never counts
    b = barrier(points, [0.9, 0.8, 0.5, 0.85, 0.7, 0.0])
    assert b.value == pytest.approx(0.3) and b.at == (0.5, 0.5)
    assert b.relative == pytest.approx(0.3 / 0.8)
    # a loss: lower is better; line from 1 to 2: 1.25, 1.5, 1.75 inside; rises 0.75, 1.5, -0.25
    lb = barrier(points, [1.0, 2.0, 3.0, 1.5, 2.0, 99.0], lower_is_better=True)
    assert lb.value == pytest.approx(1.5) and lb.at == (0.5, 0.5)


def test_a_curve_above_the_line_has_a_negative_barrier():
    b = barrier([(1, 0), (0.5, 0.5), (0, 1)], [0.8, 0.95, 0.9])
    assert b.value == pytest.approx(-0.1)


def test_barrier_on_a_triangle_by_hand():
    pts = triangle_points(2)
    assert sorted(pts) == sorted([(1, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 1, 0), (0, 0.5, 0.5), (0, 0, 1)])
    vertex = {(1, 0, 0): 0.9, (0, 1, 0): 0.6, (0, 0, 1): 0.3}
    # edge midpoints: interpolations 0.75, 0.6, 0.45; scores 0.7, 0.2, 0.45 -> drops 0.05, 0.4, 0.0
    inner = {(0.5, 0.5, 0): 0.7, (0.5, 0, 0.5): 0.2, (0, 0.5, 0.5): 0.45}
    b = barrier(pts, [vertex.get(p, inner.get(p)) for p in pts])
    assert b.value == pytest.approx(0.4) and b.at == (0.5, 0, 0.5)
    assert len(triangle_points(6)) == 28


def test_barrier_needs_every_vertex_and_an_inside_point():
    with pytest.raises(AnalysisError, match=r"vertices \[1\] were not evaluated"):
        barrier([(1, 0), (0.5, 0.5)], [1.0, 0.5])
    assert barrier([(1, 0), (0, 1)], [1.0, 0.5]) is None


def _scalar(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v], dtype=torch.float32)}


def _closed_form(fn, loss=None):
    loss = loss or (lambda w: -fn(w))
    return FunctionEvaluator(lambda sd: {"score": fn(float(sd["w"])), "loss": loss(float(sd["w"]))}, "closed-form")


def test_line_curve_scores_the_merged_weights_and_finds_the_barrier():
    # models at w = 0 and w = 2; score 1 - (w - 1)^2 is 0 at both ends, 0.75 at alpha 0.25 and 0.75, 1 midway: every point
    # is above the line, the smallest margin 0.75 (a barrier of -0.75); the loss (w - 1)^2 mirrors it
    ev = _closed_form(lambda w: 1 - (w - 1) ** 2, lambda w: (w - 1) ** 2)
    curve = line_curve(_scalar(0.0), _scalar(2.0), ev, alphas=[0.25, 0.5, 0.75], progress=False, **NO_CACHE)
    assert curve.barriers()["score"].value == pytest.approx(-0.75) and curve.barriers()["loss"].value == pytest.approx(-0.75)
    # score (w - 1)^2: 1 at both ends and 0 midway, a barrier of exactly 1; loss -(w - 1)^2 rises by 1 above its line
    curve = line_curve(_scalar(0.0), _scalar(2.0), _closed_form(lambda w: (w - 1) ** 2), alphas=[0.25, 0.5, 0.75], progress=False, **NO_CACHE)
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]  # the end points are always added
    assert [s.value for s in curve.scores] == pytest.approx([1, 0.25, 0, 0.25, 1])
    b = curve.barriers()
    assert b["score"].value == pytest.approx(1.0) and b["score"].at == (0.5, 0.5)
    assert b["loss"].value == pytest.approx(1.0) and b["loss"].relative == pytest.approx(1.0)  # over |mean end-point loss| = 1
    data = curve.to_json()
    assert data["shape"] == "line" and data["barriers"]["heldout"]["score"]["value"] == pytest.approx(1.0)
    assert "heldout score barrier: +1.0000" in curve.to_markdown()


def test_triangle_curve_weights_each_model_as_the_grid_says():
    models = [_scalar(0.0), _scalar(3.0), _scalar(6.0)]
    test = _closed_form(lambda w: w)  # the score is the soup's weight itself: w_a * 0 + w_b * 3 + w_c * 6
    curve = triangle_curve(models, _closed_form(lambda w: -abs(w - 3)), steps=3, test=test, progress=False, **NO_CACHE)
    assert len(curve.points) == 10
    for p, s in zip(curve.points, curve.test_scores):
        assert s.value == pytest.approx(3 * p[1] + 6 * p[2], abs=1e-5)
    # vertices score -3, 0, -3; the inside is never below the plane through them: -|w - 3| is concave
    assert curve.barriers()["score"].value <= 1e-6
    with pytest.raises(AnalysisError, match="exactly three models"):
        triangle_curve(models[:2], test, progress=False, **NO_CACHE)

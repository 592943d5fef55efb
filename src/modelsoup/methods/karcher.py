"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit hypersphere.

Method (as mergekit's ``karcher``): start from the normalised weighted mean of the unit vectors and take
Riemannian gradient steps (log map, weighted mean in the tangent space, exp map) until the step is
shorter than ``tol`` or ``max_iter`` steps; the result is scaled by the weighted mean of the norms.
Models whose norm is at most ``tol`` have no direction: they do not vote on it (their norm still enters
the scale). If no model has a direction the result is zero. mergekit weights every model equally.

How: every step stays in the span of the unit vectors u_i (the mean starts as their combination; a log map adds
u_i - <u_i, m> m; the exp map combines m and the tangent), so the iteration runs on the k coefficients of m in the u_i,
with the k x k Gram matrix of the inputs for every dot and norm (<sum_i a_i u_i, sum_j b_j u_j> = a^T U b). One pass
over the inputs takes the Gram matrix (float32 rows added exactly, :func:`~.reduce.gram_matrix`), the steps run in
float64 on k numbers, and a second pass writes the result as a linear combination of the inputs. The same iteration as
mergekit's whole-tensor float32 steps, without their rounding: a float32 result is the float64 one to float32 rounding
(the tensor steps were up to 1e-5 off), and the engine streams it (:data:`REDUCTION`), holding no tensor-sized buffer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .multislerp import CANCEL
from .ops import linear_combination, model_weights, normalizing_sum
from .reduce import fsum, gram_from_upper, gram_upper
from .registry import Param, Reduction, register

# A model further than this from the running mean is refused: the log map's direction at a near-antipode is decided by
# rounding (in the Gram matrix's coefficients as in float32 tensors), and such directions have no unique Karcher mean.
FAR = math.radians(160)

# Entries per slice of the Gram pass (part of the numerics): the slices' sums are added as Python floats, in order.
SLICE = 1 << 20


def _alphas(weights: Sequence[float] | None, k: int) -> list[float]:
    w = model_weights(weights, k)
    total = normalizing_sum(w, option=None)
    return [x / total for x in w]


def coefficients(gram: list[list[float]], alphas: Sequence[float], max_iter: int, tol: float) -> list[float]:
    """b_i with result = sum_i b_i theta_i, from the Gram matrix of the theta_i: the Karcher iteration on the mean's
    coefficients c (m = sum_i c_i u_i), b_i = c_i (sum_j a_j |theta_j|) / |theta_i|; all zero if no model has a direction."""
    k = len(alphas)
    norms = [math.sqrt(gram[i][i]) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    u = {(i, j): gram[i][j] / (norms[i] * norms[j]) for i in valid for j in valid}  # <u_i, u_j>

    def dot_u(i: int, c: Sequence[float]) -> float:  # <u_i, sum_j c_j u_j>
        return fsum(u[(i, j)] * c[j] for j in valid)

    def norm(c: Sequence[float]) -> float:  # |sum_i c_i u_i|
        return math.sqrt(max(fsum(c[i] * u[(i, j)] * c[j] for i in valid for j in valid), 0.0))

    vsum = sum(alphas[i] for i in valid)
    c = [alphas[i] / vsum if i in valid else 0.0 for i in range(k)]
    mn = norm(c)
    if mn * mn < CANCEL * sum(abs(x) for x in c) ** 2 or mn < tol:
        raise MethodError(f"karcher: the models' directions nearly cancel (their weighted mean has length {mn:.2g}, below "
                          f"{math.sqrt(CANCEL):.2g}): antipodal models with balancing weights have no unique Karcher mean; "
                          "change the weights, or merge with linear")
    c = [x / mn for x in c]
    for _ in range(max_iter):
        t = [0.0] * k  # the tangent: sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)
        for i in valid:
            dot = max(-1.0, min(1.0, dot_u(i, c)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            if theta > FAR:
                raise MethodError(f"karcher: model {i + 1}'s direction is {math.degrees(theta):.1f} degrees from the models' mean "
                                  f"(more than {math.degrees(FAR):.0f}): nearly opposite directions have no well-defined Karcher "
                                  "mean; drop that model, or merge with linear")
            s = alphas[i] / vsum * theta / math.sin(theta)
            t[i] += s
            for j in valid:
                t[j] -= s * dot * c[j]
        tn = norm(t)
        if tn < tol:
            break
        c = [math.cos(tn) * x + (math.sin(tn) / tn) * y for x, y in zip(c, t)]
        un = norm(c)
        if un > tol:
            c = [x / un for x in c]
    scale = sum(a * n for a, n in zip(alphas, norms))
    return [c[i] * scale / norms[i] if i in valid else 0.0 for i in range(k)]


@functools.lru_cache(maxsize=64)
def _coefficients_cached(sums: tuple[float, ...], alphas: tuple[float, ...], max_iter: int, tol: float) -> list[float]:
    """:func:`coefficients` of a tensor's sums, computed once for all of its slices."""
    return coefficients(gram_from_upper(sums, len(alphas)), alphas, max_iter, tol)


def _gram(tensors: Sequence[torch.Tensor], **_: Any) -> tuple[float, ...]:
    """The one pass: <theta_i, theta_j> for every pair (the upper triangle)."""
    return gram_upper(tensors)


def _combine(sums: tuple[float, ...], tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
             max_iter: int = 10, tol: float = 1e-5, **_: Any) -> torch.Tensor:
    """The result on one slice: sum_i b_i theta_i (:func:`coefficients`), float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if len(tensors) == 1:
        return tensors[0].reshape(-1).to(dtype, copy=True)
    b = _coefficients_cached(sums, tuple(_alphas(weights, len(tensors))), max_iter, tol)
    return linear_combination(tensors, b, None, dtype)


REDUCTION = Reduction(chunk=SLICE, partial=_gram, apply=_combine)


@register(
    "karcher",
    summary="iterative Riemannian mean of the models' directions on the sphere, scaled by the weighted mean norm",
    paper="Karcher 1977, Riemannian center of mass; for model merging as in mergekit (arXiv 2603.04972)",
    workspace=0,  # a slice-sized buffer per model for the Gram pass, no tensor-sized one
    divides_by_weight_sum=lambda p: True,
    reduction=REDUCTION,
    takes_half=True,  # each slice is widened exactly first (the Gram pass, the combination)
    whole_half=True,
)
def karcher(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    max_iter: Annotated[int, Param(ge=0, le=10_000, help="most gradient steps")] = 10,
    tol: Annotated[float, Param(gt=0, help="stop when a step is shorter; norms at most this have no direction")] = 1e-5,
) -> torch.Tensor:
    """m = argmin_m sum_i a_i d(m, u_i)^2 on the sphere (u_i = theta_i / |theta_i|), theta = m sum_i a_i |theta_i|, a_i = w_i / sum w.

    Raises:
        MethodError: weights summing to zero; directions that nearly cancel (their weighted mean shorter than
            sqrt(CANCEL)), or a model more than FAR (160 degrees) from the running mean.
    """
    _alphas(weights, len(tensors))  # weights summing to zero fail before any pass
    return REDUCTION.whole(tensors, base=None, weights=weights, max_iter=max_iter, tol=tol)

"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit hypersphere.

Method (as mergekit's ``karcher``): start from the normalised weighted mean of the unit vectors and take
Riemannian gradient steps (log map, weighted mean in the tangent space, exp map) until the step is
shorter than ``tol`` or ``max_iter`` steps; the result is scaled by the weighted mean of the norms.
Models whose norm is at most ``tol`` have no direction: they do not vote on it (their norm still enters
the scale). If no model has a direction the result is zero. mergekit weights every model equally.

How: every step stays in the span of the unit vectors u_i (the mean starts as their combination; a log map adds
u_i - <u_i, m> m; the exp map combines m and the tangent), so the iteration runs on the k coefficients of m in the u_i,
with the k x k matrix of cosines <u_i, u_j> for every dot and norm (<sum_i a_i u_i, sum_j b_j u_j> = a^T U b). One pass
over the inputs takes the sums the cosines need (:func:`~.reduce.difference_sums`: each 1 - cos from the models'
differences, so nearly parallel fine-tunes keep their angles), the steps run in float64 on k numbers, and a second
pass writes the result as a linear combination of the inputs. The same iteration as mergekit's whole-tensor float32
steps, without their rounding: a float32 result is the float64 one to about float32 rounding (the tensor steps were up
to 1e-5 off), and the engine streams it (:data:`REDUCTION`), holding no tensor-sized buffer. Where the iteration is
ill-posed (directions that nearly cancel, a model nearly opposite the mean) it is refused by name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .ops import linear_combination, model_weights, normalizing_sum
from .reduce import difference_sums, fsum
from .registry import Param, Reduction, register

# The Karcher mean's coefficients come from cosines accurate to about 1e-7 (float32 rows). The iteration is refused where
# that cannot give a float32 answer: a weighted mean of the unit vectors shorter than sqrt(CANCEL) (its coefficients grow
# as 1 / length, their errors as its square), a model more than NEAR_PI from the running mean (its log map divides a
# difference of length sin(theta) by sin(theta): by 57 at 179 degrees), or one more than FAR from the mean found.
# Directions that far apart seldom have a unique Karcher mean anyway.
CANCEL = 1e-2
NEAR_PI = math.radians(179)
FAR = math.radians(160)

# Entries per slice of the sums pass (part of the numerics): the slices' sums are added as Python floats, in order.
SLICE = 1 << 20


def _alphas(weights: Sequence[float] | None, k: int) -> list[float]:
    w = model_weights(weights, k)
    total = normalizing_sum(w, option=None)
    return [x / total for x in w]


def unit_cosines(squares: Sequence[float], pairs: dict[tuple[int, int], float]) -> tuple[list[float], list[list[float]]]:
    """The norms |theta_i| and the cosines <u_i, u_j> of the unit vectors, from :func:`~.reduce.difference_sums`:
    1 - |u_i - u_j|^2 / 2 with |u_i - u_j|^2 = (|theta_i - theta_j|^2 - (|theta_i| - |theta_j|)^2) / (|theta_i| |theta_j|),
    so the small 1 - cos of nearly parallel models comes from their small difference, not from a difference of two
    large sums (where a cosine 1e-7 from 1 would be noise)."""
    k = len(squares)
    norms = [math.sqrt(x) for x in squares]
    cos = [[1.0] * k for _ in range(k)]
    for (i, j), dd in pairs.items():
        ni, nj = norms[i], norms[j]
        if ni == 0 or nj == 0:
            cos[i][j] = cos[j][i] = 0.0
            continue
        gap = (squares[i] - squares[j]) / (ni + nj)  # |theta_i| - |theta_j|
        chord = min(max((dd - gap * gap) / (ni * nj), 0.0), 4.0)  # |u_i - u_j|^2, within [0, 4] (rounding can leave it)
        cos[i][j] = cos[j][i] = 1.0 - chord / 2
    return norms, cos


def coefficients(norms: Sequence[float], cos: list[list[float]], alphas: Sequence[float], max_iter: int, tol: float,
                 entries: int) -> list[float]:
    """b_i with result = sum_i b_i theta_i: the Karcher iteration on the mean's coefficients c (m = sum_i c_i u_i),
    b_i = c_i (sum_j a_j |theta_j|) / |theta_i|; all zero if no model has a direction, all NaN if a norm is not finite
    (NaN or Inf inputs, where allowed). A tensor of one entry (the sphere is two points) takes the sign of the weighted majority of the models' signs, as the iteration does (the first model's
    where they balance: both points are then means).

    Raises:
        MethodError: the weights of the models with a direction sum to zero; their weighted mean nearly cancels (shorter
            than sqrt(CANCEL)); a model further than NEAR_PI from the running mean, or than FAR from the mean found.
    """
    k = len(alphas)
    if not all(math.isfinite(n) for n in norms):  # NaN or Inf inputs (allowed): a non-finite result, never a finite guess
        return [math.nan] * k
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    vsum = sum(alphas[i] for i in valid)
    if vsum == 0:
        raise MethodError("karcher: the weights of the models that have a direction (a norm above tol) sum to zero; change the weights")
    a = [alphas[i] / vsum if i in valid else 0.0 for i in range(k)]
    scale = sum(x * n for x, n in zip(alphas, norms))
    if entries == 1:  # cos is +-1: the weighted majority sign, or the first model's where the signs balance
        lead = fsum(a[i] * cos[valid[0]][i] for i in valid)
        pick = valid[0] if lead >= 0 else next(i for i in valid if cos[valid[0]][i] < 0)
        return [scale / norms[i] if i == pick else 0.0 for i in range(k)]

    def dot_u(i: int, c: Sequence[float]) -> float:  # <u_i, sum_j c_j u_j>
        return fsum(cos[i][j] * c[j] for j in valid)

    def norm(c: Sequence[float]) -> float:  # |sum_i c_i u_i|
        return math.sqrt(max(fsum(c[i] * cos[i][j] * c[j] for i in valid for j in valid), 0.0))

    c = list(a)
    mn = norm(c)
    if mn * mn < CANCEL:
        raise MethodError(f"karcher: the models' directions nearly cancel (their weighted mean has length {mn:.2g}, below "
                          f"{math.sqrt(CANCEL):.2g}): antipodal models with balancing weights have no unique Karcher mean; "
                          "change the weights, or merge with linear")
    c = [float(i == valid[0]) for i in range(k)] if mn < tol else [x / mn for x in c]  # mergekit: a mean shorter than tol starts at u_0
    for _ in range(max_iter):
        t = [0.0] * k  # the tangent: sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)
        for i in valid:
            if a[i] == 0:  # a model of weight 0 adds nothing, however far it is
                continue
            dot = max(-1.0, min(1.0, dot_u(i, c)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            if theta > NEAR_PI:
                raise _far(i, theta, NEAR_PI, "the running mean")
            s = a[i] * theta / math.sin(theta)
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
    for i in valid:
        theta = math.acos(max(-1.0, min(1.0, dot_u(i, c))))
        if a[i] and theta > FAR:
            raise _far(i, theta, FAR, "the mean found")
    return [c[i] * scale / norms[i] if i in valid else 0.0 for i in range(k)]


def _far(i: int, theta: float, limit: float, where: str) -> MethodError:
    return MethodError(f"karcher: model {i + 1}'s direction is {math.degrees(theta):.1f} degrees from {where} (more than "
                       f"{math.degrees(limit):.0f}): so far from the mean, rounding would decide the result; drop that model, "
                       "or merge with linear")


@functools.lru_cache(maxsize=64)
def _coefficients_cached(sums: tuple[float, ...], alphas: tuple[float, ...], max_iter: int, tol: float) -> list[float]:
    """:func:`coefficients` of a tensor's sums (:func:`_sums`), computed once for all of its slices."""
    k = len(alphas)
    squares, rest = sums[:k], iter(sums[k:-1])
    pairs = {(i, j): next(rest) for i in range(k) for j in range(i + 1, k)}
    return coefficients(*unit_cosines(squares, pairs), alphas, max_iter, tol, entries=int(sums[-1]))


def _sums(tensors: Sequence[torch.Tensor], **_: Any) -> tuple[float, ...]:
    """The one pass: |theta_i|^2, then |theta_i - theta_j|^2 for i < j, then the number of entries
    (:func:`~.reduce.difference_sums`)."""
    squares, pairs = difference_sums(tensors)
    return (*squares, *(pairs[ab] for ab in sorted(pairs)), float(tensors[0].numel()))


def _combine(sums: tuple[float, ...], tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
             max_iter: int = 10, tol: float = 1e-5, **_: Any) -> torch.Tensor:
    """The result on one slice: sum_i b_i theta_i (:func:`coefficients`), float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if len(tensors) == 1:
        return tensors[0].reshape(-1).to(dtype, copy=True)
    b = _coefficients_cached(sums, tuple(_alphas(weights, len(tensors))), max_iter, tol)
    return linear_combination(tensors, b, None, dtype)


REDUCTION = Reduction(chunk=SLICE, partial=_sums, apply=_combine)


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
            sqrt(CANCEL) = 0.1), a model more than 179 degrees from the running mean or 160 from the mean found.
    """
    _alphas(weights, len(tensors))  # weights summing to zero fail before any pass
    return REDUCTION.whole(tensors, base=None, weights=weights, max_iter=max_iter, tol=tol)

"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit hypersphere.

Method (as mergekit's ``karcher``): start from the normalised weighted mean of the unit vectors and take
Riemannian gradient steps (log map, weighted mean in the tangent space, exp map) until the step is
shorter than ``tol`` or ``max_iter`` steps; the result is scaled by the weighted mean of the norms.
Models whose norm is at most ``tol`` have no direction: they do not vote on it (their norm still enters
the scale). If no model has a direction the result is zero. mergekit weights every model equally.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from .ops import model_weights, normalizing_sum
from .registry import Param, Reduction, register
from .slerp import dot_rows

# Entries per slice of the Gram sums (part of the numerics): the slices' sums are added in float64, in order.
SLICE = 1 << 20

_SCRATCH = threading.local()


def _flat32(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The slices in float32 (half precision, given as stored, widened into this thread's buffers; the last buffer is
    the dot products')."""
    bufs: list[torch.Tensor] = _SCRATCH.__dict__.setdefault("bufs", [])
    while len(bufs) < len(tensors) + 1:
        bufs.append(torch.empty(SLICE, dtype=torch.float32))
    n = tensors[0].numel()
    return [t.reshape(-1) if t.dtype == torch.float32 else buf[:n].copy_(t.reshape(-1)) for t, buf in zip(tensors, bufs)]


def _gram(tensors: Sequence[torch.Tensor], **_: Any) -> tuple[float, ...]:
    """The pass over the inputs: <theta_i, theta_j> for i <= j, row by row (:func:`~modelsoup.methods.slerp.dot_rows`)."""
    xs = _flat32(tensors)
    prod = _SCRATCH.bufs[-1][: xs[0].numel()]
    return tuple(dot_rows(xs[i], xs[j], prod) for i in range(len(xs)) for j in range(i, len(xs)))


@functools.lru_cache(maxsize=64)
def _coefficients(gram: tuple[float, ...], k: int, weights: tuple[float, ...] | None, max_iter: int, tol: float) -> tuple[float, ...]:
    """The result as sum_i c_i theta_i: mergekit's iteration run on coefficients over the unit vectors.

    Every vector the iteration makes (the mean, the tangent) is a combination of the unit vectors u_i = theta_i / |theta_i|,
    so it runs on those combinations' coefficients, its norms and dots taken through the Gram matrix of the u_i: the same
    steps in exact arithmetic, without a tensor-sized operation (and in float64 throughout).
    """
    g = [[0.0] * k for _ in range(k)]
    it = iter(gram)
    for i in range(k):
        for j in range(i, k):
            g[i][j] = g[j][i] = next(it)
    w = model_weights(weights, k)
    total = normalizing_sum(w, option=None)
    alphas = [x / total for x in w]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return (0.0,) * k
    units = [[g[i][j] / (norms[i] * norms[j]) if i in valid and j in valid else 0.0 for j in range(k)] for i in range(k)]

    def dot(c: Sequence[float], d: Sequence[float]) -> float:
        return math.fsum(c[i] * units[i][j] * d[j] for i in valid for j in valid)

    vsum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / vsum for i in valid}
    mean = [a.get(i, 0.0) for i in range(k)]
    mn = math.sqrt(max(dot(mean, mean), 0.0))
    mean = [1.0 if i == valid[0] else 0.0 for i in range(k)] if mn < tol else [c / mn for c in mean]
    for _ in range(max_iter):
        tangent = [0.0] * k
        for i in valid:
            d = max(-1.0, min(1.0, sum(mean[j] * units[j][i] for j in valid)))
            theta = math.acos(d)
            if theta < tol:
                continue
            f = a[i] * theta / math.sin(theta)  # += f (u_i - d mean)
            tangent = [t - f * d * m for t, m in zip(tangent, mean)]
            tangent[i] += f
        tn = math.sqrt(max(dot(tangent, tangent), 0.0))
        if tn < tol:
            break
        mean = [math.cos(tn) * m + (math.sin(tn) / tn) * t for m, t in zip(mean, tangent)]
        un = math.sqrt(max(dot(mean, mean), 0.0))
        if un > tol:
            mean = [m / un for m in mean]
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return tuple(mean[i] * scale / norms[i] if i in valid else 0.0 for i in range(k))


def _combine(gram: tuple[float, ...], tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
             max_iter: int = 10, tol: float = 1e-5, **_: Any) -> torch.Tensor:
    """sum_i c_i theta_i on one slice: pointwise given the Gram sums."""
    k = len(tensors)
    if k == 1:
        return tensors[0].reshape(-1).to(torch.float32, copy=True)
    coefficients = _coefficients(gram, k, None if weights is None else tuple(float(x) for x in weights), int(max_iter), float(tol))
    out = torch.zeros(tensors[0].numel(), dtype=torch.float32)
    for t, c in zip(tensors, coefficients):
        if c != 0.0:
            out.add_(t.reshape(-1), alpha=c)  # half precision is widened exactly inside the kernel
    return out


REDUCTION = Reduction(chunk=SLICE, partial=_gram, apply=_combine)


@register(
    "karcher",
    summary="iterative Riemannian mean of the models' directions on the sphere, scaled by the weighted mean norm",
    paper="Karcher 1977, Riemannian center of mass; for model merging as in mergekit (arXiv 2603.04972)",
    workspace=1,
    divides_by_weight_sum=lambda p: True,
    reduction=REDUCTION,
    takes_half=True,  # the Gram sums widen each slice, the combination widens inside its kernel
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

    The iteration runs on the coefficients of m over the u_i, through their Gram matrix (:func:`_coefficients`): one
    pass for the Gram sums, one for the combination, so the engine streams it (:data:`REDUCTION`).

    Raises:
        MethodError: weights summing to zero.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    return REDUCTION.whole(tensors, base=None, weights=weights, max_iter=max_iter, tol=tol)

"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit hypersphere.

Method (as mergekit's ``karcher``): start from the normalised weighted mean of the unit vectors and take
Riemannian gradient steps (log map, weighted mean in the tangent space, exp map) until the step is
shorter than ``tol`` or ``max_iter`` steps; the result is scaled by the weighted mean of the norms.
Models whose norm is at most ``tol`` have no direction: they do not vote on it (their norm still enters
the scale). If no model has a direction the result is zero. mergekit weights every model equally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import model_weights, normalizing_sum
from .registry import Param, register
from .slerp import dot64, norm64


@register(
    "karcher",
    summary="iterative Riemannian mean of the models' directions on the sphere, scaled by the weighted mean norm",
    paper="Karcher 1977, Riemannian center of mass; for model merging as in mergekit (arXiv 2603.04972)",
    workspace=1,
    divides_by_weight_sum=lambda p: True,
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
        MethodError: weights summing to zero.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    w = model_weights(weights, len(tensors))
    total = normalizing_sum(w, option=None)
    alphas = [x / total for x in w]
    flat = [t.reshape(-1) for t in tensors]
    norms = [norm64(f) for f in flat]  # reductions in float64: a float32 norm or dot of millions of entries is off in its 4th digit
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    def unit(i: int) -> torch.Tensor:  # made when needed (the same bits each time), so only one is held
        return flat[i] / norms[i]

    vsum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / vsum for i in valid}
    mean = torch.zeros_like(flat[0])
    for i in valid:
        mean.add_(unit(i), alpha=a[i])
    mn = norm64(mean)
    mean = unit(valid[0]) if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            u = unit(i)
            dot = max(-1.0, min(1.0, dot64(mean, u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent.add_(u.sub_(dot * mean), alpha=a[i] * theta / math.sin(theta))  # units[i] - dot * mean, in the unit's memory
        tn = norm64(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + (math.sin(tn) / tn) * tangent
        un = norm64(mean)
        if un > tol:
            mean = mean / un
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return (mean * scale).reshape(tensors[0].shape)

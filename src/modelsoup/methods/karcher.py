"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit hypersphere.

Method (as mergekit's ``karcher``): start from the normalised weighted mean of the unit vectors and take
Riemannian gradient steps (log map, weighted mean in the tangent space, exp map) until the step is
shorter than ``tol`` or ``max_iter`` steps; the result is scaled by the weighted mean of the norms.
Models whose norm is at most ``tol`` have no direction: they do not vote on it (their norm still enters
the scale). If no model has a direction the result is zero. mergekit weights every model equally.

Memory: the inputs (half precision as stored), the mean and the tangent; the unit vectors are made a block at a time.
Bits: those of the whole-tensor float32 steps (``tests/reference.py: karcher_whole_float32``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import model_weights, normalizing_sum
from .registry import Param, register
from .reduce import ROW, dot_parts, fsum, norm

# Entries per block of the unit vectors (whole rows of the reductions, see :mod:`.reduce`): each u_i is made a block at a
# time into one reused buffer, never whole.
BLOCK = 1024 * ROW


def _work_dtype(flat: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if an input is, else float32 (half-precision inputs are widened slice by slice)."""
    return torch.float64 if any(f.dtype == torch.float64 for f in flat) else torch.float32


class _Units:
    """u_i = theta_i / |theta_i|, a block of :data:`BLOCK` entries at a time into one reused buffer: the bits of dividing
    the whole (widened) tensor, without holding it. Blocks are whole rows of :mod:`.reduce`'s sums, so the dots gathered a
    block at a time here are :func:`~.reduce.dot`'s of the whole tensors."""

    def __init__(self, flat: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
        self.flat = flat
        self.n = flat[0].numel()
        size = min(BLOCK, self.n)
        self.u = torch.empty(size, dtype=dtype, device=flat[0].device)
        self.t = torch.empty(size, dtype=dtype, device=flat[0].device)
        self.spans = [(a, min(a + BLOCK, self.n)) for a in range(0, self.n, BLOCK)]
        self.norms = [math.sqrt(fsum(self._square_sums(i))) for i in range(len(flat))]

    def _square_sums(self, i: int) -> list[float]:
        out = []
        for a, b in self.spans:
            x = self._widened(i, a, b)
            out.extend(dot_parts(x, x))
        return out

    def _widened(self, i: int, a: int, b: int) -> torch.Tensor:
        """Entries [a, b) of theta_i in the work dtype: the input itself, or widened exactly into the shared buffer."""
        x = self.flat[i][a:b]
        return x if x.dtype == self.u.dtype else self.u[: b - a].copy_(x)

    def block(self, i: int, a: int, b: int) -> torch.Tensor:
        """Entries [a, b) of u_i, in the shared buffer (valid until the next call)."""
        return torch.div(self._widened(i, a, b), self.norms[i], out=self.u[: b - a])

    def dot(self, i: int, mean: torch.Tensor) -> float:
        """<mean, u_i> as :func:`~.reduce.dot` takes it."""
        parts: list[float] = []
        for a, b in self.spans:
            parts.extend(dot_parts(mean[a:b], self.block(i, a, b)))
        return fsum(parts)

    def add_to(self, acc: torch.Tensor, i: int, alpha: float, mean: torch.Tensor | None = None, dot: float = 0.0) -> None:
        """acc += alpha * u_i; with ``mean``, acc += alpha * (u_i - dot * mean) (the log map's direction)."""
        for a, b in self.spans:
            u = self.block(i, a, b)
            if mean is not None:
                u.sub_(torch.mul(mean[a:b], dot, out=self.t[: b - a]))
            acc[a:b].add_(u, alpha=alpha)

    def copy_to(self, out: torch.Tensor, i: int) -> None:
        """out = u_i."""
        for a, b in self.spans:
            out[a:b].copy_(self.block(i, a, b))


@register(
    "karcher",
    summary="iterative Riemannian mean of the models' directions on the sphere, scaled by the weighted mean norm",
    paper="Karcher 1977, Riemannian center of mass; for model merging as in mergekit (arXiv 2603.04972)",
    # holds the mean and the tangent beside its inputs (the engine's two buffers besides the inputs), no buffer per model
    workspace=0,
    divides_by_weight_sum=lambda p: True,
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
        MethodError: weights summing to zero.
    """
    flat = [t.reshape(-1) for t in tensors]
    dtype = _work_dtype(flat)
    if len(tensors) == 1:
        return tensors[0].to(dtype, copy=True)
    w = model_weights(weights, len(tensors))
    total = normalizing_sum(w, option=None)
    alphas = [x / total for x in w]
    units = _Units(flat, dtype)
    norms = units.norms  # reduce.dot's sums: float32 rows added exactly (a float32 dot of millions of entries is off in its 4th digit)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    # Every step below runs in place on two tensor-sized buffers (the mean and the tangent) with the operations, in the
    # order, of the textbook steps (u_i - dot * mean, cos * mean + (sin / |v|) * v, ...): their bits, without a fresh
    # tensor per step.
    vsum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / vsum for i in valid}
    mean = torch.zeros(units.n, dtype=dtype, device=tensors[0].device)
    for i in valid:
        units.add_to(mean, i, a[i])
    mn = norm(mean)
    if mn < tol:
        units.copy_to(mean, valid[0])
    else:
        mean.div_(mn)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for i in valid:
            dot = max(-1.0, min(1.0, units.dot(i, mean)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            units.add_to(tangent, i, a[i] * theta / math.sin(theta), mean, dot)
        tn = norm(tangent)
        if tn < tol:
            break
        mean.mul_(math.cos(tn)).add_(tangent.mul_(math.sin(tn) / tn))
        un = norm(mean)
        if un > tol:
            mean.div_(un)
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return mean.mul_(scale).reshape(tensors[0].shape)

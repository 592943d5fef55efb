"""Multi-SLERP: barycentric interpolation of N models on the hypersphere (optionally of their task vectors).

Method (as mergekit's ``multislerp``): project the unit vectors onto the tangent space at their
normalised weighted mean, average there, map back with the exponential map, and scale the result to the
weighted mean of the norms. (At the normalised weighted mean the weighted tangent vectors sum to zero, so
the result is that mean direction times the weighted mean norm, which is how it is computed here: one step, not the
iterated Riemannian mean, for which see :mod:`.karcher`.) Limits: the weighted mean of the unit vectors must not vanish (antipodal
models with balancing weights): with two models it falls back to the weighted sum, with more it is an
error. One model is returned unchanged.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .ops import model_weights, normalizing_sum
from .registry import Param, Reduction, register
from . import reduce

# Entries per slice of the sums (part of the numerics): the slices' sums are added as Python floats, in order.
SLICE = 1 << 20


_SCRATCH = threading.local()


def _buffers(dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """At least ``count`` of this thread's SLICE-sized buffers of ``dtype``: the vectors' first, the last two the
    work buffers of :func:`_work`."""
    bufs: list[torch.Tensor] = _SCRATCH.__dict__.setdefault("bufs", {}).setdefault(dtype, [])
    while len(bufs) < count:
        bufs.append(torch.empty(SLICE, dtype=dtype))
    return bufs


def _work(k: int, like: torch.Tensor) -> torch.Tensor:
    """Work buffer k (0: the mean, 1: a unit) in ``like``'s dtype and size."""
    return _buffers(like.dtype, 2)[-(k + 1)][: like.numel()]


def _vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """v_i = theta_i - base (theta_i without a base) of one flat slice in float32 (float64 for float64 inputs): half
    precision (given as stored) is widened first, into this thread's buffers; a theta of that width without a base is
    used as it is."""
    n = tensors[0].numel()
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32  # float64 stays float64 (direct calls)
    vs = []
    for t, buf in zip(tensors, _buffers(wide, len(tensors) + 2)):
        t = t.reshape(-1)
        if base is None:
            vs.append(t if t.dtype == wide else buf[:n].copy_(t))
        elif t.dtype == wide:
            vs.append(torch.sub(t, base.reshape(-1), out=buf[:n]))
        else:
            vs.append(buf[:n].copy_(t).sub_(base.reshape(-1)))  # widened first: a half-precision difference would round
    return vs


def _unit_weights(weights: Sequence[float] | None, n: int, normalize_weights: bool) -> list[float]:
    w = model_weights(weights, n)
    if normalize_weights:
        total = normalizing_sum(w, option="normalize_weights")
        w = [x / total for x in w]
    return w


def _mean(vs: list[torch.Tensor], norms: Sequence[float], w: Sequence[float], eps: float) -> torch.Tensor:
    """sum_i w_i u_i of one slice, u_i = v_i / (|v_i| + eps), added in model order into a zeroed buffer. Each u_i is made
    first (not one fused v_i * (w_i / (|v_i| + eps)) step): the units of exactly antipodal models then cancel exactly,
    which the degenerate-mean test needs."""
    mean, unit = _work(0, vs[0]).zero_(), _work(1, vs[0])
    for v, norm, wi in zip(vs, norms, w):
        mean.add_(torch.div(v, norm + eps, out=unit), alpha=wi)
    return mean


def _norms(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, **_: Any) -> tuple[float, ...]:
    """Pass 1: |v_i|^2 of each model."""
    return tuple(reduce.dot(v, v) for v in _vectors(tensors, base))


def _mean_norm(sums: tuple[float, ...], tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
               weights: Sequence[float] | None = None, normalize_weights: bool = True, eps: float = 1e-8, **_: Any) -> tuple[float]:
    """Pass 2: |sum_i w_i u_i|^2."""
    k = len(tensors)
    mean = _mean(_vectors(tensors, base), [math.sqrt(x) for x in sums[:k]], _unit_weights(weights, k, normalize_weights), eps)
    return (reduce.dot(mean, mean),)


def _combine(sums: tuple[float, ...], tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
             weights: Sequence[float] | None = None, normalize_weights: bool = True, eps: float = 1e-8, **_: Any) -> torch.Tensor:
    """The result on one slice, given both passes' sums: pointwise."""
    k = len(tensors)
    if k == 1 or tensors[0].numel() == 0:  # one model is itself; an empty tensor has no direction to refuse
        return tensors[0].reshape(-1).to(torch.promote_types(tensors[0].dtype, torch.float32), copy=True)
    w = _unit_weights(weights, k, normalize_weights)
    vs = _vectors(tensors, base)
    norms, mean_norm = [math.sqrt(x) for x in sums[:k]], math.sqrt(sums[k])
    if mean_norm < eps:  # (a NaN norm, from NaN inputs allowed, is not degenerate: it merges to NaN)
        if k != 2:
            raise MethodError("multislerp: the weighted mean of the models' directions is zero (antipodal models with "
                              "balancing weights); change the weights")
        out = vs[0] * w[0] + vs[1] * w[1]
        return out.add_(base.reshape(-1)) if base is not None else out
    # m cos|g| + g sin|g| / |g| with g = 0 and |g| = 0 + eps, times the weighted mean norm, plus the base
    c = math.cos(eps) * sum(n * wi for n, wi in zip(norms, w)) / mean_norm
    mean = _mean(vs, norms, w, eps)
    return torch.add(base.reshape(-1), mean, alpha=c) if base is not None else mean * c


REDUCTION = Reduction(chunk=SLICE, partial=_norms, then=(_mean_norm,), apply=_combine)


@register(
    "multislerp",
    summary="barycentric spherical interpolation of N models (of their task vectors with a base), norm = weighted mean norm",
    paper="Goddard 2024, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); Buss & Fillmore 2001",
    workspace=2,
    base="optional",
    divides_by_weight_sum=lambda p: bool(p["normalize_weights"]),
    reduction=REDUCTION,
    takes_half=True,  # each slice is widened to float32 first (_vectors)
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    normalize_weights: Annotated[bool, Param(help="divide the weights by their sum")] = True,
    eps: Annotated[float, Param(gt=0, help="added to norms before dividing; a mean shorter than this is degenerate")] = 1e-8,
) -> torch.Tensor:
    """u_i = v_i / (|v_i| + eps), m = sum w_i u_i / |.|, g = sum w_i (u_i - <u_i, m> m), theta = (m cos|g| + g sin|g|/|g|) sum w_i |v_i|.

    v_i = theta_i - base with a base (added back at the end), theta_i without. g is zero: sum w_i u_i = |.| m, so
    sum w_i <u_i, m> m is that same vector, and theta = m cos(eps) sum w_i |v_i| (|g| + eps = eps) is computed so, in
    one fused multiply-add an entry. mergekit computes g, i.e. its rounding noise (about 1e-7 of the result), which this leaves
    out. The norms are float32 row sums added exactly (:func:`~modelsoup.methods.reduce.dot`; a float32 norm of millions of
    entries is off in its fourth digit), taken in two passes over slices of the tensors, so the engine streams it (:data:`REDUCTION`).

    Raises:
        MethodError: the weighted mean of the unit vectors is zero with more than two models; weights summing
            to zero with ``normalize_weights``.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    return REDUCTION.whole(tensors, base=base, weights=weights, normalize_weights=normalize_weights, eps=eps)

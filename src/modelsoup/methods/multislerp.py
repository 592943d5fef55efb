"""Multi-SLERP: barycentric interpolation of N models on the hypersphere (optionally of their task vectors).

Method (as mergekit's ``multislerp``): project the unit vectors onto the tangent space at their
normalised weighted mean, average there, map back with the exponential map, and scale the result to the
weighted mean of the norms. (At the normalised weighted mean the weighted tangent vectors sum to zero, so
the result is that mean direction times the weighted mean norm, which is how it is computed here: one step, not the
iterated Riemannian mean, for which see :mod:`.karcher`.) That is a linear combination of the v_i whose coefficients
follow from their Gram matrix: one pass over the inputs takes every <v_i, v_j>, a second writes the combination.
Limits: the weighted mean of the unit vectors must not vanish (antipodal models with balancing weights): with two
models it falls back to the weighted sum, with more it is an error; a mean shorter than sqrt(CANCEL) of the longest it
could be is refused (the Gram matrix's float32 rows cannot resolve it). One model is returned unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .ops import linear_combination, model_weights, normalizing_sum
from .registry import Param, Reduction, register
from . import reduce

# Entries per slice of the sums (part of the numerics): the slices' sums are added as Python floats, in order.
SLICE = 1 << 20


def _gram(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, **_: Any) -> tuple[float, ...]:
    """The one pass: <v_i, v_j> for every pair (v_i = theta_i - base with a base, theta_i without)."""
    return reduce.gram_upper(tensors, base)


def _unit_weights(weights: Sequence[float] | None, n: int, normalize_weights: bool) -> list[float]:
    w = model_weights(weights, n)
    if normalize_weights:
        total = normalizing_sum(w, option="normalize_weights")
        w = [x / total for x in w]
    return w


# The Gram matrix's sums are float32 rows (accurate to about 1e-7 of sum |v_i| |v_j|), so a weighted mean of the unit
# vectors shorter than sqrt(CANCEL) of the longest it could be (sum_i |w_i|) is mostly rounding: refused, not merged.
CANCEL = 1e-3


def coefficients(gram: list[list[float]], w: Sequence[float], eps: float) -> list[float] | None:
    """c_i with result = sum_i c_i v_i, from the Gram matrix of the v_i: c_i = cos(eps) (sum_j w_j |v_j|) w_i /
    ((|v_i| + eps) |m|), |m|^2 = sum_ij p_i p_j <v_i, v_j> with p_i = w_i / (|v_i| + eps) (the weighted mean of the unit
    vectors), added exactly; None where |m| < eps (a degenerate mean).

    Raises:
        MethodError: |m| is between eps and sqrt(CANCEL) sum_i |p_i| |v_i|: the directions nearly cancel, and a Gram
            matrix accurate to 1e-7 cannot say by how much.
    """
    k = len(w)
    norms = [math.sqrt(gram[i][i]) for i in range(k)]
    p = [wi / (n + eps) for wi, n in zip(w, norms)]
    mean_sq = reduce.fsum(p[i] * p[j] * gram[i][j] for i in range(k) for j in range(k))
    mean_norm = math.sqrt(max(mean_sq, 0.0))
    if mean_norm < eps:  # (a NaN norm, from NaN inputs allowed, is not degenerate: it merges to NaN)
        return None
    longest = sum(abs(pi) * n for pi, n in zip(p, norms))
    if mean_sq < CANCEL * longest**2:
        raise MethodError(f"multislerp: the models' directions nearly cancel (their weighted mean is {mean_norm / longest:.2g} of "
                          f"the longest it could be, below {math.sqrt(CANCEL):.2g}), so rounding would decide the result; change "
                          "the weights, or merge with linear")
    # m cos|g| + g sin|g| / |g| with g = 0 and |g| = 0 + eps, times the weighted mean norm
    c = math.cos(eps) * sum(n * wi for n, wi in zip(norms, w)) / mean_norm
    return [c * pi for pi in p]


def _combine(sums: tuple[float, ...], tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
             weights: Sequence[float] | None = None, normalize_weights: bool = True, eps: float = 1e-8, **_: Any) -> torch.Tensor:
    """The result on one slice, given the Gram matrix: a linear combination of the inputs."""
    k = len(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32  # float64 stays float64 (direct calls)
    if k == 1 or tensors[0].numel() == 0:  # one model is itself; an empty tensor has no direction to refuse
        return tensors[0].reshape(-1).to(torch.promote_types(tensors[0].dtype, torch.float32), copy=True)
    w = _unit_weights(weights, k, normalize_weights)
    c = _coefficients_cached(sums, tuple(w), eps)
    if c is None:
        if k != 2:
            raise MethodError("multislerp: the weighted mean of the models' directions is zero (antipodal models with "
                              "balancing weights); change the weights")
        c = w  # two antipodes: their weighted sum
    return linear_combination(tensors, c, base, dtype)


@functools.lru_cache(maxsize=64)
def _coefficients_cached(sums: tuple[float, ...], w: tuple[float, ...], eps: float) -> list[float] | None:
    """:func:`coefficients` of a tensor's sums, computed once for all of its slices."""
    return coefficients(reduce.gram_from_upper(sums, len(w)), w, eps)


REDUCTION = Reduction(chunk=SLICE, partial=_gram, apply=_combine)


@register(
    "multislerp",
    summary="barycentric spherical interpolation of N models (of their task vectors with a base), norm = weighted mean norm",
    paper="Goddard 2024, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); Buss & Fillmore 2001",
    workspace=2,
    base="optional",
    divides_by_weight_sum=lambda p: bool(p["normalize_weights"]),
    reduction=REDUCTION,
    takes_half=True,  # each slice is widened to float32 exactly first (the Gram pass, the combination)
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
    sum w_i <u_i, m> m is that same vector, and theta = m cos(eps) sum w_i |v_i| (|g| + eps = eps) = sum_i c_i v_i with
    c_i = cos(eps) (sum_j w_j |v_j|) w_i / ((|v_i| + eps) |sum_j w_j u_j|), written in float32 term by term
    (:func:`~.ops.linear_combination`). mergekit computes g, i.e. its rounding noise (about 1e-7 of the result), which this
    leaves out. |v_i| and |sum_j w_j u_j|^2 = sum_ij p_i p_j <v_i, v_j> come from the Gram matrix (float32 row sums added
    exactly, :func:`~modelsoup.methods.reduce.gram_matrix`; a float32 dot of millions of entries is off in its fourth
    digit), taken over slices of the tensors in one pass, so the engine streams it (:data:`REDUCTION`).

    Raises:
        MethodError: the weighted mean of the unit vectors is zero with more than two models, or nearly cancels
            (:data:`CANCEL`); weights summing to zero with ``normalize_weights``.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    return REDUCTION.whole(tensors, base=base, weights=weights, normalize_weights=normalize_weights, eps=eps)

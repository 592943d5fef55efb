"""Multi-SLERP: barycentric interpolation of N models on the hypersphere (optionally of their task vectors).

Method (as mergekit's ``multislerp``): project the unit vectors onto the tangent space at their
normalised weighted mean, average there, map back with the exponential map, and scale the result to the
weighted mean of the norms. (At the normalised weighted mean the weighted tangent vectors sum to zero, so
in exact arithmetic the result is that mean direction times the weighted mean norm: one step, not the
iterated Riemannian mean, for which see :mod:`.karcher`.) Limits: the weighted mean of the unit vectors must not vanish (antipodal
models with balancing weights): with two models it falls back to the weighted sum, with more it is an
error. One model is returned unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .ops import model_weights, normalizing_sum
from .registry import Param, register
from .slerp import dot64, norm64


@register(
    "multislerp",
    summary="barycentric spherical interpolation of N models (of their task vectors with a base), norm = weighted mean norm",
    paper="Goddard 2024, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); Buss & Fillmore 2001",
    workspace=2,
    base="optional",
    divides_by_weight_sum=lambda p: bool(p["normalize_weights"]),
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

    v_i = theta_i - base with a base (added back at the end), theta_i without.

    Raises:
        MethodError: the weighted mean of the unit vectors is zero with more than two models; weights summing
            to zero with ``normalize_weights``.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    w = model_weights(weights, len(tensors))
    if normalize_weights:
        total = normalizing_sum(w, option="normalize_weights")
        w = [x / total for x in w]
    vs = [(x - base if base is not None else x).reshape(-1) for x in tensors]
    norms = [norm64(v) for v in vs]  # reductions in float64: a float32 norm or dot of millions of entries is off in its 4th digit

    def units() -> Iterator[torch.Tensor]:  # made when needed (the same bits each time), so only one is held
        return (v / (n + eps) for v, n in zip(vs, norms))

    mean = torch.zeros_like(vs[0])
    for u, wi in zip(units(), w):
        mean.add_(u, alpha=wi)
    mean_norm = norm64(mean)
    if mean_norm < eps:
        if len(vs) != 2:
            raise MethodError("multislerp: the weighted mean of the models' directions is zero (antipodal models with "
                              "balancing weights); change the weights")
        out = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean /= mean_norm
        tangent = torch.zeros_like(mean)
        for u, wi in zip(units(), w):
            tangent.add_(u.sub_(mean, alpha=dot64(u, mean)), alpha=wi)  # u - <u, m> m, in the unit's memory
        tn = norm64(tangent) + eps
        out = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
        out *= sum(float(n) * wi for n, wi in zip(norms, w))
    out = out.reshape(tensors[0].shape)
    return out.add_(base) if base is not None else out

"""NuSLERP: spherical interpolation of two models (or of their task vectors) with weights giving t.

Limits: exactly two models. ``t = w_2 / (w_1 + w_2)`` (0.5 when the weights sum to ~0, as mergekit does).
With a base the interpolation runs on the task vectors and the result is added back to the base.
``flatten`` interpolates the whole tensor as one vector; otherwise each row (``row_wise``: each column,
i.e. vectors along dim 0) is interpolated on its own. Nearly colinear vectors (1 - cos^2 <= eps^2)
are interpolated linearly.

Flattened, the angle comes from sums of |v0|^2, |v1|^2 and <v0, v1> over slices (slerp's, :func:`~.reduce.gram`), so the engine
streams the tensor in two passes. mergekit takes it from a float32 sum of u0 * u1, which on a large tensor of nearly
parallel task vectors can exceed 1 (1.00009 for a cosine of 0.9999 over 4M entries; 1.0115 over a 65M-entry
embedding), is clamped and interpolates linearly: there the two differ by that (up to a few 1e-5 relative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .ops import model_weights
from .reduce import row_dots, row_norms
from .registry import Param, Reduction, register
from .slerp import GRAM_SLICE, gram64, gram_slice

# mergekit's cut-offs: a weight sum below this gives t = 0.5; norms are floored at NORM_FLOOR.
T_FROM_WEIGHTS_FLOOR = 1e-6
NORM_FLOOR = 1e-7


def interpolation_t(weights: Sequence[float] | None) -> float:
    """t = w_2 / (w_1 + w_2), 0.5 for no weights or weights summing to ~0."""
    w = model_weights(weights, 2)
    total = w[0] + w[1]
    return 0.5 if abs(total) < T_FROM_WEIGHTS_FLOOR else w[1] / total


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float) -> torch.Tensor:
    """Slerp between the rows of ``v0`` and ``v1`` (last dim), linear where a pair is colinear."""
    u0 = v0 / row_norms(v0).clamp(min=NORM_FLOOR)  # (row_norms, row_dots: one value on any thread count)
    u1 = v1 / row_norms(v1).clamp(min=NORM_FLOOR)
    cos = row_dots(u0, u1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.where(colinear, torch.ones_like(sin), sin)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def _deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0, v1): the two models, or their task vectors with a base.

    Raises:
        MethodError: not exactly two models.
    """
    if len(tensors) != 2:
        raise MethodError(f"nuslerp merges exactly two models (besides an optional base), got {len(tensors)}")
    return (tensors[0] - base, tensors[1] - base) if base is not None else (tensors[0], tensors[1])


def _partials(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, weights: Sequence[float] | None = None,
              **_: Any) -> tuple[float, float, float]:
    """(|v0|^2, |v1|^2, <v0, v1>) of one slice (the engine's first pass; :func:`~.slerp.gram64` over the whole)."""
    return gram_slice(*_deltas(tensors, base))


def _interpolate(gram: tuple[float, float, float], tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
                 weights: Sequence[float] | None = None, eps: float = 1e-8, **_: Any) -> torch.Tensor:
    """The flattened interpolation given the task vectors' Gram sums: pointwise (the engine's second pass, and the whole
    tensor's). Norms are floored at NORM_FLOOR, the cosine clamped to [-1, 1]; colinear pairs are interpolated linearly."""
    t = interpolation_t(weights)
    v0, v1 = _deltas(tensors, base)
    sq0, sq1, dot = gram
    cos = max(-1.0, min(1.0, dot / (max(math.sqrt(sq0), NORM_FLOOR) * max(math.sqrt(sq1), NORM_FLOOR))))
    if 1 - cos * cos <= eps**2:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.mul(v0, c0)
    out.add_(v1, alpha=c1)
    return out.add_(base) if base is not None else out


@register(
    "nuslerp",
    summary="slerp of two models (of their task vectors with a base), t = w_2 / (w_1 + w_2), whole tensor or row by row",
    paper="Goddard et al., mergekit (arXiv 2403.13257), nuslerp; Shoemake 1985 (slerp)",
    workspace=3,
    base="optional",
    min_models=2,
    max_models=2,
    # flattened, the angle is three sums of the whole tensor (float64, in slices): streamed in two passes
    reduction=Reduction(chunk=GRAM_SLICE, partial=_partials, apply=_interpolate, applies=lambda p: bool(p["flatten"])),
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    flatten: Annotated[bool, Param(aliases=("nuslerp_flatten",), help="interpolate the whole tensor as one vector")] = True,
    row_wise: Annotated[bool, Param(aliases=("nuslerp_row_wise",), help="without flatten: interpolate vectors along dim 0 (columns) instead of rows")] = False,
    eps: Annotated[float, Param(gt=0, help="pairs with 1 - cos^2 <= eps^2 are interpolated linearly")] = 1e-8,
) -> torch.Tensor:
    """theta = base + slerp(t, theta_1 - base, theta_2 - base) (base = 0 without one), t = w_2 / (w_1 + w_2).

    Raises:
        MethodError: not exactly two models.
    """
    if flatten:  # the engine streams this case in two passes (the same bits: the deltas are elementwise)
        v0, v1 = _deltas(tensors, base)
        out = _interpolate(gram64(v0, v1), [v0, v1], weights=weights, eps=eps)
        return out.add_(base) if base is not None else out
    t = interpolation_t(weights)
    v0, v1 = _deltas(tensors, base)
    shape = v0.shape
    if row_wise and v0.dim() > 1:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    out = slerp_vectors(t, v0, v1, eps)
    if row_wise and out.dim() > 1:
        out = out.transpose(0, -1)
    out = out.reshape(shape).contiguous()
    return out.add_(base) if base is not None else out

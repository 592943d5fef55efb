"""Spherical linear interpolation between two models, tensor by tensor.

Limits: defined for exactly two models. The angle is measured between the flattened tensors after
normalising them, and the interpolation is applied to the unnormalised tensors, so norms are
interpolated linearly along the arc (mergekit's convention). Nearly parallel tensors
(|cos| > dot_threshold), where the spherical formula is ill-conditioned, fall back to linear
interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from . import reduce
from .registry import Param, Reduction, register

_CHUNK = 1 << 20
GRAM_SLICE = _CHUNK  # elements per slice of gram64's sums: part of the numerics of every method that uses them


def gram64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>) of two flattened tensors: the sums of each slice of ``_CHUNK`` elements
    (:func:`gram_slice`), added in order. The engine streams slerp with the same slices (:func:`_partials`), so both give
    the same bits, and each slice's sums are :func:`~.reduce.gram`'s: the same on any thread count and alignment.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for x, y in zip(fa.split(_CHUNK), fb.split(_CHUNK)):
        pa, pb, pab = gram_slice(x, y)
        aa, bb, ab = aa + pa, bb + pb, ab + pab
    return aa, bb, ab


def gram_slice(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """:func:`gram64`'s sums over one flat slice of at most ``_CHUNK`` elements."""
    return reduce.gram(a, b)


def _ends(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, weights: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0, v1): the first model (or the base) and the second.

    Raises:
        MethodError: other than two models in all, or weights given.
    """
    if weights is not None:
        raise MethodError("slerp takes no weights: set `t` (0 = first model, 1 = second)")
    ends = ([base] if base is not None else []) + list(tensors)
    if len(ends) != 2:
        raise MethodError(f"slerp merges exactly two models (or a base and one model), got {len(ends)}; use linear for more")
    return ends[0], ends[1]


def _partials(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, weights: Sequence[float] | None = None,
              **_: Any) -> tuple[float, float, float]:
    """:func:`gram64`'s sums over one slice of ``_CHUNK`` elements (the engine's first pass)."""
    return gram_slice(*_ends(tensors, base, weights))


def _interpolate(gram: tuple[float, float, float], tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
                 weights: Sequence[float] | None = None, t: float = 0.5, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """The interpolation, given the ends' Gram sums: pointwise (the engine's second pass, and the whole tensor's)."""
    v0, v1 = _ends(tensors, base, weights)
    sq0, sq1, dot = gram
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return torch.lerp(v0.to(torch.float32), v1.to(torch.float32), float(t))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    s0, s1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    out = v0.to(torch.float32) * s0
    out.add_(v1.to(torch.float32), alpha=s1)
    return out


@register(
    "slerp",
    summary="spherical interpolation from the first model (or the base) to the second at t; linear when nearly parallel",
    paper="Shoemake 1985, Animating rotation with quaternion curves; for model merging as in mergekit",
    base="optional",
    min_models=1,
    max_models=2,
    takes_weights=False,
    reduction=Reduction(chunk=_CHUNK, partial=_partials, apply=_interpolate),
    takes_half=True,  # the sums and the interpolation widen each slice to float32 (exactly)
)
def slerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    t: Annotated[float, Param(ge=0, le=1, help="position along the arc: 0 = first model (or base), 1 = second")] = 0.5,
    dot_threshold: Annotated[float, Param(gt=0, le=1, help="above this |cos| interpolate linearly")] = 0.9995,
    eps: Annotated[float, Param(gt=0, help="norms below this are not normalised")] = 1e-8,
) -> torch.Tensor:
    """theta = sin((1-t) w)/sin w * v0 + sin(t w)/sin w * v1, cos w = <v0, v1> / (|v0| |v1|).

    v0 is ``tensors[0]`` (or ``base``), v1 is ``tensors[1]`` (or ``tensors[0]`` when a base is given).

    Raises:
        MethodError: other than two models in all, or weights given.
    """
    v0, v1 = _ends(tensors, base, weights)
    return _interpolate(gram64(v0, v1), tensors, base=base, weights=weights, t=t, dot_threshold=dot_threshold, eps=eps)

"""Spherical linear interpolation between two models, tensor by tensor.

Limits: defined for exactly two models. The angle is measured between the flattened tensors after
normalising them, and the interpolation is applied to the unnormalised tensors, so norms are
interpolated linearly along the arc (mergekit's convention). Nearly parallel tensors
(|cos| > dot_threshold), where the spherical formula is ill-conditioned, fall back to linear
interpolation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import torch

from ..errors import MethodError
from .registry import Param, Reduction, register

_CHUNK = 1 << 20
GRAM_SLICE = _CHUNK  # elements per slice of gram64's float64 sums: part of the numerics of every method that uses them


def gram64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>) of two flattened tensors, accumulated in float64 chunk by chunk.

    One pass over both tensors, upcasting each chunk once into two reused float64 buffers (no full
    float64 copy, no allocation per chunk). The sums are taken over slices of ``_CHUNK`` elements, in order:
    the engine streams slerp with the same slices (:func:`_partials`), so both give the same bits.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = min(_CHUNK, fa.numel())
    ba, bb = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    aa = bb_ = ab = 0.0
    for x, y in zip(fa.split(_CHUNK), fb.split(_CHUNK)):
        pa, pb, pab = _gram_chunk(x, y, ba, bb)
        aa, bb_, ab = aa + pa, bb_ + pb, ab + pab
    return aa, bb_, ab


def _gram_chunk(x: torch.Tensor, y: torch.Tensor, ba: torch.Tensor, bb: torch.Tensor) -> tuple[float, float, float]:
    xa, yb = ba[: x.numel()].copy_(x), bb[: y.numel()].copy_(y)
    return float(torch.dot(xa, xa)), float(torch.dot(yb, yb)), float(torch.dot(xa, yb))


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


ROW = 1 << 10  # entries per row of dot_rows: part of the numerics of the methods that use it


def dot_rows(a: torch.Tensor, b: torch.Tensor, prod: torch.Tensor) -> float:
    """<a, b> of two flat float32 slices: their products (into ``prod``, a float32 buffer of their size) summed in
    float32 over rows of ROW entries, the row sums added in float64.

    Not torch.dot: its BLAS rounds differently with the thread count and the operands' alignment, where a reduction
    along rows splits only across rows (each row is one thread's), so the bits are the same wherever it runs; and a
    float32 dot of millions of entries is off in its fourth digit, a row sum of 1024 in its seventh.
    """
    n = a.numel()
    torch.mul(a, b, out=prod)
    full = n - n % ROW
    total = float(prod[:full].view(-1, ROW).sum(dim=1).to(torch.float64).sum()) if full else 0.0
    return total + float(prod[full:].sum()) if full < n else total


DOT_SLICE = 1 << 16  # entries per slice of dot64: the slices' dots are short enough to be accurate


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> of two tensors of one size (flattened): torch's dot of each slice of ``DOT_SLICE`` entries, the slices'
    dots summed in float64 (karcher's whole-tensor steps). A float32 dot of millions of entries is off in its fourth or
    fifth digit; of 65K entries its error is that of a few products."""
    return math.fsum(slice_dots(a, b))


def slice_dots(a: torch.Tensor, b: torch.Tensor) -> Iterator[float]:
    """torch's dot of each ``DOT_SLICE``-entry slice of two tensors of one size (flattened), in order: what :func:`dot64`
    sums (math.fsum, exactly rounded, so the slices' dots may be gathered from several blocks first)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return (float(torch.dot(x, y)) for x, y in zip(fa.split(DOT_SLICE), fb.split(DOT_SLICE)))


def norm64(a: torch.Tensor) -> float:
    """|a| from :func:`dot64`."""
    return math.sqrt(dot64(a, a))


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two float64 slices on ``device`` (a method may run on a GPU, see :func:`modelsoup.engine.on_device`)."""
    bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = _SCRATCH.__dict__.setdefault("bufs", {})
    if device not in bufs:
        bufs[device] = (torch.empty(_CHUNK, dtype=torch.float64, device=device), torch.empty(_CHUNK, dtype=torch.float64, device=device))
    return bufs[device]


def gram_slice(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """:func:`gram64`'s sums over one flat slice of at most ``_CHUNK`` elements, through this thread's float64 buffers."""
    return _gram_chunk(a, b, *_scratch(a.device))


def _partials(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, weights: Sequence[float] | None = None,
              **_: Any) -> tuple[float, float, float]:
    """:func:`gram64`'s sums over one slice of ``_CHUNK`` elements (the engine's first pass)."""
    return gram_slice(*_ends(tensors, base, weights))


_SCRATCH = threading.local()  # each thread's two float64 slices per device for the sums, made once


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
    takes_half=True,  # the sums widen each slice to float64, the interpolation to float32
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

"""Sums and dots whose bits do not depend on the thread count, the operands' alignment, or the pieces a tensor is taken
in: the reductions of the methods that measure angles and norms (slerp, nuslerp, multislerp, karcher, Model Stock, SCE's
energies, the L1 rescale), so that a recipe rerun on another machine writes the same bytes.

Neither torch.dot nor a whole-tensor ``t.sum()`` gives that. torch.dot is BLAS, which splits the work by the thread count
and rounds differently with the operands' alignment; a reduction of a whole tensor to one number gives each thread a
part and then adds the parts, so a merge run on 2 and on 16 cores would differ (karcher's output did in most entries).
Here a tensor (flattened) is cut into fixed rows of :data:`ROW` consecutive entries; torch reduces the rows of a 2-D view
independently, each row by one thread, so each row's sum has one value wherever it runs; and the row sums are added with
``math.fsum``, which rounds the exact total once and so gives the same result in any order. A sum gathered piece by
piece, from pieces that start at multiples of ROW (the engine's chunks, a reduction's slices), is therefore the whole
tensor's sum, bit for bit.

Two widths: :func:`dot`, :func:`norm`, :func:`gram` and :func:`gram_matrix` (the sphere methods, which take them over
every tensor) multiply and sum the rows in float32 (products of half-precision entries are exact there), accurate to
about 1e-7; :func:`dot64`, :func:`sum64` and :func:`abs_sum64` (sums taken once per tensor) widen to float64 first, where
products of float32 entries are exact, accurate to about 1e-16. Float64 inputs are float64 throughout.

(The bits are also the same across x86 machines with AVX2 and AVX-512, torch's two vectorised CPU kernels; torch's
unvectorised fallback rounds some elementwise steps differently, so no method is reproducible there bit for bit.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from . import kernels

ROW = 1 << 10  # entries per row: part of the numerics of every method that uses these sums
PIECE = 1 << 20  # entries widened at a time into this thread's buffers (a multiple of ROW)

_SCRATCH = threading.local()


def scratch(n: int, device: torch.device, k: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """This thread's buffer ``k`` of ``dtype`` and ``n`` entries on ``device``, made once (and again when a longer one is
    asked for). Keys 0-4 and 5 + m are this module's sums'; other modules take negative keys."""
    bufs: dict[tuple[torch.device, int, torch.dtype], torch.Tensor] = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((device, k, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(device, k, dtype)] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
    return buf[:n]


def row_sums(x: torch.Tensor) -> list[float]:
    """The sums of the consecutive ROW-entry rows of flat ``x`` (the last row may be shorter), in its dtype, each one
    thread's."""
    return _row_sum_tensor(x).tolist()


def _row_sum_tensor(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    full = n - n % ROW
    sums = [x[:full].view(-1, ROW).sum(dim=1)] if full else []
    if full < n:
        sums.append(x[full:].sum().reshape(1))  # fewer than ROW entries: one thread's
    return torch.cat(sums) if len(sums) > 1 else sums[0] if sums else x.new_zeros(0)


def _product_rows(x: torch.Tensor, y: torch.Tensor, prod: torch.Tensor) -> list[float]:
    """The row sums of x * y (products into ``prod``, in its dtype); a float32 row whose sum is not finite is summed again
    in float64 (its squares or products may overflow float32 where the entries do not: 1e20 squared), so only non-finite
    entries give a non-finite sum."""
    sums = _row_sum_tensor(torch.mul(x, y, out=prod))
    out: list[float] = sums.tolist()
    if prod.dtype != torch.float64 and not bool(torch.isfinite(sums).all()):
        for k in torch.nonzero(~torch.isfinite(sums)).view(-1).tolist():
            a, b = k * ROW, min((k + 1) * ROW, x.numel())
            out[k] = float((x[a:b].to(torch.float64) * y[a:b].to(torch.float64)).sum())
    return out


def fsum(parts: Iterable[float]) -> float:
    """math.fsum of row sums (exactly rounded: any order gives these bits), NaN where +inf and -inf meet and +-inf where
    the total leaves float64's range (math.fsum raises on both)."""
    parts = list(parts)
    try:
        return math.fsum(parts)
    except (ValueError, OverflowError):
        return float(sum(parts))


def _pieces(n: int) -> Iterable[tuple[int, int]]:
    return ((i, min(i + PIECE, n)) for i in range(0, n, PIECE))


def _flat_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() != fb.numel():
        raise ValueError(f"{what} of tensors of {fa.numel()} and {fb.numel()} entries")
    return fa, fb


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if a tensor is, else float32: the width of :func:`dot`'s products and row sums."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _widened(x: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """``x`` in ``dtype``: itself, or widened exactly into this thread's buffer ``k``."""
    return x if x.dtype == dtype else scratch(x.numel(), x.device, k, dtype).copy_(x)


# ------------------------------------------------------------------ the sphere methods' sums: float32 rows, added exactly


def dot_parts(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """The row sums of a * b (flattened, one size): products and row sums in :func:`work_dtype` (half precision widened
    exactly first, its products exact in float32), what :func:`dot` adds. ``a`` and ``b`` may be pieces of longer tensors
    that start at a multiple of ROW in them."""
    same = a is b
    fa, fb = _flat_pair(a, b, "dot")
    dtype = work_dtype(fa, fb)
    parts: list[float] = []
    for i, j in _pieces(fa.numel()):
        x = _widened(fa[i:j], dtype, 0)
        y = x if same else _widened(fb[i:j], dtype, 1)
        parts.extend(_product_rows(x, y, scratch(j - i, fa.device, 2, dtype)))
    return parts


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b>: float32 products summed in float32 over rows of ROW entries, the rows added exactly (float64 throughout
    for float64 inputs). The same bits on any thread count, alignment and row-aligned cut; accurate to about 1e-7 of
    |a| |b| (a float32 dot of millions of entries is off in its fourth digit). Twice the memory traffic of torch.dot,
    a fifth of :func:`dot64`'s."""
    return fsum(dot_parts(a, b))


def norm(a: torch.Tensor) -> float:
    """|a| from :func:`dot`."""
    return math.sqrt(fsum(dot_parts(a, a)))


def gram(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>), each as :func:`dot` takes it, each input widened (if it must be) once per piece."""
    g = gram_matrix([a, b])
    return g[0][0], g[1][1], g[0][1]


def gram_matrix(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> list[list[float]]:
    """G[i][j] = <v_i, v_j> for every pair, v_i = t_i - base (t_i without a base; flattened, one size), each as
    :func:`dot` takes it, so G[i][j] is G[j][i] and G[i][i] is ``dot(v_i, v_i)``, bit for bit. Each input is widened (if
    it must be) once per piece, exactly, and the difference taken in the work dtype (a half-precision difference would
    round). The tensors may be pieces of longer ones that start at a multiple of ROW in them, as for :func:`dot_parts`.
    Where the compiled kernels run (:func:`_fused`), each piece's full rows are summed by one of them, in torch's order."""
    flat = [t.reshape(-1) for t in tensors]
    fb = base.reshape(-1) if base is not None else None
    for f in flat[1:] + ([fb] if fb is not None else []):
        _flat_pair(flat[0], f, "Gram sums")
    k = len(flat)
    if not k:
        return []
    dtype = work_dtype(*flat, *([fb] if fb is not None else []))
    pairs = [(a, b, 0) for a in range(k) for b in range(a, k)]
    parts: dict[tuple[int, int], list[float]] = {(a, b): [] for a, b, _ in pairs}
    fused = dtype == torch.float32 and _fused(flat, fb)
    for i, j in _pieces(flat[0].numel()):
        if fused:
            try:
                i = _fused_rows(flat, fb, pairs, i, j, [parts[(a, b)] for a, b, _ in pairs])
            except kernels.KernelFailed:  # this piece, and the rest, on torch
                fused = False
            if i == j:
                continue
        b = _widened(fb[i:j], dtype, 4) if fb is not None else None  # buffers 4, 5, ...: 0-3 are the other sums'
        xs = []
        for m, f in enumerate(flat):
            x = _widened(f[i:j], dtype, 5 + m)
            xs.append(x if b is None else torch.sub(x, b, out=scratch(j - i, f.device, 5 + m, dtype)))
        prod = scratch(j - i, flat[0].device, 2, dtype)
        for a, c in parts:
            parts[(a, c)].extend(_product_rows(xs[a], xs[c], prod))
    g = [[0.0] * k for _ in range(k)]
    for (a, c), rows in parts.items():
        g[a][c] = g[c][a] = fsum(rows)
    return g


def _fused(flat: Sequence[torch.Tensor], base: torch.Tensor | None) -> bool:
    """Whether the compiled kernels sum these inputs' rows (:func:`kernels.pair_sums`): numba there, the tensors on the CPU,
    contiguous, float32 or bfloat16 (the inputs of one dtype), by default one of them bfloat16 (:func:`kernels.enabled`), and
    the kernel's sums found torch's on this machine (:func:`kernels.sums_like_torch`)."""
    stored = [*flat, *([base] if base is not None else [])]
    return (len({f.dtype for f in flat}) == 1 and kernels.takes(*stored) and kernels.enabled(*stored)
            and kernels.sums_like_torch())


def _fused_rows(flat: Sequence[torch.Tensor], base: torch.Tensor | None, pairs: Sequence[tuple[int, int, int]], i: int, j: int,
                parts: Sequence[list[float]]) -> int:
    """The row sums of entries [i, i + whole rows) by the compiled kernel, appended to ``parts`` (one list per pair
    (a, b, kind): kind 0 sums v_a * v_b, kind 1 (v_a - v_b)^2); returns where the rows end (j, or the start of a last
    row shorter than ROW, which torch sums). A row whose float32 sum is not finite is summed again in float64, as
    :func:`_product_rows` does."""
    end = i + (j - i) // ROW * ROW
    if end == i:
        return i
    sums = kernels.pair_sums([f[i:end] for f in flat], base[i:end] if base is not None else None, pairs, (end - i) // ROW)
    bad = ~np.isfinite(sums)
    rows = sums.tolist()
    if bad.any():
        for p, r in zip(*np.nonzero(bad)):
            a, b, kind = pairs[p]
            lo, hi = i + r * ROW, i + (r + 1) * ROW
            x, y = (_difference(f[lo:hi], base[lo:hi] if base is not None else None) for f in (flat[a], flat[b]))
            if kind == 1:
                x = y = x - y
            rows[p][r] = float((x.to(torch.float64) * y.to(torch.float64)).sum())
    for out, r in zip(parts, rows):
        out.extend(r)
    return end


def _difference(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """x widened to float32 (minus the widened base): a row's v as the torch path takes it."""
    x = x.to(torch.float32)
    return x if base is None else x - base.to(torch.float32)


def gram_upper(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> tuple[float, ...]:
    """:func:`gram_matrix`'s upper triangle, row by row: (G00, G01, ..., G11, G12, ...), the sums a pass of the sphere
    means returns for a slice (:func:`gram_from_upper` undoes it)."""
    g = gram_matrix(tensors, base)
    return tuple(g[i][j] for i in range(len(g)) for j in range(i, len(g)))


def gram_from_upper(upper: Sequence[float], k: int) -> list[list[float]]:
    """The k x k symmetric matrix of :func:`gram_upper`'s triangle."""
    g = [[0.0] * k for _ in range(k)]
    it = iter(upper)
    for i in range(k):
        for j in range(i, k):
            g[i][j] = g[j][i] = next(it)
    return g


# A slice shorter than this is summed in float64 by difference_sums (a float32 row of few entries is off by 1e-7 of it,
# where many rows' errors average out).
SHORT = 1 << 16


def difference_sums(tensors: Sequence[torch.Tensor]) -> tuple[list[float], dict[tuple[int, int], float]]:
    """|t_i|^2 for each tensor and |t_i - t_j|^2 for each pair i < j, each as :func:`dot` takes it (float32 rows added
    exactly, float64 for float64 inputs and for fewer than :data:`SHORT` entries; half precision widened exactly first):
    what the angle between two tensors needs when they are nearly parallel. 1 - cos from <t_i, t_j> in float32 rows is
    noise below about 1e-7; from the difference (exact in float32 where entries are within a factor 2 of each other,
    Sterbenz) it keeps its accuracy relative to |t_i - t_j|."""
    flat = [t.reshape(-1) for t in tensors]
    for f in flat[1:]:
        _flat_pair(flat[0], f, "difference sums")
    k = len(flat)
    n = flat[0].numel() if flat else 0
    dtype = torch.float64 if n < SHORT else work_dtype(*flat) if flat else torch.float32
    squares: list[list[float]] = [[] for _ in range(k)]
    pairs: dict[tuple[int, int], list[float]] = {(a, b): [] for a in range(k) for b in range(a + 1, k)}
    codes = [(a, a, 0) for a in range(k)] + [(a, b, 1) for a, b in pairs]
    fused = dtype == torch.float32 and _fused(flat, None)
    for i, j in _pieces(n):
        if fused:
            try:
                i = _fused_rows(flat, None, codes, i, j, [*squares, *pairs.values()])
            except kernels.KernelFailed:  # this piece, and the rest, on torch
                fused = False
            if i == j:
                continue
        xs = [_widened(f[i:j], dtype, 5 + m) for m, f in enumerate(flat)]  # buffers 5, ...: 0-4 are the other sums'
        prod, diff = scratch(j - i, flat[0].device, 2, dtype), scratch(j - i, flat[0].device, 3, dtype)
        for a, x in enumerate(xs):
            squares[a].extend(_product_rows(x, x, prod))
        for (a, b), rows in pairs.items():
            d = torch.sub(xs[a], xs[b], out=diff)
            rows.extend(_product_rows(d, d, prod))
    return [fsum(r) for r in squares], {ab: fsum(rows) for ab, rows in pairs.items()}


# ------------------------------------------------------------------ one-off sums: float64, products exact


def _exact_parts(a: torch.Tensor, b: torch.Tensor | None = None, absolute: bool = False) -> list[float]:
    """Row sums in float64 of a * b (or of a, or |a|), each piece widened exactly into this thread's float64 buffer."""
    fa = a.reshape(-1)
    fb = _flat_pair(a, b, "dot")[1] if b is not None else None
    parts: list[float] = []
    for i, j in _pieces(fa.numel()):
        w = scratch(j - i, fa.device, 3).copy_(fa[i:j])
        if fb is not None:
            w.mul_(fb[i:j])  # fb promoted to float64 inside the kernel: exact products of float32 and narrower
        parts.extend(row_sums(w.abs_() if absolute else w))
    return parts


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> in float64 (products exact for float32 and narrower, about 1e-16 relative): the same bits on any thread
    count and alignment. For sums taken once per tensor (SCE's energies, Model Stock's cosines)."""
    return fsum(_exact_parts(a, b))


def norm64(a: torch.Tensor) -> float:
    """|a| from :func:`dot64`."""
    return math.sqrt(dot64(a, a))


def sum64(a: torch.Tensor) -> float:
    """The sum of a tensor's entries in float64, the same bits on any thread count and alignment."""
    return fsum(_exact_parts(a))


def abs_sum64(a: torch.Tensor) -> float:
    """sum |a_i| in float64, as :func:`sum64` (the L1 rescale's norms)."""
    return fsum(_exact_parts(a, absolute=True))


def _one_per_row(a: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` shaped as a keepdim reduction of ``a``'s last dim (a 0-d tensor stays 0-d)."""
    return torch.full((*a.shape[:-1], 1) if a.dim() else (), value, dtype=a.dtype, device=a.device)


def _several_rows(a: torch.Tensor) -> bool:
    return a.dim() > 1 and math.prod(a.shape[:-1]) > 1


def row_sum(a: torch.Tensor) -> torch.Tensor:
    """The sums along the last dim, keepdim, in ``a``'s dtype: torch's reduction of each row where there are several (each
    row one thread's), :func:`sum64` where there is one vector (a reduction to one number is split across threads)."""
    return a.sum(dim=-1, keepdim=True) if _several_rows(a) else _one_per_row(a, sum64(a))


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dots of the rows (last dim) of two tensors of one shape, keepdim, in their dtype: torch's reduction of each row
    where there are several, :func:`dot64` where there is one vector."""
    if a.shape != b.shape:
        raise ValueError(f"row dots of tensors of shapes {list(a.shape)} and {list(b.shape)}")
    return (a * b).sum(dim=-1, keepdim=True) if _several_rows(a) else _one_per_row(a, dot64(a, b))


def row_norms(a: torch.Tensor) -> torch.Tensor:
    """The norms of the rows (last dim) of a tensor, keepdim, as :func:`row_dots` takes its dots (torch's per row, or
    :func:`norm64` of one vector)."""
    return a.norm(dim=-1, keepdim=True) if _several_rows(a) else _one_per_row(a, norm64(a))


def softmax(a: torch.Tensor) -> torch.Tensor:
    """Softmax along the last dim, exp(a - max) / sum, the sum :func:`row_sum`'s: torch.softmax's own reductions round
    differently with the CPU's vector width (AVX2 and AVX-512 differ) and, for one vector, with the thread count."""
    e = torch.exp(a - a.amax(dim=-1, keepdim=True))
    return e / row_sum(e)

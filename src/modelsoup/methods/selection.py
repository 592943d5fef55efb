"""Top-k selection by magnitude: the exact k-th largest |theta - base| of a tensor, and the trim that keeps the top k.

TIES keeps exactly k = floor(density * n) entries of each task vector. Finding the threshold is the
expensive part of a TIES merge, so magnitudes are produced chunk by chunk (never a whole-tensor
temporary), a shared base is read once per chunk for all models, and large tensors bracket the answer
from a strided sample before selecting inside the bracket. Boolean compaction and k-th selection go
through numpy (``a[mask]``, ``np.sort``), 2x faster than ``tensor[mask]`` and as fast as ``torch.kthvalue``; not
``np.partition``, whose AVX-512 select takes 10x longer than a sort where magnitudes tie (half-precision task vectors
hold few distinct values: 1.5M band entries, 1623 values, 127 ms against 12 ms).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MethodError
from . import kernels

# Tensors larger than this find their k-th magnitude by bracketing it from a strided sample first,
# of about SAMPLE elements.
BRACKET_ABOVE = 1 << 20
SAMPLE = 1 << 16
# Elementwise stages run on chunks of this many elements: no whole-tensor temporaries, and the ~10
# chunk-sized buffers of a TIES step stay in cache (256K elements measured 25-30% faster than 1M).
CHUNK = 1 << 18


def _spans(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


class MagnitudeSource:
    """|theta - base| (or |theta|) of a flat tensor, produced chunk by chunk without materialising it.

    Half-precision inputs (float16, bfloat16) may be given as stored: each chunk is widened to float32 first, so the
    deltas and magnitudes (``dtype``: float32) have the bits of the float32 copies' and no whole copy is made.
    """

    def __init__(self, theta: torch.Tensor, base: torch.Tensor | None = None) -> None:
        self.theta = theta.reshape(-1)
        self.base = None if base is None else base.reshape(-1)
        self.n = self.theta.numel()
        self.dtype = self.theta.dtype if self.theta.dtype in (torch.float32, torch.float64) else torch.float32
        self._finite: bool | None = None

    @property
    def finite_inputs(self) -> bool:
        """Whether theta and base hold only finite values, so no magnitude is NaN (one fast sum each, taken once)."""
        if self._finite is None:
            _check_finite_once([self])
        assert self._finite is not None
        return self._finite

    def delta(self, i: int, j: int, out: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        """theta - base on [i, j), written into ``out`` (j - i elements of ``dtype``) or a fresh tensor. ``base``: the base's
        entries [i, j) already widened to ``dtype`` (:class:`WideBase`), the same bits as subtracting them as stored."""
        if out is None:
            out = torch.empty(j - i, dtype=self.dtype)
        if self.base is None:
            return out.copy_(self.theta[i:j])
        if base is not None:
            return out.copy_(self.theta[i:j]).sub_(base) if self.theta.dtype != self.dtype else torch.sub(self.theta[i:j], base, out=out)
        if self.theta.dtype != self.dtype:  # widen first: a half-precision subtraction would round to half
            return out.copy_(self.theta[i:j]).sub_(self.base[i:j])
        return torch.sub(self.theta[i:j], self.base[i:j], out=out)

    def magnitude(self, i: int, j: int, out: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        return self.delta(i, j, out, base).abs_()

    def sample(self, stride: int) -> torch.Tensor:
        t = self.theta[::stride].to(self.dtype)
        return (t - self.base[::stride].to(self.dtype)).abs_() if self.base is not None else t.abs()


class WideBase:
    """The half-precision base that several sources subtract, widened a chunk at a time once for all of them.

    A float32 minus a bfloat16 tensor is a mixed-dtype subtraction, 2.3x slower than a float32 one (0.25 against 0.11
    ns an entry, with 0.14 to widen): one widening per chunk and float32 subtractions beat one mixed subtraction per
    model from two models on. The bits are the same (the mixed one widens each entry exactly too). Used by one thread,
    like the sources: :meth:`chunk` returns a buffer that the next call overwrites.
    """

    def __init__(self, srcs: Sequence[MagnitudeSource]) -> None:
        bases = [src.base for src in srcs]
        first = bases[0] if bases else None
        self.base = first if (first is not None and len(srcs) > 1 and first.dtype in (torch.float16, torch.bfloat16)
                              and all(b is not None and same_view(b, first) for b in bases)
                              and all(src.dtype == torch.float32 for src in srcs)) else None
        self._buf: torch.Tensor | None = None

    def chunk(self, i: int, j: int) -> torch.Tensor | None:
        """The base's entries [i, j) in float32, or None where the sources subtract their bases themselves."""
        if self.base is None:
            return None
        if self._buf is None or self._buf.numel() < j - i:
            self._buf = torch.empty(max(j - i, min(self.base.numel(), CHUNK)), dtype=torch.float32)
        return self._buf[: j - i].copy_(self.base[i:j])


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are one view of one memory (start, shape, strides, dtype), not merely two tensors starting alike."""
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)


class Kth(NamedTuple):
    """The k-th largest magnitude, how many magnitudes exceed it, and how many equal it in each chunk of ``_spans``."""

    value: float
    greater: int
    equal: list[int]


def kth_largest_magnitudes(srcs: Sequence[MagnitudeSource], ks: Sequence[int]) -> list[Kth]:
    """The exact k-th largest magnitude of each source (1 <= k <= n), with the counts that place it.

    The sources have one length and are read together, chunk by chunk, so a shared base is read once
    per chunk (and a source given twice in a row, for two k, once). For large tensors a deterministic strided sample brackets each answer between two
    values and the selection runs only on the magnitudes inside the bracket; if a bracket misses (it
    cannot be wrong, only unlucky), the full selection runs for that source.
    """
    if not srcs:
        return []
    n = srcs[0].n
    _check_finite_once(srcs)
    unsure = [not src.finite_inputs for src in srcs]  # non-finite inputs may give NaN magnitudes, which have no rank
    found: list[Kth | None] = [None] * len(srcs)
    if n > BRACKET_ABOVE:
        bands = [_Band(*_bracket(src, k)) for src, k in zip(srcs, ks)]
        above = [0] * len(srcs)
        sweep = (kernels.BandSweep([s.theta for s in srcs], [s.base for s in srcs], CHUNK)  # type: ignore[misc]
                 if all(s.dtype == torch.float32 and kernels.takes(s.theta, s.base) for s in srcs)
                 and kernels.enabled(*(s.base for s in srcs)) else None)
        if sweep is not None:  # the numpy steps below, compiled and fused
            try:
                for i, j in _spans(n):
                    for s, band in enumerate(bands):
                        over, at_lo, at_hi, nan, inside = sweep(s, i, j, band.lo, band.hi, band.mode)
                        if nan and unsure[s]:
                            raise _nan_error(nan)
                        above[s] += over
                        band.add_counts(at_lo, at_hi, inside)
            except kernels.KernelFailed:  # start the sweep again on numpy
                sweep = None
                bands = [_Band(*_bracket(src, k)) for src, k in zip(srcs, ks)]
                above = [0] * len(srcs)
        if sweep is None:
            buf = torch.empty(CHUNK, dtype=srcs[0].dtype)
            over_hi, scratch = np.empty(CHUNK, dtype=bool), (np.empty(CHUNK, dtype=bool), np.empty(CHUNK, dtype=bool))
            wide = WideBase(srcs)
            for i, j in _spans(n):
                base = wide.chunk(i, j)
                for s, (src, band) in enumerate(zip(srcs, bands)):
                    if s == 0 or src is not srcs[s - 1]:  # a source listed twice in a row (two k of one tensor) is read once
                        mag = src.magnitude(i, j, buf[: j - i], base).numpy()
                        if unsure[s]:
                            _refuse_nan(mag)
                    over = np.greater(mag, band.hi, out=over_hi[: j - i])
                    above[s] += int(np.count_nonzero(over))
                    band.add(mag, over, scratch)
        found = [band.kth(k, a) for band, k, a in zip(bands, ks, above)]
    return [kth if kth is not None else _kth_of_all(src, k) for kth, src, k in zip(found, srcs, ks)]


def _bracket(src: MagnitudeSource, k: int) -> tuple[float, float, bool]:
    """Two magnitudes that enclose the k-th largest with high probability, from a strided sample, and whether the sample
    puts many entries on either of them (heavy ties: :class:`_Band` then counts those instead of gathering them)."""
    n = src.n
    sample = np.sort(src.sample(n // SAMPLE).numpy())  # values only: 2.5x faster than torch.sort, which makes indices too
    m = sample.size
    pos = (1 - k / n) * m
    margin = 4.0 * (m * (k / n) * (1 - k / n)) ** 0.5 + 64
    lo, hi = sample[max(0, int(pos - margin))], sample[min(m - 1, int(pos + margin))]
    heavy = bool(lo != hi and int(np.count_nonzero(sample == lo)) + int(np.count_nonzero(sample == hi)) >= margin)
    return float(lo), float(hi), heavy


class _Band:
    """What the sweep keeps of one source's magnitudes in its bracket [lo, hi], chunk by chunk, to place the k-th largest.

    Plain: the in-bracket magnitudes of each chunk, gathered. Heavy ties (half-precision task vectors often put a fifth or
    more of their entries on one value, a delta of one ulp) would make that a large share of the tensor, gathered and
    sorted: a bracket of one value is counted per chunk instead, and one whose ends the sample shows heavy keeps the
    counts at lo and at hi and gathers only the magnitudes strictly between. Every mode gives the plain mode's answer:
    the r-th largest in the bracket, the count above it and its ties per chunk.
    """

    def __init__(self, lo: float, hi: float, heavy: bool) -> None:
        self.lo, self.hi = lo, hi
        self.mode = "one" if lo == hi else "ends" if heavy else "plain"
        self.inside: list[np.ndarray] = []  # per chunk: the gathered magnitudes (strictly inside, for "ends")
        self.at_lo: list[int] = []
        self.at_hi: list[int] = []

    def add(self, mag: np.ndarray, over: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]) -> None:
        """Take one chunk's magnitudes; ``over`` is mag > hi."""
        a, b = scratch[0][: mag.size], scratch[1][: mag.size]
        if self.mode == "one":
            self.at_lo.append(int(np.count_nonzero(np.equal(mag, self.lo, out=a))))
        elif self.mode == "ends":
            self.at_lo.append(int(np.count_nonzero(np.equal(mag, self.lo, out=a))))
            self.at_hi.append(int(np.count_nonzero(np.equal(mag, self.hi, out=a))))
            inside = np.logical_and(np.greater(mag, self.lo, out=a), np.less(mag, self.hi, out=b), out=a)
            self.inside.append(np.compress(inside, mag))  # a copy: the chunk's buffer is reused
        else:
            band = np.logical_xor(np.greater_equal(mag, self.lo, out=a), over, out=a)  # lo <= mag <= hi
            self.inside.append(np.compress(band, mag))

    def add_counts(self, at_lo: int, at_hi: int, inside: np.ndarray) -> None:
        """Take one chunk's counts and gathered magnitudes as :meth:`add` would find them (``inside`` is copied)."""
        if self.mode in ("one", "ends"):
            self.at_lo.append(at_lo)
        if self.mode == "ends":
            self.at_hi.append(at_hi)
        if self.mode != "one":
            self.inside.append(inside.copy())

    def kth(self, k: int, above: int) -> Kth | None:
        """The k-th largest magnitude, given the count above hi, or None if the bracket missed."""
        r = k - above  # the answer is the r-th largest in the bracket
        if self.mode == "one":
            return Kth(self.lo, above, self.at_lo) if 0 < r <= sum(self.at_lo) else None
        if self.mode == "ends":
            n_hi, n_lo = sum(self.at_hi), sum(self.at_lo)
            if 0 < r <= n_hi:
                return Kth(self.hi, above, self.at_hi)
            n_in = sum(x.size for x in self.inside)
            if n_hi + n_in < r <= n_hi + n_in + n_lo:
                return Kth(self.lo, above + n_hi + n_in, self.at_lo)
            if not n_hi < r <= n_hi + n_in:
                return None
            return _kth_of(self.inside, r - n_hi, above + n_hi)
        return _kth_of(self.inside, r, above) if r > 0 else None


def _kth_of(parts: list[np.ndarray], r: int, greater: int) -> Kth | None:
    """The r-th largest of the gathered magnitudes (``greater`` of the tensor's above them), with the counts that place
    it; None if there are fewer than r."""
    band = np.concatenate(parts)
    if not 0 < r <= band.size:
        return None
    kth = np.sort(band)[band.size - r]  # not np.partition: its AVX-512 select is ~10x slower than a sort on many ties
    return Kth(float(kth), greater + int(np.count_nonzero(band > kth)), [int(np.count_nonzero(b == kth)) for b in parts])


def _check_finite_once(srcs: Sequence[MagnitudeSource]) -> None:
    """Settle each source's :attr:`~MagnitudeSource.finite_inputs`, summing a tensor shared by several (the base) once."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], bool] = {}
    for src in srcs:
        if src._finite is None:
            ok = True
            for t in (src.theta, src.base):
                if t is not None and t.numel():
                    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)  # one view of memory, not merely one start
                    if key not in seen:
                        seen[key] = math.isfinite(float(t.sum()))
                    ok = ok and seen[key]
            src._finite = ok


def _refuse_nan(mag: np.ndarray) -> None:
    if np.isnan(mag).any():
        raise _nan_error(int(np.isnan(mag).sum()))


def _nan_error(count: int) -> MethodError:
    return MethodError(f"{count} task-vector entries are NaN (from NaN or infinite weights): the method keeps "
                       "entries by the rank of their magnitude, and NaN has none. Fix the checkpoint (allow_nonfinite cannot "
                       "merge NaN with a method that ranks magnitudes)")


def _kth_of_all(src: MagnitudeSource, k: int) -> Kth:
    mag = src.magnitude(0, src.n).numpy()
    if not src.finite_inputs:
        _refuse_nan(mag)
    kth = np.sort(mag)[src.n - k]  # a sorted copy (the counts below need flat order), not a partition: see _kth_of
    return Kth(float(kth), int(np.count_nonzero(mag > kth)), [int(np.count_nonzero(mag[i:j] == kth)) for i, j in _spans(src.n)])


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The exact k-th largest value of a flat non-negative tensor."""
    return kth_largest_magnitudes([MagnitudeSource(mag)], [k])[0].value


def keep_count(density: float, n: int, at_least_one: bool = False) -> int:
    """k = floor(density * n); with ``at_least_one`` (mergekit) a positive density keeps at least one entry of a nonempty tensor."""
    k = int(density * n)
    return max(k, 1) if at_least_one and density > 0 and n > 0 else k


class TopKTrim:
    """Keeps the k = floor(density * n) largest magnitudes of theta - base, applied chunk by chunk.

    Exactly k are kept even when magnitudes tie: all entries above the k-th largest magnitude, then
    those equal to it with a flat index below ``cut``, i.e. the first ones in index order. Whether an
    entry is kept depends only on its value and index, so chunks may come in any order and size.
    Build several with :meth:`for_sources` to find their thresholds in one sweep.
    """

    def __init__(self, src: MagnitudeSource, density: float, kth: Kth | None = None, *, at_least_one: bool = False) -> None:
        n = src.n
        self.k = keep_count(density, n, at_least_one)
        self.all, self.none = self.k >= n, self.k <= 0
        self.tied_at_cut = False  # some entries equal to the k-th magnitude are kept and others not
        if not (self.all or self.none):
            kth = kth or kth_largest_magnitudes([src], [self.k])[0]
            self.kth = kth.value
            # hardshrink keeps |d| > lambda: the next float below the k-th magnitude keeps those equal to it
            below = torch.nextafter(torch.tensor(kth.value, dtype=src.dtype), torch.tensor(-np.inf, dtype=src.dtype))
            self.kth_or_equal = float(below)
            self.cut = _tie_cut(src, kth, self.k - kth.greater)
            self.tied_at_cut = self.k - kth.greater < sum(kth.equal)

    @classmethod
    def for_sources(cls, srcs: Sequence[MagnitudeSource], densities: Sequence[float], *, at_least_one: bool = False) -> list[TopKTrim]:
        """One trim per source (all of one length), thresholds found together by :func:`kth_largest_magnitudes`."""
        ks = [keep_count(p, src.n, at_least_one) for src, p in zip(srcs, densities)]
        todo = [s for s, (src, k) in enumerate(zip(srcs, ks)) if 0 < k < src.n]
        kths = dict(zip(todo, kth_largest_magnitudes([srcs[s] for s in todo], [ks[s] for s in todo])))
        return [cls(src, p, kths.get(s), at_least_one=at_least_one) for s, (src, p) in enumerate(zip(srcs, densities))]

    def kernel_codes(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """This trim as the compiled kernels read it (:mod:`._numba_kernels`): (mode, cut, 0, 0, 0), (kth_or_equal, kth, 0...)."""
        if self.all or self.none:
            return (0 if self.all else 1, 0, 0, 0, 0), (0.0,) * 6
        return (2, self.cut, 0, 0, 0), (self.kth_or_equal, self.kth, 0.0, 0.0, 0.0, 0.0)

    def apply_(self, d: torch.Tensor, start: int) -> torch.Tensor:
        """Trim in place a flat chunk ``d`` of deltas holding entries [start, start + len(d)); return it."""
        if self.all:
            return d
        if self.none:
            return d.zero_()
        split = min(max(self.cut - start, 0), d.numel())  # entries before it keep ties at the threshold
        if split:
            torch.hardshrink(d[:split], self.kth_or_equal, out=d[:split])
        if split < d.numel():
            torch.hardshrink(d[split:], self.kth, out=d[split:])
        return d


def _tie_cut(src: MagnitudeSource, kth: Kth, need: int) -> int:
    """One past the flat index of the ``need``-th entry (in index order) whose magnitude equals the k-th largest
    (0 for none of them)."""
    seen = 0
    if need == 0:
        return 0
    if need == sum(kth.equal):
        return src.n
    for (i, j), equal in zip(_spans(src.n), kth.equal):
        if seen + equal >= need:
            at = torch.nonzero(src.magnitude(i, j) == kth.value).view(-1)
            return i + int(at[need - seen - 1]) + 1
        seen += equal
    raise AssertionError("the k-th magnitude has fewer ties than counted")


class RankWindow:
    """Keeps the entries whose places in the stable ascending order of |theta - base| lie in [first, stop) (breadcrumbs:
    neither among the ``first`` smallest nor the ``n - stop`` largest magnitudes), applied chunk by chunk.

    The entries ``argsort(|d|, stable=True)[first:stop]`` picks, without sorting: with lo and hi the magnitudes at
    places first and stop - 1, everything strictly between them, the entries equal to lo from index ``cut_lo`` on (the
    ties before it hold the places below ``first``) and those equal to hi before index ``cut_hi``. Like
    :class:`TopKTrim`, whether an entry is kept depends only on its value and index. Build several with
    :meth:`for_sources` to find their cuts in one sweep.
    """

    def __init__(self, src: MagnitudeSource, first: int, stop: int, kths: tuple[Kth, Kth] | None = None) -> None:
        n = src.n
        self.none, self.all = self._trivial(first, stop, n)
        self.tied_at_cut = False  # some entries equal to lo or hi are kept and others not
        if self.none or self.all:
            return
        lo, hi = kths or kth_largest_magnitudes([src, src], [n - first, n - stop + 1])  # places first and stop - 1
        drop_lo = first - (n - lo.greater - sum(lo.equal))  # ties at lo below place `first`: the first ones in index order
        keep_hi = stop - (n - hi.greater - sum(hi.equal))  # ties at hi at or below place stop - 1
        self.cut_lo, self.cut_hi = _tie_cut(src, lo, drop_lo), _tie_cut(src, hi, keep_hi)
        self.tied_at_cut = 0 < drop_lo < sum(lo.equal) or keep_hi < sum(hi.equal)
        down = torch.tensor(-np.inf, dtype=src.dtype)
        up = torch.tensor(np.inf, dtype=src.dtype)
        # keep lo_bound < |d| < hi_bound, the bounds moved by one float where the ties at lo or hi are kept
        self.lo, self.lo_or_equal = lo.value, float(torch.nextafter(torch.tensor(lo.value, dtype=src.dtype), down))
        # (an infinite hi kept has no float above it: no upper bound then)
        self.hi, self.hi_or_equal = hi.value, float(torch.nextafter(torch.tensor(hi.value, dtype=src.dtype), up)) if math.isfinite(hi.value) else None
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _trivial(first: int, stop: int, n: int) -> tuple[bool, bool]:
        """(keeps nothing, keeps everything) for the places [first, stop) of n."""
        first, stop = max(first, 0), min(stop, n)
        return stop <= first, first == 0 and stop == n

    @classmethod
    def for_sources(cls, srcs: Sequence[MagnitudeSource], windows: Sequence[tuple[int, int]]) -> list[RankWindow]:
        """One window per source (all of one length), cuts found together by :func:`kth_largest_magnitudes`."""
        n = srcs[0].n if srcs else 0
        todo = [s for s, (first, stop) in enumerate(windows) if not any(cls._trivial(first, stop, n))]
        ks = [k for s in todo for k in (n - windows[s][0], n - windows[s][1] + 1)]
        kths = kth_largest_magnitudes([srcs[s] for s in todo for _ in range(2)], ks)
        found = {s: (kths[2 * t], kths[2 * t + 1]) for t, s in enumerate(todo)}
        return [cls(src, first, stop, found.get(s)) for s, (src, (first, stop)) in enumerate(zip(srcs, windows))]

    def kernel_codes(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """This window as the compiled kernels read it (:mod:`._numba_kernels`): (mode, 0, cut_lo, cut_hi, hi_unbounded),
        (0, 0, lo, lo_or_equal, hi, hi_or_equal)."""
        if self.all or self.none:
            return (0 if self.all else 1, 0, 0, 0, 0), (0.0,) * 6
        unbounded = self.hi_or_equal is None
        return (3, 0, self.cut_lo, self.cut_hi, int(unbounded)), (0.0, 0.0, self.lo, self.lo_or_equal, self.hi,
                                                                   0.0 if unbounded else self.hi_or_equal)

    def apply_(self, d: torch.Tensor, start: int) -> torch.Tensor:
        """Zero in place the entries of a flat chunk ``d`` (entries [start, start + len(d))) outside the window; return it."""
        if self.all:
            return d
        if self.none:
            return d.zero_()
        m = d.numel()
        if self._bufs is None or self._bufs[0].numel() < m or self._bufs[0].dtype != d.dtype:
            self._bufs = (torch.empty(max(m, CHUNK), dtype=d.dtype), torch.empty(max(m, CHUNK), dtype=d.dtype))
        mag, keep = self._bufs[0][:m], self._bufs[1][:m]
        torch.abs(d, out=mag)
        cuts = sorted({0, m, *(min(max(c - start, 0), m) for c in (self.cut_lo, self.cut_hi))})
        for a, b in itertools.pairwise(cuts):  # distinct, sorted: every piece is nonempty
            lo = self.lo_or_equal if start + a >= self.cut_lo else self.lo  # from cut_lo on, ties at lo are kept
            hi = self.hi_or_equal if start + a < self.cut_hi else self.hi  # before cut_hi, ties at hi are kept
            torch.gt(mag[a:b], lo, out=keep[a:b])  # float 0/1 masks: faster than bool ones (see ops)
            if hi is not None:
                keep[a:b].mul_(torch.lt(mag[a:b], hi, out=mag[a:b]))
        return d.mul_(keep)

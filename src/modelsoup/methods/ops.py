"""Shared operations of the task-vector methods: trim, drop-and-rescale, sign election, combine.

TIES, DARE and breadcrumbs are compositions of these: sparsify each task vector (``trim_top_k``,
``drop_random``, ``trim_outliers``), then ``combine`` them (plain weighted sum, or sign election and a
disjoint mean). Every function is pure: inputs are never modified.

Accumulation is elementwise in a Python loop over models (never ``stack().sum(0)``), so results do not
depend on the number of threads.

Speed notes (torch CPU kernels): comparisons into bool tensors, ``where`` and ``masked_fill_`` run 3-25x
slower than float kernels, so masks here are float 0/1 tensors written with ``out=``; boolean
compaction and k-th selection go through numpy (``a[mask]``, ``np.partition``), 2x and 10x faster than
``tensor[mask]`` and ``torch.kthvalue``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MethodError
from .registry import Param

def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite.

    A sum is finite unless an element is NaN/Inf (or the sum overflows, which the exact check then
    clears): one pass with no allocation, against four for ``isfinite(t).all()``.
    """
    if t.dtype.itemsize == 1:  # float8: no reductions of its own
        t = t.to(torch.float32)
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def weight_sum_problem(weights: Sequence[float]) -> str | None:
    """Why weights cannot be normalised by their sum, as "weights [...] sum to ...", or None.

    The sum overflows (every weight would become 0), or is zero relative to the weights' magnitudes.
    The one place that decides it: the recipe validation and the methods both ask here.
    """
    w = [float(x) for x in weights]
    try:
        total = math.fsum(w)
    except OverflowError:  # fsum refuses an overflowing partial sum; plain addition gives the inf it means
        total = sum(w)
    if not math.isfinite(total):
        return f"weights {w} sum to {total}, too large to normalise (every weight would become 0)"
    if total == 0 or abs(total) <= ZERO_WEIGHT_SUM * sum(abs(x) for x in w):
        return f"weights {w} sum to zero"
    return None


# Weights whose sum is this small relative to their magnitudes sum to zero as far as normalising goes.
ZERO_WEIGHT_SUM = 1e-12
# A divisor smaller than this (weights of agreeing models summing to ~0) is replaced by 1, as mergekit does.
DIVISOR_FLOOR = 1e-8


def per_model(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """Broadcast a scalar or check a per-model sequence of length ``n``."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise MethodError(f"`{name}` has {len(vals)} values for {n} models")
    return vals


def model_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights as floats (all 1.0 when None)."""
    if weights is None:
        return [1.0] * n
    return per_model(weights, n, "weights")


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, method: str) -> list[torch.Tensor]:
    """delta_i = theta_i - base."""
    if base is None:
        raise MethodError(f"method '{method}' needs a base model (set `base:` / --base)")
    return [t - base for t in tensors]


# Tensors larger than this find their k-th magnitude by bracketing it from a strided sample first.
BRACKET_ABOVE = 1 << 20
_SAMPLE = 1 << 16
# Elementwise stages run on chunks of this many elements: no whole-tensor temporaries, and the ~10
# chunk-sized buffers of a TIES step stay in cache (256K elements measured 25-30% faster than 1M).
CHUNK = 1 << 18


def _spans(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


class MagnitudeSource:
    """|theta - base| (or |theta|) of a flat tensor, produced chunk by chunk without materialising it."""

    def __init__(self, theta: torch.Tensor, base: torch.Tensor | None = None) -> None:
        self.theta = theta.reshape(-1)
        self.base = None if base is None else base.reshape(-1)
        self.n = self.theta.numel()

    def delta(self, i: int, j: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """theta - base on [i, j), written into ``out`` (j - i elements) or a fresh tensor."""
        if out is None:
            out = torch.empty(j - i, dtype=self.theta.dtype)
        if self.base is None:
            return out.copy_(self.theta[i:j])
        return torch.sub(self.theta[i:j], self.base[i:j], out=out)

    def magnitude(self, i: int, j: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.delta(i, j, out).abs_()

    def sample(self, stride: int) -> torch.Tensor:
        t = self.theta[::stride]
        return (t - self.base[::stride]).abs_() if self.base is not None else t.abs()


class Kth(NamedTuple):
    """The k-th largest magnitude, how many magnitudes exceed it, and how many equal it in each chunk of ``_spans``."""

    value: float
    greater: int
    equal: list[int]


def kth_largest_magnitudes(srcs: Sequence[MagnitudeSource], ks: Sequence[int]) -> list[Kth]:
    """The exact k-th largest magnitude of each source (1 <= k <= n), with the counts that place it.

    The sources have one length and are read together, chunk by chunk, so a shared base is read once
    per chunk. For large tensors a deterministic strided sample brackets each answer between two
    values and the selection runs only on the magnitudes inside the bracket; if a bracket misses (it
    cannot be wrong, only unlucky), the full selection runs for that source.
    """
    if not srcs:
        return []
    n = srcs[0].n
    found: list[Kth | None] = [None] * len(srcs)
    if n > BRACKET_ABOVE:
        brackets = [_bracket(src, k) for src, k in zip(srcs, ks)]
        above, bands = [0] * len(srcs), [[] for _ in srcs]
        buf = torch.empty(CHUNK, dtype=srcs[0].theta.dtype)
        over_hi, in_band = np.empty(CHUNK, dtype=bool), np.empty(CHUNK, dtype=bool)
        for i, j in _spans(n):
            for s, (src, (lo, hi)) in enumerate(zip(srcs, brackets)):
                mag = src.magnitude(i, j, buf[: j - i]).numpy()
                over = np.greater(mag, hi, out=over_hi[: j - i])
                above[s] += int(np.count_nonzero(over))
                band = np.logical_xor(np.greater_equal(mag, lo, out=in_band[: j - i]), over, out=in_band[: j - i])  # lo <= mag <= hi
                bands[s].append(np.compress(band, mag))  # a copy: buf is reused
        found = [_kth_in_band(b, k, a) for b, k, a in zip(bands, ks, above)]
    return [kth if kth is not None else _kth_of_all(src, k) for kth, src, k in zip(found, srcs, ks)]


def _bracket(src: MagnitudeSource, k: int) -> tuple[float, float]:
    """Two magnitudes that enclose the k-th largest with high probability, from a strided sample."""
    n = src.n
    sample = src.sample(n // _SAMPLE).sort().values
    m = sample.numel()
    pos = (1 - k / n) * m
    margin = 4.0 * (m * (k / n) * (1 - k / n)) ** 0.5 + 64
    return float(sample[max(0, int(pos - margin))]), float(sample[min(m - 1, int(pos + margin))])


def _kth_in_band(bands: list[np.ndarray], k: int, above: int) -> Kth | None:
    """The k-th largest magnitude from the in-bracket magnitudes of each chunk, or None if the bracket missed."""
    band = np.concatenate(bands)
    r = k - above  # the answer is the r-th largest inside the band
    if not 0 < r <= band.size:
        return None
    kth = np.partition(band, band.size - r)[band.size - r]
    return Kth(float(kth), above + int(np.count_nonzero(band > kth)), [int(np.count_nonzero(b == kth)) for b in bands])


def _kth_of_all(src: MagnitudeSource, k: int) -> Kth:
    mag = src.magnitude(0, src.n).numpy()
    kth = np.partition(mag, src.n - k)[src.n - k]  # partition works on a copy: the counts below need flat order
    return Kth(float(kth), int(np.count_nonzero(mag > kth)), [int(np.count_nonzero(mag[i:j] == kth)) for i, j in _spans(src.n)])


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The exact k-th largest value of a flat non-negative tensor."""
    return kth_largest_magnitudes([MagnitudeSource(mag)], [k])[0].value


class TopKTrim:
    """Keeps the k = floor(density * n) largest magnitudes of theta - base, applied chunk by chunk.

    Exactly k are kept even when magnitudes tie: all entries above the k-th largest magnitude, then
    those equal to it with a flat index below ``cut``, i.e. the first ones in index order. Whether an
    entry is kept depends only on its value and index, so chunks may come in any order and size.
    Build several with :meth:`for_sources` to find their thresholds in one sweep.
    """

    def __init__(self, src: MagnitudeSource, density: float, kth: Kth | None = None) -> None:
        n = src.n
        self.k = int(density * n)
        self.all, self.none = self.k >= n, self.k <= 0
        if not (self.all or self.none):
            kth = kth or kth_largest_magnitudes([src], [self.k])[0]
            self.kth = kth.value
            # hardshrink keeps |d| > lambda: the next float below the k-th magnitude keeps those equal to it
            below = torch.nextafter(torch.tensor(kth.value, dtype=src.theta.dtype), torch.tensor(-np.inf, dtype=src.theta.dtype))
            self.kth_or_equal = float(below)
            self.cut = _tie_cut(src, kth, self.k - kth.greater)

    @classmethod
    def for_sources(cls, srcs: Sequence[MagnitudeSource], densities: Sequence[float]) -> list[TopKTrim]:
        """One trim per source (all of one length), thresholds found together by :func:`kth_largest_magnitudes`."""
        ks = [int(p * src.n) for src, p in zip(srcs, densities)]
        todo = [s for s, (src, k) in enumerate(zip(srcs, ks)) if 0 < k < src.n]
        kths = dict(zip(todo, kth_largest_magnitudes([srcs[s] for s in todo], [ks[s] for s in todo])))
        return [cls(src, p, kths.get(s)) for s, (src, p) in enumerate(zip(srcs, densities))]

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
    """One past the flat index of the ``need``-th entry (in index order) whose magnitude equals the k-th largest."""
    seen = 0
    if need == sum(kth.equal):
        return src.n
    for (i, j), equal in zip(_spans(src.n), kth.equal):
        if seen + equal >= need:
            at = torch.nonzero(src.magnitude(i, j) == kth.value).view(-1)
            return i + int(at[need - seen - 1]) + 1
        seen += equal
    raise AssertionError("the k-th magnitude has fewer ties than counted")


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = floor(density * numel) largest magnitudes of ``delta``, zero the rest (see :class:`TopKTrim`)."""
    src = MagnitudeSource(delta)
    return TopKTrim(src, density).apply_(src.delta(0, src.n), 0).view_as(delta)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: str) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), then rescale the survivors.

    ``rescale``: ``density`` divides by the keep probability (the DARE paper, peft); ``l1`` scales the
    result to the L1 norm of the original delta (mergekit's ``rescale: true``); ``none`` leaves it.
    The mask is one ``torch.bernoulli`` call per model, as peft draws it.
    """
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    kept = delta * mask
    if rescale == "density":
        return kept / density
    if rescale == "l1":
        return _match_l1(kept, delta)
    return kept


def _match_l1(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    new = float(kept.abs().sum(dtype=torch.float64))
    if new <= 1e-7:
        return kept
    return kept * (float(original.abs().sum(dtype=torch.float64)) / new)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction of magnitudes and the smallest, keeping ``density``.

    n_top = floor(gamma n), n_keep = floor(density n), n_bottom = n - n_keep - n_top (if negative, fewer
    top entries are dropped). At density 1 the delta is returned whole (mergekit's convention).
    """
    n = delta.numel()
    if density >= 1:
        return delta.clone()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = n - n_keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = delta.abs().reshape(-1).argsort(stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bot : n - n_top]] = True
    return delta * keep.view_as(delta)


def elect_sign(deltas: Sequence[torch.Tensor], sign_method: str) -> torch.Tensor:
    """Per-entry majority sign (+1 or -1; +1 when the vote is exactly 0).

    ``sum``: sign of the sum of the deltas (magnitude-weighted vote, TIES paper and mergekit default);
    ``count``: sign of the sum of signs (one vote per model).
    """
    vote = torch.zeros_like(deltas[0])
    for d in deltas:
        vote += d if sign_method == "sum" else d.sign()
    return torch.where(vote >= 0, 1.0, -1.0).to(deltas[0].dtype)


class ElectedMean:
    """Sign election and disjoint mean of sparsified task vectors, one flat chunk at a time (see :func:`combine`).

    Holds its working buffers, reused from chunk to chunk. Every step is elementwise, so the result
    does not depend on how the tensor is chunked. The operations and their order are those of the
    plain formula (zeros, then ``add_(x, alpha=w)`` model by model), so results are exactly those of a
    straightforward implementation.
    """

    def __init__(
        self,
        weights: Sequence[float],
        *,
        size: int,
        sign_method: str = "sum",
        sign_from: str = "weighted",
        normalize: bool = False,
        divide_by: str = "weight_sum",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        weighted = sign_from == "weighted"
        count_signs = sign_method == "count"
        # A voter is w_i delta_i (weighted) or delta_i; its sign is sign(delta_i), flipped for negative weights.
        # A zero weight makes a weighted voter all zeros: no sign, so it neither votes nor agrees.
        self.voters = [(i, w) for i, w in enumerate(weights) if not (weighted and w == 0)]
        self.flipped = [i for i, w in self.voters if weighted and w < 0]
        # each voter adds alpha * delta_i to the vote (alpha * sign(delta_i) if counting signs)
        self.vote_alpha = [(-1.0 if i in self.flipped else 1.0) if count_signs else (w if weighted else 1.0) for i, w in self.voters]
        self.divisor_alpha = [w if divide_by == "weight_sum" else 1.0 for _, w in self.voters]
        self.count_signs, self.normalize, self.floor_divisor = count_signs, normalize, divide_by == "weight_sum"
        # Fast path: with every voter's weight >= DIVISOR_FLOOR a divisor is 0 (nothing agrees, and the sum
        # is then +-0 or NaN) or >= DIVISOR_FLOOR, so clamping it to DIVISOR_FLOOR gives what replacing
        # small ones by 1 gives.
        self.divisor_is_zero_or_large = self.floor_divisor and all(a >= DIVISOR_FLOOR for a in self.divisor_alpha)
        self.vectors = torch.empty(3, size, dtype=dtype)  # vote, elected sign, divisor
        self.per_model = torch.empty(2, len(weights), size, dtype=dtype)  # products, agreement

    def __call__(self, deltas: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Merge ``deltas`` (one flat chunk per row, rows indexed like the weights) into ``out`` and return it."""
        n = out.numel()
        vote, sign, div = self.vectors[:, :n]
        prod, agree = self.per_model[:, :, :n]
        out.zero_()
        if not self.voters:
            return out
        for k, ((i, _), alpha) in enumerate(zip(self.voters, self.vote_alpha)):
            term = torch.sign(deltas[i], out=prod[i]) if self.count_signs else deltas[i]
            if k == 0:  # 0 + alpha * term but for the sign of a zero vote, which is only compared with 0
                torch.mul(term, alpha, out=vote)
            else:
                vote.add_(term, alpha=alpha)
        torch.ge(vote, 0, out=sign).mul_(2).sub_(1)  # the elected sign: +1 where the vote is >= 0, else -1
        # agree = 1 where a delta has the elected sign (the opposite one if flipped); a zero never agrees
        torch.gt(torch.mul(deltas, sign, out=prod), 0, out=agree)
        for i in self.flipped:
            torch.lt(prod[i], 0, out=agree[i])
        torch.mul(deltas, agree, out=prod)
        for i, w in self.voters:
            out.add_(prod[i], alpha=w)
        if not self.normalize:
            return out
        for k, ((i, _), alpha) in enumerate(zip(self.voters, self.divisor_alpha)):
            if k == 0:  # 0 + alpha * agree but for the sign of a zero divisor, which is replaced below
                torch.mul(agree[i], alpha, out=div)
            else:
                div.add_(agree[i], alpha=alpha)
        if self.divisor_is_zero_or_large:
            div.clamp_(min=DIVISOR_FLOOR)
        elif self.floor_divisor:
            # div = 1 where |div| < DIVISOR_FLOOR, else div: div * big + small is exact (one term is 0)
            small, big = prod[0], agree[0]
            torch.abs(div, out=small)
            torch.ge(small, DIVISOR_FLOOR, out=big)
            div.mul_(big).add_(torch.lt(small, DIVISOR_FLOOR, out=small))
        else:
            div.clamp_(min=1.0)
        return out.div_(div)


def combine(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_method: str = "none",
    sign_from: str = "weighted",
    normalize: bool = False,
    divide_by: str = "weight_sum",
) -> torch.Tensor:
    """Merge (sparsified) task vectors into one.

    Without sign election (``sign_method: none``): sum_i w_i delta_i, divided by sum_i w_i if
    ``normalize``. With it: elect a sign per entry from the weighted (``sign_from: weighted``, mergekit)
    or unweighted (peft) deltas, keep only entries that agree with it (a zero has no sign and never
    agrees), sum w_i delta_i over them, and if ``normalize`` divide by the sum of the agreeing weights
    (``divide_by: weight_sum``, mergekit; sums below ``DIVISOR_FLOOR`` in magnitude count as 1) or by the
    number of agreeing models (``count``, peft).

    Raises:
        MethodError: weights summing to zero while normalising without sign election.
    """
    if sign_method == "none":
        acc = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights):
            acc.add_(d, alpha=w)
        if normalize:
            problem = weight_sum_problem(weights)
            if problem:
                raise MethodError(f"{problem}; cannot normalise (set normalize: false or change the weights)")
            acc /= sum(weights)
        return acc
    flat = [d.reshape(-1) for d in deltas]
    n = flat[0].numel()
    out = torch.empty(n, dtype=deltas[0].dtype)
    size = min(n, CHUNK)
    elect = ElectedMean(weights, size=size, sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by, dtype=out.dtype)
    rows = torch.empty(len(flat), size, dtype=out.dtype)
    for i, j in _spans(n):
        elect(torch.stack([d[i:j] for d in flat], out=rows[:, : j - i]), out[i:j])
    return out.view_as(deltas[0])


# Parameters shared by the task-vector methods, declared once.
SIGN_CHOICES = ("sum", "count")
SIGN_FROM = ("weighted", "unweighted")
DIVIDE_BY = ("weight_sum", "count")
RESCALE = ("density", "l1", "none")


def density_param(default: float, help: str) -> Param:
    return Param("density", default, help, low=0.0, high=1.0, low_open=True, per_model=True)


SCALE = Param("scale", 1.0, "lambda: multiplies the merged task vector before adding it to the base", aliases=("lambda",))
SIGN_FROM_PARAM = Param("sign_from", "weighted", "elect signs on weighted deltas (mergekit) or unweighted ones (peft)", kind=str, choices=SIGN_FROM)
DIVIDE_BY_PARAM = Param("divide_by", "weight_sum", "with normalize: divide by the agreeing models' weights (mergekit) or their count (peft)", kind=str, choices=DIVIDE_BY)


def normalize_param(default: bool) -> Param:
    return Param("normalize", default, "divide by the sum of the weights (of agreeing models, with sign election)", kind=bool)


def sign_param(default: str, choices: tuple[str, ...] = SIGN_CHOICES) -> Param:
    return Param("sign_method", default, "sign election: sum of deltas (sum) or of their signs (count)" + ("; none = no election" if "none" in choices else ""), kind=str, choices=choices)


RESCALE_PARAM = Param("rescale", "density", "survivors divided by density (DARE paper, peft), scaled to the delta's L1 norm (mergekit), or none", kind=str, choices=RESCALE)

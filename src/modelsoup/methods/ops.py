"""Shared operations of the task-vector methods: trim, drop-and-rescale, sign election, combine.

TIES, DARE and breadcrumbs are compositions of these: sparsify each task vector (``trim_top_k``,
``drop_random``, ``trim_outliers``), then ``combine`` them (plain weighted sum, or sign election and a
disjoint mean). Every function is pure: inputs are never modified.

Accumulation is elementwise in a Python loop over models (never ``stack().sum(0)``), so results do not
depend on the number of threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MethodError
from .registry import Param

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
# Elementwise stages run on chunks of this many elements: cache-resident, no whole-tensor temporaries.
CHUNK = 1 << 20


def _spans(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


class MagnitudeSource:
    """|theta - base| (or |theta|) of a flat tensor, produced chunk by chunk without materialising it."""

    def __init__(self, theta: torch.Tensor, base: torch.Tensor | None = None) -> None:
        self.theta = theta.reshape(-1)
        self.base = None if base is None else base.reshape(-1)
        self.n = self.theta.numel()

    def delta(self, i: int, j: int) -> torch.Tensor:
        """A fresh tensor holding theta - base on [i, j)."""
        return self.theta[i:j] - self.base[i:j] if self.base is not None else self.theta[i:j].clone()

    def magnitude(self, i: int, j: int) -> torch.Tensor:
        return self.delta(i, j).abs_()

    def sample(self, stride: int) -> torch.Tensor:
        t = self.theta[::stride]
        return (t - self.base[::stride]).abs_() if self.base is not None else t.abs()


def kth_largest_magnitude(src: MagnitudeSource, k: int) -> tuple[torch.Tensor, int, int]:
    """The exact k-th largest magnitude (1 <= k <= n), how many magnitudes exceed it and how many equal it.

    For large tensors a deterministic strided sample brackets the answer between two values and
    ``kthvalue`` runs only on the magnitudes inside the bracket; if the bracket misses (it cannot be
    wrong, only unlucky), the full selection runs instead.
    """
    n = src.n
    if n > BRACKET_ABOVE:
        sample = src.sample(n // _SAMPLE).sort().values
        m = sample.numel()
        pos = (1 - k / n) * m
        margin = 4.0 * (m * (k / n) * (1 - k / n)) ** 0.5 + 64
        lo, hi = sample[max(0, int(pos - margin))], sample[min(m - 1, int(pos + margin))]
        above, bands = 0, []
        for i, j in _spans(n):
            mag = src.magnitude(i, j)
            above += int(torch.count_nonzero(mag > hi))
            bands.append(mag[(mag >= lo) & (mag <= hi)])
        band = torch.cat(bands)
        r = k - above  # the answer is the r-th largest inside the band
        if 0 < r <= band.numel():
            kth = torch.kthvalue(band, band.numel() - r + 1).values
            return kth, above + int(torch.count_nonzero(band > kth)), int(torch.count_nonzero(band == kth))
    mag = src.magnitude(0, n)
    kth = torch.kthvalue(mag, n - k + 1).values
    return kth, int(torch.count_nonzero(mag > kth)), int(torch.count_nonzero(mag == kth))


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest value of a flat non-negative tensor."""
    return kth_largest_magnitude(MagnitudeSource(mag), k)[0]


class TopKTrim:
    """Keeps the k = floor(density * n) largest magnitudes of theta - base, applied chunk by chunk.

    Exactly k are kept even when magnitudes tie: all entries above the k-th largest magnitude, then
    the first (in flat index order, across chunks) of those equal to it. Apply chunks in order.
    """

    def __init__(self, src: MagnitudeSource, density: float) -> None:
        n = src.n
        self.k = int(density * n)
        self.all, self.none = self.k >= n, self.k <= 0
        if not (self.all or self.none):
            self.kth, greater, equal = kth_largest_magnitude(src, self.k)
            self.need = self.k - greater  # how many entries equal to the k-th magnitude to keep
            self.keep_all_equal = self.need == equal  # usual case: no tie to break at the threshold
            self.tied_seen = 0

    def apply_(self, d: torch.Tensor) -> torch.Tensor:
        """Trim the next chunk of deltas in place and return it."""
        if self.all:
            return d
        if self.none:
            return d.zero_()
        mag = d.abs()
        if self.keep_all_equal:
            return d.mul_(mag >= self.kth)
        keep = mag > self.kth
        if self.need > 0:
            tied = mag == self.kth
            keep |= tied & ((tied.cumsum(0) + self.tied_seen) <= self.need)
            self.tied_seen += int(torch.count_nonzero(tied))
        return d.mul_(keep)


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = floor(density * numel) largest magnitudes of ``delta``, zero the rest (see :class:`TopKTrim`)."""
    src = MagnitudeSource(delta)
    trim = TopKTrim(src, density)
    return torch.cat([trim.apply_(src.delta(i, j)) for i, j in _spans(src.n)]).view_as(delta) if src.n else delta.clone()


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
    (``divide_by: weight_sum``, mergekit) or by the number of agreeing models (``count``, peft).

    Raises:
        MethodError: weights summing to zero while normalising without sign election.
    """
    if sign_method == "none":
        acc = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights):
            acc.add_(d, alpha=w)
        if normalize:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise MethodError(f"weights {list(weights)} sum to zero; cannot normalise (set normalize: false or change the weights)")
            acc /= total
        return acc
    # A voter is w_i delta_i (weighted) or delta_i; its sign is sign(delta_i), flipped for negative weights.
    flips = [(w < 0) if sign_from == "weighted" else False for w in weights]
    # a zero weight makes a weighted voter all zeros: no sign, so it neither votes nor agrees
    voting = [not (sign_from == "weighted" and w == 0) for w in weights]
    vote = torch.zeros_like(deltas[0])
    for d, w, flip, v in zip(deltas, weights, flips, voting):
        if not v:
            continue
        if sign_method == "sum":
            vote.add_(d, alpha=w if sign_from == "weighted" else 1.0)
        else:
            vote.add_(d.sign(), alpha=-1.0 if flip else 1.0)
    positive = vote >= 0  # the elected sign is + where True
    del vote
    acc = torch.zeros_like(deltas[0])
    div = torch.zeros_like(deltas[0]) if normalize else None
    for d, w, flip, v in zip(deltas, weights, flips, voting):
        if not v:
            continue
        up, down = (d < 0, d > 0) if flip else (d > 0, d < 0)
        agree = torch.where(positive, up, down)
        acc.add_(d * agree, alpha=w)
        if div is not None:
            div.add_(agree, alpha=w if divide_by == "weight_sum" else 1.0)
    if div is None:
        return acc
    if divide_by == "weight_sum":
        div[div.abs() < DIVISOR_FLOOR] = 1.0
    else:
        div.clamp_(min=1.0)
    return acc.div_(div)


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

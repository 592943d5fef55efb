"""Shared operations of the task-vector methods: sparsify (trim, drop-and-rescale), elect signs, combine.

TIES, DARE and breadcrumbs are compositions of these: sparsify each task vector (``trim_top_k`` /
``top_k_deltas``, ``drop_random``, ``trim_outliers``), then ``combine`` them (plain weighted sum, or sign
election and a disjoint mean), then ``add_to_base``. Every function is pure:
inputs are never modified.

Accumulation is elementwise in a Python loop over models (never ``stack().sum(0)``), so results do not
depend on the number of threads.

Speed notes (torch CPU kernels): comparisons into bool tensors, ``where`` and ``masked_fill_`` run 3-25x
slower than float kernels, so masks here are float 0/1 tensors written with ``out=``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import MethodError
from . import kernels, selection
from .reduce import abs_sum64, scratch
from .selection import MagnitudeSource, RankWindow, TopKTrim


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite.

    A sum is finite unless an element is NaN/Inf (or the sum overflows, which the exact check then
    clears): one pass with no allocation, against four for ``isfinite(t).all()``. Half precision is summed as
    stored: torch accumulates it in float32 and rounds only the total (20x faster than ``sum(dtype=float32)``,
    which widens a copy first); a float16 total beyond 65504 is retried in float32 before the exact check.
    """
    if t.dtype.itemsize == 1:  # float8: no reductions of its own
        t = t.to(torch.float32)
    if math.isfinite(t.sum().item()):  # item(): no second kernel for a 0-d check
        return True
    if t.dtype == torch.float16 and math.isfinite(t.sum(dtype=torch.float32).item()):
        return True
    return bool(torch.isfinite(t).all())


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


def normalizing_sum(weights: Sequence[float], option: str | None = "normalize") -> float:
    """sum_i w_i, to divide by; ``option`` names the switch that turns the division off (None = there is none).

    Raises:
        MethodError: the weights cannot be normalised (see :func:`weight_sum_problem`).
    """
    problem = weight_sum_problem(weights)
    if problem:
        fix = f"set {option}: false or change the weights" if option else "change the weights"
        raise MethodError(f"{problem}; cannot normalise ({fix})")
    return sum(weights)


def divides_by_plain_weight_sum(params: Mapping[str, Any]) -> bool:
    """Whether ``normalize`` divides by sum_i w_i: it does unless signs are elected (then each entry is
    divided by the weights of the models that agree there, see :class:`ElectedMean`).

    For ``register(divides_by_weight_sum=...)`` of methods whose normalisation is :func:`combine`'s.
    """
    return params["normalize"] is True and params.get("sign_method", "none") == "none"


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


def require_base(base: torch.Tensor | None, method: str) -> torch.Tensor:
    """``base``, which a task-vector method cannot do without.

    Raises:
        MethodError: no base.
    """
    if base is None:
        raise MethodError(f"method '{method}' needs a base model (set `base:` / --base)")
    return base


def base_and_one_model(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, the one model) of a method that merges one model into the base.

    Raises:
        MethodError: no base, or not exactly one model besides it.
    """
    base = require_base(base, method)
    if len(tensors) != 1:
        raise MethodError(f"{method} merges one model into the base, got {len(tensors)} models")
    return base, tensors[0]


def task_vector(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """delta = theta - base; a half-precision theta is widened to float32 first (a half subtraction would round to half),
    as :class:`~modelsoup.methods.selection.MagnitudeSource` widens it, so a method handed half precision as stored
    (``takes_half``) gets the deltas of the float32 copies."""
    if theta.dtype in (torch.float16, torch.bfloat16):
        return MagnitudeSource(theta, base).delta(0, theta.numel()).view(theta.shape)
    return theta - base


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """delta_i = theta_i - base (see :func:`task_vector`)."""
    return [task_vector(t, base) for t in tensors]


def weighted_deltas(deltas: Iterable[torch.Tensor], weights: Sequence[float], *, normalize: bool, acc: torch.Tensor) -> torch.Tensor:
    """sum_i w_i delta_i (divided by sum_i w_i if ``normalize``), added in order into ``acc`` (zeros of the deltas' shape
    and dtype). ``deltas`` may be a generator that fills one buffer for each (each is added before the next is made).

    Raises:
        MethodError: weights summing to zero while normalising.
    """
    for d, w in zip(deltas, weights):
        acc.add_(d, alpha=w)
    if normalize:
        acc /= normalizing_sum(weights)
    return acc


def add_to_base(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * merged, computed in place in ``merged`` (a fresh result of :func:`combine`)."""
    if scale != 1.0:
        merged.mul_(scale)
    return merged.add_(base)


# ---------------------------------------------------------------------------------------- sparsify


def trim_top_k_torch_order(delta: torch.Tensor, density: float, *, at_least_one: bool = False) -> torch.Tensor:
    """As :func:`trim_top_k`, but entries tied at the cut are chosen as ``torch.argsort(|delta|, descending=True)[:k]``
    chooses them (mergekit's ``magnitude``), not by index: the same recipe then keeps the same entries as mergekit."""
    mask = top_k_torch_order_mask(delta, density, at_least_one=at_least_one)
    return delta.clone() if mask is None else delta * mask.to(delta.dtype).view_as(delta)


def top_k_torch_order_mask(theta: torch.Tensor, density: float, *, at_least_one: bool = False,
                           base: torch.Tensor | None = None) -> torch.Tensor | None:
    """The flat boolean mask of the k = floor(density * numel) entries (:func:`selection.keep_count`) of largest
    |delta| that ``torch.argsort(|delta|.float(), descending=True)[:k]`` picks, delta = ``theta`` (or theta - base,
    the float32 task vector, where a base is given); None where every entry is kept."""
    n = theta.numel()
    k = selection.keep_count(density, n, at_least_one)
    return None if k >= n else sorted_window_mask(theta, 0, k, descending=True, absolute=True, base=base)


def trim_top_k(delta: torch.Tensor, density: float, *, at_least_one: bool = False) -> torch.Tensor:
    """Keep the k = floor(density * numel) largest magnitudes of ``delta`` (at least one with ``at_least_one``), zero the rest (see :class:`TopKTrim`)."""
    src = MagnitudeSource(delta)
    return TopKTrim(src, density, at_least_one=at_least_one).apply_(src.delta(0, src.n), 0).view_as(delta)


class _Trim(Protocol):
    tied_at_cut: bool

    def apply_(self, d: torch.Tensor, start: int) -> torch.Tensor: ...


class TrimmedDeltas:
    """delta_i = theta_i - base, each trimmed by its own trim (whose cuts were found first, for all models in one sweep),
    chunk by chunk: each chunk is computed and trimmed when asked for, in float32, so no task vector is held whole."""

    def __init__(self, srcs: Sequence[MagnitudeSource], trims: Sequence[_Trim], base: torch.Tensor) -> None:
        self.srcs, self.trims = list(srcs), list(trims)
        self.shape = base.shape
        self.dtype = self.srcs[0].dtype if self.srcs else torch.float32  # float32, or float64 for float64 inputs (as the cuts)
        self.wide = selection.WideBase(self.srcs)

    def __len__(self) -> int:
        return len(self.srcs)

    @property
    def tied_at_cut(self) -> bool:
        """Whether some trim keeps some entries of a magnitude at its cut and not others (their order then decides)."""
        return any(t.tied_at_cut for t in self.trims)

    def fill(self, i: int, j: int, rows: torch.Tensor) -> None:
        base = self.wide.chunk(i, j)
        for trim, src, row in zip(self.trims, self.srcs, rows):
            trim.apply_(src.delta(i, j, row, base), i)


def top_k_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float], *, at_least_one: bool = False) -> TrimmedDeltas:
    """delta_i trimmed to its k_i = floor(density_i * n) largest magnitudes (:class:`TopKTrim`), chunk by chunk."""
    srcs = [MagnitudeSource(t, base) for t in tensors]
    return TrimmedDeltas(srcs, TopKTrim.for_sources(srcs, densities, at_least_one=at_least_one), base)


def outlier_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float], gammas: Sequence[float]) -> TrimmedDeltas:
    """delta_i without its outliers and smallest magnitudes (breadcrumbs, :func:`outlier_window`; ties in index order),
    chunk by chunk."""
    srcs = [MagnitudeSource(t, base) for t in tensors]
    n = srcs[0].n if srcs else 0
    windows = [outlier_window(n, p, g) or (0, n) for p, g in zip(densities, gammas)]
    return TrimmedDeltas(srcs, RankWindow.for_sources(srcs, windows), base)


def rand(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    """``torch.rand(shape, generator=generator)`` (float32): drawn by the compiled generator where it stands in for
    torch's (:func:`kernels.draws_uniforms`: the same values, the generator left in the same state), else by torch."""
    if generator is not None and kernels.draws_uniforms(generator):
        u = torch.empty(shape, dtype=torch.float32)
        try:
            if u.device.type == "cpu":  # (a method run on a device makes its buffers there: torch draws)
                kernels.uniforms(generator, u.view(-1))
                return u
        except kernels.KernelFailed:  # the generator is as it was: a failed draw does not set its state
            pass
    return torch.rand(shape, generator=generator, dtype=torch.float32)


def bernoulli_mask(like: torch.Tensor, p: float | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A 0/1 mask shaped (and typed) like ``like``, each entry 1 with probability ``p`` (a float or a tensor of ``like``'s shape).

    Bit for bit ``torch.bernoulli(p_tensor, generator=generator)``, and it leaves the generator in the same state: that
    kernel draws one ``torch.rand`` value per entry, in order, and keeps it if below ``p`` (pinned by
    tests/test_methods.py). Drawn this way it takes a third of the time.
    """
    u = rand(like.shape, generator)
    keep = torch.lt(u, p, out=torch.empty(like.shape, dtype=torch.bool))
    return u.copy_(keep) if like.dtype == torch.float32 else keep.to(like.dtype)  # the uniforms' memory holds the mask


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: str) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), then rescale the survivors.

    ``rescale``: ``density`` divides by the keep probability (the DARE paper, peft); ``l1`` scales the
    result to the L1 norm of the original delta (mergekit's ``rescale: true``); ``none`` leaves it.
    The mask is peft's, one ``torch.bernoulli(full(density))`` per model, drawn as :func:`bernoulli_mask` draws it.
    """
    mask = bernoulli_mask(delta, density, generator)
    kept = torch.mul(delta, mask, out=mask)  # in the mask's memory: one tensor-sized buffer per model
    if rescale == "density":
        return kept.div_(density)
    if rescale == "l1":
        return _match_l1(kept, delta)
    return kept


def dare_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float | Sequence[float], generator: torch.Generator | None,
                rescale: str) -> list[torch.Tensor] | DroppedDeltas:
    """DARE's first step for every model: delta_i = theta_i - base, dropped and rescaled (:func:`drop_random`), in model order.

    With ``rescale: l1`` (which needs each dropped vector whole) the dropped deltas themselves, each delta freed once
    dropped; otherwise :class:`DroppedDeltas`, the same values a chunk at a time from masks kept as booleans.
    """
    dens = per_model(density, len(tensors), "density")
    if rescale != "l1":
        return DroppedDeltas(tensors, base, dens, generator, rescale)
    return [drop_random(task_vector(t, base), p, generator, rescale) for t, p in zip(tensors, dens)]


def ties_held(rescale: str, tie_break: str) -> float:
    """Tensor-sized float32 buffers that TIES' prepared form holds per model: nothing tensor-sized where its trims stream;
    with ``tie_break: torch_sort`` a boolean mask (a quarter) and, while it is found, the sort's int32 keys and places (two,
    counted for every model though they are made one model at a time); with ``rescale: l1`` (its whole path) each task
    vector and its trimmed copy whole, and a trim's buffers."""
    if rescale == "l1":
        return 4.0
    return 2.25 if tie_break == "torch_sort" else 0.0


def dare_held(rescale: str) -> float:
    """Tensor-sized float32 buffers that DARE's prepared deltas (:func:`dare_deltas`) hold per model: a boolean mask
    (a quarter), or with ``rescale: l1`` the dropped delta itself, and the delta it is made from while it is made."""
    return 2.0 if rescale == "l1" else 0.25


class MaskedDeltas:
    """Task vectors times 0/1 masks (each divided by its own number, or not), as :class:`DeltaChunks`.

    The masks are kept as booleans: one byte an entry instead of the four of a masked float32 delta. Each chunk of
    delta_i is made when asked for (half-precision inputs widened first, see
    :class:`~modelsoup.methods.selection.MagnitudeSource`), multiplied by its mask as a float 0/1 chunk and divided by
    its divisor: elementwise, the operations ``delta * mask`` (then ``/ divisor``) runs on the whole tensor, so the bits
    are the same. A mask of None keeps every entry (no multiply).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor, masks: Sequence[torch.Tensor | None],
                 divisors: Sequence[float | None] | None = None) -> None:
        self.srcs = [selection.MagnitudeSource(t, base) for t in tensors]
        self.shape = base.shape
        self.dtype = self.srcs[0].dtype if self.srcs else torch.float32  # float32, or float64 for float64 inputs
        self.keep = [None if m is None else m.reshape(-1) for m in masks]
        self.divisors = list(divisors) if divisors is not None else [None] * len(self.srcs)
        self._mask = torch.empty(max(1, min(self.srcs[0].n, selection.CHUNK)), dtype=self.dtype)
        self.wide = selection.WideBase(self.srcs)

    def __len__(self) -> int:
        return len(self.srcs)

    def fill(self, i: int, j: int, rows: torch.Tensor) -> None:
        base = self.wide.chunk(i, j)
        for src, keep, divisor, row in zip(self.srcs, self.keep, self.divisors, rows):
            kept = src.delta(i, j, row, base)
            if keep is not None:
                kept.mul_(self._mask[: j - i].copy_(keep[i:j]))
            if divisor is not None:
                kept.div_(divisor)


class DroppedDeltas(MaskedDeltas):
    """DARE's dropped and rescaled task vectors as :class:`DeltaChunks`: what :func:`drop_random` gives, bit for bit.

    The masks are drawn first, model after model from the one generator, a chunk of uniforms at a time (``torch.rand(a)``
    then ``torch.rand(b)`` draws what ``torch.rand(a + b)`` draws; pinned by tests/test_methods.py), and kept as
    booleans (:class:`MaskedDeltas`); ``rescale: density`` divides each survivor by density_i.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float], generator: torch.Generator | None,
                 rescale: str) -> None:
        if rescale not in ("density", "none"):
            raise ValueError(f"DroppedDeltas rescales by density or not at all, not {rescale!r}")
        n = base.numel()
        uniforms: torch.Tensor | None = None  # torch's draws, a chunk at a time (made where the kernel does not draw)
        masks = []
        for p in densities:
            keep = torch.empty(n, dtype=torch.bool)
            if generator is not None and keep.device.type == "cpu" and kernels.draws_uniforms(generator):
                try:
                    masks.append(kernels.uniforms(generator, None, p, keep))  # the whole mask in one compiled pass
                    continue
                except kernels.KernelFailed:  # the generator is as it was: a failed draw does not set its state
                    pass
            if uniforms is None:
                uniforms = torch.empty(max(1, min(n, selection.CHUNK)), dtype=torch.float32)
            for i in range(0, n, selection.CHUNK):
                j = min(i + selection.CHUNK, n)
                torch.lt(torch.rand(j - i, generator=generator, out=uniforms[: j - i]), p, out=keep[i:j])
            masks.append(keep)
        super().__init__(tensors, base, masks, list(densities) if rescale == "density" else None)


# MagPrune ranks and draws a block of rows of dim 0 (contiguous, so its uniforms come in the whole tensor's order) of about
# this many entries at a time: no tensor-sized sort indices or uniforms.
RANK_BLOCK = 1 << 16


def magnitude_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float, method: str = "della") -> torch.Tensor:
    """DELLA's MagPrune probabilities: density - epsilon for the smallest magnitude of each row up to density + epsilon for the largest.

    Ranks run along dim 1 (a 1-D tensor is one row); ties are ranked in index order. A row of one entry
    has the middle rank (probability ``density``; mergekit divides 0 by 0 there and fails); a 0-d tensor is one such row.

    Raises:
        MethodError: density -/+ epsilon outside (0, 1).
    """
    _check_magprune(density, epsilon, method)
    rows = _rows(delta)
    out = torch.empty(rows.shape, dtype=torch.float32)
    for r, block in _row_blocks(rows):
        out[r : r + len(block)] = _keep_probabilities(block, density, epsilon)
    return out.reshape(delta.shape)


def _check_magprune(density: float, epsilon: float, method: str) -> None:
    if not (0 < density - epsilon and density + epsilon < 1):
        raise MethodError(f"{method}: density {density:g} -/+ epsilon {epsilon:g} must lie inside (0, 1); lower epsilon")


def _rows(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(1, -1) if delta.dim() < 2 else delta.contiguous()


def _row_blocks(rows: torch.Tensor) -> Iterable[tuple[int, torch.Tensor]]:
    per = max(1, RANK_BLOCK // max(1, math.prod(rows.shape[1:])))  # (a tensor may have no rows)
    return ((r, rows[r : r + per]) for r in range(0, rows.shape[0], per))


def _keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    n = rows.shape[1]
    return _probabilities_of_ranks(_ranks(rows) if n > 1 else None, n, density, epsilon, rows.shape)


def _probabilities_of_ranks(ranks: torch.Tensor | None, n: int, density: float, epsilon: float, shape: Sequence[int]) -> torch.Tensor:
    """MagPrune's keep probabilities of float32 ranks in rows of n (None where n <= 1: the middle rank, for ``shape``)."""
    rank_norm = ranks / (n - 1) if ranks is not None else torch.full(tuple(shape), 0.5)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def _ranks(rows: torch.Tensor) -> torch.Tensor:
    """The float32 rank of each entry of |rows| along dim 1, ties in index order: the inverse of ``argsort(stable=True)``
    (:func:`_int_ranks`, converted)."""
    return _int_ranks(rows).to(torch.float32)


def _int_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The rank of each entry of |rows| along dim 1, ties in index order, as integers (int16 for rows shorter than 2^15,
    else int64).

    Float32 rows (the usual case) sort one integer key per entry, the magnitude's bits above the column index: keys are
    unique and order as (magnitude, index) do (non-negative floats order as their bits; NaN's bits sort after +Inf, as
    torch sorts NaN last), so numpy's unstable sort of the keys gives the stable order, and their low bits the columns:
    about 3x faster than torch's stable argsort (rows of 2048: 20 ms against 65 ms per 1M entries). Where few entries
    have bits below the column field (task vectors of half-precision models: 0.03-0.1% of a bfloat16 Llama's) the keys
    are int32, 2x faster to sort (:func:`_order_int32`). The inverse permutation is torch's ``scatter_``.
    """
    n = rows.shape[1]
    kind = torch.int16 if n < 1 << 15 else torch.int64
    order = _stable_order(rows)
    positions = torch.arange(n, dtype=kind).view(1, n, *[1] * (rows.dim() - 2)).expand(order.shape)
    return torch.empty(order.shape, dtype=kind).scatter_(1, order, positions)  # the inverse permutation, without a second sort


def _stable_order(rows: torch.Tensor) -> torch.Tensor:
    """The columns of each row of |rows| (dim 1) in ascending (magnitude, column) order, int64: ``argsort(stable=True)``,
    by sorted integer keys for float32 rows (see :func:`_int_ranks`)."""
    n = rows.shape[1]
    if rows.dim() != 2 or rows.dtype != torch.float32 or n > 1 << 32:
        return rows.abs().argsort(dim=1, stable=True)
    shift = max(1, (n - 1).bit_length())
    bits = rows.abs().numpy().view(np.int32)
    if np.count_nonzero(np.bitwise_and(bits, (1 << shift) - 1)) * 64 <= bits.size:
        return _order_int32(bits, shift)
    return _order_int64(bits, shift)


def _order_int64(bits: np.ndarray, shift: int) -> torch.Tensor:
    """The columns of each row of non-negative float bits in ascending (bits, column) order: one int64 key per entry,
    bits << shift | column, sorted (``shift``: the columns' bit length)."""
    keys = bits.astype(np.int64)
    np.left_shift(keys, shift, out=keys)
    np.bitwise_or(keys, np.arange(bits.shape[1], dtype=np.int64), out=keys)
    keys.sort(axis=1)
    np.bitwise_and(keys, (1 << shift) - 1, out=keys)  # the column at each rank
    return torch.from_numpy(keys)


def _order_int32(bits: np.ndarray, shift: int) -> torch.Tensor:
    """:func:`_order_int64`'s order, sorting int32 keys: the bits with their low ``shift`` replaced by the column.

    That sorts by (high bits, column). A row whose full bits come out non-decreasing in that order is in (bits, column)
    order: entries of equal bits have equal high bits, so their columns ascend. The rows that are not (entries whose
    high bits tie and low bits differ, in the wrong column order) are sorted again by :func:`_order_int64`.
    """
    low = (1 << shift) - 1
    keys = np.bitwise_and(bits, ~low)
    np.bitwise_or(keys, np.arange(bits.shape[1], dtype=np.int32), out=keys)
    keys.sort(axis=1)
    np.bitwise_and(keys, low, out=keys)
    order = torch.from_numpy(keys).to(torch.int64)
    full = torch.gather(torch.from_numpy(bits), 1, order)
    wrong = torch.nonzero(torch.lt(full[:, 1:], full[:, :-1]).any(dim=1)).view(-1)
    if wrong.numel():
        order[wrong] = _order_int64(bits[wrong.numpy()], shift)
    return order


def magprune_deltas(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float | Sequence[float], epsilon: float | Sequence[float],
    generator: torch.Generator | None, rescale: str, method: str,
) -> list[torch.Tensor]:
    """DELLA's first step for every model: delta_i = theta_i - base, MagPruned (:func:`drop_by_magnitude`) and rescaled.

    Half-precision inputs may be given as stored: each block of rows is widened to float32 before it is subtracted, so
    the result has the bits of the float32 copies' (and no whole delta, nor a float32 copy of an input, is made, except
    for ``rescale: l1``, whose norm is the whole delta's).
    """
    n = len(tensors)
    return [_drop_by_magnitude(_DeltaRows(t, base), p, e, generator, rescale, method)
            for t, p, e in zip(tensors, per_model(density, n, "density"), per_model(epsilon, n, "epsilon"))]


class _DeltaRows:
    """theta - base (or a delta, theta, as given), as :func:`_rows` lays a delta out, a block of rows at a time."""

    def __init__(self, theta: torch.Tensor, base: torch.Tensor | None = None) -> None:
        self.theta, self.base = _rows(theta), None if base is None else _rows(base)
        # a given delta keeps its dtype; a difference of half-precision tensors is taken in float32
        widest = theta.dtype if base is None else torch.promote_types(theta.dtype, base.dtype)
        self.dtype = torch.float32 if base is not None and widest in (torch.float16, torch.bfloat16) else widest
        self.shape = theta.shape

    def block(self, r: int, stop: int) -> torch.Tensor:
        """Rows [r, stop) of the delta, a fresh tensor of ``dtype``."""
        x = self.theta[r:stop]
        if self.base is None:
            return x.to(self.dtype, copy=True)
        if x.dtype != self.dtype:  # widened exactly, then subtracted: a half-precision subtraction would round to half
            return x.to(self.dtype).sub_(self.base[r:stop])
        return x - self.base[r:stop]

    def whole(self) -> torch.Tensor:
        return self.block(0, self.theta.shape[0]).reshape(self.shape)

    def flat(self, i: int, j: int, out: torch.Tensor) -> torch.Tensor:
        """Entries [i, j) of the flattened delta (rows are contiguous: the flat order is theta's), by :meth:`block`'s
        elementwise steps, into ``out`` (of ``dtype``)."""
        x = self.theta.reshape(-1)[i:j]
        if self.base is None:
            return out.copy_(x)
        b = self.base.reshape(-1)[i:j]
        return out.copy_(x).sub_(b) if x.dtype != self.dtype else torch.sub(x, b, out=out)


def della_held(rescale: str, shape: tuple[int, ...]) -> float:
    """Tensor-sized float32 buffers that :class:`MagPrunedDeltas` holds per model: its int16 codes (a half), or, where it
    holds the result whole (``rescale: l1``, rows of 2^15 entries or more), that and the delta it is made from."""
    return 2.0 if _held_whole(rescale, shape[1] if len(shape) >= 2 else math.prod(shape)) else 0.5


def _held_whole(rescale: str, cols: int) -> bool:
    """Whether :class:`MagPrunedDeltas` holds a model's result whole (float32) rather than as codes, for rows of ``cols``."""
    return rescale == "l1" or cols >= 1 << 15


class MagPrunedDeltas:
    """DELLA's MagPruned and rescaled task vectors, :func:`magprune_deltas` bit for bit, as :class:`DeltaChunks` that hold
    an int16 code an entry instead of its float32 value: half the memory.

    The masks are drawn as :func:`magprune_deltas` draws them (model after model, a block of rows at a time, in the whole
    tensor's order); an entry's code is its rank in its row where it was kept, the row length where it was dropped. A
    chunk is rebuilt from the inputs: the delta (:meth:`_DeltaRows.flat`) divided by its keep probability, looked up from
    the code in a table of every rank's made by the same float32 steps (:func:`_probabilities_of_ranks`), +inf for a
    dropped entry: the bits of the whole path's (delta * mask) / p, a dropped zero's sign included (``rescale: none``:
    times the mask, code != row length). Elementwise, so any chunking gives them. Held whole as before (float32) where
    that is needed or no smaller: ``rescale: l1`` (its norms are the whole result's) and rows of 2^15 entries or more.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float | Sequence[float],
                 epsilon: float | Sequence[float], generator: torch.Generator | None, rescale: str, method: str) -> None:
        n = len(tensors)
        self.shape = base.shape
        self.rescale = rescale
        self.deltas = [_DeltaRows(t, base) for t in tensors]
        self.codes: list[tuple[torch.Tensor, int, torch.Tensor] | None] = []  # (flat codes, row length, probability table)
        self.held: list[torch.Tensor | None] = []  # results held whole
        self.dtypes: list[torch.dtype] = []
        for delta, p, e in zip(self.deltas, per_model(density, n, "density"), per_model(epsilon, n, "epsilon")):
            cols = delta.theta.shape[1]
            if p < 1 and _held_whole(rescale, cols):
                held = _drop_by_magnitude(delta, p, e, generator, rescale, method)
                self.held.append(held)
                self.codes.append(None)
                self.dtypes.append(held.dtype)
                continue
            self.held.append(None)
            self.codes.append(self._draw(delta, p, e, generator, method, cols) if p < 1 else None)  # density 1: the delta whole
            self.dtypes.append(torch.promote_types(delta.dtype, torch.float32) if p < 1 and rescale == "density" else delta.dtype)
        self.dtype = self.dtypes[0] if self.dtypes else torch.float32
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @staticmethod
    def _draw(delta: _DeltaRows, density: float, epsilon: float, generator: torch.Generator | None, method: str,
              cols: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One model's codes, drawn block by block as :func:`_drop_by_magnitude` draws its masks, and its table of keep
        probabilities by rank (+inf at the row length: the dropped)."""
        _check_magprune(density, epsilon, method)
        # the ranks (float32 integers) and their probabilities, by the steps below; a dropped entry divides by +inf, which
        # gives the zero of (delta * 0) / p, its sign the delta's (and NaN for an infinite delta, as inf * 0 / p)
        table = _probabilities_of_ranks(torch.arange(cols).to(torch.float32) if cols > 1 else None, cols, density, epsilon, (max(cols, 1),))
        coded = (cols, torch.cat([table[:cols], torch.tensor([math.inf])]))
        codes = torch.empty(delta.theta.shape, dtype=torch.int16)
        rows = delta.theta.dim() == 2 and 1 < cols < 1 << 15 and codes.device.type == "cpu" and table.device.type == "cpu"
        if rows and delta.base is not None and delta.theta.dtype == delta.base.dtype and kernels.takes(delta.theta, delta.base) \
                and kernels.draws_uniforms(generator):
            try:  # the keys, order, ranks, draws and codes below, compiled (the rows sorted as there)
                kernels.magprune_codes(delta.theta, delta.base, table, generator, codes)
                return (codes.reshape(-1), *coded)
            except kernels.KernelFailed:  # on torch (the generator is as it was)
                pass
        for r, shape_block in _row_blocks(delta.theta):
            stop = r + len(shape_block)
            block = delta.block(r, stop)
            ranks = _int_ranks(block).to(torch.float32) if cols > 1 else None  # a row of one entry has rank 0
            keep = bernoulli_mask(block, _probabilities_of_ranks(ranks, cols, density, epsilon, block.shape), generator)
            # the rank where kept, cols where dropped: keep * (rank - cols) + cols, exact in float32 (integers below 2^15),
            # 15x faster than a masked fill
            codes[r:stop] = (ranks if ranks is not None else torch.zeros(block.shape)).sub_(cols).mul_(keep).add_(cols)
        return (codes.reshape(-1), *coded)

    def __len__(self) -> int:
        return len(self.deltas)

    def _buf(self, role: str, dtype: torch.dtype, m: int) -> torch.Tensor:
        buf = self._bufs.get((role, dtype))
        if buf is None or buf.numel() < m:
            buf = self._bufs[(role, dtype)] = torch.empty(max(m, min(math.prod(self.shape), selection.CHUNK)), dtype=dtype)
        return buf[:m]

    def fill(self, i: int, j: int, rows: torch.Tensor) -> None:
        m = j - i
        for delta, held, codes, dtype, row in zip(self.deltas, self.held, self.codes, self.dtypes, rows):
            if held is not None:
                row.copy_(held.reshape(-1)[i:j])
                continue
            direct = row.dtype == delta.dtype == dtype
            kept = delta.flat(i, j, row if direct else self._buf("delta", delta.dtype, m))
            if codes is not None:
                code, cols, table = codes
                c = code[i:j]
                if self.rescale == "density":  # (delta * mask) / p as delta / table[code]: inf for the dropped
                    divisor = torch.index_select(table, 0, self._buf("index", torch.int32, m).copy_(c), out=self._buf("probs", table.dtype, m))
                    if not direct:
                        row.copy_(kept / divisor)
                        continue
                    kept.div_(divisor)
                else:
                    kept.mul_(torch.ne(c, cols, out=self._buf("mask", delta.dtype, m)))  # delta * mask
            if not direct:
                row.copy_(kept)


def drop_by_magnitude(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None, rescale: str, method: str = "della"
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its rank's probability (:func:`magnitude_keep_probabilities`), then rescale.

    ``rescale``: ``density`` divides each survivor by its own keep probability (the DELLA paper); ``l1`` scales
    the result to the L1 norm of the original delta (mergekit's ``rescale: true``); ``none`` leaves it. At
    density 1 the delta is returned whole (mergekit's convention).

    Computed a block of rows at a time: ranks, uniforms (:func:`bernoulli_mask`, drawn in the whole tensor's order, so
    the masks are those of one draw for the whole tensor) and the division are elementwise per block, so the result has
    the bits of the same steps on the whole tensor.
    """
    return _drop_by_magnitude(_DeltaRows(delta), density, epsilon, generator, rescale, method)


def _drop_by_magnitude(delta: _DeltaRows, density: float, epsilon: float, generator: torch.Generator | None, rescale: str,
                       method: str) -> torch.Tensor:
    if density >= 1:
        return delta.whole()
    _check_magprune(density, epsilon, method)
    original = delta.whole() if rescale == "l1" else None  # the L1 norm is the whole delta's sum
    rows = _rows(original) if original is not None else None
    out = torch.empty(delta.theta.shape, dtype=torch.promote_types(delta.dtype, torch.float32) if rescale == "density" else delta.dtype)
    for r, shape_block in _row_blocks(delta.theta):
        stop = r + len(shape_block)
        block = rows[r:stop] if rows is not None else delta.block(r, stop)
        probs = _keep_probabilities(block, density, epsilon)
        kept = block * bernoulli_mask(block, probs, generator)
        out[r:stop] = kept / probs if rescale == "density" else kept
    out = out.reshape(delta.shape)
    return _match_l1(out, original) if original is not None else out


def rescale_l1(kept: torch.Tensor, original: torch.Tensor, rescale: str) -> torch.Tensor:
    """``kept`` scaled to the L1 norm of ``original`` (``rescale: l1``, mergekit's ``rescale: true``), or as it is (``none``)."""
    return _match_l1(kept, original) if rescale == "l1" else kept


def _match_l1(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    new = abs_sum64(kept)  # float64 sums with the same bits on any thread count (a whole-tensor torch sum is split by threads)
    if new <= 1e-7:
        return kept
    return kept * (abs_sum64(original) / new)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float, tie_break: str = "index") -> torch.Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction of magnitudes and the smallest, keeping ``density``
    (see :func:`outlier_window`). At density 1 the delta is returned whole (mergekit's convention)."""
    window = outlier_window(delta.numel(), density, gamma)
    if window is None:
        return delta.clone()
    if tie_break == "index":
        src = MagnitudeSource(delta)
        return RankWindow(src, *window).apply_(src.delta(0, src.n), 0).view_as(delta)
    return delta * sorted_window_mask(delta.abs(), *window).view_as(delta)


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """The places [first, stop) in the ascending order of a task vector's n magnitudes that breadcrumbs keeps; None at
    density 1 (all of them).

    n_top = floor(gamma n), n_keep = floor(density n), n_bottom = n - n_keep - n_top (if negative, fewer top entries
    are dropped). Ties at the cuts are taken in index order (:class:`~modelsoup.methods.selection.RankWindow`), or
    (``tie_break: torch_sort``) in the order torch.sort gives them (:func:`sorted_window_mask`, mergekit's
    magnitude_outliers).
    """
    if density >= 1:
        return None
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = n - n_keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n - n_top


def sorted_window_mask(values: torch.Tensor, first: int, stop: int, *, descending: bool = False, absolute: bool = False,
                       base: torch.Tensor | None = None) -> torch.Tensor:
    """The flat boolean mask of the entries at places [first, stop) of ``torch.sort(m.reshape(-1).float(), descending)``
    (its order of ties), of magnitudes m: ``values``, |values| where ``absolute``, or |values - base| (the task vector's,
    :func:`task_vector`) where a base is given. Found without the whole sort where the kernel stands in for torch's
    (:func:`kernels.torch_order_window`), else by sorting."""
    as_given = kernels.takes(values, base) if base is not None else values.dtype == torch.float32  # what the kernel reads
    magnitude = None if as_given else _sort_magnitudes(values, base, absolute)
    if values.device.type == "cpu":
        mask = (kernels.torch_order_window(values.reshape(-1), first, stop, descending=descending, absolute=absolute, base=base)
                if magnitude is None else kernels.torch_order_window(magnitude, first, stop, descending=descending))
        if mask is not None:
            return mask
    if magnitude is None:
        magnitude = _sort_magnitudes(values, base, absolute)
    order = torch.sort(magnitude, descending=descending).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    keep[order[first:stop]] = True
    return keep


def _sort_magnitudes(values: torch.Tensor, base: torch.Tensor | None, absolute: bool) -> torch.Tensor:
    """:func:`sorted_window_mask`'s magnitudes, flat float32."""
    m = task_vector(values, base).abs_() if base is not None else values.abs() if absolute else values
    return m.reshape(-1).float()


# ----------------------------------------------------------------------------------------- combine


def linear_combination(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], base: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """base + sum_i c_i (theta_i - base) (sum_i c_i theta_i without a base) of flat tensors of one size, in ``dtype``
    (float32, or float64 for float64 inputs), term by term in model order into a fresh tensor; half-precision inputs
    widened exactly first (into this thread's buffer), each difference taken in ``dtype``. Terms with c_i = 0 are left out
    (they add nothing, and 0 * -x would turn a +0 sum into -0). The results of the sphere means (multislerp, karcher),
    given the coefficients their passes of sums give."""
    n, device = tensors[0].numel(), tensors[0].device
    if _fused_combination(tensors, coefficients, base, dtype):
        try:
            return kernels.combination(tensors, coefficients, base, torch.empty(n, dtype=dtype, device=device))
        except kernels.KernelFailed:  # on torch, as below
            pass
    out = torch.zeros(n, dtype=dtype, device=device)
    work = scratch(n, device, -1, dtype)
    flat_base = base.reshape(-1) if base is not None else None
    for t, c in zip(tensors, coefficients):
        if c == 0:
            continue
        v = t.reshape(-1)
        if v.dtype != dtype:
            v = work.copy_(v)
        if flat_base is not None:
            v = torch.sub(v, flat_base, out=work)
        out.add_(v, alpha=c)
    return out.add_(flat_base) if flat_base is not None else out


def _fused_combination(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], base: torch.Tensor | None,
                       dtype: torch.dtype) -> bool:
    """Whether :func:`linear_combination` runs on the compiled kernel (:func:`kernels.combination`): a float32 result,
    inputs of one dtype the kernels take (a base of either), by default one of them bfloat16 (:func:`kernels.enabled`),
    and coefficients torch would take as float32 alphas (finite, within float32's range: torch refuses larger ones) that
    are zero there only where they are zero (one that rounds to 0 is still a term on torch: inf * 0 is NaN)."""
    stored = [*tensors, *([base] if base is not None else [])]
    return (dtype == torch.float32 and len({t.dtype for t in tensors}) == 1 and len(coefficients) == len(tensors)
            and len({t.numel() for t in stored}) == 1 and kernels.takes(*stored)
            and all(math.isfinite(c) and abs(c) <= _FLOAT32_MAX and (c == 0) == (np.float32(c) == 0) for c in coefficients)
            and kernels.enabled(*stored))


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class DeltaChunks(Protocol):
    """Task vectors of one shape, handed out a flat chunk at a time, so that none need exist whole."""

    shape: torch.Size
    dtype: torch.dtype

    def __len__(self) -> int: ...

    def fill(self, i: int, j: int, rows: torch.Tensor) -> None:
        """Write entries [i, j) of each flattened task vector into its row of ``rows``."""


class _Stacked:
    """Whole task vectors as :class:`DeltaChunks`."""

    def __init__(self, deltas: Sequence[torch.Tensor]) -> None:
        self.flat = [d.reshape(-1) for d in deltas]
        self.shape, self.dtype = deltas[0].shape, deltas[0].dtype

    def __len__(self) -> int:
        return len(self.flat)

    def fill(self, i: int, j: int, rows: torch.Tensor) -> None:
        torch.stack([d[i:j] for d in self.flat], out=rows)


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
    deltas: Sequence[torch.Tensor] | DeltaChunks,
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
    number of agreeing models (``count``, peft). Sign election runs chunk by chunk (:class:`ElectedMean`),
    so task vectors given as :class:`DeltaChunks` are never held whole.

    Raises:
        MethodError: weights summing to zero while normalising without sign election.
    """
    if sign_method == "none":
        whole = deltas if isinstance(deltas, Sequence) else _whole(deltas)
        return weighted_deltas(whole, weights, normalize=normalize, acc=torch.zeros_like(whole[0]))
    chunks = _Stacked(deltas) if isinstance(deltas, Sequence) else deltas
    n = math.prod(chunks.shape)
    out = torch.empty(n, dtype=chunks.dtype)
    size = min(n, selection.CHUNK)
    elect = ElectedMean(weights, size=size, sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by, dtype=out.dtype)
    rows = torch.empty(len(chunks), size, dtype=out.dtype)
    for i in range(0, n, selection.CHUNK):
        j = min(i + selection.CHUNK, n)
        chunks.fill(i, j, rows[:, : j - i])
        elect(rows[:, : j - i], out[i:j])
    return out.view(chunks.shape)


class MergedChunks:
    """base + scale * combine(deltas), a flat chunk at a time: what :func:`combine` and :func:`add_to_base` compute,
    by the same elementwise operations, so the engine can stream the result (:meth:`chunk`) instead of holding it
    whole (:meth:`whole`). The chunk returned lives in a buffer reused by the next call.

    Args:
        deltas: the (sparsified) task vectors, whole or as :class:`DeltaChunks`.
        weights, sign_method, sign_from, normalize, divide_by: as :func:`combine`.
        base, scale: as :func:`add_to_base`.
    """

    def __init__(self, deltas: Sequence[torch.Tensor] | DeltaChunks, weights: Sequence[float], base: torch.Tensor, scale: float, *,
                 sign_method: str = "none", sign_from: str = "weighted", normalize: bool = False, divide_by: str = "weight_sum") -> None:
        self.deltas = _Stacked(deltas) if isinstance(deltas, Sequence) else deltas
        self.shape, self.base, self.scale, self.weights = base.shape, base.reshape(-1), scale, list(weights)
        self.n = math.prod(self.shape)
        size = max(1, min(self.n, selection.CHUNK))
        dtype = self.deltas.dtype
        self.divisor = normalizing_sum(weights) if sign_method == "none" and normalize else None  # refused here, as combine refuses it
        self.elect = None if sign_method == "none" else ElectedMean(weights, size=size, sign_method=sign_method, sign_from=sign_from,
                                                                   normalize=normalize, divide_by=divide_by, dtype=dtype)
        self.rows = torch.empty(len(self.deltas), size, dtype=dtype)
        self.out = torch.empty(size, dtype=dtype)
        self.fused = _fused_merge(self.deltas, self.elect, self.weights, self.base, scale, self.divisor, dtype)

    def chunk(self, i: int, j: int) -> torch.Tensor:
        """Entries [i, j) of the flat result (at most ``selection.CHUNK`` of them)."""
        if self.fused is not None:  # the same operations, compiled and fused
            try:
                return self.fused(i, j, self.rows, self.out[: j - i], self.deltas.fill)
            except kernels.KernelFailed:
                self.fused = None  # this chunk and the rest on torch (the kernel's partial writes are all overwritten)
        rows, out = self.rows[:, : j - i], self.out[: j - i]
        self.deltas.fill(i, j, rows)
        if self.elect is not None:
            self.elect(rows, out)
        else:  # combine's plain weighted sum
            out.zero_()
            for d, w in zip(rows, self.weights):
                out.add_(d, alpha=w)
            if self.divisor is not None:
                out /= self.divisor
        if self.scale != 1.0:
            out.mul_(self.scale)
        return out.add_(self.base[i:j])

    def whole(self) -> torch.Tensor:
        out = torch.empty(self.n, dtype=self.deltas.dtype)
        for i in range(0, self.n, selection.CHUNK):
            j = min(i + selection.CHUNK, self.n)
            out[i:j] = self.chunk(i, j)
        return out.view(self.shape)


def _fused_merge(deltas: DeltaChunks, elect: ElectedMean | None, weights: Sequence[float], base: torch.Tensor, scale: float,
                 divisor: float | None, dtype: torch.dtype) -> kernels.FusedMerge | None:
    """The compiled kernel for a :class:`MergedChunks`, or None where it does not apply (no numba, turned off, a device,
    float64 or float16 tensor): the torch path then runs. Trimmed deltas of models of one dtype are taken and trimmed in
    the kernel; other deltas (random drops, models of several dtypes) are filled by torch first."""
    if dtype != torch.float32 or not kernels.takes(base) or not kernels.enabled(base):
        return None
    models = len(deltas)
    thetas = trims = bounds = masks = divisors = None
    if isinstance(deltas, MaskedDeltas):
        tensors = [s.theta for s in deltas.srcs]
        if (all(s.base is not None and selection.same_view(s.base, base) for s in deltas.srcs) and kernels.takes(*tensors)
                and len({t.dtype for t in tensors}) == 1 and all(m is None or kernels.takes_mask(m) for m in deltas.keep)):
            thetas, masks, divisors = tensors, deltas.keep, deltas.divisors
    elif isinstance(deltas, TrimmedDeltas) and deltas.trims and all(isinstance(t, (TopKTrim, RankWindow)) for t in deltas.trims):
        tensors = [s.theta for s in deltas.srcs]
        if (all(s.base is not None and selection.same_view(s.base, base) for s in deltas.srcs) and kernels.takes(*tensors)
                and len({t.dtype for t in tensors}) == 1):
            thetas = tensors
            codes = [t.kernel_codes() for t in deltas.trims]
            trims = np.array([c for c, _ in codes], np.int64).reshape(-1, 5)
            bounds = np.array([b for _, b in codes], np.float32).reshape(-1, 6)
    if elect is None:  # combine's plain weighted sum: every model, then the division by the weights' sum
        voters = list(range(models))
        alphas = np.array([(0.0, w, 0.0) for w in weights], np.float64).reshape(-1, 3)
        flipped = np.zeros(models, np.bool_)
        flags = np.array([0, 0, divisor is not None, 0, scale != 1.0], np.int64)
    else:
        voters = [i for i, _ in elect.voters]
        alphas = np.array([(va, w, da) for (_, w), va, da in zip(elect.voters, elect.vote_alpha, elect.divisor_alpha)],
                          np.float64).reshape(-1, 3)
        flipped = np.array([i in elect.flipped for i in voters], np.bool_)
        mode = 0 if elect.divisor_is_zero_or_large else 1 if elect.floor_divisor else 2
        flags = np.array([1, int(elect.count_signs), int(elect.normalize), mode, scale != 1.0], np.int64)
    with np.errstate(over="ignore"):
        scalars = np.array([DIVISOR_FLOOR, scale, divisor if divisor is not None else 1.0], np.float32)
        alphas = alphas.astype(np.float32)  # as torch takes a Python float for a float32 tensor
        divisors32 = None if divisors is None else np.array([1.0 if d is None else d for d in divisors], np.float64).astype(np.float32)
        if not (np.isfinite(alphas).all() and np.isfinite(scalars).all() and (divisors32 is None or np.isfinite(divisors32).all())):
            return None  # a weight or divisor beyond float32's range: torch refuses it (a float32 scalar cannot hold it)
    return kernels.FusedMerge(base=base, thetas=thetas, trims=trims, lambdas=bounds, voters=voters, alphas=alphas, flipped=flipped,
                              flags=flags, scalars=scalars, models=models, masks=masks, divisors=divisors32,
                              divided=None if divisors is None else [d is not None for d in divisors])


def _whole(deltas: DeltaChunks) -> list[torch.Tensor]:
    rows = torch.empty(len(deltas), math.prod(deltas.shape), dtype=deltas.dtype)
    deltas.fill(0, rows.shape[1], rows)
    return [r.view(deltas.shape) for r in rows]

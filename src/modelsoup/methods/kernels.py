"""Compiled, fused chunk kernels for the TIES family's merges (ties, dare, breadcrumbs, della) and the sphere methods'
passes (slerp, nuslerp, multislerp, karcher), where numba is installed.

Four steps run here: the threshold sweep of :func:`selection.kth_largest_magnitudes` (magnitudes, counts and the
bracket's entries of each chunk: 0.23 against 0.56 ns a magnitude for bfloat16), the merge of each chunk; and the
sphere methods' row sums (:func:`pair_sums`: every pair's products of a slice in one pass, each row summed in the
order of torch's own CPU kernel, so the sums are torch's bit for bit) and their linear combination (:func:`combination`).
And DARE's and DELLA's uniforms (:func:`uniforms`): torch's CPU generator is MT19937, ``torch.rand`` takes the low 24
bits of one output per entry, serially (2.3-2.6 ns an entry); compiled, the same draws take 0.24 ns, read from and
written back to the generator's state, under its lock (threads may share a generator); DELLA's MagPrune codes of a
task vector (:func:`magprune_codes`: the sort keys of a block of rows in one pass, numpy's sort of each row, the order
checked and the codes drawn in two more). These run
for models of every dtype (the draws cost the same on each), the other kernels by default where models are bfloat16.
Two once-per-process checks keep a kernel off where it would not be torch's: the draws against ``torch.rand``, the row
sums against torch's (whose summation order they copy, and a future torch could change).
:class:`ops.MergedChunks` computes a chunk of ``base + scale * combine(deltas)`` as ~25 torch passes over chunk-sized
buffers (delta, trim, vote, sign, agreement, products, sums, divisor, division, base); each pass is fast, but they
add up to ~4.5 ns an output entry for three bfloat16 models. Here the same operations run as one compiled loop
nest over L1-sized blocks: ~2 ns an entry. The callers (:mod:`.ops`, :mod:`.selection`) decide where a kernel
applies and hand it plain arrays; this module knows nothing of their classes. Optional: without numba (``pip install 'modelsoup[fast]'``), or with
``MODELSOUP_KERNELS=torch`` in the environment, the torch path runs; by default the kernels run where models are
stored in bfloat16 (the base, and as a rule the models with it; see :func:`enabled`).

The bits are the torch path's, operation for operation, and tests compare the two on every option:
  * every step is the same IEEE float32 operation on the same operands, in the same order (model by model);
  * torch's ``add_(x, alpha=w)`` is a fused multiply-add on the CPU (one rounding): here ``llvm.fma``, never a
    separate multiply and add; numba's defaults do not reassociate or contract (no fastmath);
  * half precision is widened exactly (a bfloat16's bits shifted into a float32's), as torch widens it;
  * comparisons are IEEE's (false for NaN), as torch's, and ``torch.sign`` of NaN is 0;
  * a float32 row sum adds its entries in the order torch's AVX2 kernel does (8 lanes, 4 vectors, a 16-step cascade:
    ``_numba_kernels._row_total``; its AVX-512 build sums these rows in the same order, checked).

Compiled code is cached on disk by numba (next to this module, or in numba's user cache), once per model count
and input dtypes: the first merge of a kind pays ~2 s of compiling, later processes ~0.3 s of loading.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

DISABLE_ENV = "MODELSOUP_KERNELS"  # "torch": always the torch path; "all": float32 models too (see enabled)

_lock = threading.Lock()
_compiled: Any = None  # the module of kernels once loaded; False where numba is missing or they could not be built
_warming: threading.Thread | None = None
_warming_lock = threading.Lock()  # not _lock, which the loading holds
_broken = False  # a kernel failed in this process (see KernelFailed)


def enabled(*stored: torch.Tensor | None) -> bool:
    """Whether the kernels run, on these tensors as stored: numba importable, ``MODELSOUP_KERNELS`` not ``torch``, and
    (where tensors are given) one of them bfloat16. Float32 models run on them only with ``MODELSOUP_KERNELS=all``: there
    a whole TIES merge measured no faster (1.05x the torch path's wall time: the torch steps are cheaper on float32, and
    loading numba costs ~0.6 s of CPU), against 0.80x for bfloat16 ones. Without tensors: whether they are available."""
    setting = _setting()
    if setting == "torch" or _broken or not _fused_cpu():
        return False
    if stored and setting != "all" and not any(t is not None and t.dtype == torch.bfloat16 for t in stored):
        return False
    return _kernels() is not None


def _fused_cpu() -> bool:
    """Whether torch's CPU kernels fuse ``add_(x, alpha=w)`` into one rounding, as the compiled kernels do: its AVX2 and
    AVX-512 kernels do; its portable ones (``ATEN_CPU_CAPABILITY=default``, CPUs without AVX2, other architectures)
    round the product first, so the kernels would give other bits there and are not used."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


class KernelFailed(Exception):
    """A compiled kernel failed to build, load or cache its code (a full disk, a damaged cache file): the caller redoes the
    step on the torch path, and the kernels are off for the rest of the process."""


def _failed(e: Exception) -> KernelFailed:
    global _broken
    _broken = True
    logging.getLogger(__name__).warning("compiled merge kernels failed (%s: %s); merging with torch", type(e).__name__, e)
    return KernelFailed(str(e))


def _setting() -> str:
    return os.environ.get(DISABLE_ENV, "").strip().lower()


def warm_up() -> None:
    """Start loading the kernels in a background thread, where they will be used: importing numba and loading compiled
    code take ~0.6 s, which then overlap the first tensors' reading instead of delaying their merge."""
    global _warming
    if _compiled is None and _warming is None and _setting() != "torch" and _fused_cpu():  # not where they would not run
        with _warming_lock:
            if _warming is None:
                _warming = threading.Thread(target=_kernels, name="modelsoup-kernels", daemon=True)
                _warming.start()


def _kernels() -> Any:
    global _compiled
    if _compiled is None:
        with _lock:
            if _compiled is None:
                _compiled = _load()
    return _compiled or None


def _load() -> Any:
    """The kernels' module, each kernel run once on a few entries (numba's first call loads its code, or compiles and
    caches it); False where numba is missing or a kernel cannot be built or cached (then the torch path runs)."""
    try:
        k = importlib.import_module(f"{__package__}._numba_kernels")
    except ImportError:  # numba is not installed: the torch path, silently
        return False
    except Exception as e:  # e.g. no cache folder numba can write to (it checks when a kernel is defined)
        logging.getLogger(__name__).warning("compiled merge kernels unavailable (%s: %s); merging with torch", type(e).__name__, e)
        return False
    try:
        z, block = np.zeros(4, np.float32), k.BLOCK
        k.band_sweep(z, z, np.float32(0), np.float32(1), 0, np.empty(block, np.float32), np.empty(5, np.float32), np.zeros(4, np.int64))
        k.merge_rows(np.zeros((1, 4), np.float32), z, np.zeros(1, np.int64), np.zeros((1, 3), np.float32), np.zeros(1, np.bool_),
                     np.zeros(5, np.int64), np.ones(3, np.float32), np.empty(block, np.float32), np.empty(block, np.float32), z.copy())
        h = np.zeros(k.ROW, np.uint16)  # the sphere methods' kernels, on bfloat16 models
        k.pair_sums((h, h), h, False, np.zeros((1, 3), np.int64), np.empty((2, k.ROW), np.float32), np.empty((1, 1), np.float32))
        k.combination((h, h), np.zeros(2, np.float32), h, False, np.empty(k.ROW, np.float32))
    except Exception as e:  # e.g. no writable cache folder; numba's own errors have no common base
        logging.getLogger(__name__).warning("compiled merge kernels unavailable (%s: %s); merging with torch", type(e).__name__, e)
        return False
    return k


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat CPU tensor's memory as an array: bfloat16 as its raw 16 bits (uint16), float32 as is."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class FusedMerge:
    """One chunk of ``base + scale * combine(deltas)`` (see :class:`ops.MergedChunks`) by the compiled kernel.

    Built by ``ops._fused_merge``, which decides whether the kernel applies. Three forms: ``thetas`` given (a top-k trim
    or a rank window: deltas taken and trimmed inside the kernel, block by block), with ``masks`` (random drops kept as
    boolean masks, DARE's: the deltas taken, masked and divided inside the kernel), or ``thetas`` None (DELLA's codes,
    models of several dtypes: the rows are filled by torch first and the kernel does the rest). The parameter arrays
    are described in :mod:`._numba_kernels`.
    """

    def __init__(self, *, base: torch.Tensor, thetas: Sequence[torch.Tensor] | None, trims: np.ndarray | None,
                 lambdas: np.ndarray | None, voters: Sequence[int], alphas: np.ndarray, flipped: np.ndarray, flags: np.ndarray,
                 scalars: np.ndarray, models: int, masks: Sequence[torch.Tensor | None] | None = None,
                 divisors: np.ndarray | None = None, divided: Sequence[bool] | None = None) -> None:
        self.k = _kernels()
        self.base = _as_numpy(base.reshape(-1))
        self.thetas = None if thetas is None else tuple(_as_numpy(t.reshape(-1)) for t in thetas)
        self.masks: tuple[np.ndarray, ...] = tuple(np.zeros(0, np.bool_) for _ in range(models))  # none: mode 4 only
        self.divisors = np.ones(models, np.float32)
        if masks is not None:  # the masked form (trim mode 4): boolean masks (None keeps all), float32 divisors where divided
            self.masks = tuple(np.zeros(0, np.bool_) if mk is None else mk.reshape(-1).numpy() for mk in masks)
            each = divided if divided is not None else [False] * len(masks)
            trims = np.array([(4, mk is not None, d, 0, 0) for mk, d in zip(masks, each)], np.int64).reshape(-1, 5)
            if divisors is not None:
                self.divisors = divisors
        self.trims = trims if trims is not None else np.zeros((models, 5), np.int64)
        self.lambdas = lambdas if lambdas is not None else np.zeros((models, 6), np.float32)
        self.voters = np.asarray(voters, np.int64)
        self.alphas, self.flipped, self.flags, self.scalars = alphas, flipped, flags, scalars
        self.models = models
        self._local = threading.local()  # work buffers per thread (a job runs on one worker, but be safe)

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            block = self.k.BLOCK
            bufs = (np.empty((max(self.models, 1), block), np.float32), np.empty(block, np.float32), np.empty(block, np.float32))
            self._local.bufs = bufs
        return bufs

    def __call__(self, i: int, j: int, rows: torch.Tensor, out: torch.Tensor, fill: Any) -> torch.Tensor:
        """Entries [i, j) of the result into ``out`` (float32, j - i entries). ``rows`` (models x at least j - i, float32,
        contiguous) and ``fill`` are the torch path's buffer and filler, used where the kernel does not take the deltas
        itself."""
        scratch, vote, div = self._buffers()
        o = out.numpy()
        b = self.base[i:j]
        try:
            if self.thetas is None:
                fill(i, j, rows[:, : j - i])
                self.k.merge_rows(rows.numpy(), b, self.voters, self.alphas, self.flipped, self.flags, self.scalars, vote, div, o)
            else:
                self.k.merge_trimmed(tuple(t[i:j] for t in self.thetas), b, i, self.trims, self.lambdas,
                                     tuple(mk[i:j] for mk in self.masks), self.divisors, self.voters,
                                     self.alphas, self.flipped, self.flags, self.scalars, scratch, vote, div, o)
        except Exception as e:  # a new signature compiled or loaded here: I/O and pickle errors of numba's cache
            raise _failed(e) from e
        return out


class BandSweep:
    """The threshold sweep's step for one chunk of one source (:func:`selection.kth_largest_magnitudes`): magnitudes,
    the count above the bracket and the bracket's counts and gathered entries, in one compiled pass (the same values as
    the numpy steps: the magnitudes are the torch path's, the comparisons IEEE's)."""

    MODES = {"plain": 0, "one": 1, "ends": 2}

    def __init__(self, thetas: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], chunk: int) -> None:
        self.k = _kernels()
        self.thetas = [_as_numpy(t.reshape(-1)) for t in thetas]
        self.bases = [_as_numpy(b.reshape(-1)) for b in bases]
        self.scratch = np.empty(self.k.BLOCK, np.float32)
        self.gathered = np.empty(chunk, np.float32)
        self.counts = np.zeros(4, np.int64)

    def __call__(self, s: int, i: int, j: int, lo: float, hi: float, mode: str) -> tuple[int, int, int, int, np.ndarray]:
        """(above hi, equal to lo, equal to hi, NaN, the gathered magnitudes: a view the next call overwrites)."""
        try:
            c = self.k.band_sweep(self.thetas[s][i:j], self.bases[s][i:j], np.float32(lo), np.float32(hi), self.MODES[mode],
                                  self.scratch, self.gathered, self.counts)
        except Exception as e:  # as FusedMerge.__call__
            raise _failed(e) from e
        above, at_lo, at_hi, nan = (int(x) for x in self.counts)
        return above, at_lo, at_hi, nan, self.gathered[:c]


def pair_sums(xs: Sequence[torch.Tensor], base: torch.Tensor | None, pairs: Sequence[tuple[int, int, int]], rows: int) -> np.ndarray:
    """The float32 row sums of :func:`reduce.gram_matrix` and :func:`reduce.difference_sums` over ``rows`` whole rows of
    ROW entries: a (len(pairs), rows) array, entry (p, r) the sum of row r of v_a * v_b (pairs[p] = (a, b, 0)) or of
    (v_a - v_b)^2 (kind 1), v_m = xs[m] minus base, each widened to float32 exactly. Each row is summed in the order
    of torch's CPU kernel (:func:`._numba_kernels._row_total`), so the sums are torch's, bit for bit."""
    k = _kernels()
    out = np.empty((len(pairs), rows), np.float32)
    try:
        arrays = tuple(_as_numpy(x.reshape(-1)) for x in xs)
        b = _as_numpy(base.reshape(-1)) if base is not None else arrays[0]
        k.pair_sums(arrays, b, base is not None, np.asarray(pairs, np.int64).reshape(-1, 3), np.empty((len(arrays), k.ROW), np.float32), out)
    except Exception as e:  # as FusedMerge.__call__
        raise _failed(e) from e
    return out


_sums_checked: bool | None = None


def sums_like_torch() -> bool:
    """Whether :func:`pair_sums` gives torch's row sums on this machine and torch (the kernel copies the order of torch's
    CPU reduction, which a future torch could change): checked once per process on random rows (products, squared
    differences, a base, bfloat16 and float32), against torch's own sums."""
    global _sums_checked
    if _sums_checked is None:
        try:
            g = torch.Generator().manual_seed(20261203)
            x, y, b = (torch.randn(8 * 1024, generator=g, device="cpu") * 10 ** float(e) for e in (-3, 0, 2))
            ok = True
            for dt in KERNEL_DTYPES:
                xs = [x.to(dt), y.to(dt)]
                got = pair_sums(xs, b.to(dt), [(0, 1, 0), (0, 1, 1), (1, 1, 0)], 8)
                v = [t.to(torch.float32) - b.to(dt).to(torch.float32) for t in xs]
                want = [(v[0] * v[1]).view(-1, 1024).sum(dim=1), (v[0] - v[1]).mul_(v[0] - v[1]).view(-1, 1024).sum(dim=1),
                        (v[1] * v[1]).view(-1, 1024).sum(dim=1)]
                ok = ok and all(np.array_equal(got[p].view(np.int32), w.numpy().view(np.int32)) for p, w in enumerate(want))
            _sums_checked = ok
        except KernelFailed:
            _sums_checked = False
        if not _sums_checked:
            logging.getLogger(__name__).info("compiled row sums differ from this torch's; summing with torch")
    return _sums_checked


def combination(xs: Sequence[torch.Tensor], coefficients: Sequence[float], base: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """:func:`ops.linear_combination` into ``out`` (float32, flat, the inputs' size): sum_i c_i (x_i - base) + base, term by
    term in model order, each a fused multiply-add by c_i rounded to float32 (torch's ``add_(v, alpha=c)``); c_i = 0
    left out. The caller checks that every c_i is finite and within float32's range (torch refuses the others)."""
    k = _kernels()
    try:
        arrays = tuple(_as_numpy(x.reshape(-1)) for x in xs)
        b = _as_numpy(base.reshape(-1)) if base is not None else arrays[0]
        k.combination(arrays, np.asarray(coefficients, np.float32), b, base is not None, out.numpy())
    except Exception as e:  # as FusedMerge.__call__
        raise _failed(e) from e
    return out


# torch's CPU generator state (CPUGeneratorImpl::get_state): int64 seed, int32 left, int32 seeded, uint64 next, then
# the 624 MT19937 words as uint64; the rest (normal-sample caches) is kept as it is.
_STATE_BYTES = 5056
_rand_checked: bool | None = None


def draws_uniforms(generator: torch.Generator | None) -> bool:
    """Whether :func:`uniforms` can stand in for ``torch.rand`` on this generator: a CPU generator, whose draws a check
    (once per process) found to be torch's, bit for bit, with the state left as torch leaves it; the kernels available
    (:func:`enabled`). (Each draw checks its generator's state size as it reads it: :func:`_draw`.)"""
    global _rand_checked
    if generator is None or generator.device.type != "cpu" or not enabled():
        return False
    if _rand_checked is None:
        _rand_checked = _check_uniforms()
    return _rand_checked


def _check_uniforms() -> bool:
    """Our draws against torch.rand's from one seed: across a new state, in pieces, and the states after."""
    try:
        ours, theirs = torch.Generator().manual_seed(20261203), torch.Generator().manual_seed(20261203)
        if ours.get_state().numel() != _STATE_BYTES:
            return False
        got = [uniforms(ours, torch.empty(n, device="cpu")) for n in (5, 1000, 1)]
        want = [torch.rand(n, generator=theirs, device="cpu") for n in (5, 1000, 1)]
        keep = torch.empty(700, dtype=torch.bool, device="cpu")
        uniforms(ours, None, 0.3, keep)
        same = all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(keep, torch.rand(700, generator=theirs, device="cpu") < 0.3)
        return same and torch.equal(ours.get_state(), theirs.get_state())
    except (KernelFailed, RuntimeError):
        return False


# a generator's state is read, advanced and set as one step, under its lock (threads may share a generator); one of a
# fixed set by the generator's identity, so that draws of different generators (one per tensor) seldom wait on each other
_draw_locks = tuple(threading.Lock() for _ in range(61))


def _draw(generator: torch.Generator, run: Callable[[Any, np.ndarray, np.ndarray], None]) -> None:
    """``run(kernels, words, pos)`` on the generator's MT19937 state (624 words; left, next), then the state set back:
    under the generator's lock, so threads sharing a generator draw one after the other, never the same numbers."""
    k = _kernels()
    with _draw_locks[id(generator) % len(_draw_locks)]:
        state = generator.get_state()
        if state.numel() != _STATE_BYTES:  # not the layout read here: torch draws (the kernels stay on)
            raise KernelFailed(f"a generator state of {state.numel()} bytes, not {_STATE_BYTES}")
        raw = state.numpy()
        words = raw[24:24 + 8 * k.MT_N].view(np.uint64).astype(np.uint32)
        pos = np.array([int(raw[8:12].view(np.int32)[0]), int(raw[16:24].view(np.uint64)[0])], np.int64)
        try:
            run(k, words, pos)
        except Exception as e:  # as FusedMerge.__call__; the generator is left as it was
            raise _failed(e) from e
        raw[8:12].view(np.int32)[0] = pos[0]
        raw[16:24].view(np.uint64)[0] = pos[1]
        raw[24:24 + 8 * k.MT_N].view(np.uint64)[:] = words
        generator.set_state(state)


def uniforms(generator: torch.Generator, out: torch.Tensor | None, below: float | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.rand(n, generator=generator, out=out)`` (float32, flat, contiguous, on the CPU), or with ``below`` the
    mask ``torch.rand(n, generator=generator) < below`` into ``keep`` (bool, flat, on the CPU), drawn by the compiled
    MT19937: the same values, and the generator left in the state torch leaves it in (read and set through
    get_state/set_state). The caller checks :func:`draws_uniforms` first."""
    target = keep if below is not None else out
    assert target is not None and target.device.type == "cpu"
    empty_f, empty_b = np.empty(0, np.float32), np.empty(0, np.bool_)
    masked = below is not None

    def run(k: Any, words: np.ndarray, pos: np.ndarray) -> None:
        t = target.numpy()
        k.uniforms(words, pos, masked, np.float32(below if masked else 0.0), empty_f if masked else t, t if masked else empty_b)

    _draw(generator, run)
    return target


MAGPRUNE_BLOCK = 1 << 18  # entries of a block of rows whose keys are made, sorted and coded together (:func:`magprune_codes`)


def magprune_codes(theta: torch.Tensor, base: torch.Tensor, probs: torch.Tensor, generator: torch.Generator,
                   codes: torch.Tensor) -> torch.Tensor:
    """:meth:`ops.MagPrunedDeltas._draw`'s codes of one model, theta - base (rows x cols, 1 < cols < 2^15, both of one
    kernel dtype: :func:`takes`), given the keep probability of each rank (``probs``: float32, cols, on the CPU), into
    ``codes`` (int16, rows x cols, on the CPU), a block of rows at a time: the sort
    keys of the delta's magnitudes (uint32 where at most 1 entry in 64 has bits below the column's: the bits above
    them, a flag for those, the column; else int64, as ``ops._stable_order``'s, and int64 from then on) in one compiled
    pass, each row sorted by numpy (as there), then the order completed (:func:`._numba_kernels.magprune_columns`; rows
    it cannot cheaply put in order sorted again by int64 keys, by numpy, as there), then the ranks, probabilities, draws
    and codes in one more (:func:`._numba_kernels.magprune_codes`). The generator is advanced as torch.rand of each
    block advances it (its state read once and set once, under its lock). The caller checks :func:`draws_uniforms`
    first."""
    assert codes.device.type == "cpu" and codes.dtype == torch.int16 and codes.shape == theta.shape == base.shape
    rows, cols = theta.shape
    assert probs.dtype == torch.float32 and probs.shape == (cols,) and probs.is_contiguous() and probs.device.type == "cpu"
    shift = max(1, (cols - 1).bit_length())
    t, b, c = _as_numpy(theta), _as_numpy(base), codes.numpy()
    per = max(1, MAGPRUNE_BLOCK // cols)
    n = min(per, rows)
    narrow, uniform, wrong = np.empty((n, cols), np.uint32), np.empty(cols, np.float32), np.empty(n, np.int64)
    wide: np.ndarray | None = None
    p = probs.numpy()

    def run(k: Any, words: np.ndarray, pos: np.ndarray) -> None:
        nonlocal wide
        for r in range(0, rows, per):
            s = min(rows, r + per)
            tb, bb = t[r:s], b[r:s]
            keys = narrow[: s - r]
            if wide is not None or k.magprune_keys(tb, bb, shift, False, keys) * 64 > keys.size:
                if wide is None:
                    wide = np.empty((n, cols), np.int64)
                keys = wide[: s - r]
                k.magprune_keys(tb, bb, shift, True, keys)
            keys.sort(axis=1)
            redo = wrong[: k.magprune_columns(keys, tb, bb, shift, keys.dtype == np.uint32, wrong)]
            if redo.size:  # rows the kernel did not put in (bits, column) order: their int64 keys, sorted
                exact = np.empty((redo.size, cols), np.int64)
                k.magprune_keys(tb[redo], bb[redo], shift, True, exact)
                exact.sort(axis=1)
                keys[redo] = np.bitwise_and(exact, (1 << shift) - 1)
            k.magprune_codes(keys, p, words, pos, uniform, c[r:s])

    _draw(generator, run)
    return codes


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can read these tensors as they are: CPU, contiguous, float32 or bfloat16, plain memory (not a
    lazily negated or conjugated view, not tracking gradients: torch will not hand those to numpy)."""
    return all(t is not None and t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous() and not t.is_neg()
               and not t.is_conj() and not t.requires_grad for t in tensors)


def takes_mask(mask: torch.Tensor) -> bool:
    """Whether the kernels can read this boolean mask as it is (CPU, contiguous, plain memory)."""
    return mask.dtype == torch.bool and mask.device.type == "cpu" and mask.is_contiguous() and not mask.requires_grad


def torch_order_window(values: torch.Tensor, first: int, stop: int, *, descending: bool, absolute: bool = False,
                       base: torch.Tensor | None = None) -> torch.Tensor | None:
    """The flat boolean mask of the entries at places [first, stop) of ``torch.sort(m, descending=...)`` (the set torch's
    order of ties gives) of float32 magnitudes m: ``values`` (non-negative float32), ``|values|`` where ``absolute``, or
    with a ``base`` |values - base|, the float32 task vector's (either of a kernel dtype: :func:`takes`; made from the
    inputs, no delta held). Without the whole sort: the partitions of std::sort that decide the two cuts, then the short
    range around each sorted (:func:`._numba_kernels.torch_order`: 0.15 s against torch's 0.94 s for 11.5M
    bfloat16-valued magnitudes; 8 bytes an entry while it runs). None where it cannot stand in for torch (the caller
    sorts with torch): the kernels unavailable (:func:`enabled`), this torch's sort found to order ties otherwise
    (:func:`sorts_like_torch`), a negative magnitude, or a range that meets introsort's depth limit (std::sort
    heap-sorts it)."""
    n = values.numel()
    readable = takes(values, base) and base.numel() == n if base is not None else takes(values) and values.dtype == torch.float32
    if not (0 <= first <= stop <= n) or not readable or not enabled() or not sorts_like_torch():
        return None
    return _window(values, first, stop, descending, absolute, base)


def _window(values: torch.Tensor, first: int, stop: int, descending: bool, absolute: bool, base: torch.Tensor | None = None,
            depth: int | None = None) -> torch.Tensor | None:
    k = _kernels()
    n = values.numel()
    if first == stop:
        return torch.zeros(n, dtype=torch.bool)
    try:
        keys = np.empty(n, np.int32)
        if base is not None:
            k.delta_sort_keys(_as_numpy(values.reshape(-1)), _as_numpy(base.reshape(-1)), descending, keys)
        elif k.sort_keys(values.reshape(-1).numpy(), absolute, descending, keys):
            return None
        order = np.arange(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
        limit = 2 * (n.bit_length() - 1) if depth is None else depth  # std::sort's: 2 floor(log2 n)
        if not k.torch_order(keys, order, np.array([first, stop], np.int64), limit):
            return None
        del keys
        keep = torch.zeros(n, dtype=torch.bool)
        k.mark(order, first, stop, keep.numpy())
    except Exception as e:  # as FusedMerge.__call__
        raise _failed(e) from e
    return keep


_order_checked: bool | None = None


def sorts_like_torch() -> bool:
    """Whether :func:`torch_order_window` gives torch.sort's sets on this torch (its CPU sort is libstdc++'s std::sort,
    which a future torch could change): checked once per process on magnitudes with many ties and NaNs, both
    directions, windows at the ends and inside, against torch.sort itself."""
    global _order_checked
    if _order_checked is None:
        try:
            g = torch.Generator().manual_seed(20261203)
            ok = True
            for n, levels in ((37, 3), (5000, 40), (70_001, 1000)):
                x = torch.randint(0, levels, (n,), generator=g, device="cpu").float()
                x[torch.randint(0, n, (n // 20,), generator=g, device="cpu")] = float("nan")
                for descending in (True, False):
                    order = torch.sort(x, descending=descending).indices
                    for first, stop in ((0, n // 2), (n // 7, n - n // 3)):
                        want = torch.zeros(n, dtype=torch.bool)
                        want[order[first:stop]] = True
                        got = _window(x, first, stop, descending, False)
                        ok = ok and got is not None and torch.equal(got, want)
            _order_checked = ok
        except KernelFailed:
            _order_checked = False
        if not _order_checked:
            logging.getLogger(__name__).info("this torch's sort orders ties otherwise; sorting with torch")
    return _order_checked

"""The numba kernels behind :mod:`.kernels` (importing this module imports numba; :mod:`.kernels` does it on first use).

Each inner loop is one simple pass over an L1-sized block, so LLVM vectorizes it; the order of operations is the torch
path's (:class:`ops.ElectedMean`, :class:`ops.MergedChunks`, :meth:`selection.TopKTrim.apply_`), see :mod:`.kernels`.

flags: [elect, count_signs, normalize, divisor_mode, scaled]; elect 0 is combine's plain weighted sum (normalize then
means: divide by scalars[2]); divisor_mode 0 clamps the divisor to the floor, 1 replaces divisors below the floor in
magnitude by 1, 2 clamps it to 1. scalars: [floor, scale, plain divisor]. alphas: per voter (vote, weight, divisor).
trims: per model (mode, cut, cut_lo, cut_hi, hi_unbounded), lambdas: (kth_or_equal, kth, lo, lo_or_equal, hi,
hi_or_equal); mode 0 keeps all, 1 none, 2 is a TopKTrim (hardshrink by kth_or_equal before cut, by kth from it on), 3 a
RankWindow (lo < |d| < hi, the bounds moved by one float where ties are kept; no upper bound before cut_hi where
hi_unbounded), 4 a mask and divisor (mode, masked, divided, -, -: MaskedDeltas, DARE's drops).
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload



BLOCK = 2048  # entries per block: a few float32 rows of it stay in L1 (a constant of the compiled code, hence here)


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a * b + c with one rounding (torch's ``add_(x, alpha=w)`` on the CPU)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _bits_to_float(typingctx, u):  # type: ignore[no-untyped-def]
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def widen(x):  # type: ignore[no-untyped-def]
    """A stored entry as float32: bfloat16 (its raw uint16 bits) widened exactly, float32 as is."""
    raise NotImplementedError("compiled only")


@overload(widen)
def _widen(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: _bits_to_float(np.uint32(x) << np.uint32(16))
    if x == types.float32:
        return lambda x: x
    return None


@njit(nogil=True, cache=True)
def _delta(theta, base, r):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        r[j] = widen(theta[j]) - widen(base[j])


@njit(nogil=True, cache=True)
def _hardshrink(r, lam):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        x = r[j]
        r[j] = np.float32(0.0) if (x >= -lam and x <= lam) else x


@njit(nogil=True, cache=True)
def _signs(r, t):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        x = r[j]
        t[j] = np.float32((x > 0) - (x < 0))  # torch.sign: NaN gives 0


@njit(nogil=True, cache=True)
def _scaled(r, a, v):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        v[j] = r[j] * a


@njit(nogil=True, cache=True)
def _fma_into(r, a, v):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        v[j] = _fma(a, r[j], v[j])


@njit(nogil=True, cache=True)
def _agree(r, vote, o, w, flipped):  # type: ignore[no-untyped-def]
    """o += w * (r where r has the elected sign (the opposite one if flipped), else r * 0); the agreement (0/1) into r."""
    for j in range(r.shape[0]):
        d = r[j]
        p = d * (np.float32(1.0) if vote[j] >= 0 else np.float32(-1.0))
        ag = np.float32(1.0) if ((p < 0) if flipped else (p > 0)) else np.float32(0.0)
        o[j] = _fma(w, d * ag, o[j])
        r[j] = ag


@njit(nogil=True, cache=True)
def _divide(o, div, floor, mode):  # type: ignore[no-untyped-def]
    if mode == 0:
        for j in range(o.shape[0]):
            x = div[j]
            o[j] = o[j] / (x if x >= floor else floor)
    elif mode == 1:
        for j in range(o.shape[0]):
            x = div[j]
            o[j] = o[j] / (x if abs(x) >= floor else np.float32(1.0))
    else:
        for j in range(o.shape[0]):
            x = div[j]
            o[j] = o[j] / (x if x >= 1.0 else np.float32(1.0))


@njit(nogil=True, cache=True)
def _combine_block(rows, b0, b1, base, voters, alphas, flipped, flags, scalars, vote, div, out):  # type: ignore[no-untyped-def]
    """Entries [b0, b1) of out from rows[:, b0:b1] (the rows are overwritten)."""
    w = b1 - b0
    o = out[b0:b1]
    o[:] = 0.0
    nv = voters.shape[0]
    if flags[0] == 0:  # plain weighted sum
        for k in range(nv):
            _fma_into(rows[voters[k], b0:b1], alphas[k, 1], o)
        if flags[2]:
            d = scalars[2]
            for j in range(w):
                o[j] = o[j] / d
    elif nv > 0:
        v = vote[:w]
        for k in range(nv):
            r = rows[voters[k], b0:b1]
            if flags[1]:  # count signs
                t = div[:w]
                _signs(r, t)
                r = t
            if k == 0:
                _scaled(r, alphas[k, 0], v)
            else:
                _fma_into(r, alphas[k, 0], v)
        for k in range(nv):
            _agree(rows[voters[k], b0:b1], v, o, alphas[k, 1], flipped[k])  # leaves the agreement in the row
        if flags[2]:
            dv = div[:w]
            for k in range(nv):
                if k == 0:
                    _scaled(rows[voters[k], b0:b1], alphas[k, 2], dv)
                else:
                    _fma_into(rows[voters[k], b0:b1], alphas[k, 2], dv)
            _divide(o, dv, scalars[0], flags[3])
    if flags[4]:
        s = scalars[1]
        for j in range(w):
            o[j] = o[j] * s
    bs = base[b0:b1]
    for j in range(w):
        o[j] = o[j] + widen(bs[j])


@njit(nogil=True, cache=True)
def merge_rows(rows, base, voters, alphas, flipped, flags, scalars, vote, div, out):  # type: ignore[no-untyped-def]
    """out = base + scale * combine(rows[:, :n]) for n = len(out); the rows are overwritten."""
    n = out.shape[0]
    for b0 in range(0, n, BLOCK):
        _combine_block(rows, b0, min(b0 + BLOCK, n), base, voters, alphas, flipped, flags, scalars, vote, div, out)


@njit(nogil=True, cache=True)
def _window(r, lo, hi, bounded):  # type: ignore[no-untyped-def]
    """r * (lo < |r| (< hi if bounded)), as RankWindow.apply_ computes it (0/1 factors: an infinite r outside gives NaN)."""
    if bounded:
        for j in range(r.shape[0]):
            x = r[j]
            a = abs(x)
            r[j] = x * (np.float32(1.0 if a > lo else 0.0) * np.float32(1.0 if a < hi else 0.0))
    else:
        for j in range(r.shape[0]):
            x = r[j]
            r[j] = x * np.float32(1.0 if abs(x) > lo else 0.0)


@njit(nogil=True, cache=True)
def _trim(r, first, i, trims, lambdas):  # type: ignore[no-untyped-def]
    """Model i's trim of the deltas r (entries [first, first + len(r)) of the tensor), in place."""
    w = r.shape[0]
    mode = trims[i, 0]
    if mode == 2:  # TopKTrim: ties at the threshold kept before the cut
        split = min(max(trims[i, 1] - first, 0), w)
        if split > 0:
            _hardshrink(r[:split], lambdas[i, 0])
        if split < w:
            _hardshrink(r[split:], lambdas[i, 1])
    elif mode == 3:  # RankWindow: ties at lo kept from cut_lo on, ties at hi before cut_hi
        cut_lo = min(max(trims[i, 2] - first, 0), w)
        cut_hi = min(max(trims[i, 3] - first, 0), w)
        a = 0
        while a < w:  # the pieces between the cuts
            b = w
            if a < cut_lo < b:
                b = cut_lo
            if a < cut_hi < b:
                b = cut_hi
            lo = lambdas[i, 3] if a >= cut_lo else lambdas[i, 2]
            if a < cut_hi:
                _window(r[a:b], lo, lambdas[i, 5], trims[i, 4] == 0)
            else:
                _window(r[a:b], lo, lambdas[i, 4], True)
            a = b


@njit(nogil=True, cache=True)
def _masked(r, mask, masked, divided, d):  # type: ignore[no-untyped-def]
    """r * mask (as a float 0/1) where ``masked``, then / d where ``divided``: ops.MaskedDeltas.fill's steps."""
    if masked:
        for j in range(r.shape[0]):
            r[j] = r[j] * np.float32(mask[j])
    if divided:
        for j in range(r.shape[0]):
            r[j] = r[j] / d


@njit(nogil=True, cache=True)
def merge_trimmed(thetas, base, start, trims, lambdas, masks, divisors, voters, alphas, flipped, flags, scalars, scratch, vote, div, out):  # type: ignore[no-untyped-def]
    """As merge_rows, the rows being theta_i - base trimmed (TopKTrim.apply_, RankWindow.apply_) on entries
    [start, start + len(out)), or, for trim mode 4, times masks[i] (entries as thetas[i]'s; where trims[i, 1]) and
    divided by divisors[i] (where trims[i, 2])."""
    n = out.shape[0]
    m = len(thetas)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        w = b1 - b0
        bs = base[b0:b1]
        for i in range(m):
            r = scratch[i, :w]
            if trims[i, 0] == 1:
                r[:] = 0.0
                continue
            _delta(thetas[i][b0:b1], bs, r)
            if trims[i, 0] == 4:
                _masked(r, masks[i][b0:b1], trims[i, 1] != 0, trims[i, 2] != 0, divisors[i])
            else:
                _trim(r, start + b0, i, trims, lambdas)
        _combine_block(scratch, 0, w, bs, voters, alphas, flipped, flags, scalars, vote, div, out[b0:b1])


@njit(nogil=True, cache=True)
def _magnitude(theta, base, r):  # type: ignore[no-untyped-def]
    for j in range(r.shape[0]):
        r[j] = abs(widen(theta[j]) - widen(base[j]))


@njit(nogil=True, cache=True)
def _count_above(r, hi):  # type: ignore[no-untyped-def]
    c = 0
    for j in range(r.shape[0]):
        c += r[j] > hi
    return c


@njit(nogil=True, cache=True)
def _count_equal(r, v):  # type: ignore[no-untyped-def]
    c = 0
    for j in range(r.shape[0]):
        c += r[j] == v
    return c


@njit(nogil=True, cache=True)
def _count_nan(r):  # type: ignore[no-untyped-def]
    c = 0
    for j in range(r.shape[0]):
        c += r[j] != r[j]
    return c


@njit(nogil=True, cache=True)
def _gather(r, lo, hi, closed, out, c):  # type: ignore[no-untyped-def]
    """Append the entries in [lo, hi] (closed) or (lo, hi) to out from place c, in index order; the new count."""
    if closed:
        for j in range(r.shape[0]):
            x = r[j]
            out[c] = x
            c += (x >= lo) & (x <= hi)
    else:
        for j in range(r.shape[0]):
            x = r[j]
            out[c] = x
            c += (x > lo) & (x < hi)
    return c


@njit(nogil=True, cache=True)
def band_sweep(theta, base, lo, hi, mode, scratch, gathered, counts):  # type: ignore[no-untyped-def]
    """One chunk of one source's magnitudes |theta - base| against its bracket [lo, hi] (selection._Band): counts[0] the
    entries above hi, [1] and [2] those equal to lo and to hi (modes 1 "one" and 2 "ends"), [3] the NaN; the magnitudes
    in [lo, hi] (mode 0 "plain") or strictly inside (mode 2) gathered, in index order, into ``gathered`` (as long as the
    chunk plus one); returns how many."""
    n = theta.shape[0]
    above = 0
    at_lo = 0
    at_hi = 0
    nan = 0
    c = 0
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        r = scratch[: b1 - b0]
        _magnitude(theta[b0:b1], base[b0:b1], r)
        above += _count_above(r, hi)
        nan += _count_nan(r)
        if mode == 0:
            c = _gather(r, lo, hi, True, gathered, c)
        else:
            at_lo += _count_equal(r, lo)
            if mode == 2:
                at_hi += _count_equal(r, hi)
                c = _gather(r, lo, hi, False, gathered, c)
    counts[0] = above
    counts[1] = at_lo
    counts[2] = at_hi
    counts[3] = nan
    return c


# ------------------------------------------------------------------ the sphere methods' sums and combinations (reduce, ops)

ROW = 1 << 10  # reduce.ROW: entries per row sum
LANES, VECTORS = 8, 4  # torch's float32 row sum keeps 4 (its ILP factor) vectors of 8 lanes (AVX2; its AVX-512 build sums alike)
LEVEL = 16  # rows of 4 vectors added into one level of its cascade before the level is folded into the next


def _row_total(kind):  # type: ignore[no-untyped-def]
    """An intrinsic ``f(a, b, at)``: the float32 sum of the ROW products a[at + j] * b[at + j] (kind 0) or squared
    differences (a[at + j] - b[at + j])^2 (kind 1), j < ROW, in the order torch's CPU kernel sums a contiguous float32
    row of ROW entries: entry j goes to slot j % 32 (4 vectors of 8 lanes); each slot adds its entries in order, 16 at a
    time into a partial that starts at 0 and is then added to the slot's total; the 4 vectors are added vector-wise, and
    their 8 lanes in order into 0. Written as vector IR, since LLVM does not vectorize the loop form of it (the
    accumulators may alias the inputs for all it knows), and the operations are then plain float32 multiplies and adds
    in exactly this order (no fma, no reassociation)."""

    @intrinsic
    def row_total(typingctx, a, b, at):  # type: ignore[no-untyped-def]
        sig = types.float32(a, b, types.intp)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            f32 = ir.FloatType()
            vec = ir.VectorType(f32, LANES)
            i64 = ir.IntType(64)
            pa, pb = (builder.gep(context.make_array(t)(context, builder, x).data, [args[2]]) for t, x in zip(signature.args[:2], args[:2]))
            zero = ir.Constant(vec, [0.0] * LANES)
            total = [zero] * VECTORS
            for h in range(0, ROW, LEVEL * LANES * VECTORS):
                acc = [zero] * VECTORS
                for j in range(h, h + LEVEL * LANES * VECTORS, LANES):
                    at = ir.Constant(i64, j)
                    x, y = (builder.load(builder.bitcast(builder.gep(p, [at]), vec.as_pointer()), align=4) for p in (pa, pb))
                    if kind:
                        x = y = builder.fsub(x, y)
                    q = (j // LANES) % VECTORS
                    acc[q] = builder.fadd(acc[q], builder.fmul(x, y))
                total = [builder.fadd(t, c) for t, c in zip(total, acc)]
            v = total[0]
            for t in total[1:]:
                v = builder.fadd(v, t)
            out = ir.Constant(f32, 0.0)
            for lane in range(LANES):
                out = builder.fadd(out, builder.extract_element(v, ir.Constant(ir.IntType(32), lane)))
            return out

        return sig, codegen

    return row_total


_row_dot = _row_total(0)
_row_difference = _row_total(1)


@njit(nogil=True, cache=True)
def pair_sums(xs, base, has_base, pairs, scratch, out):  # type: ignore[no-untyped-def]
    """out[p, r] = the float32 row sum (:func:`_row_total`) of row r of v_a * v_b or (v_a - v_b)^2 for pairs[p] = (a, b,
    kind), v_m = xs[m] widened (minus the widened base where has_base), for each of the out.shape[1] full rows of ROW
    entries: reduce.gram_matrix's and reduce.difference_sums's rows."""
    m = len(xs)
    for r in range(out.shape[1]):
        o = r * ROW
        bs = base[o:o + ROW]
        for k in range(m):
            x = xs[k][o:o + ROW]
            s = scratch[k]
            if has_base:
                for j in range(ROW):
                    s[j] = widen(x[j]) - widen(bs[j])
            else:
                for j in range(ROW):
                    s[j] = widen(x[j])
        for p in range(pairs.shape[0]):
            a = scratch[pairs[p, 0]]
            b = scratch[pairs[p, 1]]
            out[p, r] = _row_dot(a, b, 0) if pairs[p, 2] == 0 else _row_difference(a, b, 0)


@njit(nogil=True, cache=True)
def combination(xs, coefficients, base, has_base, out):  # type: ignore[no-untyped-def]
    """out = sum_i c_i v_i (+ base where has_base), v_i = xs[i] widened (minus the widened base), term by term in model
    order from 0, each term one fused multiply-add (ops.linear_combination's add_(v, alpha=c)); models with c_i = 0
    left out, as there."""
    n = out.shape[0]
    m = len(xs)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        o = out[b0:b1]
        o[:] = 0.0
        bs = base[b0:b1]
        for k in range(m):
            c = coefficients[k]
            if c == 0:
                continue
            x = xs[k][b0:b1]
            if has_base:
                for j in range(b1 - b0):
                    o[j] = _fma(widen(x[j]) - widen(bs[j]), c, o[j])
            else:
                for j in range(b1 - b0):
                    o[j] = _fma(widen(x[j]), c, o[j])
        if has_base:
            for j in range(b1 - b0):
                o[j] = o[j] + widen(bs[j])


# ------------------------------------------------------------------ torch's CPU uniforms (MT19937), for DARE's and DELLA's draws

MT_N, MT_M = 624, 397


@njit(nogil=True, cache=True)
def _twist(s):  # type: ignore[no-untyped-def]
    """MT19937's next state, in place (torch's ``mt19937_engine::next_state``)."""
    upper, lower, matrix = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
    one = np.uint32(1)
    for k in range(MT_N - MT_M):
        v = s[k + 1]
        s[k] = s[k + MT_M] ^ (((s[k] & upper) | (v & lower)) >> one) ^ ((np.uint32(0) - (v & one)) & matrix)
    for k in range(MT_N - MT_M, MT_N - 1):
        v = s[k + 1]
        s[k] = s[k + MT_M - MT_N] ^ (((s[k] & upper) | (v & lower)) >> one) ^ ((np.uint32(0) - (v & one)) & matrix)
    v = s[0]
    s[MT_N - 1] = s[MT_M - 1] ^ (((s[MT_N - 1] & upper) | (v & lower)) >> one) ^ ((np.uint32(0) - (v & one)) & matrix)


@njit(nogil=True, cache=True)
def _tempered(y):  # type: ignore[no-untyped-def]
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@njit(nogil=True, cache=True)
def uniforms(state, pos, masked, p, out, keep):  # type: ignore[no-untyped-def]
    """The next len(out) (or len(keep)) float32 uniforms of torch's CPU generator, as ``torch.rand`` draws them: one
    MT19937 output each, its low 24 bits times 2^-24, in order. Into ``out``, or where ``masked`` ``keep = u < p`` (p a
    float32, as torch compares a float32 tensor with a Python number). ``state`` (624 words) and ``pos`` (left, next: the
    engine's counters) are advanced as torch advances them."""
    n = keep.shape[0] if masked else out.shape[0]
    left = pos[0]
    nxt = pos[1]
    scale = np.float32(1.0 / (1 << 24))
    mask = np.uint32(0xFFFFFF)
    i = 0
    while i < n:
        if left == 1:  # the next draw makes a new state
            _twist(state)
            left = MT_N + 1
            nxt = 0
        run = min(n - i, left - 1)
        words = state[nxt:nxt + run]
        if not masked:
            dst = out[i:i + run]
            for t in range(run):
                dst[t] = np.float32(_tempered(words[t]) & mask) * scale
        else:
            flags = keep[i:i + run]
            for t in range(run):
                flags[t] = np.float32(_tempered(words[t]) & mask) * scale < p
        i += run
        nxt += run
        left -= run
    pos[0] = left
    pos[1] = nxt


# ------------------------------------------------------------------ DELLA's MagPrune codes (ops.MagPrunedDeltas._draw)

@intrinsic
def _float_bits(typingctx, f):  # type: ignore[no-untyped-def]
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(nogil=True, cache=True)
def _magnitude_bits(t, b):  # type: ignore[no-untyped-def]
    """The bits of |widen(t) - widen(b)| (torch's float32 delta and its abs: the sign bit cleared, NaN's payload kept),
    a non-negative int64."""
    return np.int64(_float_bits(widen(t) - widen(b)) & np.uint32(0x7FFFFFFF))


@njit(nogil=True, cache=True)
def magprune_keys(theta, base, shift, wide, keys):  # type: ignore[no-untyped-def]
    """The sort keys of a block of rows (rows x cols) of |theta - base| (the bits of the float32 delta's abs, as
    ops._stable_order takes them): where ``wide`` (int64 keys), bits << shift | column, which sort in (bits, column)
    order; else uint32 keys high << (shift + 1) | flag << shift | column, high = bits >> shift and flag whether any bit
    below it is set, which sort by (high, flag, column) (the magnitude's sign bit is always clear, so there is room for
    the flag; see :func:`magprune_columns`). Returns how many entries have any low bit set (int32-sized keys are used
    where at most 1 in 64 does, as ops._stable_order picks them)."""
    rows, cols = keys.shape
    low = np.int64((1 << shift) - 1)
    set_low = 0
    for r in range(rows):
        t = theta[r]
        b = base[r]
        k = keys[r]
        for j in range(cols):
            bits = _magnitude_bits(t[j], b[j])
            flag = np.int64((bits & low) != 0)
            set_low += flag
            if wide:
                k[j] = (bits << shift) | j
            else:
                k[j] = ((bits >> shift) << (shift + 1)) | (flag << shift) | j
    return set_low


@njit(nogil=True, cache=True)
def magprune_columns(keys, theta, base, shift, checked, wrong):  # type: ignore[no-untyped-def]
    """The columns of a block of rows' sorted keys (:func:`magprune_keys`, each row sorted ascending), in place: key &
    (2^shift - 1), so each row lists its columns in ascending (|delta|, column) order.

    Where ``checked`` (uint32 keys, sorted by (high, flag, column)), a row is in (magnitude, column) order unless two
    entries with low bits set share a high part: within one high part, the entries without low bits have its smallest
    magnitude (the high part itself) and come first, by column; those with low bits come after them, by column, so
    they are in order where there is at most one of them, and otherwise maybe not. Such a row (seen in the same
    sequential pass that takes out the columns) is insertion-sorted by its full magnitudes, moving an entry only past
    greater ones (stable: entries of equal magnitude, which have equal keys but for the column, keep their ascending
    columns), which gives the (magnitude, column) order; a row that would need more than 8 moves an entry is left
    listed in ``wrong`` (their count returned), to be sorted again by int64 keys, as ops._order_int32 sorts its rows
    out of order."""
    rows, cols = keys.shape
    mask = (1 << shift) - 1
    n = 0
    mags = np.empty(cols if checked else 0, np.int64)
    for r in range(rows):
        k = keys[r]
        if not checked:
            for q in range(cols):
                k[q] = k[q] & mask
            continue
        shared = False
        prev = np.int64(-1)
        for q in range(cols):
            key = np.int64(k[q])
            top = key >> shift  # high << 1 | flag
            shared |= ((top & 1) == 1) & (top == prev)
            prev = top
            k[q] = key & mask
        if not shared:
            continue
        t = theta[r]
        b = base[r]
        for q in range(cols):
            mags[q] = _magnitude_bits(t[k[q]], b[k[q]])
        budget = 8 * cols
        for q in range(1, cols):
            m = mags[q]
            if m >= mags[q - 1]:
                continue
            col = k[q]
            p = q
            while p > 0 and mags[p - 1] > m:
                mags[p] = mags[p - 1]
                k[p] = k[p - 1]
                p -= 1
            mags[p] = m
            k[p] = col
            budget -= q - p
            if budget < 0:
                wrong[n] = r
                n += 1
                break
    return n


@njit(nogil=True, cache=True)
def magprune_codes(order, probs, state, pos, uniform, codes):  # type: ignore[no-untyped-def]
    """DELLA's codes of a block of rows (rows x cols), given each row's columns in ascending (|delta|, column) order
    (int32 or int64): the entry at place q of its row's order has rank q and keep probability probs[q] (float32, the
    table of ops.MagPrunedDeltas), and is kept where its uniform of torch's generator (drawn for the block in
    row-major order, as torch.rand(block.shape)) is below that; the code is the rank where kept, cols where dropped."""
    rows, cols = order.shape
    ur = uniform[:cols]
    none = np.empty(0, np.bool_)
    for r in range(rows):  # each row's uniforms drawn just before they are used (in row-major order, as for the block)
        uniforms(state, pos, False, np.float32(0.0), ur, none)
        o = order[r]
        c = codes[r]
        for q in range(cols):
            j = o[q]
            c[j] = q if ur[j] < probs[q] else cols


# ------------------------------------------------ torch.sort's order of ties at a cut (mergekit's magnitude, outliers)
# torch's CPU sort of a float32 vector (values and indices, not stable) is libstdc++'s std::sort (introsort) with
# KeyValueCompAsc/KeyValueCompDesc; kernels.torch_order_window checks this once per process against torch itself.

SORT_THRESHOLD = 16  # libstdc++'s _S_threshold: introsort leaves ranges of at most this many to the final insertion sort


@njit(nogil=True, cache=True)
def _sort_key(bits, descending):  # type: ignore[no-untyped-def]
    """The key of a non-negative float32's bits (a NaN's collapsed to 0x7F800001, one above inf's) in torch's order."""
    return np.int32(0x7F800001 - bits) if descending else np.int32(bits)


@njit(nogil=True, cache=True)
def sort_keys(values, absolute, descending, keys):  # type: ignore[no-untyped-def]
    """int32 keys of float32 magnitudes (of |values| where ``absolute``: the sign bit cleared, as torch.abs clears it)
    whose ascending integer order is torch's comparator's order: ascending, NaN last (KeyValueCompAsc); descending,
    NaN first (KeyValueCompDesc). A non-negative float's bits order as it does, -0 is 0, and every NaN is one key above
    inf (the comparators hold NaNs equivalent). Returns the count of negative entries (other than -0): keys cannot
    order those, and the caller sorts with torch."""
    negative = 0
    for i in range(values.size):
        bits = np.int64(_float_bits(values[i]))
        if absolute:
            bits &= 0x7FFFFFFF
        if bits >= 0x80000000:
            if bits != 0x80000000 and (bits & 0x7FFFFFFF) <= 0x7F800000:
                negative += 1
            bits = 0 if bits == 0x80000000 else 0x7F800001
        elif bits > 0x7F800000:
            bits = 0x7F800001
        keys[i] = _sort_key(bits, descending)
    return negative


@njit(nogil=True, cache=True)
def delta_sort_keys(theta, base, descending, keys):  # type: ignore[no-untyped-def]
    """:func:`sort_keys` of |theta - base|, the float32 task vector's magnitudes (half precision widened first), made
    from the inputs: no delta is held."""
    for i in range(theta.size):
        keys[i] = _sort_key(min(_magnitude_bits(theta[i], base[i]), np.int64(0x7F800001)), descending)


@njit(nogil=True, cache=True)
def _swap(keys, order, i, j):  # type: ignore[no-untyped-def]
    k = keys[i]
    keys[i] = keys[j]
    keys[j] = k
    o = order[i]
    order[i] = order[j]
    order[j] = o


@njit(nogil=True, cache=True)
def _median_to_first(keys, order, result, a, b, c):  # type: ignore[no-untyped-def]
    """libstdc++'s __move_median_to_first."""
    if keys[a] < keys[b]:
        if keys[b] < keys[c]:
            _swap(keys, order, result, b)
        elif keys[a] < keys[c]:
            _swap(keys, order, result, c)
        else:
            _swap(keys, order, result, a)
    elif keys[a] < keys[c]:
        _swap(keys, order, result, a)
    elif keys[b] < keys[c]:
        _swap(keys, order, result, c)
    else:
        _swap(keys, order, result, b)


@njit(nogil=True, cache=True)
def _partition(keys, order, first, last, pivot):  # type: ignore[no-untyped-def]
    """libstdc++'s __unguarded_partition (the median of three at ``pivot`` bounds both scans)."""
    p = keys[pivot]
    while True:
        while keys[first] < p:
            first += 1
        last -= 1
        while p < keys[last]:
            last -= 1
        if not first < last:
            return first
        _swap(keys, order, first, last)
        first += 1


PARTITION_BLOCK = 512  # entries each side of a block partition reads at a time (:func:`_partition_blocks`)


@njit(nogil=True, cache=True)
def _partition_blocks(keys, order, first, last, pivot, left, right):  # type: ignore[no-untyped-def]
    """:func:`_partition`'s result (the same swaps, the same cut) without its branches on every key.

    With p the pivot's key, let A be the places from ``first`` up whose keys are >= p (where the left scan stops) and B
    those from ``last - 1`` down whose keys are <= p (where the right scan stops), both in the range as it was before
    the partition. The t-th swap of the unguarded partition exchanges A[t] and B[t] while A[t] < B[t]: the places between
    the cursors are as they were, so each scan stops where it would have stopped on them. So each side is read a block
    at a time into a list of its stops (branch-free: every place written, the count advanced by the comparison), never
    reading a place the other side has read (none has been written), and the lists are swapped pairwise; once the
    sides meet, the partition carries on, as it is, from the cursors after the last swap made: over at most two blocks."""
    p = keys[pivot]
    lo, hi = first, last - 1  # the next places each side reads
    nl = sl = nr = sr = 0  # each list's length and its next unswapped stop
    a = b = -1  # the last pair swapped
    while True:
        if sl == nl:
            if lo > hi:
                break
            stop = min(lo + PARTITION_BLOCK, hi + 1)
            nl = sl = 0
            for q in range(lo, stop):
                left[nl] = q
                nl += keys[q] >= p
            lo = stop
            continue
        if sr == nr:
            if lo > hi:
                break
            stop = max(hi - PARTITION_BLOCK, lo - 1)
            nr = sr = 0
            for q in range(hi, stop, -1):
                right[nr] = q
                nr += keys[q] <= p
            hi = stop
            continue
        m = min(nl - sl, nr - sr)
        for t in range(m):
            _swap(keys, order, left[sl + t], right[sr + t])
        a, b = left[sl + m - 1], right[sr + m - 1]
        sl += m
        sr += m
    return _partition(keys, order, a + 1 if a >= 0 else first, b if b >= 0 else last, pivot)


@njit(nogil=True, cache=True)
def _straddled(bounds, first, last):  # type: ignore[no-untyped-def]
    for b in bounds:
        if first < b < last:
            return True
    return False


@njit(nogil=True, cache=True)
def _insertion_sort(keys, order, first, last):  # type: ignore[no-untyped-def]
    """A stable insertion sort of [first, last) (libstdc++'s final insertion sort keeps equal keys in place)."""
    for i in range(first + 1, last):
        k = keys[i]
        o = order[i]
        j = i
        while j > first and k < keys[j - 1]:
            keys[j] = keys[j - 1]
            order[j] = order[j - 1]
            j -= 1
        keys[j] = k
        order[j] = o


@njit(nogil=True, cache=True)
def torch_order(keys, order, bounds, depth):  # type: ignore[no-untyped-def]
    """Reorders ``keys`` (:func:`sort_keys`) and ``order`` (the indices 0..n-1, int32 or int64) as std::sort does, but
    only where it decides which entries lie on each side of a place in ``bounds``: introsort's partitions are made on
    the ranges that straddle one (the others are left as they are: nothing leaves a partitioned range), and the last
    range of at most SORT_THRESHOLD entries around one is insertion-sorted, as std::sort's final pass sorts it. Then the
    entries at places [a, b) between two bounds (or the ends) are those of ``torch.sort``. About 2n steps for one bound,
    against n log n for the whole sort. ``depth``: introsort's limit, 2 floor(log2 n); returns False where a straddling
    range reaches it (std::sort would heap-sort it: the caller sorts with torch)."""
    n = keys.size
    left = np.empty(PARTITION_BLOCK, np.int64)
    right = np.empty(PARTITION_BLOCK, np.int64)
    stack = np.empty((2 * 64 + 2, 3), np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, n, depth
    top = 1
    while top > 0:
        top -= 1
        first, last, d = stack[top, 0], stack[top, 1], stack[top, 2]
        while last - first > SORT_THRESHOLD and _straddled(bounds, first, last):
            if d == 0:
                return False
            d -= 1
            mid = first + (last - first) // 2
            _median_to_first(keys, order, first, first + 1, mid, last - 1)
            if last - first > 4 * PARTITION_BLOCK:
                cut = _partition_blocks(keys, order, first + 1, last, first, left, right)
            else:
                cut = _partition(keys, order, first + 1, last, first)
            if _straddled(bounds, cut, last):
                if top == stack.shape[0]:
                    return False
                stack[top, 0], stack[top, 1], stack[top, 2] = cut, last, d
                top += 1
            last = cut
        if last - first <= SORT_THRESHOLD and _straddled(bounds, first, last):
            _insertion_sort(keys, order, first, last)
    return True


@njit(nogil=True, cache=True)
def mark(order, first, stop, keep):  # type: ignore[no-untyped-def]
    """keep[order[q]] = True for places q in [first, stop)."""
    for q in range(first, stop):
        keep[order[q]] = True

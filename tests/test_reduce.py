"""modelsoup.methods.reduce: float64 sums and dots with one value on any thread count, alignment and cut into pieces."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from modelsoup.methods import reduce

from . import reference as ref


@pytest.fixture
def threads():
    """Sets torch's thread count for the test's body; restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def placed(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t``'s values in a fresh buffer starting ``offset`` entries in (another alignment), same shape."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    buf[offset:] = t.reshape(-1)
    return buf[offset:].view(t.shape)


def bits(x: float) -> str:
    return float(x).hex()


SIZES = [0, 1, 1023, 1024, 1025, 70_001, (1 << 20) + 4097, (2 << 20) + 3]


@pytest.mark.parametrize("n", SIZES)
def test_sums_do_not_depend_on_threads_or_alignment(threads, n):
    """torch.dot and a whole-tensor torch sum change their last bits with the thread count; these do not, and not with the
    operands' alignment either (a mapped tensor may start anywhere)."""
    g = torch.Generator().manual_seed(n % 101)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    seen = set()
    for t in (1, 2, 3, 4):
        threads(t)
        for off in (0, 1, 3):
            x, y = placed(a, off), placed(b, off)
            seen.add((bits(reduce.dot64(x, y)), bits(reduce.norm64(x)), bits(reduce.sum64(x)), bits(reduce.abs_sum64(y)),
                      bits(reduce.dot(x, y)), bits(reduce.norm(x)), tuple(map(bits, reduce.gram(x, y)))))
    assert len(seen) == 1


def test_a_sum_gathered_in_row_aligned_pieces_is_the_whole_sum():
    """Karcher gathers its dots a block at a time, the engine its sums a chunk at a time: any cut at multiples of ROW
    gives the whole tensor's bits (the row sums are the same rows; fsum adds them exactly)."""
    g = torch.Generator().manual_seed(0)
    n = 3 * reduce.PIECE + 5 * reduce.ROW + 17
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    whole = reduce.dot(a, b)
    for step in (reduce.ROW, 7 * reduce.ROW, reduce.PIECE, reduce.PIECE + reduce.ROW):
        parts = []
        for i in range(0, n, step):
            parts.extend(reduce.dot_parts(a[i : i + step], b[i : i + step]))
        assert bits(reduce.fsum(parts)) == bits(whole), step
    assert reduce.gram(a, b) == (reduce.dot(a, a), reduce.dot(b, b), whole)


@pytest.mark.parametrize("n", [1, 1023, 1025, (1 << 20) + 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gram_matrix_is_every_pairwise_dot(n, dtype):
    """G[i][j] is dot(v_i, v_j) bit for bit, symmetric, with v_i = t_i - base taken in the work dtype (a bfloat16
    difference would round); the upper triangle round-trips; a row whose float32 products overflow is summed in float64."""
    g = torch.Generator().manual_seed(n % 89)
    ts = [(torch.randn(n, generator=g) * (i + 1)).to(dtype) for i in range(3)]
    base = torch.randn(n, generator=g).to(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for b in (None, base):
        vs = [t.to(wide) - (b.to(wide) if b is not None else 0) for t in ts]
        got = reduce.gram_matrix(ts, b)
        assert [[bits(x) for x in row] for row in got] == [[bits(reduce.dot(x, y)) for y in vs] for x in vs]
        assert reduce.gram_from_upper(reduce.gram_upper(ts, b), 3) == got
    if dtype == torch.float32 and n > 1:
        big = [t * 1e20 for t in ts]
        got = reduce.gram_matrix(big)
        assert all(math.isfinite(x) for row in got for x in row)
        assert got[0][1] == pytest.approx(1e40 * reduce.dot64(ts[0], ts[1]), rel=1e-5, abs=1e40 * 1e-6 * n)
    assert reduce.gram_matrix([]) == []
    with pytest.raises(ValueError, match="Gram sums of tensors of 3 and 4 entries"):
        reduce.gram_matrix([torch.ones(3), torch.ones(4)])


def test_linear_combination_closed_forms():
    """base + sum_i c_i (t_i - base), term by term; half precision widened exactly; c_i = 0 left out (no -0 from 0 * -x)."""
    from modelsoup.methods.ops import linear_combination

    a, b, base = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 4.0, -0.0]), torch.tensor([0.5, 0.5, 0.0])
    assert torch.equal(linear_combination([a, b], [2.0, 0.5], None, torch.float32), torch.tensor([3.5, -2.0, 0.0]))
    assert torch.equal(linear_combination([a, b], [1.0, 1.0], base, torch.float32), torch.tensor([3.5, 1.5, 0.0]))
    zero = linear_combination([-a, b], [0.0, 0.0], None, torch.float32)
    assert torch.equal(zero, torch.zeros(3)) and not torch.signbit(zero).any()
    half = torch.tensor([1.0 + 2**-7, 3.0], dtype=torch.bfloat16)  # 1 + 2^-7 - 1 is exact only once widened
    got = linear_combination([half], [1.0], torch.tensor([1.0, 3.0], dtype=torch.bfloat16), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor([1.0 + 2**-7, 3.0]))
    d = linear_combination([a.double(), b.double()], [1 / 3, 1 / 3], None, torch.float64)
    assert d.dtype == torch.float64 and torch.equal(d, a.double() * (1 / 3) + b.double() * (1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dot_is_accurate_against_exact_rational_arithmetic(dtype):
    """The exact dot (fractions) against ours: dot64's float32 and narrower products are exact in float64, so only its row
    sums round (a relative error near 1e-16); dot's float32 products and rows are off near 1e-7 of the products' scale
    (a float32 dot of a million entries near 1e-4)."""
    g = torch.Generator().manual_seed(1)
    n = 50_000 + 333
    a, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    exact = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a.tolist(), b.tolist())), Fraction(0))
    scale = sum(abs(float(x) * float(y)) for x, y in zip(a.tolist(), b.tolist()))
    assert abs(reduce.dot64(a, b) - float(exact)) <= 1e-14 * scale
    assert abs(reduce.dot(a, b) - float(exact)) <= (1e-14 if dtype == torch.float64 else 1e-6) * scale
    assert bits(reduce.dot64(a, b)) == bits(ref.dot_by_rows(a, b, exact=True))
    assert bits(reduce.dot(a, b)) == bits(ref.dot_by_rows(a, b))


def test_closed_forms():
    """Integers (every sum exact): sum 1..n, sum of squares, |.| of alternating signs, a Gram of orthogonal halves."""
    n = (1 << 20) + 999
    x = torch.arange(1, n + 1, dtype=torch.float64)
    assert reduce.sum64(x) == n * (n + 1) // 2
    small = torch.arange(1, 3001, dtype=torch.float32)
    assert reduce.dot64(small, small) == 3000 * 3001 * 6001 // 6
    alt = torch.tensor([(-1.0) ** i * i for i in range(5000)])
    assert reduce.abs_sum64(alt) == sum(range(5000))
    assert reduce.sum64(torch.empty(0)) == 0.0 and reduce.dot64(torch.empty(0), torch.empty(0)) == 0.0
    e = torch.zeros(4096)
    e[:2048], f = 1.0, torch.zeros(4096)
    f[2048:] = 2.0
    assert reduce.gram(e, f) == (2048.0, 4 * 2048.0, 0.0)
    ones = torch.ones(5000)
    assert reduce.dot(ones, ones * 3) == 15000 and reduce.norm(ones * 2) == 2 * math.sqrt(5000)  # float32 rows exact here

    with pytest.raises(ValueError, match="dot of tensors of 3 and 4 entries"):
        reduce.dot64(torch.ones(3), torch.ones(4))


def test_row_dots_and_norms(threads):
    """Several rows: torch's reduction of each row (one thread's); one vector (1-D, or a single row): dot64 and norm64,
    where torch would split a reduction to one number across threads."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3000, generator=g), torch.randn(5, 3000, generator=g)
    assert torch.equal(reduce.row_dots(a, b), (a * b).sum(dim=-1, keepdim=True))
    assert torch.equal(reduce.row_norms(a), a.norm(dim=-1, keepdim=True))
    v, w = torch.randn(200_001, generator=g), torch.randn(200_001, generator=g)
    seen = set()
    for t in (1, 2, 3):
        threads(t)
        d, nv = reduce.row_dots(v, w), reduce.row_norms(v)
        assert d.shape == (1,) and nv.shape == (1,)
        seen.add((bits(float(d)), bits(float(nv)), bits(float(reduce.row_dots(v.view(1, -1), w.view(1, -1))))))
    assert len(seen) == 1
    long_rows = torch.randn(2, 300_001, generator=g)  # fewer rows than threads, each longer than torch's grain
    assert len({(reduce.row_dots(long_rows, long_rows).numpy().tobytes(), reduce.row_norms(long_rows).numpy().tobytes())
                for t in (1, 2, 3, 4) if threads(t) is None}) == 1
    assert float(d) == pytest.approx(float(v.double() @ w.double()), rel=1e-6)
    assert math.isclose(float(nv), float(v.double().norm()), rel_tol=1e-6)


def _has_avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="needs a CPU with AVX-512 (torch's AVX2 and AVX-512 kernels compared)")
def test_every_method_has_the_same_bits_with_torchs_avx2_and_avx512_kernels():
    """A machine with AVX2 only and one with AVX-512 run different torch kernels (ATEN_CPU_CAPABILITY picks one here):
    every method writes the same bits on both, so the README's "runs on another machine are bit-identical" holds."""
    script = (
        "import hashlib, torch\n"
        "from modelsoup.methods import available_methods\n"
        "g = torch.Generator().manual_seed(3)\n"
        "for shape in [(70_001,), (300, 261)]:\n"
        "    base = torch.randn(shape, generator=g)\n"
        "    ms = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(4)]\n"
        "    for m in available_methods():\n"
        "        if m.statistic is None:\n"
        "            kw = {'base': base} if m.base == 'required' else {}\n"
        "            gen = torch.Generator().manual_seed(1) if m.random else None\n"
        "            r = m(ms[: m.max_models or 4], generator=gen, **kw)\n"
        "            print(m.name, hashlib.sha256(r.numpy().tobytes()).hexdigest())\n"
        "from modelsoup.methods.arcee_fusion import importance\n"
        "a, b = torch.randn(300, 1208, generator=g), torch.randn(300, 1208, generator=g)\n"
        "print('importance', hashlib.sha256(importance(a, b).numpy().tobytes()).hexdigest())\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    outs = {}
    for cap in ("avx2", "avx512"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        outs[cap] = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert outs["avx2"][-1] == "AVX2" and outs["avx512"][-1] == "AVX512"
    assert len(outs["avx2"]) > 20 and outs["avx2"][:-1] == outs["avx512"][:-1]


def test_arcee_fusion_keeps_the_same_entries_on_any_thread_count(threads):
    """arcee_fusion's importance is |delta| times a KL divergence; for one vector its sum was a whole-tensor torch sum, so
    on deltas at the outlier cut (few distinct magnitudes) 1 and 2 threads kept different entries. Its softmax and sums
    are reduce's now."""
    from modelsoup.methods import get_method
    from modelsoup.methods.arcee_fusion import importance

    n = 200_000
    g = torch.Generator().manual_seed(0)
    base = torch.round(torch.randn(n, generator=g) * 256) / 256  # a grid: base + delta is exact
    mag = torch.full((n,), 2.0)
    mag[: int(0.3 * n)], mag[int(0.7 * n) :], mag[-200:] = 1.0, 3.0, 5.0
    theta = base + torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) * mag / 64
    seen = set()
    for t in (1, 2, 3):
        threads(t)
        seen.add((importance(theta, base).numpy().tobytes(), get_method("arcee_fusion")([theta], base=base).numpy().tobytes()))
    assert len(seen) == 1


def test_non_finite_and_overflowing_sums():
    """+inf and -inf in different rows give NaN (math.fsum raises there), a total beyond float64 gives inf; float32
    squares that overflow where the entries do not (1e20) are summed again in float64: the angle stays right."""
    x = torch.zeros(5000)
    x[3], x[4000] = math.inf, -math.inf
    assert math.isnan(reduce.sum64(x)) and math.isnan(reduce.dot(x, torch.ones(5000))) and reduce.gram(x, x)[0] == math.inf
    big = torch.full((3000,), 1e308, dtype=torch.float64)
    assert reduce.sum64(big) == math.inf
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(70_001, generator=g), torch.randn(70_001, generator=g)
    huge = reduce.gram(a * 1e20, b * 1e20)
    assert all(math.isfinite(v) for v in huge)
    small = reduce.gram(a.double(), b.double())
    assert huge[2] / math.sqrt(huge[0] * huge[1]) == pytest.approx(small[2] / math.sqrt(small[0] * small[1]), rel=1e-6)
    assert reduce.dot(a * 1e20, a * 1e20) == pytest.approx(1e40 * reduce.dot64(a, a), rel=1e-6)


def test_row_helpers_shapes():
    """Keepdim shapes as torch gives them (a 0-d tensor stays 0-d); operands of two shapes are refused, not broadcast."""
    assert reduce.row_dots(torch.tensor(2.0), torch.tensor(3.0)).shape == () and float(reduce.row_dots(torch.tensor(2.0), torch.tensor(3.0))) == 6
    assert reduce.row_norms(torch.tensor(-2.0)).shape == ()
    assert reduce.row_sum(torch.ones(4, 3)).shape == (4, 1) and reduce.row_sum(torch.ones(1, 7)).shape == (1, 1)
    with pytest.raises(ValueError, match=r"row dots of tensors of shapes \[2, 3\] and \[3\]"):
        reduce.row_dots(torch.ones(2, 3), torch.ones(3))
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reduce.softmax(x), torch.softmax(x, dim=-1))
    torch.testing.assert_close(reduce.softmax(x[0]), torch.softmax(x[0], dim=-1))

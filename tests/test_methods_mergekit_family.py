"""The methods that follow mergekit 0.1.5 (nuslerp, multislerp, karcher, sce, della, della_linear, nearswap,
arcee_fusion, ram, ramplus_tl, passthrough, breadcrumbs_ties; ties/breadcrumbs with ``rescale: l1`` and
``keep_at_least_one``), three ways: hand-worked numbers, the slow loops of tests/reference.py (which were
checked against mergekit's own code), and algebraic identities."""

from __future__ import annotations

import math
import re

import pytest
import torch

from modelsoup.errors import MethodError
from modelsoup.methods import get_method
from modelsoup.methods.ops import magnitude_keep_probabilities

from . import reference as ref
from .tolerances import FP32_VS_REFERENCE


def T(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def M(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), **FP32_VS_REFERENCE)


def call(name, tensors, **kw):
    return get_method(name)(tensors, **kw)


def _rand(seed: int, n: int, shape=(4, 5), spread=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * torch.randn(shape, generator=g) for _ in range(n)]


SHAPES = [(7,), (4, 5), (3, 2, 4)]
H = math.sqrt(0.5)


# ================================================================ hand-worked examples


def test_nuslerp_takes_the_angle_of_a_large_tensor_in_float64():
    """Two fine-tunes of 4M entries, nearly parallel (cos 0.9999): a float32 sum of u0 * u1 comes out above 1 there
    (1.00009), which clamps to 1 and interpolates linearly; the float64 sums give the spherical result, which the
    float64 formula computes here to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    base = torch.randn(n, generator=g) * 0.02
    a, b = base + torch.randn(n, generator=g) * 2e-4, base + torch.randn(n, generator=g) * 2e-4
    a64, b64 = a.double(), b.double()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    assert float((a / a.norm() * (b / b.norm())).sum()) > 1 > cos > 0.9998  # what a float32 angle would do
    theta = math.acos(cos)
    want = (math.sin(theta / 2) * a64 + math.sin(theta / 2) * b64) / math.sin(theta)
    got = call("nuslerp", [a, b])
    assert float(((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max()) < 1e-6
    linear = (a64 + b64) / 2
    assert float(((linear - want).abs() / want.abs().clamp_min(1e-3)).max()) > 5e-6  # the test tells the two apart


@pytest.mark.parametrize("name", ["multislerp", "karcher"])
def test_sphere_means_of_large_tensors_have_float32_rounding_only(name):
    """Three near-parallel fine-tunes of 4M entries: the norms and dots come from float64 sums, so the float32 run is
    the float64 run to float32 rounding (with float32 reductions multislerp was 1.5e-4 off, karcher 1.4e-5)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    base = torch.randn(n, generator=g) * 0.02
    ts = [base + torch.randn(n, generator=g) * 2e-4 for _ in range(3)]
    got, want = call(name, ts).double(), call(name, [t.double() for t in ts])
    assert float(((got - want).abs() / want.abs().clamp_min(1e-3)).max()) < 2e-6


def test_nuslerp_by_hand():
    # t = w_2 / (w_1 + w_2); orthogonal unit vectors, theta = pi/2
    close(call("nuslerp", [T(1, 0), T(0, 1)]), T(H, H))  # no weights: t = .5
    # t = 3/4: sin(pi/8) and sin(3 pi/8)
    close(call("nuslerp", [T(1, 0), T(0, 1)], weights=[1, 3]), T(math.sin(math.pi / 8), math.sin(3 * math.pi / 8)))
    # weights summing to ~0 give t = .5 (as mergekit)
    close(call("nuslerp", [T(1, 0), T(0, 1)], weights=[1, -1]), T(H, H))
    # with a base the task vectors (1, 0) and (0, 1) are interpolated and added back
    close(call("nuslerp", [T(2, 1), T(1, 2)], base=T(1, 1)), T(1 + H, 1 + H))


def test_nuslerp_flatten_rows_and_columns_by_hand():
    a, b = M([1, 0], [1, 0]), M([0, 1], [1, 0])
    # flatten (the default): (1,0,1,0) and (0,1,1,0) have cos 1/2, theta = pi/3; t = .5 gives
    # sin(pi/6) / sin(pi/3) = 1/sqrt(3) times their sum (1, 1, 2, 0)
    s = 1 / math.sqrt(3)
    close(call("nuslerp", [a, b]), M([s, s], [2 * s, 0]))
    # per row: row 0 orthogonal -> (h, h); row 1 the same vector twice (colinear) -> itself
    close(call("nuslerp", [a, b], flatten=False), M([H, H], [1, 0]))
    # row_wise (vectors along dim 0, the columns): column 0 (1,1) vs (0,1) at 45 degrees,
    # sin(pi/8) / sin(pi/4) (1+0, 1+1); column 1 (0,0) vs (1,0): a zero vector has no direction (cos 0,
    # theta = pi/2), so sin(pi/4) (1, 0)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(call("nuslerp", [a, b], flatten=False, row_wise=True), M([c, H], [2 * c, 0]))
    # a tiny vector keeps its direction (norms are floored at 1e-7 only): (1e-5, 1e-5) is at 45 degrees to (1, 0),
    # so the midpoint is c ((1e-5, 1e-5) + (1, 0)), not the (h, 0) of a right angle
    close(call("nuslerp", [T(1e-5, 1e-5), T(1, 0)]), c * T(1 + 1e-5, 1e-5))


def test_multislerp_by_hand():
    # the tangent vectors sum to zero at the normalised weighted mean m = sum w_i u_i / |.| (sum w_i (u_i - <u_i, m> m)
    # = M - |M| m = 0), so the result is m times the weighted mean norm. (2,0), (0,1), w = [3, 1] -> [.75, .25]:
    # m = (.75, .25) / |(.75, .25)| = (3, 1) / sqrt(10), mean norm .75 * 2 + .25 * 1 = 1.75
    m = T(3, 1) / math.sqrt(10)
    close(call("multislerp", [T(2, 0), T(0, 1)], weights=[3, 1]), 1.75 * m)
    # weights not normalised: the direction of 3 u_1 + u_2 is the same, the norm 3 * 2 + 1 * 1 = 7
    close(call("multislerp", [T(2, 0), T(0, 1)], weights=[3, 1], normalize_weights=False), 7 * m)
    # equal weights: (h, h) times (2 + 1) / 2; slerp at t = .5 would keep the norms apart: (2h, h)
    close(call("multislerp", [T(2, 0), T(0, 1)]), T(1.5 * H, 1.5 * H))
    # with a base: the same on the task vectors, then added back
    close(call("multislerp", [T(3, 1), T(1, 2)], base=T(1, 1)), T(1 + 1.5 * H, 1 + 1.5 * H))


def test_multislerp_antipodal_fallback_and_error_by_hand():
    # (3, 4) and (-6, -8) point in opposite directions: with equal weights the mean direction vanishes and two
    # models fall back to the weighted sum .5 (3, 4) + .5 (-6, -8)
    close(call("multislerp", [T(3, 4), T(-6, -8)]), T(-1.5, -2))
    close(call("multislerp", [T(4, 5), T(-5, -7)], base=T(1, 1)), T(1 - 1.5, 1 - 2))
    with pytest.raises(MethodError, match=r"^multislerp: the weighted mean of the models' directions is zero \(antipodal models "
                                          r"with balancing weights\); change the weights$"):
        call("multislerp", [T(3, 4), T(-3, -4), T(3, 4)], weights=[1, 2, 1])


def test_karcher_by_hand():
    # on a circle the Karcher mean of directions is the weighted mean of their angles (the first step lands on it,
    # the second is shorter than tol): 0, 0 and 90 degrees -> 30 degrees, not the 26.57 of the normalised
    # Euclidean mean (2/3, 1/3); the norm is the mean norm (2 + 1 + 3) / 3 = 2
    close(call("karcher", [T(2, 0), T(1, 0), T(0, 3)]), 2 * T(math.cos(math.pi / 6), 0.5))
    # weights [1, 2]: (0 + 2 * 90) / 3 = 60 degrees, norm 1
    close(call("karcher", [T(1, 0), T(0, 1)], weights=[1, 2]), T(0.5, math.sin(math.pi / 3)))


def test_karcher_without_directions_by_hand():
    # a zero model has no direction: the mean direction is (1, 0); the norm (2 + 0) / 2 still counts it
    close(call("karcher", [T(2, 0), T(0, 0)]), T(1, 0))
    # a norm at most tol is no direction either: (1, 0), norm (2 + 5e-6) / 2
    close(call("karcher", [T(2, 0), T(0, 5e-6)]), T(1 + 2.5e-6, 0))
    # nothing has a direction: zero
    assert torch.equal(call("karcher", [T(0, 0), T(0, 0)]), T(0, 0))
    assert torch.equal(call("karcher", [T(0, 0), T(5e-6, 0)]), T(0, 0))


def test_sce_by_hand():
    base = T(1, 1, 1, 1, 1)
    d1, d2 = T(1, 2, 0, -2, 1), T(3, -2, 0, 1, 6)
    # select_topk 1 (no selection): energies mean(d^2) = 10/5 = 2 and 50/5 = 10 -> weights 1/6, 5/6.
    # entry 0: both +, 1/6 * 1 + 5/6 * 3 = 8/3; entry 1: the vote 2 - 2 = 0 elects +, d1 alone: 2;
    # entry 2: no delta; entry 3: the vote -1 elects -, d1 alone: -2; entry 4: 1/6 * 1 + 5/6 * 6 = 31/6
    close(call("sce", [base + d1, base + d2], base=base), base + T(8 / 3, 2, 0, -2, 31 / 6))
    # select_topk .75: the variances (1, 4, 0, 2.25, 6.25) have 4 nonzero, k = 3 keeps entries 4, 1, 3;
    # energies of (0,2,0,-2,1) and (0,-2,0,1,6): 9/5 and 41/5 -> weights .18, .82; entry 4: .18 + .82 * 6 = 5.1
    close(call("sce", [base + d1, base + d2], base=base, select_topk=0.75), base + T(0, 2, 0, -2, 5.1))
    close(ref.sce([base + d1, base + d2], base, 0.75), base + T(0, 2, 0, -2, 5.1))


def test_sce_tiny_energies_weigh_the_models_equally_by_hand():
    # mean(d^2) = 5e-9 and 4.5e-8 sum below 1e-6: weights 1/2 each, (1e-4 + 3e-4) / 2 (energies would give 2.8e-4)
    got = call("sce", [T(1e-4, 0), T(3e-4, 0)], base=T(0, 0))
    torch.testing.assert_close(got, T(2e-4, 0), rtol=1e-5, atol=1e-9)


def test_nearswap_by_hand():
    # t = 1: |diff| .5 -> weight clamp(2) = 1 (the model's); 2 -> .5 (halfway); 4 -> .25 (1 toward -4);
    # no difference: t / 1e-6 clamps to 1 (the model's, which is the base's)
    close(call("nearswap", [T(0.5, 2, -4, 1)], base=T(0, 0, 0, 1), t=1.0), T(0.5, 1, -1, 1))


def test_arcee_fusion_by_hand():
    # one row: one KL for every entry, so importance ranks as |delta|; n = 9, quartiles at floor(q * 8) = 2, 4, 6 of
    # the sorted |delta|: .3, .5, .7 -> threshold .5 + 1.5 * .4 = 1.1: only the 3.0 is kept
    delta = T(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 3.0)
    close(call("arcee_fusion", [delta], base=torch.zeros(9)), T(0, 0, 0, 0, 0, 0, 0, 0, 3.0))


def test_arcee_fusion_kl_is_per_row_by_hand():
    # row 1 moves by a constant: softmax does not change, KL = 0, so its large changes have importance 0;
    # row 0's importances are K * (.1, .2, .5, 3). Sorted: 0,0,0,0,.1K,.2K,.5K,3K; quartiles at floor(q * 7) = 1, 3, 5:
    # 0, 0, .2K -> threshold .3K: row 0 keeps .5 and 3, row 1 keeps nothing
    base = torch.zeros(2, 4)
    model = M([0.1, 0.2, 0.5, 3], [3, 3, 3, 3])
    close(call("arcee_fusion", [model], base=base), M([0, 0, 0.5, 3], [0, 0, 0, 0]))


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(4)
    d1, d2 = T(1, 2, 4, 1e-6), T(3, 0, 0, 0.5)
    # entry 0 changed by both: mean 2; entries 1, 2 by d1 alone; entry 3: 1e-6 is no change (<= epsilon), d2's .5 alone
    close(call("ram", [d1, d2], base=base), T(2, 2, 4, 0.5))
    # RAM+: d1 has 1 shared and 2 unique changes, rho .5 -> lambda 1 + .1 * .5 = 1.05; d2 1 and 1, rho 1 clamped to
    # alpha .8 -> 1.08; unique changes times lambda, shared ones averaged as in RAM
    close(call("ramplus_tl", [d1, d2], base=base, r=0.1, alpha=0.8), T(2, 2.1, 4.2, 0.54))
    close(ref.ram([d1, d2], base, r=0.1, alpha=0.8), T(2, 2.1, 4.2, 0.54))


def test_passthrough_by_hand():
    close(call("passthrough", [T(1, -2)], scale=3.0), T(3, -6))
    close(call("passthrough", [T(1, -2)], scale=[0.5]), T(0.5, -1))


def test_ties_rescale_l1_by_hand():
    d1, d2, zero = T(3, -1, 0.5, -2), T(-1, 2, 1, -4), torch.zeros(4)
    # density .5 keeps (3, 0, 0, -2): |d1|_1 = 6.5 from 5, times 1.3
    close(call("ties", [d1], base=zero, density=0.5, rescale="l1"), T(3.9, 0, 0, -2.6))
    # d2 keeps (0, 2, 0, -4): 8 from 6, times 4/3; entry 3: (-2.6 - 16/3) / 2
    want = T(3.9, 8 / 3, 0, (-2.6 - 16 / 3) / 2)
    close(call("ties", [d1, d2], base=zero, density=0.5, rescale="l1"), want)
    close(ref.ties([d1, d2], zero, [1, 1], [0.5, 0.5], rescale="l1"), want)


def test_ties_keep_at_least_one_by_hand():
    d = T(3, -1, 0.5, -2)
    # density .1 of 4 entries: k = floor(.4) = 0, nothing kept; mergekit keeps at least the largest
    assert torch.equal(call("ties", [d], base=torch.zeros(4), density=0.1), torch.zeros(4))
    close(call("ties", [d], base=torch.zeros(4), density=0.1, keep_at_least_one=True), T(3, 0, 0, 0))


def test_breadcrumbs_rescale_l1_by_hand():
    # n = 10, density .5, gamma .1 keeps 5..9 (L1 35) of 1..10 (L1 55): times 11/7
    d = torch.arange(1.0, 11.0)
    want = T(0, 0, 0, 0, 5, 6, 7, 8, 9, 0) * (11 / 7)
    close(call("breadcrumbs", [d], base=torch.zeros(10), density=0.5, gamma=0.1, rescale="l1"), want)
    close(call("breadcrumbs_ties", [d], base=torch.zeros(10), density=0.5, gamma=0.1, rescale="l1"), want)


def test_breadcrumbs_ties_by_hand():
    # as in test_methods.test_breadcrumbs_with_sign_election_by_hand: density .6, gamma .2 trim
    # d1 -> [0, -2, 3, -4, 0], d2 -> [0, 4, 0, 2, -3]; elected [+, +, +, -, -]; no division (normalize false)
    d1, d2, zero = T(1, -2, 3, -4, 5), T(-5, 4, -1, 2, -3), torch.zeros(5)
    close(call("breadcrumbs_ties", [d1, d2], base=zero, density=0.6, gamma=0.2), T(0, 4, 3, -4, -3))
    # normalize: divided by the agreeing weights, 1 each
    close(call("breadcrumbs_ties", [d1, d2], base=zero, density=0.6, gamma=0.2, normalize=True), T(0, 4, 3, -4, -3))
    close(call("breadcrumbs_ties", [d1, d2], base=zero, density=0.6, gamma=0.2, weights=[1, 3], normalize=True),
          T(0, 12 / 3, 3, 6 / 3, -9 / 3))


def test_della_keep_probabilities_by_hand():
    # |d| = (.3, 2, .1, 1, .5) has ranks (1, 4, 0, 3, 2); density .5, epsilon .2: .3 + .4 * rank / 4
    d = T(0.3, -2, 0.1, 1, -0.5)
    close(magnitude_keep_probabilities(d, 0.5, 0.2), T(0.4, 0.7, 0.3, 0.6, 0.5))
    # equal magnitudes are ranked in index order
    close(magnitude_keep_probabilities(T(1, -1, 1), 0.5, 0.2), T(0.3, 0.5, 0.7))
    # a matrix is ranked row by row (along dim 1)
    close(magnitude_keep_probabilities(M([1, 2], [4, 3]), 0.5, 0.2), M([0.3, 0.7], [0.7, 0.3]))
    # a row of one entry gets density (mergekit divides 0 by 0 there)
    close(magnitude_keep_probabilities(M([3], [1]), 0.5, 0.2), M([0.5], [0.5]))


def test_della_by_hand_with_known_mask():
    # probabilities (.4, .7, .3, .6, .5) as above; seed 0 draws the keep-mask [0, 0, 1, 1, 1]: the largest
    # magnitude (-2) dropped, the smallest (.1) kept
    d, zero = T(0.3, -2, 0.1, 1, -0.5), torch.zeros(5)
    probs = magnitude_keep_probabilities(d, 0.5, 0.2)
    assert torch.bernoulli(probs, generator=torch.Generator().manual_seed(0)).tolist() == [0, 0, 1, 1, 1]

    def della(name, **kw):
        return call(name, [d], base=zero, density=0.5, epsilon=0.2, generator=torch.Generator().manual_seed(0), **kw)

    for name in ("della", "della_linear"):  # one model: the sign election keeps every survivor
        close(della(name), T(0, 0, 0.1 / 0.3, 1 / 0.6, -0.5 / 0.5))  # each survivor over its own probability
        close(della(name, rescale="l1"), T(0, 0, 0.1, 1, -0.5) * (3.9 / 1.6))  # to |d|_1 = 3.9 from 1.6
        close(della(name, rescale="none"), T(0, 0, 0.1, 1, -0.5))


# ================================================================ agreement with tests/reference.py


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES + [(5, 1)])
@pytest.mark.parametrize("form", [{"flatten": True}, {"flatten": False}, {"flatten": False, "row_wise": True}])
def test_nuslerp_matches_reference(seed, shape, form):
    base, ms = _rand(seed, 2, shape)
    for weights in (None, [1.0, 2.5], [0.3, -0.1]):
        close(call("nuslerp", ms, weights=weights, **form), ref.nuslerp(ms, weights, **form))
        close(call("nuslerp", ms, base=base, weights=weights, **form), ref.nuslerp(ms, weights, base, **form))


def test_nuslerp_forms_differ():
    base, ms = _rand(3, 2, (4, 5))
    flat, rows, cols = (call("nuslerp", ms, base=base, **f) for f in ({}, {"flatten": False}, {"flatten": False, "row_wise": True}))
    assert not torch.allclose(flat, rows) and not torch.allclose(rows, cols) and not torch.allclose(flat, cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_multislerp_matches_reference(seed, shape):
    base, ms = _rand(seed, 4, shape)
    w = [1.0, 0.5, 2.0, 0.25]
    for nw in (True, False):
        close(call("multislerp", ms, weights=w, normalize_weights=nw), ref.multislerp(ms, w, normalize_weights=nw))
        close(call("multislerp", ms, base=base, weights=w, normalize_weights=nw), ref.multislerp(ms, w, base, normalize_weights=nw))
    close(call("multislerp", ms[:2], base=base), ref.multislerp(ms[:2], None, base))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_matches_reference(seed, shape):
    _, ms = _rand(seed, 3, shape, spread=1.0)
    close(call("karcher", ms), ref.karcher(ms))
    close(call("karcher", ms, weights=[1.0, 0.5, 2.0]), ref.karcher(ms, [1.0, 0.5, 2.0]))
    far = [ms[0], -2 * ms[1], ms[2] + 1]  # wide angles: several steps before the step is shorter than tol
    close(call("karcher", far), ref.karcher(far))
    close(call("karcher", far, max_iter=2), ref.karcher(far, max_iter=2))
    assert not torch.allclose(ref.karcher(far, max_iter=1), ref.karcher(far))  # the iterations matter here
    close(call("karcher", far, tol=1e-2), ref.karcher(far, tol=1e-2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.3, 0.0])
def test_sce_matches_reference(seed, shape, select_topk):
    base, ms = _rand(seed, 3, shape)
    n = ms[0].numel()
    # these sizes take the same k in float32 (mergekit) and float64 (see test_sce_keep_count_is_mergekits)
    assert ref.sce_keep_count(n, select_topk) == int(n * select_topk)
    close(call("sce", ms, base=base, select_topk=select_topk), ref.sce(ms, base, select_topk))


def test_sce_selection_with_zero_variance_entries_matches_reference():
    base, ms = _rand(4, 3, (5, 6))
    for m in ms:
        m[:, :2] = base[:, :2] + 0.5  # equal deltas: zero variance, not counted in nnz (20 of 30 left)
    for topk in (0.5, 0.9):
        got = call("sce", ms, base=base, select_topk=topk)
        close(got, ref.sce(ms, base, topk))
    # k = int(20 * .5) = 10 of the nonzero-variance entries, not int(30 * .5) = 15
    kept = (call("sce", ms, base=base, select_topk=0.5) - base)[:, 2:] != 0
    assert int(kept.sum()) == 10


def test_sce_keep_count_is_mergekits():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(100)
    ms = [torch.randn(100, generator=g) for _ in range(2)]  # 100 distinct nonzero variances
    assert ref.sce_keep_count(100, 0.57) == 57 != int(100 * 0.57)
    got = call("sce", ms, base=base, select_topk=0.57)
    close(got, ref.sce(ms, base, 0.57))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_matches_reference(seed, shape):
    base, (m,) = _rand(seed, 1, shape)
    for t in (0.0, 0.05, 0.3, 10.0):
        close(call("nearswap", [m], base=base, t=t), ref.nearswap(m, base, t))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES + [(40, 25)])
def test_arcee_fusion_matches_reference(seed, shape):
    base, (m,) = _rand(seed, 1, shape)
    m = m.clone()
    m.view(-1)[seed :: 5] += 2.0  # some large changes among the small ones: outliers to find
    got = call("arcee_fusion", [m], base=base)
    close(got, ref.arcee_fusion(m, base))
    kept = got != base
    assert 0 < int(kept.sum()) < m.numel() // 2  # some changes kept, most not


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_ram_and_ramplus_match_reference(seed, shape):
    base, ms = _rand(seed, 3, shape)
    g = torch.Generator().manual_seed(seed + 100)
    # each model changes about half the entries (some by less than epsilon): unique, shared and untouched entries
    sparse = []
    for m in ms:
        keep = torch.rand(shape, generator=g)
        sparse.append(torch.where(keep < 0.4, m, torch.where(keep < 0.5, base + 1e-6, base)))
    close(call("ram", sparse, base=base), ref.ram(sparse, base))
    close(call("ram", sparse, base=base, epsilon=0.1), ref.ram(sparse, base, 0.1))
    for r, alpha in ((0.1, 0.2), (0.5, 3.0), (0.0, 1.0)):
        close(call("ramplus_tl", sparse, base=base, r=r, alpha=alpha), ref.ram(sparse, base, r=r, alpha=alpha))
    assert not torch.allclose(call("ramplus_tl", sparse, base=base, r=0.5, alpha=3.0), call("ram", sparse, base=base))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_passthrough_matches_reference(seed, shape):
    _, (m,) = _rand(seed, 1, shape)
    close(call("passthrough", [m], scale=-0.7), ref.passthrough(m, -0.7))


TIES_CONVENTIONS = [{}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}, {"normalize": False}]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("conv", TIES_CONVENTIONS)
def test_ties_rescale_and_keep_at_least_one_match_reference(seed, shape, conv):
    base, ms = _rand(seed, 3, shape)
    w, dens = [1.0, 0.5, 2.0], [0.3, 0.6, 0.01]  # .01 keeps nothing, or one entry with keep_at_least_one
    full = {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"} | conv
    for rescale in ("none", "l1"):
        for alo in (False, True):
            got = call("ties", ms, base=base, weights=w, density=dens, scale=0.9, rescale=rescale, keep_at_least_one=alo, **conv)
            close(got, ref.ties(ms, base, w, dens, 0.9, rescale=rescale, keep_at_least_one=alo, **full))
    plain = ref.ties(ms, base, w, dens, 0.9, **full)
    assert not torch.allclose(plain, ref.ties(ms, base, w, dens, 0.9, rescale="l1", **full))
    assert not torch.allclose(plain, ref.ties(ms, base, w, dens, 0.9, keep_at_least_one=True, **full))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("conv", [{}, {"normalize": True}, {"sign_method": "sum"}, {"sign_method": "count", "normalize": True}])
def test_breadcrumbs_rescale_matches_reference(seed, shape, conv):
    base, ms = _rand(seed, 3, shape)
    w, dens, gam = [1.0, 0.5, 2.0], [0.6, 0.8, 0.5], [0.1, 0.05, 0.2]
    got = call("breadcrumbs", ms, base=base, weights=w, density=dens, gamma=gam, rescale="l1", **conv)
    close(got, ref.breadcrumbs(ms, base, w, dens, gam, rescale="l1", **conv))
    assert not torch.allclose(got, call("breadcrumbs", ms, base=base, weights=w, density=dens, gamma=gam, **conv))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_breadcrumbs_ties_matches_reference(seed, shape, rescale):
    base, ms = _rand(seed, 3, shape)
    w, dens, gam = [1.0, 0.5, 2.0], [0.6, 0.8, 0.5], [0.1, 0.05, 0.2]
    for conv in ({}, {"normalize": True}, {"sign_method": "count", "sign_from": "unweighted", "divide_by": "count", "normalize": True}):
        got = call("breadcrumbs_ties", ms, base=base, weights=w, density=dens, gamma=gam, scale=0.8, rescale=rescale, **conv)
        want = ref.breadcrumbs(ms, base, w, dens, gam, 0.8, rescale=rescale, **({"sign_method": "sum"} | conv))
        close(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES + [(5, 1), (2, 6)])
def test_della_keep_probabilities_match_reference(seed, shape):
    g = torch.Generator().manual_seed(seed)
    for d in (torch.randn(shape, generator=g), torch.randint(-2, 3, shape, generator=g).float()):  # continuous, and ties
        for density, eps in ((0.5, 0.2), (0.3, 0.1), (0.7, 0.0)):
            close(magnitude_keep_probabilities(d, density, eps), ref.della_keep_probabilities(d, density, eps))


def _della_masks(ms, base, dens, eps, seed):
    """The keep probabilities and masks a DELLA method draws from a generator seeded with ``seed``: one
    torch.bernoulli call per model below density 1, in model order, over its float32 probabilities (a model at
    density 1 is kept whole and draws nothing)."""
    g = torch.Generator().manual_seed(seed)
    probs, masks = [], []
    for m, p, e in zip(ms, dens, eps):
        if p >= 1:
            probs.append(torch.ones_like(m, dtype=torch.float64))
            masks.append(torch.ones_like(m))
            continue
        q = ref.della_keep_probabilities(m - base, p, e)
        probs.append(q)
        masks.append(torch.bernoulli(q.float(), generator=g))
    return probs, masks


DELLA_CONVENTIONS = [{}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}, {"normalize": False}]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["density", "l1", "none"])
@pytest.mark.parametrize("name, conv", [("della_linear", {}), ("della_linear", {"normalize": True})]
                         + [("della", c) for c in DELLA_CONVENTIONS])
def test_della_matches_reference_with_the_same_masks(seed, shape, rescale, name, conv):
    base, ms = _rand(seed, 3, shape)
    w, dens, eps = [1.0, 0.5, 2.0], [0.5, 0.6, 0.4], [0.2, 0.1, 0.3]
    got = call(name, ms, base=base, weights=w, density=dens, epsilon=eps, scale=0.8, rescale=rescale,
               generator=torch.Generator().manual_seed(7 + seed), **conv)
    probs, masks = _della_masks(ms, base, dens, eps, 7 + seed)
    assert all(0 < int(m.sum()) < m.numel() for m in masks)  # something dropped and something kept in every model
    close(got, ref.della(ms, base, w, masks, probs, ties_style=name == "della", scale=0.8, rescale=rescale, **conv))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_model_at_density_one_draws_nothing(name):
    base, ms = _rand(5, 3, (4, 5))
    w, dens, eps = [1.0, 0.5, 2.0], [1.0, 0.5, 0.6], [0.15, 0.2, 0.1]
    got = call(name, ms, base=base, weights=w, density=dens, epsilon=eps, generator=torch.Generator().manual_seed(3))
    probs, masks = _della_masks(ms, base, dens, eps, 3)
    close(got, ref.della(ms, base, w, masks, probs, ties_style=name == "della"))


# ================================================================ identities


def test_soups_of_identical_models_are_that_model():
    base, (m,) = _rand(5, 1, (4, 5))
    same = [m, m.clone(), m.clone()]
    close(call("karcher", same), m)
    close(call("karcher", same, weights=[1, 2, 3]), m)
    close(call("multislerp", same), m)
    close(call("multislerp", same, base=base, weights=[1, 2, 3]), m)
    for form in ({}, {"flatten": False}, {"flatten": False, "row_wise": True}):
        close(call("nuslerp", same[:2], weights=[1, 3], **form), m)
        close(call("nuslerp", same[:2], base=base, **form), m)
    close(call("sce", same, base=base), m)
    close(call("ram", same, base=base), m)
    close(call("ramplus_tl", same, base=base), m)  # every change shared: averaged, never boosted
    close(call("breadcrumbs_ties", same, base=base, density=1.0, normalize=True), m)


def test_one_model_soups_are_that_model():
    base, (m,) = _rand(6, 1, (4, 5))
    for name in ("karcher", "multislerp"):
        assert torch.equal(call(name, [m]), m)
    assert torch.equal(call("multislerp", [m], base=base), m)
    assert torch.equal(call("passthrough", [m]), m)
    close(call("sce", [m], base=base), m)  # select_topk 1: the one model's signs are elected, weight 1


def test_nuslerp_end_weights_give_the_ends():
    base, (a, b) = _rand(7, 2, (4, 5))
    for form in ({}, {"flatten": False}, {"flatten": False, "row_wise": True}):
        close(call("nuslerp", [a, b], weights=[1, 0], **form), a)
        close(call("nuslerp", [a, b], weights=[0, 1], **form), b)
        close(call("nuslerp", [a, b], base=base, weights=[2, 0], **form), a)
        close(call("nuslerp", [a, b], base=base, weights=[0, 0.5], **form), b)


def test_nuslerp_takes_exactly_two_models():
    with pytest.raises(MethodError, match=r"^nuslerp merges exactly two models \(besides an optional base\), got 3$"):
        call("nuslerp", [T(1), T(2), T(3)])


def test_passthrough_scale_multiplies_and_one_model_only():
    _, (m,) = _rand(8, 1, (4, 5))
    close(call("passthrough", [m], scale=2.5), 2.5 * m)
    assert torch.equal(call("passthrough", [m], scale=0.0), torch.zeros_like(m))
    with pytest.raises(MethodError, match=r"^passthrough takes one model per tensor, got 2; to stack layers of several models use `slices:`$"):
        call("passthrough", [m, m])


def test_nearswap_ends():
    base, (m,) = _rand(9, 1, (4, 5))
    assert torch.equal(call("nearswap", [m], base=base, t=0.0), base)
    assert torch.equal(call("nearswap", [m], base=base, t=1e9), m)
    # t between the differences: entries within t are the model's, the others move exactly t toward it
    got = call("nearswap", [m], base=base, t=0.2)
    near = (m - base).abs() <= 0.2
    assert 0 < int(near.sum()) < m.numel()
    close(got[near], m[near])
    close((got - base)[~near].abs(), torch.full((int((~near).sum()),), 0.2))
    with pytest.raises(MethodError, match=r"^nearswap merges one model into the base, got 2 models$"):
        call("nearswap", [m, m], base=base)


def test_ram_of_one_model_keeps_its_changes_above_epsilon():
    base, (m,) = _rand(10, 1, (4, 5))
    m = m.clone()
    m[0] = base[0] + 1e-6  # changes of at most epsilon are not changes
    want = m.clone()
    want[0] = base[0]
    close(call("ram", [m], base=base), want)
    close(call("ramplus_tl", [m], base=base, r=0.5, alpha=1.0), want)  # no shared changes: rho 0, lambda 1


def test_ram_of_disjoint_changes_is_task_arithmetic():
    base, ms = _rand(11, 3, (6, 5))
    owner = torch.arange(30).reshape(6, 5) % 3  # each entry changed by one model only
    disjoint = [torch.where(owner == i, m, base) for i, m in enumerate(ms)]
    ta = call("task_arithmetic", disjoint, base=base)
    close(call("ram", disjoint, base=base), ta)
    close(call("ramplus_tl", disjoint, base=base), ta)  # nothing shared: rho 0, lambda 1
    # where they overlap RAM averages and task arithmetic adds
    assert not torch.allclose(call("ram", ms, base=base), call("task_arithmetic", ms, base=base))


def test_sce_of_one_model_with_selection_is_the_base():
    # one model has zero variance everywhere: nnz = 0, k = 0, every entry is dropped (mergekit does the same)
    base, (m,) = _rand(12, 1, (4, 5))
    assert torch.equal(call("sce", [m], base=base, select_topk=0.5), base)


def test_della_density_one_is_ties_and_task_arithmetic():
    base, ms = _rand(13, 3, (4, 5))
    w = [1.0, 0.5, 2.0]
    g = torch.Generator().manual_seed(0)
    for conv in ({}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}):
        close(call("della", ms, base=base, weights=w, density=1.0, generator=g, **conv),
              call("ties", ms, base=base, weights=w, density=1.0, **conv))
    close(call("della_linear", ms, base=base, weights=w, density=1.0, scale=0.7, generator=g),
          call("task_arithmetic", ms, base=base, weights=w, scale=0.7))
    close(call("della_linear", ms, base=base, weights=w, density=1.0, normalize=True, generator=g),
          call("task_arithmetic", ms, base=base, weights=w, normalize=True))


def test_della_rejects_probabilities_outside_zero_one():
    base, ms = _rand(14, 2, (4, 5))
    g = torch.Generator().manual_seed(0)
    for name, density, epsilon, bad in [("della", 0.1, 0.15, "0.1 -/+ epsilon 0.15"), ("della_linear", 0.9, 0.15, "0.9 -/+ epsilon 0.15"),
                                        ("della", 0.3, 0.3, "0.3 -/+ epsilon 0.3"), ("della_linear", [0.5, 0.7], [0.1, 0.3], "0.7 -/+ epsilon 0.3")]:
        with pytest.raises(MethodError, match="^" + re.escape(f"{name}: density {bad} must lie inside (0, 1); lower epsilon") + "$"):
            call(name, ms, base=base, density=density, epsilon=epsilon, generator=g)
    call("della", ms, base=base, density=0.5, epsilon=0.49, generator=g)  # just inside


def test_della_keeps_about_density_and_large_magnitudes_more_often():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200_000, generator=g)
    out = call("della_linear", [d], base=torch.zeros_like(d), density=0.4, epsilon=0.2, rescale="none",
               generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.005  # sd of the fraction ~ 0.0011
    order = d.abs().argsort()
    tenth = len(d) // 10
    low, high = float(kept[order[:tenth]].float().mean()), float(kept[order[-tenth:]].float().mean())
    # probabilities .2 + .4 r: the smallest tenth averages .22, the largest .58 (sd ~ 0.0035)
    assert abs(low - 0.22) < 0.015 and abs(high - 0.58) < 0.015
    assert torch.equal(out[kept], d[kept])  # rescale none: survivors unchanged


def test_della_density_rescale_is_unbiased():
    # 20000 copies of one row: rows are ranked (and drawn) separately, so the column means estimate E[della]
    row = T(0.1, -0.3, 0.5, -0.7, 0.9, 1.1, -1.3, 1.5, -1.7, 2.0)
    delta = row.repeat(20_000, 1)
    base = torch.zeros_like(delta)
    p = ref.della_keep_probabilities(row, 0.4, 0.2).float()  # .2 ... .6
    for rescale, want in (("density", row), ("none", p * row)):
        out = call("della_linear", [base + delta], base=base, density=0.4, epsilon=0.2, rescale=rescale,
                   generator=torch.Generator().manual_seed(2))
        # sd of a mean of 20000 survivors / p: |d| sqrt((1 - p) / p) / 141 <= .015 |d|
        torch.testing.assert_close(out.mean(dim=0), want, rtol=0.08, atol=0.0)
    # without the rescale the mean is p * d, far from d
    assert not torch.allclose(p * row, row, rtol=0.3)


def test_arcee_fusion_keeps_only_outlier_importances():
    base, (m,) = _rand(15, 1, (8, 16))
    m = m.clone()
    m[3, 5] += 4.0  # a planted outlier
    got = call("arcee_fusion", [m], base=base)
    imp = torch.tensor(ref.arcee_fusion_importance(m, base), dtype=torch.float64).reshape(m.shape)
    s = imp.reshape(-1).sort().values
    n = s.numel()
    thr = s[int(0.5 * (n - 1))] + 1.5 * (s[int(0.75 * (n - 1))] - s[int(0.25 * (n - 1))])
    keep = imp >= thr
    assert bool(keep[3, 5]) and 0 < int(keep.sum()) < n // 4
    assert torch.equal(got[keep], m[keep]) and torch.equal(got[~keep], base[~keep])  # each entry is one or the other


def test_arcee_fusion_takes_a_sparse_change_whole():
    # fewer than a quarter of the entries changed: Q1 = median = Q3 = 0, threshold 0, and importance >= 0 everywhere
    base, (m,) = _rand(16, 1, (8, 16))
    sparse = base.clone()
    sparse[:, :3] = m[:, :3]  # 3 of 16 columns
    assert torch.equal(call("arcee_fusion", [sparse], base=base), sparse)


def test_arcee_fusion_keeps_importance_equal_to_the_threshold():
    # rows 1-3 move by a constant: softmax unchanged, KL = 0, importance 0 although they changed. 12 of 16
    # importances are 0, so Q1 = median = Q3 = 0 (positions floor(q * 15) = 3, 7, 11), the threshold is 0, and
    # importance >= 0 keeps every change, the shifted rows too (mergekit's >=; > would keep row 0 only)
    base = torch.zeros(4, 4)
    model = M([0.1, 0.2, 0.5, 3], [1, 1, 1, 1], [-2, -2, -2, -2], [5, 5, 5, 5])
    assert torch.equal(call("arcee_fusion", [model], base=base), model)
    close(ref.arcee_fusion(model, base), model)


def test_arcee_fusion_takes_one_model():
    with pytest.raises(MethodError, match=r"^arcee_fusion merges one model into the base, got 2 models$"):
        call("arcee_fusion", [T(1, 2), T(2, 3)], base=T(0, 0))


def test_karcher_and_multislerp_scale_only_by_norms():
    # both are positively homogeneous in each direction: scaling every model by c scales the result by c
    _, ms = _rand(17, 3, (4, 5), spread=1.0)
    for name in ("karcher", "multislerp"):
        close(call(name, [3 * m for m in ms], weights=[1, 2, 0.5]), 3 * call(name, ms, weights=[1, 2, 0.5]))


# ================================================================ edge cases found while writing these tests


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_on_a_scalar_tensor(name):
    assert torch.equal(magnitude_keep_probabilities(torch.tensor(2.0), 0.5, 0.2), torch.tensor(0.5))
    got = call(name, [torch.tensor(2.0)], base=torch.tensor(1.0), density=0.5, epsilon=0.2, rescale="density",
               generator=torch.Generator().manual_seed(0))
    assert float(got) in (1.0, 3.0)  # dropped, or kept and divided by .5


def test_zero_sum_weight_errors_name_an_option_that_exists():
    for name in ("karcher", "multislerp"):
        with pytest.raises(MethodError) as e:
            call(name, [T(1, 0), T(0, 1)], weights=[1, -1])
        assert "normalize: false" not in str(e.value), (name, str(e.value))
        assert str(e.value).endswith("(change the weights)" if name == "karcher" else "(set normalize_weights: false or change the weights)")


def test_multislerp_of_exact_antipodes_takes_the_weighted_sum_and_float64_stays_float64():
    """Exactly antipodal units cancel exactly (each unit is made before it is weighted), so the degenerate mean is caught:
    the two-model fallback, not noise divided by noise. float64 inputs are computed in float64 (1e100 does not overflow)."""
    g = torch.Generator().manual_seed(0)
    for x in (torch.tensor([1.0, 2.0, 3.0]), torch.randn(70_001, generator=g), torch.tensor(2.0)):
        assert torch.equal(call("multislerp", [x, -x]), torch.zeros_like(x))
    assert torch.equal(call("multislerp", [torch.tensor(2.0), torch.tensor(-3.0)]), torch.tensor(-0.5))
    big = [torch.tensor([1e100, 2e100], dtype=torch.float64), torch.tensor([3e100, 1e100], dtype=torch.float64)]
    got = call("multislerp", big)
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    close(got / 1e100, ref.multislerp([b / 1e100 for b in big]))


def test_della_of_a_tensor_without_rows():
    from modelsoup.methods.ops import drop_by_magnitude, magnitude_keep_probabilities

    for shape in ((0, 5), (0,), (3, 0)):
        assert magnitude_keep_probabilities(torch.zeros(shape), 0.5, 0.2).shape == shape
        assert drop_by_magnitude(torch.zeros(shape), 0.5, 0.2, torch.Generator().manual_seed(0), "density").shape == shape


def test_multislerp_of_empty_tensors_is_empty():
    """A tensor with no entries has no direction: it merges to an empty tensor, not a refusal of the whole merge."""
    for n_models in (2, 3):
        got = call("multislerp", [torch.zeros(0, 4)] * n_models)
        assert got.shape == (0, 4)


def test_multislerp_of_a_nan_input_is_nan_not_a_degenerate_mean():
    """A NaN (merged only with allow_nonfinite) makes the norms NaN: that is not a vanishing mean, so it is not refused as one."""
    x = torch.tensor([1.0, 2.0, math.nan])
    assert torch.isnan(call("multislerp", [x, torch.ones(3), torch.ones(3) * 2])).all()


@pytest.mark.parametrize("n", [5, (1 << 20) + 12345, 3 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_karcher_on_its_coefficients_is_the_tensor_iteration_in_float64_to_float32_rounding(n, dtype):
    """karcher iterates on the k coefficients of the mean, with the unit vectors' cosines from one pass of sums, and
    writes the result as one combination of the inputs: within float32 rounding (of the largest entry) of the whole-tensor iteration run in float64,
    across slice edges, with weights, a model and its opposite beside a third, a model without a direction, a capped and a
    wide tol."""
    g = torch.Generator().manual_seed(n % 97)
    ts = [(torch.randn(n, generator=g) * (1 + i)).to(dtype) for i in range(3)]
    cases = [(ts, {}), (ts, {"weights": [1.0, 0.5, 2.0]}), (ts, {"max_iter": 1}), (ts, {"tol": 1e-2}), ([ts[0], -ts[0], ts[1]], {}),
             ([torch.zeros(n, dtype=dtype), *ts[1:]], {}), ([ts[0], (ts[0].double() * 1.01 + 1e-3).to(dtype)], {})]
    for tensors, kw in cases:
        got = call("karcher", tensors, **kw)
        truth = ref.karcher_tensor_steps([t.double() for t in tensors], **kw)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), kw
        err = float((got.double() - truth).abs().max()) / max(float(truth.abs().max()), 1e-30)
        assert err < (1e-12 if dtype == torch.float64 else 1e-6), (kw, err)


def test_karcher_refuses_opposite_directions_where_the_tensor_iteration_answers_wrongly():
    """Two opposite directions have no unique Karcher mean. With equal weights their mean cancels; with weights 2 and 1
    the iteration starts at x, where the opposite model's log map has no direction, and the tensor steps (mergekit's)
    stop there: x, the worst point on the sphere's great circle through x, not a mean. Both are refused by name."""
    x, y = T(1, 0), T(0, 1)
    with pytest.raises(MethodError, match=r"^karcher: the models' directions nearly cancel \(their weighted mean has length 0, below 0.1\)"):
        call("karcher", [x, -x])
    with pytest.raises(MethodError, match=r"^karcher: model 2's direction is 180.0 degrees from the running mean \(more than 179\)"):
        call("karcher", [x, -x], weights=[2, 1])
    stuck = ref.karcher_tensor_steps([x, -x], [2, 1])
    close(stuck / stuck.norm(), x)

    def cost(m):  # sum_i a_i d(m, u_i)^2 for u = x (a = 2/3), -x (a = 1/3)
        d = math.acos(max(-1.0, min(1.0, float(m @ x))))
        return 2 / 3 * d**2 + 1 / 3 * (math.pi - d) ** 2

    assert cost(math.cos(math.pi / 3) * x + math.sin(math.pi / 3) * y) < cost(x) - 1
    # a model 150 degrees from the other two's mean is merged
    far = T(math.cos(math.radians(150)), math.sin(math.radians(150)))
    assert torch.isfinite(call("karcher", [x, x, far])).all()


@pytest.mark.parametrize("seed", range(4))
def test_karcher_of_nearly_parallel_float32_fine_tunes_keeps_their_angles(seed):
    """Four float32 fine-tunes 5e-5 apart (cosines 1 - 1e-9): from a Gram matrix of float32 rows their angles are noise,
    so models were dropped from the tangent as "closer than tol" and the result moved 1e-5 (a fifth of the models'
    differences; the float32 tensor steps do so too). From the differences' sums it is the float64 iteration's to
    float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(20_000, generator=g, dtype=torch.float64)
    ts = [(b + 5e-5 * torch.randn(20_000, generator=g, dtype=torch.float64)).float() for _ in range(4)]
    w = [1.0, 1.3, 1.6, 1.9]
    truth = ref.karcher_tensor_steps([t.double() for t in ts], w)
    err = float((call("karcher", ts, weights=w).double() - truth).abs().max() / truth.abs().max())
    assert err < 3e-7, err


def test_karcher_edge_cases_by_hand():
    """One-entry tensors take the weighted majority sign (mergekit's answer, the mean of the two-point sphere); a model
    of weight 0 never blocks the merge; a model 165 degrees away with a tenth of the weight is merged (the mean is 150
    degrees from it); a tol above the mean's length starts at the first model, as mergekit; directions whose weights sum
    to zero are refused by name; NaN and Inf give NaN."""
    scalars = [torch.tensor([0.5]), torch.tensor([0.7]), torch.tensor([-0.2])]
    close(call("karcher", scalars), torch.tensor([1.4 / 3]))
    close(call("karcher", scalars, weights=[1, 1, 5]), torch.tensor([-(0.5 + 0.7 + 5 * 0.2) / 7]))
    close(call("karcher", [torch.tensor(2.0), torch.tensor(-2.0)]), torch.tensor(2.0))  # balanced: the first model's sign
    x, y = T(1, 0), T(0, 1)
    close(call("karcher", [x, -x], weights=[1, 0]), x)
    far = T(math.cos(math.radians(165)), math.sin(math.radians(165)))
    got = call("karcher", [x, far], weights=[10, 1])
    close(got / got.norm(), T(math.cos(math.radians(15)), math.sin(math.radians(15))))
    g = torch.Generator().manual_seed(0)
    five = [torch.randn(1000, generator=g) for _ in range(5)]
    truth = ref.karcher_tensor_steps([t.double() for t in five], tol=0.5)
    torch.testing.assert_close(call("karcher", five, tol=0.5).double(), truth, rtol=0, atol=1e-6 * float(truth.abs().max()))
    with pytest.raises(MethodError, match=r"^karcher: the weights of the models that have a direction \(a norm above tol\) sum to zero; change the weights$"):
        call("karcher", [x, y, T(0, 0)], weights=[1, -1, 1])
    nan = T(math.nan, 1.0)  # allowed NaN inputs give NaN (a NaN norm is no "norm below tol": never zeros)
    assert torch.isnan(call("karcher", [nan, nan])).all() and torch.isnan(call("karcher", [x, T(math.inf, 0)])).all()


def test_multislerp_refuses_directions_that_nearly_cancel():
    """A weighted mean of the unit vectors shorter than 0.032 of the longest it could be is decided by rounding in a Gram
    matrix of float32 rows: refused, naming the ratio. Exact antipodes (a mean under eps) keep the two-model fallback."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    for gap, fails in ((0.2, False), (0.01, True)):
        other = -(x + gap * y * x.norm() / y.norm())
        if fails:
            with pytest.raises(MethodError, match=r"^multislerp: the models' directions nearly cancel \(their weighted mean is 0.005 of the "
                               r"longest it could be, below 0.032\), so rounding would decide the result; change the weights, or merge with linear$"):
                call("multislerp", [x, other])
        else:
            truth = call("multislerp", [x.double(), other.double()])
            torch.testing.assert_close(call("multislerp", [x, other]).double(), truth, rtol=0, atol=1e-5 * float(truth.abs().max()))
    assert torch.equal(call("multislerp", [x, -x]), torch.zeros_like(x))


def test_karcher_half_inputs_as_stored_through_the_engine(tmp_path):
    """The engine hands karcher bfloat16 inputs as stored (no float32 copy of each) and streams it: the file holds the
    bits of the float32 copies' whole-tensor merge, rounded once to bfloat16."""
    from safetensors.torch import load_file, save_file

    from modelsoup.api import merge

    g = torch.Generator().manual_seed(4)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": torch.randn(300, 1000, generator=g).bfloat16(), "b": torch.randn(7, generator=g).bfloat16()}, paths[-1])
    # no thread pinning: the merge's workers and this process use every core, and karcher's sums do not depend on that
    merge({"method": "karcher", "models": [{"path": str(p)} for p in paths]}, tmp_path / "o", progress=False, hash_files=False)
    out = load_file(tmp_path / "o" / "model.safetensors")
    for name in ("w", "b"):
        want = call("karcher", [load_file(p)[name].float() for p in paths]).bfloat16()
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name

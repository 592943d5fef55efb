"""Every merge method three ways: hand-worked numbers, a slow reference loop, algebraic identities;
plus contract tests over the whole registry."""

from __future__ import annotations

import math

import pytest
import torch

from modelsoup.errors import MethodError
from modelsoup.methods import available_methods, get_method, register
from modelsoup.methods.ops import combine, trim_top_k

from . import reference as ref
from .tolerances import FP32_VS_REFERENCE


def T(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), **FP32_VS_REFERENCE)


def call(name, tensors, **kw):
    return get_method(name)(tensors, **kw)


# ---------------------------------------------------------------- hand-worked examples


def test_linear_by_hand():
    close(call("linear", [T(1, 2), T(3, 6)], weights=[1, 3]), T(2.5, 5))
    close(call("linear", [T(1, 2), T(3, 6)], weights=[1, 3], normalize=False), T(10, 20))


def test_ema_by_hand():
    # e0 = 0, e1 = .5*0 + .5*2 = 1, e2 = .5*1 + .5*4 = 2.5
    close(call("ema", [T(0), T(2), T(4)], decay=0.5), T(2.5))


def test_task_arithmetic_by_hand():
    close(call("task_arithmetic", [T(2, 0), T(3, 3)], base=T(1, 1), scale=0.5), T(2.5, 1.5))
    close(call("task_arithmetic", [T(2, 0), T(3, 3)], base=T(1, 1), normalize=True), T(2.5, 1.5))


def test_ties_by_hand():
    # density .5 keeps 2 of 4: d1 -> [3,0,0,-2], d2 -> [0,2,0,-4]; elected signs [+,+,+,-];
    # entry 0: 3/1, entry 1: 2/1, entry 2: nothing agrees -> 0, entry 3: (-2-4)/2
    d1, d2 = T(3, -1, 0.5, -2), T(-1, 2, 1, -4)
    close(call("ties", [d1, d2], base=T(0, 0, 0, 0), density=0.5), T(3, 2, 0, -3))
    # weighted: w = [1, 3]; entry 3: (-2*1 - 4*3) / (1 + 3) = -3.5 (mergekit), (-2 - 12) / 2 = -7 (peft count)
    close(call("ties", [d1, d2], base=T(0, 0, 0, 0), density=0.5, weights=[1, 3]), T(3, 2, 0, -3.5))
    close(call("ties", [d1, d2], base=T(0, 0, 0, 0), density=0.5, weights=[1, 3], divide_by="count", sign_from="unweighted"), T(3, 6, 0, -7))


def test_ties_sign_from_weighted_vs_unweighted_differ_by_hand():
    # deltas +1 and -2 with weights 3 and 1: weighted vote 3 - 2 > 0 elects +, unweighted 1 - 2 < 0 elects -
    a, b = T(1.0), T(-2.0)
    close(call("ties", [a, b], base=T(0), density=1.0, weights=[3, 1]), T(1.0))
    close(call("ties", [a, b], base=T(0), density=1.0, weights=[3, 1], sign_from="unweighted"), T(-2.0))
    # count: one vote each, tie 0 -> +
    close(call("ties", [a, b], base=T(0), density=1.0, sign_method="count"), T(1.0))


def test_breadcrumbs_by_hand():
    # n=10, density .5 keeps 5, gamma .1 drops the largest 1, so the 4 smallest and the top 1 go
    d = torch.arange(1.0, 11.0)
    close(call("breadcrumbs", [d], base=torch.zeros(10), density=0.5, gamma=0.1), T(0, 0, 0, 0, 5, 6, 7, 8, 9, 0))


def test_breadcrumbs_with_sign_election_by_hand():
    # n=5, density .6 keeps 3, gamma .2 drops the largest 1, so the smallest 1 goes too:
    # d1 = [1, -2, 3, -4, 5] -> [0, -2, 3, -4, 0], d2 = [-5, 4, -1, 2, -3] -> [0, 4, 0, 2, -3]
    d1, d2, zero = T(1, -2, 3, -4, 5), T(-5, 4, -1, 2, -3), torch.zeros(5)
    w = {"weights": [1, 3], "normalize": True}
    peft = {"sign_from": "unweighted", "divide_by": "count"}
    cases = [
        ({}, T(0, 2, 3, -2, -3)),  # no election: the plain sum
        # elected signs [+ (a zero vote elects +, but nothing agrees), +, +, -, -]; each entry keeps the agreeing deltas
        ({"sign_method": "sum"}, T(0, 4, 3, -4, -3)),
        # w = [1, 3]: weighted votes [0, 10, 3, 2, -9], so entry 3 elects +; divided by the agreeing weights
        ({**w, "sign_method": "sum"}, T(0, 12 / 3, 3, 6 / 3, -9 / 3)),
        # peft's conventions: unweighted votes [0, 2, 3, -2, -3] (entry 3 elects - again), divided by the count
        ({**w, **peft, "sign_method": "sum"}, T(0, 12, 3, -4, -9)),
        # counting signs: entries 1 and 3 are 1-1 ties, which elect +
        ({**w, **peft, "sign_method": "count"}, T(0, 12, 3, 6, -9)),
    ]
    for kw, want in cases:
        close(call("breadcrumbs", [d1, d2], base=zero, density=0.6, gamma=0.2, **kw), want)
        weights = kw.pop("weights", [1, 1])
        close(ref.breadcrumbs([d1, d2], zero, weights, 0.6, 0.2, **kw), want)


def test_slerp_by_hand():
    h = math.sqrt(0.5)
    close(call("slerp", [T(1, 0), T(0, 1)], t=0.5), T(h, h))
    close(call("slerp", [T(0, 1)], base=T(1, 0), t=0.5), T(h, h))  # base is the t=0 end
    # norms interpolate along the arc: |v0| = 2, |v1| = 1 at 90 degrees, t = .5 -> (2h, h)
    close(call("slerp", [T(2, 0), T(0, 1)], t=0.5), T(2 * h, h))


def test_model_stock_by_hand():
    # cos(delta1, delta2) = 1/sqrt(2); t = 2c / (1 + c); result = t * mean([1,1],[1,0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(call("model_stock", [T(1, 1), T(1, 0)], base=T(0, 0)), T(t, 0.5 * t))


def test_model_stock_filter_wise_by_hand():
    # one t per row: row 0 has the cosine of the example above, row 1 orthogonal task vectors (t = 0: the base),
    # row 2 opposite ones (1 + (N - 1) cos = 0: t would be infinite, the base instead), row 3 a zero task vector
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    base = torch.full((4, 2), 1.0)
    a = base + torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, -2.0], [0.0, 0.0]])
    b = base + torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 2.0], [2.0, 1.0]])
    want = torch.tensor([[1 + t, 1 + 0.5 * t], [1, 1], [1, 1], [1, 1]])
    close(call("model_stock", [a, b], base=base, filter_wise=True), want)
    close(ref.model_stock([a, b], base, filter_wise=True), want)
    # per tensor, the rows' task vectors together give a different t
    assert not torch.allclose(call("model_stock", [a, b], base=base), want)


def test_dare_by_hand_with_known_mask():
    # seed 1 draws the keep-mask [0, 1, 1, 0, 1, 0] at density .5 (one torch.bernoulli call, as peft draws it)
    assert torch.bernoulli(torch.full((6,), 0.5), generator=torch.Generator().manual_seed(1)).tolist() == [0, 1, 1, 0, 1, 0]
    d, zero = torch.arange(1.0, 7.0), torch.zeros(6)

    def dare(**kw):
        return call("dare_linear", [d], base=zero, density=0.5, generator=torch.Generator().manual_seed(1), **kw)

    close(dare(), T(0, 4, 6, 0, 10, 0))  # survivors / density
    close(dare(rescale="none"), T(0, 2, 3, 0, 5, 0))
    close(dare(rescale="l1"), T(0, 2, 3, 0, 5, 0) * (21 / 10))  # survivors scaled to |d|_1 = 21 from 2 + 3 + 5
    # next to nothing survives (|survivors|_1 <= 1e-7): left as it is rather than blown up to |d|_1
    assert torch.bernoulli(torch.full((6,), 0.5), generator=torch.Generator().manual_seed(8)).tolist() == [0, 0, 0, 1, 0, 0]
    tiny = T(1, 2, 3, 1e-8, 5, 6)
    got = call("dare_linear", [tiny], base=zero, density=0.5, rescale="l1", generator=torch.Generator().manual_seed(8))
    assert torch.equal(got, T(0, 0, 0, 1e-8, 0, 0))
    # nothing survives (every draw at density 1e-6 is 0): nothing to scale up, the task vector is dropped
    assert not torch.bernoulli(torch.full((6,), 1e-6), generator=torch.Generator().manual_seed(1)).any()
    none_left = call("dare_linear", [d], base=torch.ones(6), density=1e-6, rescale="l1", generator=torch.Generator().manual_seed(1))
    assert torch.equal(none_left, torch.ones(6))


# ---------------------------------------------------------------- agreement with tests/reference.py


def _rand(seed: int, n: int, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_ema_task_arithmetic_match_reference(seed):
    base, ms = _rand(seed, 4)
    w = [0.5, 1.5, -0.25, 2.0]
    close(call("linear", ms, weights=w), ref.linear(ms, w))
    close(call("linear", ms, weights=w, normalize=False), ref.linear(ms, w, normalize=False))
    close(call("ema", ms, decay=0.7), ref.ema(ms, 0.7))
    close(call("task_arithmetic", ms, base=base, weights=w, scale=0.8), ref.task_arithmetic(ms, base, w, 0.8))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "conv",
    [{}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}, {"normalize": False}],
)
def test_ties_matches_reference(seed, conv):
    base, ms = _rand(seed, 3)
    w, dens = [1.0, 0.5, 2.0], [0.3, 0.6, 0.45]
    got = call("ties", ms, base=base, weights=w, density=dens, scale=0.9, **conv)
    full = {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"} | conv
    close(got, ref.ties(ms, base, w, dens, 0.9, **full))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_with_the_same_masks(seed, name):
    base, ms = _rand(seed, 3)
    w, dens = [1.0, 0.5, 2.0], [0.5, 0.7, 0.9]
    g = torch.Generator().manual_seed(11)
    masks = [torch.bernoulli(torch.full_like(m, p), generator=g) for m, p in zip(ms, dens)]
    got = call(name, ms, base=base, weights=w, density=dens, generator=torch.Generator().manual_seed(11))
    ties_style = name == "dare_ties"
    close(got, ref.dare(ms, base, w, masks, dens, ties_style=ties_style))


def _dare_masks(ms, base, dens, seed):
    """The masks a DARE method draws from a generator seeded with ``seed``: one torch.bernoulli call per model,
    in model order, over a tensor of the task vector's shape filled with its density (as ops.drop_random does)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full_like(m - base, p), generator=g) for m, p in zip(ms, dens)]


DARE_TIES_CONVENTIONS = [{}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}, {"normalize": False}]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, conv", [("dare_linear", {}), ("dare_linear", {"normalize": True})]
                         + [("dare_ties", c) for c in DARE_TIES_CONVENTIONS])
def test_dare_l1_rescale_matches_reference_with_the_same_masks(seed, name, conv):
    base, ms = _rand(seed, 3)
    w, dens = [1.0, 0.5, 2.0], [0.3, 0.7, 0.5]
    got = call(name, ms, base=base, weights=w, density=dens, rescale="l1", scale=0.8, generator=torch.Generator().manual_seed(5), **conv)
    masks = _dare_masks(ms, base, dens, 5)
    assert all(0 < int(m.sum()) < m.numel() for m in masks)  # something dropped and something kept in every model
    want = ref.dare(ms, base, w, masks, dens, ties_style=name == "dare_ties", scale=0.8, rescale="l1", **conv)
    close(got, want)
    # l1 is not the default 1/density rule: the same masks rescaled by 1/density give another result
    assert not torch.allclose(want, ref.dare(ms, base, w, masks, dens, ties_style=name == "dare_ties", scale=0.8, **conv))


BREADCRUMBS_CONVENTIONS = [
    {"sign_method": "sum"},  # mergekit's breadcrumbs_ties: elected signs, no division (normalize: false)
    {"sign_method": "sum", "normalize": True},  # divided by the weights that agree with the elected sign
    {"sign_method": "count", "normalize": True},
    {"sign_method": "sum", "sign_from": "unweighted", "divide_by": "count", "normalize": True},  # peft's TIES conventions
    {"sign_method": "count", "sign_from": "unweighted", "normalize": True},
    {"sign_method": "sum", "divide_by": "count", "normalize": True},
    {"normalize": True},  # no election: divided by sum_i w_i
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conv", BREADCRUMBS_CONVENTIONS)
def test_breadcrumbs_with_sign_election_matches_reference(seed, conv):
    base, ms = _rand(seed, 3, shape=(6, 9))
    w, dens, gam = [1.0, 0.5, 2.0], [0.6, 0.8, 0.5], [0.1, 0.05, 0.2]
    got = call("breadcrumbs", ms, base=base, weights=w, density=dens, gamma=gam, scale=0.9, **conv)
    close(got, ref.breadcrumbs(ms, base, w, dens, gam, 0.9, **conv))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, shape", [(2, (4, 5)), (3, (4, 5)), (3, (3, 2, 4)), (3, (7,))])
def test_model_stock_filter_wise_matches_reference(seed, n, shape):
    base, ms = _rand(seed, n, shape=shape)
    got = call("model_stock", ms, base=base, filter_wise=True)
    close(got, ref.model_stock(ms, base, filter_wise=True))
    if len(shape) >= 2:  # one t per row, not one per tensor
        assert not torch.allclose(got, ref.model_stock(ms, base).float())
    else:  # a vector is one row: filter_wise changes nothing
        close(got, ref.model_stock(ms, base))


@pytest.mark.parametrize("seed", [0, 1])
def test_breadcrumbs_slerp_model_stock_match_reference(seed):
    base, ms = _rand(seed, 3, shape=(50,))
    w = [1.0, 0.5, 2.0]
    close(call("breadcrumbs", ms, base=base, weights=w, density=0.6, gamma=0.1), ref.breadcrumbs(ms, base, w, 0.6, 0.1))
    close(call("slerp", ms[:2], t=0.3), ref.slerp(ms[0], ms[1], 0.3))
    close(call("slerp", [ms[0] - base, ms[1] - base], t=0.7), ref.slerp(ms[0] - base, ms[1] - base, 0.7))
    close(call("model_stock", ms, base=base), ref.model_stock(ms, base))


# ---------------------------------------------------------------- identities


def test_soup_of_identical_models_is_that_model():
    base, (m,) = _rand(5, 1)
    same = [m, m.clone(), m.clone()]
    for name, kw in [
        ("linear", {}),
        ("ema", {}),
        ("slerp", {"tensors": same[:2]}),
        ("model_stock", {"base": base}),
        ("task_arithmetic", {"base": base, "normalize": True}),
        ("ties", {"base": base, "density": 1.0}),
        ("breadcrumbs", {"base": base, "density": 1.0, "normalize": True}),
        ("dare_ties", {"base": base, "density": 1.0, "generator": torch.Generator().manual_seed(0)}),
    ]:
        tensors = kw.pop("tensors", same)
        close(call(name, tensors, **kw), m)


def test_weights_one_minus_one_give_zero():
    _, (a,) = _rand(1, 1)
    assert torch.equal(call("linear", [a, a.clone()], weights=[1, -1], normalize=False), torch.zeros_like(a))


def test_ties_density_one_single_model_is_task_arithmetic():
    base, (m,) = _rand(2, 1)
    close(call("ties", [m], base=base, density=1.0, scale=0.6), call("task_arithmetic", [m], base=base, scale=0.6))


def test_dare_density_one_is_task_arithmetic():
    base, ms = _rand(3, 3)
    ta = call("task_arithmetic", ms, base=base, weights=[1, 2, 3])
    close(call("dare_linear", ms, base=base, weights=[1, 2, 3], density=1.0), ta)


def test_slerp_endpoints_and_parallel_fallback():
    _, (a, b) = _rand(4, 2)
    close(call("slerp", [a, b], t=0.0), a)
    close(call("slerp", [a, b], t=1.0), b)
    c = 2.0 * a  # parallel: cos = 1 -> linear interpolation
    close(call("slerp", [a, c], t=0.25), 0.75 * a + 0.25 * c)


def test_ema_decay_zero_is_last_model():
    _, ms = _rand(6, 3)
    close(call("ema", ms, decay=0.0), ms[-1])


def test_model_stock_orthogonal_gives_base_and_identical_deltas_give_mean():
    base = T(1, 1, 1)
    close(call("model_stock", [T(2, 1, 1), T(1, 2, 1)], base=base), base)
    close(call("model_stock", [T(2, 3, 1), T(2, 3, 1)], base=base), T(2, 3, 1))


def test_exact_k_with_magnitude_ties():
    d = T(1, -1, 1, -1, 0.5, 2)
    # k = 3: keep 2 (above), then the first two of the tied |1| entries in index order
    assert torch.equal(trim_top_k(d, 0.5), T(1, -1, 0, 0, 0, 2))
    assert torch.equal(trim_top_k(d, 0.1), T(0, 0, 0, 0, 0, 0))
    assert int((trim_top_k(torch.ones(1000), 0.37) != 0).sum()) == 370


# ---------------------------------------------------------------- contract tests over the registry


def _args(m):
    base, ms = _rand(9, 3, shape=(8, 6))
    if m.max_models is not None:
        ms = ms[: m.max_models]
    kw = {"base": base} if m.base == "required" else {}
    return ms, kw


@pytest.mark.parametrize("m", available_methods(), ids=lambda m: m.name)
def test_contract_shape_dtype_no_mutation_deterministic(m):
    ms, kw = _args(m)
    copies = [t.clone() for t in ms]
    base_copy = kw["base"].clone() if "base" in kw else None
    gen = (lambda s: torch.Generator().manual_seed(s)) if m.random else (lambda s: None)
    out1 = m(ms, generator=gen(1), **kw)
    out2 = m(ms, generator=gen(1), **kw)
    assert out1.shape == ms[0].shape and out1.dtype == torch.float32
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(ms, copies))
    if base_copy is not None:
        assert torch.equal(kw["base"], base_copy)
    if m.random:
        assert not torch.equal(out1, m(ms, generator=gen(2), **kw))


def _placed(t, offset):
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    buf[offset:] = t.reshape(-1)
    return buf[offset:].view(t.shape)


@pytest.mark.parametrize("m", [m for m in available_methods() if m.statistic is None], ids=lambda m: m.name)
def test_contract_bits_do_not_depend_on_threads_or_alignment(m):
    """The same inputs give the same bits on 1, 2 and 3 threads and at any alignment (a mapped input may start anywhere):
    a recipe rerun on another machine reproduces its output. torch.dot and whole-tensor sums are split by the thread
    count (karcher and SCE differed in most entries before their sums became modelsoup.methods.reduce's)."""
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for shape in [(70_001,), (300, 261)]:
            base = torch.randn(shape, generator=g)
            ms = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(4)][: m.max_models or 4]
            want = None
            for threads, offset in [(1, 0), (2, 0), (3, 1), (2, 3)]:
                torch.set_num_threads(threads)
                kw = {"base": _placed(base, offset)} if m.base == "required" else {}
                gen = torch.Generator().manual_seed(1) if m.random else None
                got = m([_placed(t, offset) for t in ms], generator=gen, **kw).view(torch.int32)
                want = got if want is None else want
                assert torch.equal(got, want), (shape, threads, offset, int((got != want).sum()))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m", available_methods(), ids=lambda m: m.name)
def test_contract_defaults_are_in_range_and_documented(m):
    assert m.summary and m.paper
    for p in m.params:
        assert p.check(p.default) is None, (m.name, p.name)
        assert p.help


def test_unknown_method_lists_valid_ones():
    with pytest.raises(MethodError, match=r"unknown merge method 'tie'; valid methods: arcee_fusion, breadcrumbs, .*ties"):
        get_method("tie")


def test_duplicate_registration_and_bad_signatures_rejected():
    with pytest.raises(MethodError, match="registered twice"):
        register("linear", summary="x", paper="y")(lambda tensors, *, base=None, weights=None: tensors[0])

    with pytest.raises(MethodError, match="must be keyword-only"):

        @register("bad_positional", summary="x", paper="y")
        def f(tensors, base=None, *, weights=None):
            return tensors[0]

    with pytest.raises(MethodError, match="do not match the declared params"):

        @register("bad_params", summary="x", paper="y")
        def g(tensors, *, base=None, weights=None, alpha=1.0):
            return tensors[0]


def test_count_problems_name_the_method():
    assert get_method("linear").count_problem(1, False) is None  # one model is a (trivial) linear soup
    assert get_method("ties").count_problem(2, False) == "method 'ties' needs a base model (set `base:`)"
    assert get_method("model_stock").count_problem(1, True) == "method 'model_stock' takes at least 2 models besides the base, got 1"
    assert get_method("model_stock").count_problem(2, True) is None
    with pytest.raises(MethodError, match=r"^slerp merges exactly two models \(or a base and one model\), got 3; use linear for more$"):
        call("slerp", [T(1), T(2), T(3)])
    with pytest.raises(MethodError, match=r"^weights \[1.0, -1.0\] sum to zero; cannot normalise \(set normalize: false or change the weights\)$"):
        call("linear", [T(1), T(2)], weights=[1, -1])
    with pytest.raises(MethodError, match=r"^ema takes no weights: list the checkpoints oldest first and set `decay`$"):
        call("ema", [T(1), T(2)], weights=[1, 1])


@pytest.mark.parametrize("kind", ["continuous", "few_values", "one_value"])
def test_bracketed_kth_largest_is_exact(kind):
    from modelsoup.methods.selection import kth_largest

    g = torch.Generator().manual_seed(0)
    n = 3_000_000
    if kind == "continuous":
        mag = torch.randn(n, generator=g).abs()
    elif kind == "few_values":  # like half-precision magnitudes: many exact ties
        mag = torch.randint(0, 50, (n,), generator=g).float()
    else:
        mag = torch.ones(n)
    for k in (1, 17, n // 5, n // 2, n - 3, n):
        assert float(kth_largest(mag, k)) == float(torch.kthvalue(mag, n - k + 1).values), k


def test_a_bracket_of_one_value_is_counted_not_gathered(monkeypatch):
    """Half-precision task vectors often put a fifth or more of their magnitudes on one value (a delta of one ulp): the
    bracket around the k-th largest then holds that value alone, and its entries are counted per chunk, never gathered
    (np.compress fails here if called), with the exact value, the count above and the per-chunk ties of a brute force."""
    import numpy as np

    from modelsoup.methods import selection

    g = torch.Generator().manual_seed(1)
    n = 2_000_003
    mag = torch.randint(0, 9, (n,), generator=g).float()
    mag[torch.rand(n, generator=g) < 0.5] = 4.0  # the middle value holds more than half of the entries
    monkeypatch.setattr(selection.np, "compress", lambda *a, **k: (_ for _ in ()).throw(AssertionError("gathered")))
    src = selection.MagnitudeSource(mag)
    for k in (n // 2, n // 3, 2 * n // 3):
        kth = selection.kth_largest_magnitudes([src], [k])[0]
        value = float(torch.sort(mag, descending=True).values[k - 1])
        assert (kth.value, kth.greater) == (value, int((mag > value).sum()))
        assert kth.equal == [int((mag[i:j] == value).sum()) for i, j in selection._spans(n)]
    monkeypatch.setattr(selection.np, "compress", np.compress)
    assert selection.kth_largest_magnitudes([src], [n // 20])[0].value == float(torch.sort(mag, descending=True).values[n // 20 - 1])


def test_a_bracket_with_heavy_ends_counts_them_and_gathers_only_between():
    """Where the k-th largest sits at the edge between two heavy tie values, the bracket spans both: the sweep counts the
    entries at lo and at hi and gathers only those strictly between, with the brute force's value, count above and
    per-chunk ties on either side of the edge."""
    from modelsoup.methods import selection

    g = torch.Generator().manual_seed(2)
    n = 2_000_003
    mag = torch.randint(0, 40, (n,), generator=g).float() / 4
    u = torch.rand(n, generator=g)
    mag[u < 0.3], mag[(u >= 0.3) & (u < 0.6)] = 4.0, 5.0  # two heavy values, next to each other in rank
    src = selection.MagnitudeSource(mag)
    edge = int((mag > 5.0).sum()) + int((mag == 5.0).sum())  # the last entry at 5.0, in descending order
    desc = torch.sort(mag, descending=True).values
    modes = set()
    for k in (edge - 300, edge, edge + 1, edge + 300):
        lo, hi, heavy = selection._bracket(src, k)
        modes.add(selection._Band(lo, hi, heavy).mode)
        kth = selection.kth_largest_magnitudes([src], [k])[0]
        value = float(desc[k - 1])
        assert (kth.value, kth.greater) == (value, int((mag > value).sum())), k
        assert kth.equal == [int((mag[i:j] == value).sum()) for i, j in selection._spans(n)], k
    assert "ends" in modes


def test_finite_check_shared_by_views_is_per_view_not_per_start():
    """The finite check of a base shared by every task vector is summed once; two views that start at one address (x[::2]
    and x[:n]) are still checked each, so a NaN in one is refused by name, not ranked."""
    n = 1000
    x = torch.randn(2 * n, generator=torch.Generator().manual_seed(0))
    x[1] = float("nan")  # in x[:n], the base; not in x[::2], the model
    for name in ("ties", "breadcrumbs"):
        with pytest.raises(MethodError, match="task-vector entries are NaN"):
            call(name, [x[::2]], base=x[:n], density=0.5)


def test_zero_weight_neither_votes_nor_counts():
    a, b = T(1.0, -1.0), T(-3.0, 2.0)
    got = call("ties", [a, b], base=T(0, 0), density=1.0, weights=[1.0, 0.0], divide_by="count")
    close(got, T(1.0, -1.0))
    close(ref.ties([a, b], T(0, 0), [1.0, 0.0], [1.0, 1.0], divide_by="count"), T(1.0, -1.0))


# ---------------------------------------------------------------- chunked trimming and sign election


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements and bracketing from 256 elements on: small tensors take the paths of large ones."""
    import modelsoup.methods.selection as selection

    monkeypatch.setattr(selection, "CHUNK", 64)
    monkeypatch.setattr(selection, "BRACKET_ABOVE", 256)
    monkeypatch.setattr(selection, "SAMPLE", 32)


def _tricky(seed: int, n: int = 1500):
    """Base and 3 models whose deltas (exact multiples of 1/4) tie in magnitude, hold exact zeros, and cancel."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 9, (n,), generator=g).float() / 4
    steps = torch.randint(-3, 4, (3, n), generator=g).float() / 4
    steps[1, ::5] = -steps[0, ::5]  # votes of the first two models cancel exactly
    steps[2, ::5] = 0.0  # and the third has nothing there: the vote is exactly 0
    return base, [base + s for s in steps]


TRICKY_WEIGHTS = [[1.0, 1.0, 1.0], [1.0, 0.5, 2.0], [1.0, -0.5, 2.0], [1.0, 0.0, 2.0], [1.0, -1.0, 0.5], [1e-9, 2e-9, 1.0]]
CONVENTIONS = [{}, {"sign_method": "count"}, {"sign_from": "unweighted", "divide_by": "count"}, {"normalize": False}, {"divide_by": "count"}]


@pytest.mark.parametrize("conv", CONVENTIONS)
@pytest.mark.parametrize("w", TRICKY_WEIGHTS)
def test_chunked_ties_matches_reference_on_ties_zeros_and_negative_weights(small_chunks, w, conv):
    base, ms = _tricky(len(conv) + int(10 * w[1]))
    dens = [0.3, 0.55, 0.8]
    got = call("ties", ms, base=base, weights=w, density=dens, scale=0.9, **conv)
    full = {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"} | conv
    close(got, ref.ties(ms, base, w, dens, 0.9, **full))


@pytest.mark.parametrize("conv", BREADCRUMBS_CONVENTIONS)
@pytest.mark.parametrize("w", TRICKY_WEIGHTS)
def test_chunked_breadcrumbs_matches_reference_on_ties_zeros_and_negative_weights(small_chunks, w, conv):
    base, ms = _tricky(len(conv) + int(10 * w[1]), n=700)
    dens, gam = [0.5, 0.7, 0.9], [0.05, 0.1, 0.0]
    got = call("breadcrumbs", ms, base=base, weights=w, density=dens, gamma=gam, **conv)
    close(got, ref.breadcrumbs(ms, base, w, dens, gam, **conv))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", ["l1", "none"])
def test_dare_rescale_rules_match_reference_on_ties_and_zeros(small_chunks, name, rescale):
    base, ms = _tricky(2, n=600)
    w, dens = [1.0, -0.5, 2.0], [0.4, 0.6, 0.8]
    got = call(name, ms, base=base, weights=w, density=dens, rescale=rescale, generator=torch.Generator().manual_seed(9))
    close(got, ref.dare(ms, base, w, _dare_masks(ms, base, dens, 9), dens, ties_style=name == "dare_ties", rescale=rescale))


@pytest.mark.parametrize("threads", [1, 2])
def test_uniforms_drawn_in_pieces_are_the_uniforms_drawn_at_once(threads):
    """DroppedDeltas draws each model's mask a chunk at a time from one generator, into a reused buffer: that must be the
    draw of one torch.rand over the whole tensor (and so peft's torch.bernoulli), whatever the pieces and threads."""
    import itertools

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = torch.rand(3 * 70_001, generator=torch.Generator().manual_seed(4))
        g, out, parts, done = torch.Generator().manual_seed(4), torch.empty(40_000), [], 0
        for size in itertools.cycle((1, 15, 16, 17, 40_000, 39_999, 33)):
            if done == whole.numel():
                break
            size = min(size, whole.numel() - done)
            parts.append(torch.rand(size, generator=g, out=out[:size]).clone())
            done += size
        assert torch.equal(torch.cat(parts), whole)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rescale", ["density", "none"])
def test_dropped_deltas_a_chunk_at_a_time_are_drop_randoms_bits(small_chunks, dtype, rescale):
    from modelsoup.methods.ops import DroppedDeltas, drop_random

    base, ms = _rand(3, 3)
    base, ms = base.to(dtype), [m.to(dtype) for m in ms]
    dens = [0.3, 0.7, 1.0]
    chunks = DroppedDeltas(ms, base, dens, torch.Generator().manual_seed(8), rescale)
    n = base.numel()
    rows = torch.full((3, n), float("nan"))
    for i in range(0, n, 50):  # chunks of another size than the masks were drawn in
        chunks.fill(i, min(i + 50, n), rows[:, i : min(i + 50, n)])
    g = torch.Generator().manual_seed(8)
    for row, m, p in zip(rows, ms, dens):
        want = drop_random(m.float() - base.float(), p, g, rescale).reshape(-1)
        assert torch.equal(row.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_sign_election_matches_reference_on_exact_zero_votes_and_zero_deltas(conv):
    _, ms = _tricky(3, n=400)
    deltas = [m - ms[0] * 0 for m in ms]  # already sparse-looking: many exact zeros and ties
    for w in TRICKY_WEIGHTS:
        full = {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"} | conv
        want = ref.sign_merge([[float(x) for x in d.double()] for d in deltas], w, **full)
        close(combine(deltas, w, **full), torch.tensor(want, dtype=torch.float64))


def test_ties_result_does_not_depend_on_chunking_or_threads(monkeypatch):
    import modelsoup.methods.selection as selection

    base, ms = _tricky(7, n=300_001)
    kw = {"base": base, "weights": [1.0, -0.5, 2.0], "density": [0.3, 0.5, 0.7], "scale": 0.7}
    want = call("ties", ms, **kw)
    threads = torch.get_num_threads()
    for chunk, bracket_above, n_threads in [(4096, 1 << 20, threads), (1000, 10_000, 1), (77_777, 10_000, 2)]:
        monkeypatch.setattr(selection, "CHUNK", chunk)
        monkeypatch.setattr(selection, "BRACKET_ABOVE", bracket_above)
        torch.set_num_threads(n_threads)
        try:
            got = call("ties", ms, **kw)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (chunk, n_threads)


def test_exact_k_with_magnitude_ties_across_chunks(small_chunks):
    g = torch.Generator().manual_seed(4)
    d = torch.randint(-2, 3, (1000,), generator=g).float()  # magnitudes 0, 1, 2: the k-th is tied across many chunks
    for density in (0.1, 0.3, 0.45, 0.6, 0.9):
        want = d * torch.tensor(ref.top_k_mask(d, density), dtype=torch.float32)
        assert torch.equal(trim_top_k(d, density), want), density


def test_divisor_fast_path_equals_the_general_floor():
    from modelsoup.methods.ops import ElectedMean

    _, ms = _tricky(5, n=2000)
    deltas = torch.stack([m - ms[0].round() for m in ms])  # exact zeros, ties, cancelling votes
    deltas[:, ::11] = 0.0  # nothing agrees there: the divisor is exactly 0
    deltas[0, 3::13] = float("nan")
    for w in ([1.0, 1.0, 1.0], [1.0, 0.5, 2.0], [1e-8, 3.0, 0.25], [2.0, 0.0, 1.0]):
        for conv in ({}, {"sign_method": "count"}, {"sign_from": "unweighted"}):
            fast = ElectedMean(w, size=2000, normalize=True, **conv)
            # every weight of a voter >= DIVISOR_FLOOR (a zero weight does not vote when weighted)
            assert fast.divisor_is_zero_or_large == (min(w) > 0 or "sign_from" not in conv)
            general = ElectedMean(w, size=2000, normalize=True, **conv)
            general.divisor_is_zero_or_large = False
            a, b = fast(deltas, torch.empty(2000)), general(deltas, torch.empty(2000))
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (w, conv)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.9, 1e-8, 0.0, 1.0, "tensor"])
def test_bernoulli_mask_draws_torch_bernoullis_bits_and_leaves_the_generator_alike(p):
    from modelsoup.methods.ops import bernoulli_mask

    like = torch.empty(301, 417)
    probs = torch.rand(like.shape, generator=torch.Generator().manual_seed(1)) if p == "tensor" else p
    g, h = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    ref = torch.bernoulli(probs if p == "tensor" else torch.full_like(like, p), generator=g)
    got = bernoulli_mask(like, probs, h)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    assert torch.equal(g.get_state(), h.get_state())  # the next model's draws follow on alike


def test_della_ranks_are_the_double_argsorts():
    from modelsoup.methods.ops import magnitude_keep_probabilities

    x = torch.randint(-5, 6, (37, 129, 3)).float()  # many ties: ranks in index order; ranked along dim 1
    p = magnitude_keep_probabilities(x, 0.5, 0.2)
    ranks = x.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    assert torch.equal(p, (0.3 + ranks / 128 * 0.4))


def _stable_ranks(rows):
    order = rows.abs().argsort(dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).view(1, -1, *[1] * (rows.dim() - 2)).expand_as(order))


def test_della_int32_and_int64_rank_keys_give_the_stable_argsorts_ranks(monkeypatch):
    """_int_ranks sorts int32 keys (magnitude bits above the column, low bits dropped) where few entries have low bits,
    re-sorting with int64 keys the rows whose low bits tie them out of order; int64 keys elsewhere. Either way: the
    stable argsort's ranks, int16 below 2^15 columns."""
    from modelsoup.methods import ops

    calls = {"int32": 0, "rows again": 0}
    wide, narrow = ops._order_int64, ops._order_int32

    def count_narrow(bits, shift):
        calls["int32"] += 1
        return narrow(bits, shift)

    def count_wide(bits, shift):
        calls["rows again"] += bits.shape[0] if calls["in int32"] else 0
        return wide(bits, shift)

    monkeypatch.setattr(ops, "_order_int32", count_narrow)
    monkeypatch.setattr(ops, "_order_int64", count_wide)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 2048, generator=g).to(torch.bfloat16).float()
    half = (x + 1e-2 * torch.randn(24, 2048, generator=g)).to(torch.bfloat16).float() - x  # a bfloat16 fine-tune's task vector
    out_of_order = torch.full((5, 2048), 0.5)
    out_of_order[1:3, 100] = 0.5 + 2**-24  # low bits differ, high bits tie: (high bits, column) order is wrong here
    out_of_order[1:3, 50] = 0.5 + 2**-23
    out_of_order[4, 7] = 0.5 + 2**-23
    out_of_order[4, 9] = 0.5 + 2**-24
    ties = torch.randint(-3, 4, (9, 700), generator=g).float() * -0.0  # +0 and -0
    odd = torch.tensor([[float("inf"), 0.5, float("nan"), -float("inf"), 0.5, 1e-45, 0.0, -float("nan")]])
    half_odd = half.clone()
    half_odd[0, [3, 70]], half_odd[1, [9, 2]] = float("nan"), float("inf")  # NaN sorts after +inf, as torch sorts it
    half_odd[2, 5] = -float("nan")
    cases = {"bfloat16 task vector": (half, 1, 0), "out of order": (out_of_order, 1, 3), "zeros": (ties, 1, 0),
             "wide rows": (half.reshape(1, -1)[:, :40_000].contiguous(), 1, 1), "nonfinite": (odd, 0, 0), "bfloat16 with NaN and inf": (half_odd, 1, 0),
             "float32": (torch.randn(24, 2048, generator=g), 0, 0), "float64": (half.double(), 0, 0), "3-d": (half.reshape(24, 64, 32), 0, 0)}
    for name, (rows, int32_calls, again) in cases.items():
        calls.update({"int32": 0, "rows again": 0, "in int32": int32_calls})
        got = ops._int_ranks(rows)
        assert got.dtype == (torch.int16 if rows.shape[1] < 1 << 15 else torch.int64), name
        assert torch.equal(got.long(), _stable_ranks(rows)), name
        assert (calls["int32"], calls["rows again"]) == (int32_calls, again), (name, calls)


@pytest.mark.parametrize("seed", range(6))
def test_breadcrumbs_linear_time_trim_keeps_the_stable_sorts_entries(seed):
    """trim_outliers' index-order ties (a partition and the tie groups at both cuts) against the stable-sort reference."""
    from modelsoup.methods.ops import trim_outliers

    from .reference import outlier_mask

    g = torch.Generator().manual_seed(seed)
    for n in (1, 2, 3, 7, 64, 1000):
        d = torch.randint(-4, 5, (n,), generator=g).float() * 0.5  # heavy ties, signed zeros below
        d[::3] *= -1
        for density, gamma in ((0.9, 0.01), (0.5, 0.2), (0.1, 0.0), (0.3, 0.9), (0.99, 0.5), (0.0, 0.1), (0.6, 0.05)):
            got = trim_outliers(d, density, gamma) != 0
            want = torch.tensor(outlier_mask(d, density, gamma), dtype=torch.bool) & (d != 0)
            assert torch.equal(got, want), (n, density, gamma)
    big = torch.randn(50_001, generator=g).round(decimals=2)
    assert torch.equal(trim_outliers(big, 0.8, 0.03), big * _stable_outlier_mask(big, 0.8, 0.03))


def _stable_outlier_mask(d, density, gamma):
    n = d.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(n - n_keep - n_top, 0)
    n_top = n - n_keep - n_bot
    keep = torch.zeros(n, dtype=torch.bool)
    keep[d.abs().argsort(stable=True)[n_bot : n - n_top]] = True
    return keep


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_all_finite_finds_every_nonfinite_and_clears_overflowing_sums(dtype):
    from modelsoup.methods.ops import all_finite

    n = 3 * (1 << 16) + 5
    x = (torch.arange(n, dtype=torch.float32) % 7 - 3).to(dtype)
    assert all_finite(x)
    bad_values = [math.nan] if dtype == torch.float8_e4m3fn else [math.nan, math.inf, -math.inf]  # e4m3fn has no Inf
    for bad in bad_values:
        for at in (0, n // 2, n - 1):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (dtype, bad, at)
    if dtype != torch.float8_e4m3fn:
        opposite = x.clone()
        opposite[1], opposite[n - 2] = math.inf, -math.inf  # a sum of NaN, not of an infinity
        assert not all_finite(opposite)
    # every value finite and large: the sum overflows the dtype (float16's total: beyond 65504), which is not a NaN/Inf
    big = torch.full((n,), torch.finfo(dtype).max / 2, dtype=torch.float64).to(dtype)
    assert all_finite(big)


@pytest.mark.parametrize("seed", range(4))
def test_rank_window_in_any_chunks_keeps_the_stable_sorts_places(seed):
    """RankWindow (breadcrumbs' streamed cuts) keeps argsort(|d|, stable=True)[first:stop], whatever the chunks, at every
    kind of window: empty, whole, touching either end, and both cuts inside one group of ties."""
    from modelsoup.methods.selection import MagnitudeSource, RankWindow

    g = torch.Generator().manual_seed(seed)
    n = 997
    base = torch.randint(-3, 4, (n,), generator=g).float() / 2
    theta = base + torch.randint(-3, 4, (n,), generator=g).float() / 2  # seven magnitudes: every cut falls inside ties
    d = theta - base
    order = d.abs().argsort(stable=True)
    src = MagnitudeSource(theta, base)
    for first, stop in ((0, n), (0, 500), (300, n), (400, 400), (500, 10), (1, n - 1), (450, 470), (0, 1), (n - 1, n)):
        want = torch.zeros(n, dtype=torch.bool)
        want[order[first:stop]] = True
        window = RankWindow(src, first, stop)
        for size in (n, 64, 97, 1):
            got = torch.cat([window.apply_(src.delta(i, min(i + size, n)), i) for i in range(0, n, size)])
            assert torch.equal(got, d * want), (first, stop, size)
        groups = {float(v) for v in d.abs()[order[first:stop]]} & {float(v) for v in d.abs()[~want]} if 0 < stop - first < n else set()
        assert window.tied_at_cut == bool(groups), (first, stop)


def test_breadcrumbs_torch_sort_streams_where_no_ties_meet_a_cut_and_sorts_where_they_do():
    """tie_break: torch_sort (mergekit's breadcrumbs) keeps torch.sort's order of ties at a cut; without such ties every order
    keeps the same entries, so the cuts stream as with index order."""
    from modelsoup.methods.breadcrumbs import prepare_breadcrumbs
    from modelsoup.methods.ops import MaskedDeltas, TrimmedDeltas, sorted_window_mask

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4000, generator=g)
    distinct = [base + torch.randn(4000, generator=g) for _ in range(2)]
    tied = [base + torch.randint(-2, 3, (4000,), generator=g).float() for _ in range(2)]
    params = {"weights": [1.0, 0.5], "density": 0.6, "gamma": 0.05, "scale": 1.0, "rescale": "none", "tie_break": "torch_sort",
              "sign_method": "none", "sign_from": "weighted", "normalize": False, "divide_by": "weight_sum"}
    for models, kind in ((distinct, TrimmedDeltas), (tied, MaskedDeltas)):
        prepared = prepare_breadcrumbs(models, base=base, **params)
        assert isinstance(prepared.deltas, kind)
        masks = [sorted_window_mask((t - base).abs(), 4000 - 2400 - 200, 4000 - 200) for t in models]
        want = base + sum(w * (t - base) * m for w, t, m in zip(params["weights"], models, masks))
        assert torch.equal(prepared.whole(), want)


def test_ties_torch_sort_streams_its_masks_where_ties_meet_a_cut():
    """tie_break: torch_sort (mergekit's ties) keeps the entries torch.argsort(|delta|, descending=True)[:k] picks; where
    ties meet a cut each model's mask is kept (MaskedDeltas) and the merge streams: the whole formula's bits."""
    from modelsoup.methods.ops import MaskedDeltas, TrimmedDeltas, add_to_base, combine
    from modelsoup.methods.ties import _prepare

    g = torch.Generator().manual_seed(4)
    base = torch.randn(5000, generator=g)
    distinct = [base + torch.randn(5000, generator=g) for _ in range(3)]
    tied = [base + torch.randint(-3, 4, (5000,), generator=g).float() * 0.25 for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    election = {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"}
    for models, kind in ((distinct, TrimmedDeltas), (tied, MaskedDeltas)):
        prepared = _prepare(models, base=base, weights=weights, density=[0.5, 0.3, 0.7], scale=0.8, rescale="none",
                            keep_at_least_one=True, tie_break="torch_sort", **election)
        assert isinstance(prepared.deltas, kind)
        deltas = []
        for t, p in zip(models, [0.5, 0.3, 0.7]):
            d = t - base
            keep = torch.zeros(5000)
            keep[torch.argsort(d.abs(), descending=True)[: int(p * 5000)]] = 1
            deltas.append(d * keep)
        assert torch.equal(prepared.whole(), add_to_base(base, combine(deltas, weights, **election), 0.8))


def test_rank_trims_of_float64_inputs_cut_in_float64():
    """Cuts found in float64 are applied to float64 deltas: a float32 row would round the entries at a cut onto the
    float next to the cut (both dropped, or every tie kept)."""
    base = torch.zeros(4, dtype=torch.float64)
    m = torch.tensor([1.0, 1 + 2**-40, 1 + 2**-41, 3.0], dtype=torch.float64)
    assert torch.equal(call("breadcrumbs", [m], base=base, density=0.5, gamma=0.25), torch.tensor([0, 1 + 2**-40, 1 + 2**-41, 0], dtype=torch.float64))
    assert torch.equal(call("ties", [m], base=base, density=0.5), torch.tensor([0, 1 + 2**-40, 0, 3], dtype=torch.float64))


def test_outlier_trim_keeps_an_infinite_entry_inside_the_window_and_refuses_nan():
    from modelsoup.methods.ops import trim_outliers, trim_top_k

    inf, nan = math.inf, math.nan
    assert torch.equal(trim_outliers(torch.tensor([inf, 1.0, 2.0, 3.0]), 0.75, 0.0), torch.tensor([inf, 0.0, 2.0, 3.0]))
    for trim in (lambda d: trim_outliers(d, 0.75, 0.0), lambda d: trim_top_k(d, 0.5)):
        with pytest.raises(MethodError, match=r"1 task-vector entries are NaN.*rank"):
            trim(torch.tensor([nan, 1.0, 2.0, 3.0]))


def test_nan_is_refused_on_the_bracketed_path_too(small_chunks):
    base = torch.zeros(1000)
    m = torch.linspace(-1, 1, 1000)
    m[777] = math.nan
    for name in ("ties", "breadcrumbs"):
        with pytest.raises(MethodError, match="NaN"):
            call(name, [m, m.flip(0)], base=base, density=0.5)


def _magprune_whole(delta, density, epsilon, generator, rescale):
    """MagPrune on the whole tensor at once, by torch's stable argsort: what drop_by_magnitude computes a block at a time."""
    from modelsoup.methods.ops import _match_l1, bernoulli_mask

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).view(1, n, *[1] * (rows.dim() - 2)).expand_as(order)).float()
    probs = ((density - epsilon) + (ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)) * (2 * epsilon)).reshape(delta.shape)
    kept = delta * bernoulli_mask(delta, probs, generator)
    return {"density": lambda: kept / probs, "l1": lambda: _match_l1(kept, delta), "none": lambda: kept}[rescale](), probs


@pytest.mark.parametrize("block", [1 << 20, 64])
def test_magprune_by_blocks_of_rows_and_sorted_keys_has_the_whole_tensors_bits(monkeypatch, block):
    """Ranks from sorted (magnitude bits, column) keys, drawn and rescaled a block of rows at a time: the same probabilities,
    masks and bits as torch's stable argsort and one draw over the whole tensor, and the generator left alike."""
    from modelsoup.methods import ops

    monkeypatch.setattr(ops, "RANK_BLOCK", block)
    g = torch.Generator().manual_seed(5)
    shapes = [(), (1,), (7,), (300,), (1, 1), (9, 1), (40, 33), (129, 16), (6, 5, 3), (4, 3, 2, 2)]
    for shape in shapes:
        for kind in ("distinct", "ties", "zeros"):
            d = torch.randn(shape, generator=g)
            if kind == "ties":
                d = torch.randint(-3, 4, shape, generator=g).float() / 4  # signed equal magnitudes and zeros
            elif kind == "zeros":
                d = torch.zeros(shape) * torch.randn(shape, generator=g).sign()  # +0 and -0
            for dtype in (torch.float32, torch.float64, torch.float16):
                x = d.to(dtype)
                want_p = _magprune_whole(x, 0.5, 0.2, None, "none")[1]
                assert torch.equal(ops.magnitude_keep_probabilities(x, 0.5, 0.2), want_p), (shape, kind, dtype)
                for rescale in ("density", "l1", "none"):
                    ga, gb = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
                    got = ops.drop_by_magnitude(x, 0.5, 0.2, ga, rescale)
                    want = _magprune_whole(x, 0.5, 0.2, gb, rescale)[0]
                    assert got.dtype == want.dtype and torch.equal(got, want), (shape, kind, dtype, rescale)
                    assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magprune_of_half_inputs_as_stored_has_the_float32_copies_bits(monkeypatch, dtype):
    """DELLA's streamed path hands magprune_deltas half-precision models and base as stored: each block of rows is widened
    before it is subtracted, so every rescale gives the float32 copies' bits and leaves the generator alike."""
    from modelsoup.methods import ops

    monkeypatch.setattr(ops, "RANK_BLOCK", 64)  # several blocks of rows
    g = torch.Generator().manual_seed(8)
    for shape in [(40, 33), (300,), (6, 5, 3)]:
        base = torch.randn(shape, generator=g).to(dtype)
        models = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
        for rescale in ("density", "l1", "none"):
            ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            got = ops.magprune_deltas(models, base, [0.5, 0.6, 0.4], 0.2, ga, rescale, "della")
            want = ops.magprune_deltas([m.float() for m in models], base.float(), [0.5, 0.6, 0.4], 0.2, gb, rescale, "della")
            for a, b in zip(got, want):
                assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), (shape, rescale)
            assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "dare_linear"])
def test_a_half_precision_base_widened_once_per_chunk_gives_the_float32_copies_bits(monkeypatch, dtype, method):
    """The TIES family widens a half-precision base shared by the models once per chunk (selection.WideBase), in the
    threshold sweep and in every chunk of the merge: the float32 copies' bits, the base's zeros included."""
    from modelsoup.methods import selection

    monkeypatch.setattr(selection, "BRACKET_ABOVE", 256)  # the bracketed sweep, in several chunks
    monkeypatch.setattr(selection, "SAMPLE", 64)
    monkeypatch.setattr(selection, "CHUNK", 128)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, 33, generator=g).to(dtype)
    base.view(-1)[::97] = 0.0
    models = [(base.float() + 0.1 * torch.randn(40, 33, generator=g)).to(dtype) for _ in range(3)]
    models[1].view(-1)[5] = base.view(-1)[5]  # a zero delta entry
    params = {"seed": 0} if method.startswith("dare") else {}
    m = get_method(method)
    assert m.takes_half
    for weights in (None, [0.5, 1.0, 0.25]):
        got = m.fn(models, base=base, weights=weights, **_generators(params))
        want = m.fn([t.float() for t in models], base=base.float(), weights=weights, **_generators(params))
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), weights
        widened = selection.WideBase([selection.MagnitudeSource(t, base) for t in models])
        assert widened.base is not None and torch.equal(widened.chunk(3, 50), base.reshape(-1)[3:50].float())
    assert selection.WideBase([selection.MagnitudeSource(models[0], base)]).base is None  # one model: nothing to share
    assert selection.WideBase([selection.MagnitudeSource(t.float(), base.float()) for t in models]).base is None


def _generators(params):
    return {"generator": torch.Generator().manual_seed(params["seed"])} if "seed" in params else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_magpruned_codes_rebuild_magprune_deltas_bits_in_any_chunks(monkeypatch, dtype):
    """DELLA's streamed task vectors hold a rank code an entry (int16), not the float32 result: every chunk rebuilt from
    the inputs and the codes has magprune_deltas' bits (zeros' signs, infinite deltas' NaN and rows of one entry included),
    for every rescale and a density of 1, and the generator is left alike."""
    from modelsoup.methods import ops

    monkeypatch.setattr(ops, "RANK_BLOCK", 64)  # several blocks of rows
    g = torch.Generator().manual_seed(9)
    for shape in [(40, 33), (300,), (6, 5, 3), (1,), (), (9, 1), (3, 0)]:
        base = torch.randn(shape, generator=g).to(dtype)
        models = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
        if shape == (40, 33):
            models[1] = base.clone()  # a zero delta: every magnitude tied
            models[2].view(-1)[::3] = float("inf")
        for rescale in ("density", "none", "l1"):
            for dens in ([0.5, 0.6, 0.4], [0.5, 1.0, 0.4]):
                ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
                want = ops.magprune_deltas(models, base, dens, 0.2, ga, rescale, "della")
                chunks = ops.MagPrunedDeltas(models, base, dens, 0.2, gb, rescale, "della")
                n = base.numel()
                rows = torch.full((3, n), float("nan"), dtype=chunks.dtype)
                for i in range(0, n, 7):
                    chunks.fill(i, min(i + 7, n), rows[:, i : min(i + 7, n)])
                for got, w in zip(rows, want):
                    w = w.reshape(-1).to(got.dtype)
                    assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got.nan_to_num(7.0), w.nan_to_num(7.0)), (shape, rescale, dens)
                    assert torch.equal(torch.signbit(got), torch.signbit(w)), (shape, rescale, dens)
                assert torch.equal(ga.get_state(), gb.get_state())
    with pytest.raises(MethodError, match="density 0.5 -/\\+ epsilon 0.6 must lie inside"):
        ops.MagPrunedDeltas(models, base, 0.5, 0.6, None, "density", "della")

"""The compiled chunk kernels (methods.kernels) give the torch path's bits, on every option of the merges that use them."""

from __future__ import annotations

import itertools

import pytest
import torch

from modelsoup.methods import get_method, kernels, reduce, selection
from modelsoup.methods.ops import MergedChunks, top_k_deltas
from modelsoup.errors import MethodError

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba is not installed (pip install 'modelsoup[fast]')")


@pytest.fixture(autouse=True)
def _every_dtype(monkeypatch):  # type: ignore[no-untyped-def]
    """The kernels on float32 models too (by default only bfloat16 ones use them), so both are compared."""
    monkeypatch.setenv(kernels.DISABLE_ENV, "all")


def _models(seed: int, n: int, dtype: torch.dtype, k: int = 3, special: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = [base + 0.01 * torch.randn(n, generator=g) for _ in range(k)]
    if special:  # ties at the cut, zero deltas, signed zeros, infinities (NaN: ranking methods refuse it)
        for m in models:
            idx = torch.randint(0, n, (max(1, n // 50),), generator=g)
            m[idx] = base[idx]
        models[0][: n // 7] = base[: n // 7] + 0.0625
        models[1][3] = float("inf")
        models[2][5] = float("-inf")
        base[17] = -0.0
        models[0][17] = 0.0
    return base.to(dtype), [m.to(dtype) for m in models]


def _both(monkeypatch: pytest.MonkeyPatch, fn, watched=((kernels.FusedMerge, "__call__"),)):  # type: ignore[no-untyped-def]
    """fn() on the kernels and on the torch path (checking that one of the ``watched`` kernels ran, and then none did)."""
    calls = []
    for owner, name in watched:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real: calls.append(1) or real(*a))
    fused = fn()
    assert calls, "the kernels did not run"
    monkeypatch.setenv(kernels.DISABLE_ENV, "torch")
    calls.clear()
    plain = fn()
    assert not calls
    monkeypatch.setenv(kernels.DISABLE_ENV, "all")
    return fused, plain


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    ai, bi = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    bad = (ai != bi).nonzero().view(-1)
    assert bad.numel() == 0, f"{bad.numel()} entries differ, first at {bad[:5].tolist()}: {a[bad[:5]].tolist()} vs {b[bad[:5]].tolist()}"


ELECTIONS = [
    {"sign_method": "sum", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"},
    {"sign_method": "sum", "sign_from": "unweighted", "normalize": True, "divide_by": "count"},
    {"sign_method": "count", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"},
    {"sign_method": "count", "sign_from": "unweighted", "normalize": False, "divide_by": "count"},
    {"sign_method": "sum", "sign_from": "weighted", "normalize": False, "divide_by": "weight_sum"},
    {"sign_method": "none", "sign_from": "weighted", "normalize": True, "divide_by": "weight_sum"},
    {"sign_method": "none", "sign_from": "weighted", "normalize": False, "divide_by": "weight_sum"},
]
WEIGHTS = [[1.0, 1.0, 1.0], [0.3, -0.5, 0.9], [0.0, 1e-9, 2.0], [0.0, 0.0, 0.0]]


# per kind of deltas, the options looped over: TIES's densities, or the masked deltas' divisors (DARE's drops)
OPTIONS = {"top-k": ([0.5, 0.2, 1.0], [0.0, 0.3, 0.9]), "masked": ([None, 0.3, 0.8], None, [1e-30, 0.5, 3.0])}


@pytest.mark.parametrize("kind", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("election", ELECTIONS, ids=lambda e: f"{e['sign_method']}-{e['sign_from']}-{e['normalize']}-{e['divide_by']}")
def test_fused_chunks_give_the_torch_paths_bits(monkeypatch, kind, dtype, special, election):
    """Deltas taken and trimmed (top-k), or masked by booleans (or not) and divided (or not), in the kernel."""
    from modelsoup.methods.ops import MaskedDeltas

    n = (1 << 18) + 2 * 2048 + 37  # two chunks, the second with a partial block
    base, models = _models(1, n, dtype, special=special)
    g = torch.Generator().manual_seed(5)
    masks = [None, torch.rand(n, generator=g) < 0.3, torch.rand(n, generator=g) < 0.8]
    for weights, scale, option in itertools.product(WEIGHTS, (1.0, 0.7), OPTIONS[kind]):
        if election["sign_method"] == "none" and election["normalize"] and sum(weights) == 0:
            continue  # refused (a zero weight sum), on both paths

        def merge(weights=weights, scale=scale, option=option):  # type: ignore[no-untyped-def]
            deltas = top_k_deltas(models, base, option) if kind == "top-k" else MaskedDeltas(models, base, masks, option)
            chunks = MergedChunks(deltas, weights, base, scale, **election)
            mode = 2 if kind == "top-k" else 4  # a TopKTrim (density 1 or 0: mode 0 or 1), or the masked form
            assert chunks.fused is None or set(chunks.fused.trims[:, 0].tolist()) <= {mode, 0, 1}
            return chunks.whole()

        fused, plain = _both(monkeypatch, merge)
        _same_bits(fused, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.4}),
    ("ties", {"density": [0.2, 0.9, 0.5], "sign_from": "unweighted", "divide_by": "count"}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("breadcrumbs", {}),
    ("breadcrumbs_ties", {}),
    ("della", {"density": 0.6, "epsilon": 0.1, "seed": 1}),
    ("della_linear", {"density": 0.6, "epsilon": 0.1, "seed": 1}),
])
def test_methods_on_the_kernels_give_the_torch_paths_bits(monkeypatch, dtype, method, params):
    base, models = _models(2, (1 << 20) + 4099, dtype, special=True)  # above selection.BRACKET_ABOVE: the compiled sweep
    fn = get_method(method)
    params = dict(params)
    seed = params.pop("seed", None)

    def merge():  # type: ignore[no-untyped-def]
        kw = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
        return fn(models, base=base, weights=[0.6, 1.0, 0.8], **params, **kw)

    fused, plain = _both(monkeypatch, merge)
    _same_bits(fused.float(), plain.float())


@pytest.mark.parametrize("election", ELECTIONS, ids=lambda e: f"{e['sign_method']}-{e['sign_from']}-{e['normalize']}-{e['divide_by']}")
def test_fused_merge_of_given_deltas_with_nan_and_inf_gives_the_torch_paths_bits(monkeypatch, election):
    base, models = _models(4, 70_000, torch.float32)
    deltas = [m - base for m in models]
    deltas[0][::5] = float("nan")
    deltas[1][1::7] = float("inf")
    deltas[2][2::9] = float("-inf")
    deltas[2][3::11] = 0.0
    deltas[1][4::13] = -0.0
    for weights in WEIGHTS[:3]:
        fused, plain = _both(monkeypatch, lambda w=weights: MergedChunks(deltas, w, base.to(torch.bfloat16), 0.5, **election).whole())
        _same_bits(fused, plain)


def test_kernels_are_not_used_where_they_do_not_apply(monkeypatch):
    base, models = _models(3, 5000, torch.float16)
    assert MergedChunks(top_k_deltas(models, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum").fused is None  # float16
    base, models = _models(3, 5000, torch.float64)
    assert MergedChunks(top_k_deltas(models, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum").fused is None  # float64 sums
    base, models = _models(3, 5000, torch.float32)
    monkeypatch.setenv(kernels.DISABLE_ENV, "torch")
    assert MergedChunks(top_k_deltas(models, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum").fused is None
    monkeypatch.delenv(kernels.DISABLE_ENV)  # the default: bfloat16 models only
    assert MergedChunks(top_k_deltas(models, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum").fused is None
    half = [m.to(torch.bfloat16) for m in models]
    assert MergedChunks(top_k_deltas(half, base.to(torch.bfloat16), [0.5] * 3), [1.0] * 3, base.to(torch.bfloat16), 1.0,
                        sign_method="sum").fused is not None
    monkeypatch.setenv(kernels.DISABLE_ENV, "all")
    mixed = [models[0], models[1].to(torch.bfloat16), models[2]]  # models of two dtypes: rows filled by torch, then the kernel
    chunks = MergedChunks(top_k_deltas(mixed, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum")
    assert chunks.fused is not None and chunks.fused.thetas is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_threshold_sweep_finds_the_numpy_steps_thresholds_in_every_bracket_mode(monkeypatch, dtype):
    n = (1 << 20) + 777
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g).to(dtype)
    # a spread task vector (plain brackets), one of a few values (bfloat16: brackets of one value, or heavy ends)
    models = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype),
              (base.float() + torch.randint(-2, 3, (n,), generator=g).float() * 2 ** -6).to(dtype),
              (base.float() + torch.randint(0, 2, (n,), generator=g).float() * 2 ** -4 * torch.rand(n, generator=g).round()).to(dtype)]
    srcs = [selection.MagnitudeSource(m, base) for m in models]
    ks = [n // 2, n // 5, n // 3, n - 1, 1, n // 9]
    srcs6 = [srcs[0], srcs[1], srcs[2], srcs[0], srcs[1], srcs[2]]
    modes = {selection._Band(*selection._bracket(src, k)).mode for src, k in zip(srcs6, ks)}
    calls = []
    run = kernels.BandSweep.__call__
    monkeypatch.setattr(kernels.BandSweep, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    runs = []
    for env in (None, "torch"):
        if env:
            monkeypatch.setenv(kernels.DISABLE_ENV, env)
        calls.clear()
        runs.append(selection.kth_largest_magnitudes([selection.MagnitudeSource(m, base) for m in (*models, *models)], ks))
        assert bool(calls) == (env is None)
    assert runs[0] == runs[1]
    # and chunk by chunk, each bracket's counts and gathered magnitudes (a wrong band would only make the bracket miss,
    # which the full selection then hides)
    import numpy as np

    sweep = kernels.BandSweep([s.theta for s in srcs6], [s.base for s in srcs6], selection.CHUNK)
    for s, (src, k) in enumerate(zip(srcs6, ks)):
        compiled, steps = selection._Band(*selection._bracket(src, k)), selection._Band(*selection._bracket(src, k))
        above = [0, 0]
        scratch = (np.empty(selection.CHUNK, dtype=bool), np.empty(selection.CHUNK, dtype=bool))
        for i, j in selection._spans(n):
            over, at_lo, at_hi, nan, inside = sweep(s, i, j, compiled.lo, compiled.hi, compiled.mode)
            compiled.add_counts(at_lo, at_hi, inside)
            mag = src.magnitude(i, j).numpy()
            steps.add(mag, mag > steps.hi, scratch)
            above[0] += over
            above[1] += int((mag > steps.hi).sum())
            assert nan == 0
        assert above[0] == above[1] and compiled.at_lo == steps.at_lo and compiled.at_hi == steps.at_hi
        assert len(compiled.inside) == len(steps.inside) and all(np.array_equal(a, b) for a, b in zip(compiled.inside, steps.inside))
    assert modes >= ({"one", "ends"} if dtype == torch.bfloat16 else {"plain"}), modes


def test_compiled_threshold_sweep_refuses_nan_magnitudes_as_the_numpy_steps_do(monkeypatch):
    n = (1 << 20) + 5
    base = torch.zeros(n)
    model = torch.randn(n, generator=torch.Generator().manual_seed(6))
    model[n // 2] = float("inf")
    base[n // 2] = float("inf")  # inf - inf: a NaN task-vector entry
    messages = []
    for env in (None, "torch"):
        if env:
            monkeypatch.setenv(kernels.DISABLE_ENV, env)
        with pytest.raises(MethodError, match="NaN") as err:
            selection.kth_largest_magnitudes([selection.MagnitudeSource(model, base)], [n // 2])
        messages.append(str(err.value))
    assert messages[0] == messages[1] and messages[0].startswith("1 task-vector")


def test_kernels_that_cannot_be_built_leave_the_torch_path_with_a_warning(monkeypatch, caplog):
    import sys
    import types

    broken = types.ModuleType("modelsoup.methods._numba_kernels")

    def fail(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot cache function 'band_sweep': no locator available")

    broken.BLOCK, broken.band_sweep, broken.merge_rows = 2048, fail, fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modelsoup.methods._numba_kernels", broken)
    monkeypatch.setattr(kernels, "_compiled", None)
    base, models = _models(7, 3000, torch.bfloat16)
    with caplog.at_level("WARNING"):
        chunks = MergedChunks(top_k_deltas(models, base, [0.5] * 3), [1.0] * 3, base, 1.0, sign_method="sum")
    assert chunks.fused is None and not kernels.enabled()
    assert "compiled merge kernels unavailable (RuntimeError: cannot cache function" in caplog.text
    monkeypatch.setitem(sys.modules, "modelsoup.methods._numba_kernels", None)  # numba missing: an ImportError, no warning
    monkeypatch.setattr(kernels, "_compiled", None)
    caplog.clear()
    assert not kernels.enabled() and "unavailable" not in caplog.text


def test_kernels_are_off_where_torch_rounds_a_multiply_add_twice(monkeypatch):
    """torch's portable CPU kernels (no AVX2) round w * x before adding it; the compiled kernels fuse it, as AVX2 does."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not kernels.enabled()
    monkeypatch.setattr(kernels, "_compiled", None)
    monkeypatch.setattr(kernels, "_warming", None)
    kernels.warm_up()  # nor is numba loaded there for nothing
    assert kernels._warming is None
    import subprocess
    import sys

    code = ("import os, torch\nfrom modelsoup.methods import get_method, kernels\n"
            "g = torch.Generator().manual_seed(0)\nb = torch.randn(5000, generator=g)\n"
            "ms = [(b + 0.01 * torch.randn(5000, generator=g)).bfloat16() for _ in range(3)]\n"
            "out = []\nfor env in ('', 'torch'):\n    os.environ['MODELSOUP_KERNELS'] = env\n"
            "    out.append(get_method('ties')(ms, base=b.bfloat16(), weights=[0.3, 0.7, 0.9], density=0.5))\n"
            "print(kernels.enabled(), torch.equal(out[0].view(torch.int16), out[1].view(torch.int16)))\n")
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "default"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"], r.stdout


def test_a_kernel_failing_mid_merge_redoes_the_step_on_torch(monkeypatch, caplog):
    k = kernels._kernels()
    n = (1 << 20) + 4099  # the compiled sweep too
    base, models = _models(8, n, torch.bfloat16)
    want_monkey = pytest.MonkeyPatch()
    want_monkey.setenv(kernels.DISABLE_ENV, "torch")
    want = get_method("ties")(models, base=base, weights=[0.5, 1.0, 0.7], density=0.4)
    want_monkey.undo()
    for name in ("band_sweep", "merge_trimmed"):
        calls = []
        real = getattr(k, name)

        def flaky(*args, real=real, calls=calls):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 3:  # a new signature's cached code unreadable, say
                raise OSError(28, "No space left on device")
            return real(*args)

        monkeypatch.setattr(k, name, flaky)
        monkeypatch.setattr(kernels, "_broken", False)
        caplog.clear()
        with caplog.at_level("WARNING"):
            got = get_method("ties")(models, base=base, weights=[0.5, 1.0, 0.7], density=0.4)
        _same_bits(got.float(), want.float())
        assert len(calls) == 3 and "compiled merge kernels failed (OSError" in caplog.text
        assert not kernels.enabled()  # off for the rest of the process
        monkeypatch.setattr(k, name, real)
    monkeypatch.setattr(kernels, "_broken", False)


def test_a_weight_beyond_float32_is_refused_as_the_torch_path_refuses_it(monkeypatch):
    base, models = _models(9, 3000, torch.bfloat16)
    errors = []
    for env in ("all", "torch"):
        monkeypatch.setenv(kernels.DISABLE_ENV, env)
        with pytest.raises(RuntimeError) as err:
            get_method("ties")(models, base=base, weights=[1e39, 3e38, 1.0], density=0.5)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


# ------------------------------------------------------------------ the sphere methods' sums and combinations


def _sphere_both(monkeypatch: pytest.MonkeyPatch, fn):  # type: ignore[no-untyped-def]
    """:func:`_both`, watching the sphere methods' kernels."""
    return _both(monkeypatch, fn, ((kernels, "pair_sums"), (kernels, "combination")))


def _same_floats(a, b) -> None:  # type: ignore[no-untyped-def]
    """Python floats (nested lists, dicts, tuples) equal bit for bit (NaN included)."""
    import struct

    def flat(x):  # type: ignore[no-untyped-def]
        if isinstance(x, dict):
            return [v for k in sorted(x) for v in flat(x[k])]
        if isinstance(x, (list, tuple)):
            return [v for y in x for v in flat(y)]
        return [struct.pack("<d", x)]

    assert flat(a) == flat(b)


def _sphere_inputs(seed: int, n: int, dtype: torch.dtype, k: int, special: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = [base + 0.05 * torch.randn(n, generator=g) for _ in range(k)]
    if special:  # rows whose float32 squares overflow though every entry is finite, signed zeros, a far model
        models[0][5] = 3e38
        models[-1][n // 2] = -2e38
        models[0][1030:1040] = -0.0
        models[-1][2048:4096] = 0.0
    return [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1 << 20, (1 << 20) + 1000, 3 * 1024 + 5, (1 << 21) + 77, 70000, 1024])
@pytest.mark.parametrize("special", [False, True])
def test_compiled_sums_of_the_sphere_methods_give_the_torch_paths_bits(monkeypatch, dtype, n, special):

    ts = _sphere_inputs(n + special, n, dtype, 4, special)
    base = _sphere_inputs(n + 7, n, dtype, 1, False)[0]
    for args in ((ts,), (ts, base), (ts[:1],), (ts[:2], base.float())):
        got, want = _sphere_both(monkeypatch, lambda: reduce.gram_matrix(*args))
        _same_floats(got, want)
    if n >= reduce.SHORT:  # shorter ones are summed in float64 on torch
        got, want = _sphere_both(monkeypatch, lambda: reduce.difference_sums(ts))
        _same_floats(got, want)


def test_compiled_sums_with_nan_and_inf_entries_give_the_torch_paths_bits(monkeypatch):

    ts = _sphere_inputs(3, (1 << 17) + 9, torch.bfloat16, 3, False)
    ts[0][100] = float("nan")
    ts[1][5000] = float("inf")
    ts[2][5000] = float("inf")  # inf - inf in the difference: NaN
    ts[2][70000] = float("-inf")
    for fn in (lambda: reduce.gram_matrix(ts), lambda: reduce.gram_matrix(ts[1:], ts[0]), lambda: reduce.difference_sums(ts)):
        got, want = _sphere_both(monkeypatch, fn)
        _same_floats(got, want)


COEFFICIENTS = [[0.3, -1.1, 0.0, 1e-50], [0.3, -1.1, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0], [-0.0, 7e-39, 3.3e38, 1e-45]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coefficients", COEFFICIENTS)
def test_compiled_linear_combination_gives_the_torch_paths_bits(monkeypatch, dtype, coefficients):
    from modelsoup.methods.ops import linear_combination

    ts = _sphere_inputs(11, 2 * 2048 + 37, dtype, 4, True)
    ts[1][9] = float("inf")  # times a coefficient that rounds to 0 in float32: NaN on torch, so not on the kernel
    ts[3][9] = float("inf")
    base = _sphere_inputs(12, 2 * 2048 + 37, dtype, 1, False)[0]
    for b in (None, base, base.float()):
        if any(c and float(torch.tensor(c, dtype=torch.float32)) == 0 for c in coefficients):
            monkeypatch.setenv(kernels.DISABLE_ENV, "torch")
            want = linear_combination(ts, coefficients, b, torch.float32)
            monkeypatch.setenv(kernels.DISABLE_ENV, "all")
            got = linear_combination(ts, coefficients, b, torch.float32)  # on torch: the kernel would skip the term
        else:
            got, want = _sphere_both(monkeypatch, lambda: linear_combination(ts, coefficients, b, torch.float32))
        _same_bits(got, want)


def test_a_coefficient_beyond_float32_stays_on_torch_which_refuses_it(monkeypatch):
    from modelsoup.methods.ops import linear_combination

    ts = _sphere_inputs(13, 3000, torch.bfloat16, 2, False)
    errors = []
    for env in ("all", "torch"):
        monkeypatch.setenv(kernels.DISABLE_ENV, env)
        with pytest.raises(RuntimeError) as err:
            linear_combination(ts, [1e39, 1.0], None, torch.float32)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,params,with_base", [
    ("multislerp", {}, False), ("multislerp", {"weights": [0.2, 0.5, 1.0]}, True), ("karcher", {}, False),
    ("karcher", {"weights": [3.0, 1.0, 1.0], "max_iter": 50}, False), ("slerp", {"t": 0.3}, False), ("nuslerp", {}, False),
])
def test_sphere_methods_on_the_kernels_give_the_torch_paths_bits(monkeypatch, dtype, method, params, with_base):
    n = (1 << 20) + 3 * 1024 + 11  # two slices, a partial row
    ts = _sphere_inputs(21, n, dtype, 2 if method in ("slerp", "nuslerp") else 3, False)
    base = _sphere_inputs(22, n, dtype, 1, False)[0] if with_base else None
    kw = {**params, **({"base": base} if with_base else {})}
    got, want = _sphere_both(monkeypatch, lambda: get_method(method)(ts, **kw))
    _same_bits(got.float(), want.float())


def test_a_sum_kernel_failing_mid_reduction_redoes_the_piece_on_torch(monkeypatch, caplog):

    k = kernels._kernels()
    ts = _sphere_inputs(31, 3 * (1 << 20) + 5, torch.bfloat16, 3, False)
    monkeypatch.setenv(kernels.DISABLE_ENV, "torch")
    want = reduce.gram_matrix(ts), reduce.difference_sums(ts)
    monkeypatch.setenv(kernels.DISABLE_ENV, "all")
    for fn, i in ((reduce.gram_matrix, 0), (reduce.difference_sums, 1)):
        calls = []
        real = k.pair_sums

        def flaky(*args, real=real, calls=calls):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real(*args)

        monkeypatch.setattr(k, "pair_sums", flaky)
        monkeypatch.setattr(kernels, "_broken", False)
        caplog.clear()
        with caplog.at_level("WARNING"):
            got = fn(ts)
        _same_floats(got, want[i])
        assert len(calls) == 2 and "compiled merge kernels failed (OSError" in caplog.text and not kernels.enabled()
        monkeypatch.setattr(k, "pair_sums", real)
    monkeypatch.setattr(kernels, "_broken", False)


# ------------------------------------------------------------------ the random draws (DARE, DELLA)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7])
def test_compiled_uniforms_are_torch_rands_and_leave_the_generator_as_torch_does(seed):
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for n in (1, 622, 623, 624, 625, 1247, 1248, 1249, 3, 100_003, 0, 5000):  # across new states, at and around them
        _same_bits(kernels.uniforms(ours, torch.empty(n)), torch.rand(n, generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())
    for p in (0.0, 1.0, 0.5, 0.3, 1e-8, 0.9999999, 0.6):
        keep = torch.empty(7001, dtype=torch.bool)
        assert torch.equal(kernels.uniforms(ours, None, p, keep), torch.rand(7001, generator=theirs) < p)
    assert torch.equal(ours.get_state(), theirs.get_state())
    torch.randn(5, generator=ours), torch.randn(5, generator=theirs)  # a normal draw (its cache in the state) between
    _same_bits(kernels.uniforms(ours, torch.empty(999)), torch.rand(999, generator=theirs))
    _same_bits(torch.rand(10, generator=ours), torch.rand(10, generator=theirs))  # and torch goes on from our state


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {"density": 0.4}), ("dare_linear", {"density": 0.7}), ("della", {"density": 0.6, "epsilon": 0.1}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_methods_on_the_compiled_draws_give_the_torch_paths_bits(monkeypatch, method, params, dtype):
    base, models = _models(41, (1 << 18) + 3 * 2048 + 5, dtype)

    def run():  # type: ignore[no-untyped-def]
        return get_method(method)(models, base=base, weights=[0.5, 1.0, 0.7], generator=torch.Generator().manual_seed(3), **params)

    got, want = _both(monkeypatch, run, ((kernels, "uniforms"),))
    _same_bits(got.float(), want.float())


def test_streamed_dare_masks_on_the_compiled_draws_give_the_torch_paths_bits(monkeypatch):
    from modelsoup.methods.ops import DroppedDeltas

    base, models = _models(42, 3 * (1 << 18) + 11, torch.bfloat16)

    def masks():  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(9)
        d = DroppedDeltas(models, base, [0.3, 0.5, 0.9], g, "density")
        return torch.stack(d.keep).float(), g.get_state()

    (got, gs), (want, ws) = _both(monkeypatch, masks, ((kernels, "uniforms"),))
    _same_bits(got, want)
    assert torch.equal(gs, ws)


def test_compiled_draws_are_not_used_where_they_would_not_be_torchs(monkeypatch):
    """A generator state of another layout (another torch), or draws that the check at first use finds differ."""
    monkeypatch.setattr(kernels, "_rand_checked", None)
    k = kernels._kernels()
    real = k.uniforms

    def off_by_one(state, pos, masked, p, out, keep):  # type: ignore[no-untyped-def]
        real(state, pos, masked, p, out, keep)
        if out.size:
            out[0] += 1e-3

    monkeypatch.setattr(k, "uniforms", off_by_one)
    assert not kernels.draws_uniforms(torch.Generator())
    monkeypatch.setattr(k, "uniforms", real)
    monkeypatch.setattr(kernels, "_rand_checked", None)
    assert kernels.draws_uniforms(torch.Generator())
    monkeypatch.setattr(kernels, "_STATE_BYTES", 5057)  # a state of another size once the check passed: torch draws
    from modelsoup.methods.ops import rand

    _same_bits(rand((3000,), torch.Generator().manual_seed(4)), torch.rand(3000, generator=torch.Generator().manual_seed(4)))
    assert kernels.enabled()  # and the kernels stay on
    monkeypatch.setattr(kernels, "_rand_checked", None)
    assert not kernels.draws_uniforms(torch.Generator())
    monkeypatch.setattr(kernels, "_rand_checked", None)


def test_a_failing_compiled_draw_leaves_the_generator_as_it_was_and_torch_draws(monkeypatch, caplog):
    from modelsoup.methods.ops import bernoulli_mask

    k = kernels._kernels()

    def fail(*args):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    want = bernoulli_mask(torch.empty(5000), 0.4, torch.Generator().manual_seed(5))
    monkeypatch.setattr(k, "uniforms", fail)
    monkeypatch.setattr(kernels, "_broken", False)
    with caplog.at_level("WARNING"):
        got = bernoulli_mask(torch.empty(5000), 0.4, torch.Generator().manual_seed(5))
    _same_bits(got, want)
    assert "compiled merge kernels failed (OSError" in caplog.text and not kernels.enabled()
    monkeypatch.setattr(kernels, "_broken", False)


def test_draws_made_on_a_device_are_torchs(monkeypatch):
    """A method run on a device (engine.on_device) makes its buffers there: torch draws into them, not the kernel."""
    from modelsoup.engine import on_device
    from modelsoup.methods.ops import bernoulli_mask, rand

    assert kernels.draws_uniforms(torch.Generator())  # checked on the CPU first
    calls = []
    real = kernels.uniforms
    monkeypatch.setattr(kernels, "uniforms", lambda *a, **k: calls.append(1) or real(*a, **k))
    with on_device(torch.device("meta")):
        assert rand((10,), torch.Generator().manual_seed(1)).device.type == "meta"
        assert bernoulli_mask(torch.empty(3000), 0.5, torch.Generator().manual_seed(1)).device.type == "meta"
    assert not calls


def test_threads_sharing_a_generator_never_draw_the_same_numbers():
    import threading

    from modelsoup.methods.ops import rand

    n, shared, ref = 200_000, torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    got: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: got.append(rand((n,), shared))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = [torch.rand(n, generator=ref) for _ in range(4)]  # the same four pieces of torch's stream, in some order
    assert sorted(float(g[:4].sum()) for g in got) == sorted(float(w[:4].sum()) for w in want)
    assert all(any(torch.equal(g, w) for w in want) for g in got) and torch.equal(shared.get_state(), ref.get_state())


def test_a_mask_below_zero_is_torchs_all_false_mask(monkeypatch):
    from modelsoup.methods.ops import DroppedDeltas

    base, models = _models(44, 5000, torch.bfloat16, k=2)

    def masks():  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(1)
        return torch.stack(DroppedDeltas(models, base, [-0.5, 0.5], g, "none").keep).float(), g.get_state()

    (got, gs), (want, ws) = _both(monkeypatch, masks, ((kernels, "uniforms"),))
    _same_bits(got, want)
    assert torch.equal(gs, ws) and not got[0].any()


def test_row_sums_that_are_not_torchs_here_leave_the_sums_to_torch(monkeypatch, caplog):
    import numpy as np

    k = kernels._kernels()
    real = k.pair_sums

    def off(xs, base, has_base, pairs, scratch, out):  # type: ignore[no-untyped-def]
        real(xs, base, has_base, pairs, scratch, out)
        out[0, 0] = np.nextafter(out[0, 0], np.float32(np.inf))

    monkeypatch.setattr(k, "pair_sums", off)
    monkeypatch.setattr(kernels, "_sums_checked", None)
    ts = _sphere_inputs(45, 5000, torch.bfloat16, 2, False)
    calls = []
    monkeypatch.setattr(kernels, "pair_sums", lambda *a, real=kernels.pair_sums: calls.append(1) or real(*a))
    with caplog.at_level("INFO"):
        assert not kernels.sums_like_torch()
    calls.clear()
    got = reduce.gram_matrix(ts)
    assert not calls and "compiled row sums differ" in caplog.text
    monkeypatch.setenv(kernels.DISABLE_ENV, "torch")
    _same_floats(got, reduce.gram_matrix(ts))
    monkeypatch.setattr(kernels, "_sums_checked", None)


def test_a_combination_of_mismatched_sizes_is_refused_as_torch_refuses_it(monkeypatch):
    from modelsoup.methods.ops import linear_combination

    ts = _sphere_inputs(46, 5000, torch.bfloat16, 3, False)
    base = _sphere_inputs(47, 3000, torch.bfloat16, 1, False)[0]
    errors = []
    for env in ("all", "torch"):
        monkeypatch.setenv(kernels.DISABLE_ENV, env)
        with pytest.raises(RuntimeError) as err:
            linear_combination(ts, [1.0, 1.0, 1.0], base, torch.float32)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [2, 7, 2048, 5632])
def test_streamed_della_codes_on_the_compiled_pass_give_the_torch_paths_bits(monkeypatch, dtype, cols):
    from modelsoup.methods.ops import MagPrunedDeltas

    g = torch.Generator().manual_seed(cols)
    base = torch.randn(max(3, (1 << 17) // cols), cols, generator=g)
    models = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(3)]
    models[0][1] = base[1]  # a row of ties (zero deltas)
    models[1][2, : cols // 2] = base[2, : cols // 2] + 2.0 ** -10  # ties of one magnitude
    models[2][0, 0] = float("inf")  # (inputs allowed to be non-finite)
    models = [m.to(dtype) for m in models]

    def codes():  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(2)
        d = MagPrunedDeltas(models, base.to(dtype), [0.6, 0.3, 0.5], [0.1, 0.2, 0.05], gen, "density", "della")
        return torch.stack([c[0] for c in d.codes]).float(), gen.get_state()

    (got, gs), (want, ws) = _both(monkeypatch, codes, ((kernels, "magprune_codes"),))
    _same_bits(got, want)
    assert torch.equal(gs, ws)


def _della_rows(seed: int, rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Models whose deltas are bfloat16-like (few distinct magnitudes, their float32 low bits zero), but for two rows
    whose magnitudes tie in their high bits and differ below them out of column order: a few entries of row 1 (sorted in
    place by the kernel) and every entry of row 2 (too many moves: sorted again by int64 keys). There theta = 2^-16 +
    m 2^-23 (exact in bfloat16) and base 1, so |delta| = 1 - 2^-16 - m 2^-23: for m in 1..31 the same bits above 2^-18,
    decreasing with m."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(rows, cols)
    base[1:3] = base[4] = 1.0
    models = []
    for _ in range(3):
        theta = torch.randint(-8, 9, (rows, cols), generator=g) * 2.0 ** -8
        theta[1:3] = 0.5
        theta[1, 3:9] = 2.0 ** -16 + torch.arange(1, 7) * 2.0 ** -23  # m = 1..6, in column order: magnitudes decreasing
        theta[2] = 2.0 ** -16 + (1 + torch.arange(cols) * 30 // (cols - 1)) * 2.0 ** -23
        theta[3, 0] = float("inf")
        theta[3, 1] = -0.0
        theta[4, :2] = torch.tensor([2.0 ** -16 + 2.0 ** -23, 2.0 ** -16 + 2.0 ** -18])  # m = 1 and 32 (no low bits), one high part
        theta[4, 2:] = 0.5
        models.append(theta.to(dtype))
    return base.to(dtype), models


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [1 << 18, 300])
def test_della_codes_where_high_bits_tie_out_of_order_give_the_torch_paths_bits(monkeypatch, dtype, block):
    from modelsoup.methods.ops import MagPrunedDeltas

    monkeypatch.setattr(kernels, "MAGPRUNE_BLOCK", block)  # one block, or several (the keys of later ones int64 once wide)
    base, models = _della_rows(50, 4096 if dtype == torch.bfloat16 else 64, 64, dtype)

    def codes():  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(3)
        d = MagPrunedDeltas(models, base, 0.5, 0.2, gen, "density", "della")
        return torch.stack([c[0] for c in d.codes]).float(), gen.get_state()

    (got, gs), (want, ws) = _both(monkeypatch, codes, ((kernels, "magprune_codes"),))
    _same_bits(got, want)
    assert torch.equal(gs, ws)


def test_della_rows_out_of_order_take_each_way_of_sorting_them():
    import numpy as np

    k = kernels._kernels()
    base, models = _della_rows(51, 4096, 64, torch.bfloat16)
    t, b = kernels._as_numpy(models[0]), kernels._as_numpy(base)
    keys = np.empty((4096, 64), np.uint32)
    assert k.magprune_keys(t, b, 6, False, keys) * 64 <= keys.size  # the 32-bit keys
    keys.sort(axis=1)
    wrong = np.empty(4096, np.int64)
    # row 4 in order by its keys' flag, row 1 sorted in place, row 2 sorted again
    assert wrong[: k.magprune_columns(keys, t, b, 6, True, wrong)].tolist() == [2]
    mags = (models[0].float() - base.float()).abs().numpy().view(np.int32)
    for r in (0, 1, 3, 4):
        assert np.array_equal(keys[r], np.argsort(mags[r], kind="stable")), r
    assert keys[4][-2:].tolist() == [1, 0] and not np.array_equal(keys[2], np.argsort(mags[2], kind="stable"))


# ------------------------------------------------------------ torch.sort's order of ties at a cut (tie_break: torch_sort)


def _sorted_window(x: torch.Tensor, first: int, stop: int, descending: bool) -> torch.Tensor:
    order = torch.sort(x, descending=descending).indices
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[order[first:stop]] = True
    return keep


@pytest.mark.parametrize("n", [1, 2, 16, 17, 18, 33, 1000, 70_001, 300_000])
@pytest.mark.parametrize("levels", [1, 3, 300, 10**9])
@pytest.mark.parametrize("descending", [True, False])
def test_the_window_of_torchs_sort_is_found_without_sorting_it_all(n, levels, descending):
    """Many ties (levels distinct magnitudes, NaNs among them: the comparators hold them equivalent, first when
    descending, last ascending) and windows at each end, inside, empty and whole: torch.sort's own sets."""
    g = torch.Generator().manual_seed(n * 7 + levels)
    x = torch.randint(0, levels, (n,), generator=g).float() * 0.5
    x[torch.randint(0, n, (n // 9,), generator=g)] = float("nan")
    x[torch.randint(0, n, (n // 11,), generator=g)] = float("inf")
    for first, stop in ((0, n // 2), (n // 3, n - n // 5), (0, 1), (n - 1, n), (0, n), (n // 2, n // 2), (0, 0)):
        got = kernels.torch_order_window(x, first, stop, descending=descending)
        assert got is not None and torch.equal(got, _sorted_window(x, first, stop, descending)), (first, stop)


def test_the_window_of_torchs_sort_of_magnitudes_of_signed_values():
    """absolute: the magnitudes of a delta, read from it (signed zeros, negative NaN): those of torch.sort(|delta|)."""
    g = torch.Generator().manual_seed(5)
    d = (torch.randn(50_000, generator=g) * 4).round() / 8
    d[::97] = -0.0
    d[::101] = -float("nan")
    d[::103] = -float("inf")
    k = 20_000
    got = kernels.torch_order_window(d, 0, k, descending=True, absolute=True)
    assert got is not None and torch.equal(got, _sorted_window(d.abs(), 0, k, True))
    assert kernels.torch_order_window(d, 0, k, descending=True) is None  # negative magnitudes: keys cannot order them
    assert kernels.torch_order_window(d.double(), 0, k, descending=True, absolute=True) is None  # float32 only


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16)])
def test_the_window_of_torchs_sort_of_a_task_vectors_magnitudes_is_made_from_the_inputs(dtypes):
    """With a base: the magnitudes of the float32 task vector (half precision widened first), read from theta and base
    (ties, infinities, NaN from inf - inf): the sets of torch.sort(|task_vector(theta, base)|)."""
    from modelsoup.methods.ops import task_vector

    g = torch.Generator().manual_seed(8)
    base = torch.randn(40_000, generator=g)
    theta = base + (torch.randn(40_000, generator=g) * 8).round() / 256
    theta[::89], base[::89] = float("inf"), float("inf")
    theta[::97] = -float("inf")
    theta, base = theta.to(dtypes[0]), base.to(dtypes[1])
    m = task_vector(theta, base).abs()
    for first, stop, descending in ((0, 17_000, True), (3000, 33_000, False)):
        got = kernels.torch_order_window(theta, first, stop, descending=descending, base=base)
        assert got is not None and torch.equal(got, _sorted_window(m, first, stop, descending))


def test_a_window_that_meets_introsorts_depth_limit_is_left_to_torch(monkeypatch):
    """Where std::sort would heap-sort a range (its depth limit), the kernel declines, and the trim sorts with torch."""
    from modelsoup.methods import ops

    g = torch.Generator().manual_seed(3)
    d = (torch.randn(4000, generator=g) * 4).round()
    assert kernels._window(d, 0, 1500, True, True, depth=0) is None
    assert kernels._window(d, 0, 1500, True, True, depth=2) is None
    assert kernels._window(d, 0, 1500, True, True) is not None
    want = ops.trim_top_k_torch_order(d, 0.375)
    monkeypatch.setattr(kernels, "_window", lambda *a: None)
    _same_bits(ops.trim_top_k_torch_order(d, 0.375), want)
    _same_bits(want, d * _sorted_window(d.abs(), 0, 1500, True).float())


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.4, "tie_break": "torch_sort", "keep_at_least_one": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "tie_break": "torch_sort"}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "tie_break": "torch_sort"}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_merges_in_torchs_order_of_ties_give_the_torch_sorts_bits(monkeypatch, method, params, dtype):
    base, models = _models(11, 60_000, dtype, special=True)
    for m in models:  # many ties at every cut
        m.copy_(base + ((m - base) * 64).round() / 64)
    fused, plain = _both(monkeypatch, lambda: get_method(method)(models, base=base, **params), ((kernels, "_window"),))
    _same_bits(fused, plain)


def test_torchs_sort_is_the_one_the_window_copies():
    """This torch's CPU sort is std::sort (what the kernel copies); a torch where it is not sorts with torch itself."""
    assert kernels.sorts_like_torch()


@pytest.mark.parametrize("levels", [1, 2, 5, 1000, 2**30])
def test_the_block_partition_makes_the_unguarded_partitions_swaps(levels):
    """The block partition (branch-free lists of each side's stops) leaves the keys, the places and the cut exactly as
    libstdc++'s unguarded partition does, on ranges of one block more or less than a multiple, and with many ties."""
    import numpy as np

    k = kernels._kernels()
    rng = np.random.default_rng(levels)
    block = k.PARTITION_BLOCK
    for n in (4 * block + 1, 4 * block + 2, 7 * block - 1, 10_000, 100_003):
        keys = rng.integers(0, levels, n).astype(np.int32)
        order = np.arange(n, dtype=np.int32)
        k._median_to_first(keys, order, 0, 1, n // 2, n - 1)
        keys2, order2 = keys.copy(), order.copy()
        cut = k._partition(keys, order, 1, n, 0)
        assert k._partition_blocks(keys2, order2, 1, n, 0, np.empty(block, np.int64), np.empty(block, np.int64)) == cut
        assert np.array_equal(keys, keys2) and np.array_equal(order, order2)

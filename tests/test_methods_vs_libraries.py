"""Agreement with public implementations under their conventions: peft's merge utilities, torch's SWA."""

from __future__ import annotations

import pytest
import torch

from modelsoup.methods import get_method

from .tolerances import FP32_VS_LIBRARY

merge_utils = pytest.importorskip("peft.utils.merge_utils")
PEFT = {"sign_from": "unweighted", "divide_by": "count"}


def _deltas(seed: int, n: int = 3, shape=(16, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("density", [0.3, 0.7])
@pytest.mark.parametrize("peft_sign, ours", [("total", "sum"), ("frequency", "count")])
def test_ties_agrees_with_peft(density, peft_sign, ours):
    ds = _deltas(0)
    w = [0.5, 1.0, 2.0]
    want = merge_utils.ties(ds, torch.tensor(w), density, majority_sign_method=peft_sign)
    got = get_method("ties")(ds, base=torch.zeros_like(ds[0]), weights=w, density=density, sign_method=ours, **PEFT)
    torch.testing.assert_close(got, want, **FP32_VS_LIBRARY)


def test_ties_default_convention_differs_from_peft_with_uneven_weights():
    ds = _deltas(1)
    w = [0.5, 1.0, 2.0]
    peft = merge_utils.ties(ds, torch.tensor(w), 0.5)
    ours = get_method("ties")(ds, base=torch.zeros_like(ds[0]), weights=w, density=0.5)
    assert not torch.allclose(peft, ours)


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_linear_agrees_with_peft_bit_for_bit(seed):
    # Exact, not close: the same Bernoulli draws from an identically seeded generator (so the same mask), the
    # same division by the density, and power-of-two weights, whose products are exact, summed in model order
    # (with other weights a fused multiply-add may round the sum differently, see the test below).
    ds = _deltas(seed + 1)
    w = [0.5, 1.0, 2.0]
    torch.manual_seed(seed)
    want = merge_utils.dare_linear(ds, torch.tensor(w), 0.6)
    got = get_method("dare_linear")(ds, base=torch.zeros_like(ds[0]), weights=w, density=0.6, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_linear_agrees_with_peft_to_float32_rounding_for_any_weights(seed):
    ds = _deltas(seed + 1)
    w = [0.3, 1.7, 0.9]
    torch.manual_seed(seed)
    want = merge_utils.dare_linear(ds, torch.tensor(w), 0.6)
    got = get_method("dare_linear")(ds, base=torch.zeros_like(ds[0]), weights=w, density=0.6, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(got, want, **FP32_VS_LIBRARY)
    assert torch.equal(got == 0, want == 0)  # the same entries dropped


def test_dare_ties_agrees_with_peft():
    ds = _deltas(3)
    w = [1.0, 0.25, 1.5]
    torch.manual_seed(4)
    want = merge_utils.dare_ties(ds, torch.tensor(w), 0.5, majority_sign_method="total")
    got = get_method("dare_ties")(ds, base=torch.zeros_like(ds[0]), weights=w, density=0.5, generator=torch.Generator().manual_seed(4), **PEFT)
    torch.testing.assert_close(got, want, **FP32_VS_LIBRARY)


def test_linear_agrees_with_swa_averaged_model_per_parameter():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)) for _ in range(5)]
    swa = torch.optim.swa_utils.AveragedModel(nets[0])
    for n in nets:
        swa.update_parameters(n)
    linear = get_method("linear")
    for name, p in swa.module.named_parameters():
        got = linear([dict(n.named_parameters())[name].detach() for n in nets])
        torch.testing.assert_close(got, p.detach(), **FP32_VS_LIBRARY)

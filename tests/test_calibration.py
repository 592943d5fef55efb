"""Calibration metrics against hand-made prediction sets and slow reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from modelsoup.eval.calibration import brier, calibration_metrics, ece, entropy, fit_temperature, nll, reliability

from . import reference


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_perfectly_calibrated_set_has_zero_ece():
    # ten predictions at confidence 0.8, eight right; ten at 0.6, six right
    probs = _probs([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert ece(probs, labels, scheme="mass", bins=2) == pytest.approx(0.0, abs=1e-12)


def test_over_confident_set():
    # confidence 0.99, half right: ECE = |0.5 - 0.99|
    probs = _probs([[0.99, 0.01]] * 10)
    labels = torch.tensor([0, 1] * 5)
    assert ece(probs, labels) == pytest.approx(0.49)
    m = calibration_metrics(probs, labels)
    assert m["accuracy"] == 0.5 and m["confidence"] == pytest.approx(0.99)
    assert m["nll"] == pytest.approx(-(math.log(0.99) + math.log(0.01)) / 2)


def test_hand_worked_bins():
    # confidences 0.55 (right), 0.65 (wrong), 0.9 (right), 0.95 (right); 2 equal-width bins: all in (0.5, 1]
    probs = _probs([[0.55, 0.45], [0.65, 0.35], [0.1, 0.9], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 0])
    assert ece(probs, labels, bins=2) == pytest.approx(abs(0.75 - (0.55 + 0.65 + 0.9 + 0.95) / 4))
    # 4 equal-width bins: (0.5,0.75] holds 0.55, 0.65 -> |0.5 - 0.6|; (0.75,1] holds 0.9, 0.95 -> |1 - 0.925|
    assert ece(probs, labels, bins=4) == pytest.approx(0.5 * 0.1 + 0.5 * 0.075)
    # 2 equal-mass bins: {0.55, 0.65} and {0.9, 0.95}: the same here
    assert ece(probs, labels, bins=2, scheme="mass") == pytest.approx(0.5 * 0.1 + 0.5 * 0.075)
    assert reliability(probs, labels, bins=4) == [(0.625, 0.5, pytest.approx(0.6), 2), (0.875, 1.0, pytest.approx(0.925), 2)]


def test_nll_brier_entropy_by_hand():
    probs = _probs([[0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 0])
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)
    assert brier(probs, labels) == pytest.approx(((0.3**2 + 0.3**2) + (0.6**2 + 0.6**2)) / 2)
    assert entropy(probs) == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3) + 0.4 * math.log(0.4) + 0.6 * math.log(0.6)) / 2)
    assert nll(_probs([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))  # a hard vote stays finite


@pytest.mark.parametrize("bins", [1, 3, 15])
def test_ece_agrees_with_reference_loops(bins):
    g = torch.Generator().manual_seed(bins)
    probs = torch.softmax(torch.randn(97, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    labels = torch.randint(0, 4, (97,), generator=g)
    assert ece(probs, labels, bins=bins) == pytest.approx(reference.ece_equal_width(probs, labels, bins), abs=1e-12)
    assert ece(probs, labels, bins=bins, scheme="mass") == pytest.approx(reference.ece_equal_mass(probs, labels, bins), abs=1e-12)


def test_temperature_recovers_the_scale_of_over_confident_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)  # calibrated for logits z
    t = fit_temperature(3.0 * z, labels)  # the model reports logits 3x too sharp
    assert t.value == pytest.approx(3.0, rel=0.05)
    grid = [0.5 + 0.01 * k for k in range(400)]
    best = min(grid, key=lambda v: float(torch.nn.functional.cross_entropy(3.0 * z / v, labels)))
    assert t.value == pytest.approx(best, abs=0.011)
    assert ece(t.probs(3.0 * z), labels) < ece(torch.softmax(3.0 * z, 1), labels)

"""Calibration and uncertainty of predicted probabilities: ECE, NLL, Brier score, entropy, temperature scaling.

Conventions (each pinned by a test against a hand-computed case):
  * confidence = the largest predicted probability; a prediction is correct when its arg-max (lowest
    class index on a tie) is the label.
  * ECE (Guo et al. 2017) = sum over bins of (examples in bin / N) * |accuracy in bin - mean confidence
    in bin|. Equal-width bins split [0, 1] into ``bins`` intervals (lo, hi], the first one also holding 0;
    equal-mass bins sort examples by confidence and split them into ``bins`` groups of sizes differing
    by at most one (larger groups first), ties broken by example order.
  * NLL = mean of -log p(label), natural log; probabilities are floored at 1e-12 so that a hard vote
    with p = 0 gives a large finite value.
  * Brier score = mean over examples of sum over classes (p_c - 1[c = label])^2 (Brier's original
    multi-class form, in [0, 2]).
  * entropy = mean over examples of -sum_c p_c log p_c (nats).
  * temperature scaling divides logits by one T > 0 fitted to minimise the NLL on held-out data.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..errors import EvaluatorError, OptionError

PROB_FLOOR = 1e-12
DEFAULT_BINS = 15


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0] or probs.shape[0] == 0:
        raise EvaluatorError(f"need probabilities (examples, classes) and labels (examples,); got {list(probs.shape)} and {list(labels.shape)}")


def _check_bins(bins: int) -> None:
    try:
        ok = operator.index(bins) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise OptionError(f"bins must be a whole number, at least 1; got {bins!r}")


def confidence_and_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest probability, whether its class is the label) per example, in float64."""
    _check(probs, labels)
    p = probs.double()
    conf, pred = p.max(dim=1)
    return conf, (pred == labels.long()).double()


def _ece_of_bins(conf: torch.Tensor, correct: torch.Tensor, bin_of: torch.Tensor, bins: int) -> float:
    n = conf.numel()
    total = 0.0
    for b in range(bins):
        m = bin_of == b
        k = int(m.sum())
        if k:
            total += k / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return total


def ece(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = DEFAULT_BINS, scheme: str = "width") -> float:
    """Expected calibration error with equal-width (``scheme="width"``) or equal-mass (``"mass"``) bins.

    Raises:
        OptionError: ``bins`` below 1 or an unknown ``scheme``.
        EvaluatorError: probabilities and labels that do not line up.
    """
    _check_bins(bins)
    if scheme not in ("width", "mass"):
        raise OptionError(f"scheme must be 'width' (equal-width bins) or 'mass' (equal-mass bins), got {scheme!r}")
    conf, correct = confidence_and_correct(probs, labels)
    if scheme == "width":
        # bin b holds confidences in (b/B, (b+1)/B]; 0 goes to the first bin
        bin_of = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    else:  # mass
        order = torch.sort(conf, stable=True).indices
        bin_of = torch.empty_like(order)
        for b, idx in enumerate(torch.tensor_split(order, bins)):
            bin_of[idx] = b
    return _ece_of_bins(conf, correct, bin_of, bins)


def reliability(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = DEFAULT_BINS) -> list[tuple[float, float, float, int]]:
    """Equal-width reliability diagram data: (bin centre, accuracy, mean confidence, count) per non-empty bin.

    Raises:
        OptionError: ``bins`` below 1.
    """
    _check_bins(bins)
    conf, correct = confidence_and_correct(probs, labels)
    bin_of = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        m = bin_of == b
        k = int(m.sum())
        if k:
            out.append(((b + 0.5) / bins, float(correct[m].mean()), float(conf[m].mean()), k))
    return out


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    p = probs.double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return float(-torch.log(p.clamp_min(PROB_FLOOR)).mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def entropy(probs: torch.Tensor) -> float:
    p = probs.double()
    return float(-(p * torch.log(p.clamp_min(PROB_FLOOR))).sum(1).mean())


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Accuracy, NLL, Brier, mean entropy, mean confidence, and ECE with both binnings."""
    conf, correct = confidence_and_correct(probs, labels)
    return {
        "accuracy": float(correct.mean()),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "entropy": entropy(probs),
        "confidence": float(conf.mean()),
        "ece": ece(probs, labels, bins=bins, scheme="width"),
        "ece_mass": ece(probs, labels, bins=bins, scheme="mass"),
    }


@dataclass(frozen=True)
class Temperature:
    """A fitted temperature: probabilities = softmax(logits / value)."""

    value: float

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double() / self.value, dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, lo: float = 0.05, hi: float = 20.0, steps: int = 100) -> Temperature:
    """The T in [lo, hi] minimising the NLL of softmax(logits / T), by golden-section search on log T.

    The NLL of temperature-scaled logits is convex in 1/T, hence unimodal in log T, so the search finds
    the optimum to ~1e-9 relative in ``steps`` iterations, deterministically.

    Raises:
        OptionError: not 0 < lo < hi (finite).
        EvaluatorError: logits and labels that do not line up.
    """
    if not (0 < lo < hi < float("inf")):
        raise OptionError(f"the temperature search needs 0 < lo < hi, both finite; got lo {lo}, hi {hi}")
    _check(logits, labels)
    z, y = logits.double(), labels.long()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / torch.exp(torch.tensor(log_t, dtype=torch.float64)), y))

    a, b = torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item()
    g = (5 ** 0.5 - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return Temperature(float(torch.exp(torch.tensor((a + b) / 2))))

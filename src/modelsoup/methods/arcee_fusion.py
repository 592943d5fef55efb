"""Arcee Fusion: keep only the model's most important changes to the base, by a dynamic outlier threshold.

importance = |theta - base| * KL(softmax(theta) || softmax(base)) (softmax and KL along the last dim, one
KL per row); an entry's change is kept where its importance is at least median + 1.5 IQR of all
importances (quartiles as order statistics at floor(q (n - 1))), else the base's value stays.
mergekit estimates the quartiles of tensors above 10^6 entries from a random sample; here they are
always exact (the value the sample estimates), so the method is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reduce
from .ops import base_and_one_model
from .registry import register

# mergekit's constants: added to the probabilities before the log; the quartiles used.
PROB_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|theta - base| times the KL divergence of the rows' softmax distributions.

    The softmax and the KL's sums are :mod:`.reduce`'s (exp(x - max) / sum, per row): torch.softmax rounds differently
    on AVX2 and AVX-512 CPUs, and a one-vector sum with the thread count, which moved entries across the outlier cut."""
    p = reduce.softmax(theta) + PROB_EPS
    q = reduce.softmax(base) + PROB_EPS
    kl = reduce.row_sum(p * torch.log(p / q))
    return (theta - base).abs() * kl


def order_statistic(flat: torch.Tensor, q: float) -> float:
    """The value at position floor(q (n - 1)) of the sorted entries."""
    k = int(q * (flat.numel() - 1))
    return float(torch.kthvalue(flat, k + 1).values)


@register(
    "arcee_fusion",
    summary="base plus the model's changes whose importance |delta| * KL(rows) is an outlier (>= median + 1.5 IQR)",
    paper="Arcee AI 2025, Arcee Fusion (arcee.ai); as in mergekit",
    workspace=3,
    base="required",
    min_models=1,
    max_models=1,
    takes_weights=False,
)
def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """theta' = base + (theta - base) * [I >= median(I) + 1.5 (Q3(I) - Q1(I))], I = importance(theta, base).

    Raises:
        MethodError: no base, or not exactly one model besides it.
    """
    base, theta = base_and_one_model(tensors, base, "arcee_fusion")
    imp = importance(theta, base)
    flat = imp.reshape(-1)
    q1, median, q3 = (order_statistic(flat, q) for q in QUARTILES)
    keep = (imp >= median + 1.5 * (q3 - q1)).to(theta.dtype)
    return base + (theta - base) * keep

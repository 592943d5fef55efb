"""Weighted average of ingredients: the uniform soup, SWA, and WiSE-FT when one ingredient is the base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import divides_by_plain_weight_sum, normalizing_sum
from .registry import Param, register

# Above this many models the running sum is kept in float64 so that rounding does not grow with N.
FLOAT64_ACCUMULATION_ABOVE = 16


@register(
    "linear",
    summary="weighted average sum_i w_i theta_i / sum_i w_i (uniform soup; SWA; WiSE-FT with the base listed)",
    paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482); Izmailov et al. 2018 (SWA); Wortsman et al. 2022 (WiSE-FT)",
    divides_by_weight_sum=divides_by_plain_weight_sum,
    keeps_identical=lambda p: bool(p["normalize"]),
)
def linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    normalize: Annotated[bool, Param(help="divide by the sum of the weights")] = True,
) -> torch.Tensor:
    """theta = sum_i w_i theta_i / sum_i w_i (``normalize``) or sum_i w_i theta_i.

    ``base`` is not an ingredient here: list the base among the models for WiSE-FT
    (weights [1 - alpha, alpha]).

    Raises:
        MethodError: weights sum to zero while normalising.
    """
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    if normalize:
        total = normalizing_sum(w)
        w = [x / total for x in w]
    acc_dtype = torch.float64 if len(tensors) > FLOAT64_ACCUMULATION_ABOVE else torch.float32
    acc = tensors[0].to(acc_dtype) * w[0]
    for t, wi in zip(tensors[1:], w[1:]):
        acc.add_(t.to(acc_dtype), alpha=wi)
    return acc.to(torch.float32)

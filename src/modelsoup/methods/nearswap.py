"""NearSwap: take the model's value where it is close to the base, keep the base's where they differ much.

Per entry, weight = clamp(t / max(|base - theta|, 1e-6), 0, 1) and theta' = weight theta + (1 - weight) base:
entries that differ by at most ``t`` are the model's, larger differences move only ``t`` toward it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import base_and_one_model
from .registry import Param, register

# mergekit floors the difference at this before dividing.
DIFF_FLOOR = 1e-6


@register(
    "nearswap",
    summary="per entry, the model's value where it is within t of the base, else move t toward it",
    paper="alchemonaut 2024, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); as in mergekit",
    workspace=2,
    base="required",
    min_models=1,
    max_models=1,
    takes_weights=False,
    pointwise=True,
)
def nearswap(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    t: Annotated[float, Param(ge=0, help="distance, in weight units, below which the model's value is taken")] = 1e-3,
) -> torch.Tensor:
    """theta' = w theta + (1 - w) base, w = clamp(t / max(|base - theta|, 1e-6), 0, 1), per entry.

    Raises:
        MethodError: no base, or not exactly one model besides it.
    """
    base, theta = base_and_one_model(tensors, base, "nearswap")
    w = (t / (base - theta).abs().clamp_(min=DIFF_FLOOR)).clamp_(0, 1)
    return w * theta + (1 - w) * base

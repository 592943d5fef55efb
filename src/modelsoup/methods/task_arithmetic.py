"""Task arithmetic: add a weighted sum of task vectors to the base model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import SCALE, combine, model_weights, normalize_param, task_vectors
from .registry import register


@register(
    "task_arithmetic",
    summary="base + scale * sum_i w_i (theta_i - base)  (divided by sum_i w_i with normalize)",
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
    params=[SCALE, normalize_param(False)],
    base="required",
    workspace=1,
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """theta = base + scale * sum_i w_i delta_i (/ sum_i w_i if ``normalize``), delta_i = theta_i - base."""
    deltas = task_vectors(tensors, base, "task_arithmetic")
    merged = combine(deltas, model_weights(weights, len(tensors)), normalize=normalize)
    assert base is not None
    return base + scale * merged

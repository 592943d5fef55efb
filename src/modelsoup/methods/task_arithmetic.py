"""Task arithmetic: add a weighted sum of task vectors to the base model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .ops import add_to_base, combine, divides_by_plain_weight_sum, model_weights, require_base, task_vectors, weighted_deltas
from .params import Normalize, Scale
from .registry import register


def _chunk(tensors: Sequence[torch.Tensor], *, buffer: Callable[[str, torch.dtype], torch.Tensor], base: torch.Tensor | None = None,
           weights: Sequence[float] | None = None, scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """:func:`task_arithmetic` on one chunk: each delta made in one reused buffer and added before the next is made."""
    base = require_base(base, "task_arithmetic")
    delta = buffer("delta", base.dtype)
    deltas = (torch.sub(t, base, out=delta) for t in tensors)
    merged = weighted_deltas(deltas, model_weights(weights, len(tensors)), normalize=normalize, acc=buffer("sum", base.dtype).zero_())
    return add_to_base(base, merged, scale)


@register(
    "task_arithmetic",
    summary="base + scale * sum_i w_i (theta_i - base)  (divided by sum_i w_i with normalize)",
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
    base="required",
    workspace=1,
    divides_by_weight_sum=divides_by_plain_weight_sum,
    pointwise=True,
    chunk_kernel=_chunk,
    carries_nonfinite=True,
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    scale: Scale = 1.0,
    normalize: Normalize = False,
) -> torch.Tensor:
    """theta = base + scale * sum_i w_i delta_i (/ sum_i w_i if ``normalize``), delta_i = theta_i - base."""
    base = require_base(base, "task_arithmetic")
    merged = combine(task_vectors(tensors, base), model_weights(weights, len(tensors)), normalize=normalize)
    return add_to_base(base, merged, scale)

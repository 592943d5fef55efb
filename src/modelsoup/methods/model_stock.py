"""Model Stock: interpolate between the base and the average of fine-tunes by the angle between task vectors.

Edge cases follow mergekit's implementation: cosines are computed with the norm product floored at
1e-6 and clipped to [-1, 1]; where 1 + (N - 1) cos is ~0 (task vectors pointing against each other)
t would be infinite, and the base is returned (t = 0) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .reduce import row_dots, row_norms
from .registry import Param, register


def _rows(t: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if not filter_wise:
        return t.reshape(1, -1)
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


@register(
    "model_stock",
    summary="t * mean(models) + (1 - t) * base, t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of task vectors",
    paper="Jang et al. 2024, Model Stock: all we need is just a few fine-tuned models (arXiv 2403.19522)",
    base="required",
    workspace=2,
    min_models=2,
    takes_weights=False,
)
def model_stock(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    filter_wise: Annotated[bool, Param(help="one t per output row instead of per tensor")] = False,
) -> torch.Tensor:
    """theta = t * mean_i theta_i + (1 - t) * base, t = N c / (1 + (N - 1) c), c = mean_(i<j) cos(delta_i, delta_j).

    Raises:
        MethodError: no base, fewer than two models, or weights given.
    """
    if weights is not None:
        raise MethodError("model_stock takes no weights: t is computed from the angles between task vectors")
    if base is None or len(tensors) < 2:
        raise MethodError("model_stock needs a base model and at least two fine-tuned models")
    n = len(tensors)
    deltas = [_rows(t - base, filter_wise).double() for t in tensors]
    norms = [row_norms(d).squeeze(1) for d in deltas]  # (row_norms, row_dots: one value on any thread count)
    cos_sum = torch.zeros(deltas[0].shape[0], dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            dot = row_dots(deltas[i], deltas[j]).squeeze(1)
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    cos = cos_sum / (n * (n - 1) / 2)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() > 1e-8, n * cos / denom, torch.zeros_like(cos))
    mean = torch.zeros_like(tensors[0], dtype=torch.float64)
    for x in tensors:
        mean += x.double()
    mean /= n
    t_full = t.reshape(-1, *([1] * (base.dim() - 1))) if filter_wise and base.dim() >= 2 else t.reshape(())
    return (t_full * mean + (1 - t_full) * base.double()).to(torch.float32)

"""Fisher merging: each weight averaged with its models' diagonal Fisher information as weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .linear import linear
from .ops import normalizing_sum
from .registry import Param, register


@register(
    "fisher",
    summary="sum_i w_i F_i theta_i / sum_i w_i F_i, F_i the diagonal Fisher of model i on its own data (floored at epsilon)",
    paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv 2111.09832)",
    divides_by_weight_sum=lambda p: True,
    statistic="fisher",
)
def fisher(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    statistics: Sequence[torch.Tensor] | None = None,
    epsilon: Annotated[float, Param(gt=0, help="floor of every Fisher value: where all models' Fishers are below it the result is the weighted mean")] = 1e-6,
) -> torch.Tensor:
    """theta = sum_i w_i F_i theta_i / sum_i w_i F_i elementwise, with F_i = max(F_i, epsilon).

    ``statistics`` holds one Fisher per ingredient (the mean over its data of the squared gradient of the log-likelihood,
    :func:`modelsoup.recipes.statistics.fisher_statistics`); a tensor without one (a buffer, a frozen tensor) is the weighted
    mean, which is also what identical Fishers give. Sums are taken in float64.

    Raises:
        MethodError: weights that sum to zero, a negative weight, or a Fisher of another shape or with negative values.
    """
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    normalizing_sum(w, None)
    if statistics is None:
        return linear(tensors, weights=w)
    if any(x < 0 for x in w):
        raise MethodError(f"fisher merging weighs each model's Fisher by its weight, which must not be negative; got {w}")
    if len(statistics) != len(tensors) or any(f.shape != t.shape for f, t in zip(statistics, tensors)):
        raise MethodError(f"fisher merging needs one Fisher of each tensor's shape per model; got {[list(f.shape) for f in statistics]} "
                          f"for tensors of shape {list(tensors[0].shape)}")
    num = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    den = torch.zeros_like(num)
    for t, f, wi in zip(tensors, statistics, w):
        if bool((f < 0).any()):
            raise MethodError("a Fisher holds negative values; it is a mean of squares, so the statistics file is not a Fisher")
        fw = f.to(torch.float64).clamp_min(epsilon).mul_(wi)
        num.addcmul_(fw, t.to(torch.float64))
        den.add_(fw)
    return num.div_(den).to(torch.float32)

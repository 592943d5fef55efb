"""Passthrough: one model's tensor, optionally scaled; with ``slices:`` it stacks layers from several models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .ops import per_model
from .registry import Param, PerModel, register


@register(
    "passthrough",
    summary="one model's tensor unchanged (times scale); stacks layers of several models in a slices recipe",
    paper="mergekit's passthrough (Goddard et al. 2024, arXiv 2403.13257): frankenmerges such as Goliath-120B",
    max_models=1,
    takes_weights=False,
    pointwise=True,
)
def passthrough(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    scale: Annotated[PerModel[float], Param(help="multiplies the tensor (e.g. 0 to silence a layer's output projection)")] = 1.0,
) -> torch.Tensor:
    """theta = scale * theta_1.

    Raises:
        MethodError: more than one model.
    """
    if len(tensors) != 1:
        raise MethodError(f"passthrough takes one model per tensor, got {len(tensors)}; to stack layers of several models use `slices:`")
    (factor,) = per_model(scale, 1, "scale")
    return tensors[0] * factor if factor != 1.0 else tensors[0].clone()

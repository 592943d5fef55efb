"""Model breadcrumbs with TIES sign election (mergekit's ``breadcrumbs_ties``): :mod:`.breadcrumbs` with signs elected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .breadcrumbs import breadcrumbs, prepare_breadcrumbs
from .params import Density, DivideBy, Gamma, Normalize, RescaleL1, Scale, SignFrom, SignMethod, TieBreak
from .registry import register


@register(
    "breadcrumbs_ties",
    summary="breadcrumbs (drop outliers and small magnitudes), then TIES sign election and disjoint mean, add to base",
    paper="Davari & Belilovsky 2024, Model breadcrumbs (arXiv 2312.06795); Yadav et al. 2023 (TIES)",
    base="required",
    workspace=2,
    prepare=lambda tensors, **kw: prepare_breadcrumbs(tensors, **kw),
    takes_half=True,
)
def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    density: Density = 0.9,
    gamma: Gamma = 0.01,
    scale: Scale = 1.0,
    rescale: RescaleL1 = "none",
    tie_break: TieBreak = "index",
    sign_method: SignMethod = "sum",
    sign_from: SignFrom = "weighted",
    normalize: Normalize = False,
    divide_by: DivideBy = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(trim_outliers(delta_i, density_i, gamma_i)))."""
    return breadcrumbs(
        tensors, base=base, weights=weights, density=density, gamma=gamma, scale=scale, rescale=rescale, tie_break=tie_break,
        sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by,
    )

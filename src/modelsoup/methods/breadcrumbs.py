"""Model breadcrumbs: drop both the smallest and the largest (outlier) task-vector entries, then combine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import DIVIDE_BY_PARAM, SCALE, SIGN_FROM_PARAM, combine, density_param, model_weights, normalize_param, per_model, sign_param, task_vectors, trim_outliers
from .registry import Param, register


@register(
    "breadcrumbs",
    summary="drop the largest gamma and smallest magnitudes of each task vector (keep density), combine, add to base",
    paper="Davari & Belilovsky 2024, Model breadcrumbs (arXiv 2312.06795)",
    params=[
        density_param(0.9, "fraction of each task vector kept"),
        Param("gamma", 0.01, "fraction of largest magnitudes removed as outliers", low=0.0, high=1.0, high_open=True, per_model=True),
        SCALE,
        sign_param("none", ("none", "sum", "count")),
        SIGN_FROM_PARAM,
        normalize_param(False),
        DIVIDE_BY_PARAM,
    ],
    base="required",
    workspace=2,
)
def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 0.9,
    gamma: float | Sequence[float] = 0.01,
    scale: float = 1.0,
    sign_method: str = "none",
    sign_from: str = "weighted",
    normalize: bool = False,
    divide_by: str = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * combine(trim_outliers(delta_i, density_i, gamma_i)); sign_method sum = mergekit's breadcrumbs_ties."""
    deltas = task_vectors(tensors, base, "breadcrumbs")
    dens, gam = per_model(density, len(deltas), "density"), per_model(gamma, len(deltas), "gamma")
    trimmed = [trim_outliers(d, p, g) for d, p, g in zip(deltas, dens, gam)]
    merged = combine(trimmed, model_weights(weights, len(deltas)), sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by)
    assert base is not None
    return base + scale * merged

"""TIES-merging: trim each task vector, elect a sign per entry, average the agreeing entries.

Conventions (parameters, defaults pinned by tests):
  * trimming is per tensor, keeping exactly floor(density * numel) entries of largest magnitude;
  * ``sign_from: weighted`` and ``divide_by: weight_sum`` are mergekit's ``ties`` (signs elected on
    w_i delta_i, divided by the summed weights of the agreeing models);
  * ``sign_from: unweighted`` and ``divide_by: count`` are peft's ``ties`` (peft returns the merged
    delta only, i.e. base = 0 here); with unit weights the two coincide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import DIVIDE_BY_PARAM, SCALE, SIGN_FROM_PARAM, combine, density_param, model_weights, normalize_param, per_model, sign_param, task_vectors, trim_top_k
from .registry import register


@register(
    "ties",
    summary="trim task vectors to their top-density magnitudes, elect signs, disjoint mean, add to base",
    paper="Yadav et al. 2023, TIES-Merging: resolving interference when merging models (arXiv 2306.01708)",
    params=[density_param(0.2, "fraction of each task vector kept (largest magnitudes, per tensor)"), SCALE, sign_param("sum"), SIGN_FROM_PARAM, normalize_param(True), DIVIDE_BY_PARAM],
    base="required",
    workspace=1,
)
def ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 0.2,
    scale: float = 1.0,
    sign_method: str = "sum",
    sign_from: str = "weighted",
    normalize: bool = True,
    divide_by: str = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(trim(delta_i, density_i))), see :func:`ops.combine`."""
    deltas = task_vectors(tensors, base, "ties")
    dens = per_model(density, len(deltas), "density")
    trimmed = [trim_top_k(d, p) for d, p in zip(deltas, dens)]
    merged = combine(trimmed, model_weights(weights, len(deltas)), sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by)
    assert base is not None
    return base + scale * merged

"""DARE with TIES sign election: randomly drop and rescale task-vector entries, then elect signs.

peft's ``dare_ties`` is ``sign_from: unweighted, divide_by: count`` with base = 0; mergekit's is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import DIVIDE_BY_PARAM, RESCALE_PARAM, SCALE, SIGN_FROM_PARAM, combine, density_param, drop_random, model_weights, normalize_param, per_model, sign_param, task_vectors
from .registry import register


@register(
    "dare_ties",
    summary="DARE drop-and-rescale of task vectors, then TIES sign election and disjoint mean, add to base",
    paper="Yu et al. 2024, Language models are Super Mario (DARE) (arXiv 2311.03099); Yadav et al. 2023 (TIES)",
    params=[density_param(0.5, "probability of KEEPING each entry"), SCALE, RESCALE_PARAM, sign_param("sum"), SIGN_FROM_PARAM, normalize_param(True), DIVIDE_BY_PARAM],
    base="required",
    workspace=1,
)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: float | Sequence[float] = 0.5,
    scale: float = 1.0,
    rescale: str = "density",
    sign_method: str = "sum",
    sign_from: str = "weighted",
    normalize: bool = True,
    divide_by: str = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(rescale(m_i * delta_i))), m_i ~ Bernoulli(density_i)."""
    deltas = task_vectors(tensors, base, "dare_ties")
    dens = per_model(density, len(deltas), "density")
    dropped = [drop_random(d, p, generator, rescale) for d, p in zip(deltas, dens)]
    merged = combine(dropped, model_weights(weights, len(deltas)), sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by)
    assert base is not None
    return base + scale * merged

"""DARE with a linear combination: randomly drop task-vector entries, rescale, weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import RESCALE_PARAM, SCALE, combine, density_param, drop_random, model_weights, normalize_param, per_model, task_vectors
from .registry import register


@register(
    "dare_linear",
    summary="drop each task-vector entry with probability 1 - density, rescale, weighted sum, add to base",
    paper="Yu et al. 2024, Language models are Super Mario (DARE) (arXiv 2311.03099)",
    params=[density_param(0.5, "probability of KEEPING each entry (peft and mergekit convention)"), SCALE, RESCALE_PARAM, normalize_param(False)],
    base="required",
    workspace=1,
)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: float | Sequence[float] = 0.5,
    scale: float = 1.0,
    rescale: str = "density",
    normalize: bool = False,
) -> torch.Tensor:
    """theta = base + scale * sum_i w_i rescale(m_i * delta_i), m_i ~ Bernoulli(density_i), drawn from ``generator``."""
    deltas = task_vectors(tensors, base, "dare_linear")
    dens = per_model(density, len(deltas), "density")
    dropped = [drop_random(d, p, generator, rescale) for d, p in zip(deltas, dens)]
    merged = combine(dropped, model_weights(weights, len(deltas)), normalize=normalize)
    assert base is not None
    return base + scale * merged

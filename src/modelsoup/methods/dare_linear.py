"""DARE with a linear combination: randomly drop task-vector entries, rescale, weighted sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import MergedChunks, dare_deltas, dare_held, divides_by_plain_weight_sum, model_weights, require_base
from .params import Density, Normalize, Rescale, Scale
from .registry import Param, register


@register(
    "dare_linear",
    summary="drop each task-vector entry with probability 1 - density, rescale, weighted sum, add to base",
    paper="Yu et al. 2024, Language models are Super Mario (DARE) (arXiv 2311.03099)",
    base="required",
    workspace=1,
    prepared_workspace=lambda params, shape: dare_held(params["rescale"]),
    divides_by_weight_sum=divides_by_plain_weight_sum,
    prepare=lambda tensors, **kw: _prepare(tensors, **kw),
    takes_half=True,
)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: Annotated[Density, Param(help="probability of KEEPING each entry (peft and mergekit convention)")] = 0.5,
    scale: Scale = 1.0,
    rescale: Rescale = "density",
    normalize: Normalize = False,
) -> torch.Tensor:
    """theta = base + scale * sum_i w_i rescale(m_i * delta_i), m_i ~ Bernoulli(density_i), drawn from ``generator``."""
    return _prepare(tensors, base=base, weights=weights, generator=generator, density=density, scale=scale, rescale=rescale,
                    normalize=normalize).whole()


def _prepare(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None, generator: torch.Generator | None,
             density: float | Sequence[float], scale: float, rescale: str, normalize: bool) -> MergedChunks:
    """The dropped task vectors (masks drawn model after model, kept as booleans; each chunk's deltas made when merged, see
    :class:`~modelsoup.methods.ops.DroppedDeltas`) and their weighted sum, a chunk at a time."""
    base = require_base(base, "dare_linear")
    dropped = dare_deltas(tensors, base, density, generator, rescale)
    return MergedChunks(dropped, model_weights(weights, len(tensors)), base, scale, normalize=normalize)

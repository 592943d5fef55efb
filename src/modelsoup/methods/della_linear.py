"""DELLA without sign election: MagPrune each task vector, rescale, weighted sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import MagPrunedDeltas, MergedChunks, della_held, divides_by_plain_weight_sum, model_weights, require_base
from .params import DellaDensity, DellaEpsilon, Normalize, Rescale, Scale
from .registry import Param, register


@register(
    "della_linear",
    summary="MagPrune: keep entries with probability density +- epsilon by magnitude rank, rescale, weighted sum, add to base",
    paper="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617), linear variant as in mergekit",
    base="required",
    workspace=1,
    prepared_workspace=lambda params, shape: della_held(params["rescale"], shape),
    divides_by_weight_sum=divides_by_plain_weight_sum,
    prepare=lambda tensors, **kw: _prepare(tensors, **kw),
    takes_half=True,  # each block of rows is widened to float32 before it is subtracted (magprune_deltas)
)
def della_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: DellaDensity = 0.7,
    epsilon: DellaEpsilon = 0.15,
    scale: Scale = 1.0,
    rescale: Annotated[Rescale, Param(help="survivors divided by their keep probability (paper), scaled to the delta's L1 norm (mergekit), or none")] = "density",
    normalize: Normalize = False,
) -> torch.Tensor:
    """theta = base + scale * sum_i w_i rescale(m_i * delta_i), m_i ~ Bernoulli(p_i), p_i from delta_i's magnitude ranks."""
    return _prepare(tensors, base=base, weights=weights, generator=generator, density=density, epsilon=epsilon, scale=scale, rescale=rescale,
                    normalize=normalize).whole()


def _prepare(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None, generator: torch.Generator | None,
             density: float | Sequence[float], epsilon: float | Sequence[float], scale: float, rescale: str, normalize: bool) -> MergedChunks:
    """The MagPruned task vectors (their masks drawn whole, kept as rank codes: :class:`~.ops.MagPrunedDeltas`) and their
    weighted sum, a chunk at a time."""
    base = require_base(base, "della_linear")
    dropped = MagPrunedDeltas(tensors, base, density, epsilon, generator, rescale, "della_linear")
    return MergedChunks(dropped, model_weights(weights, len(tensors)), base, scale, normalize=normalize)

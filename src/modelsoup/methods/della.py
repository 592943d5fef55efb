"""DELLA: drop task-vector entries with probabilities ranked by magnitude (MagPrune), rescale, elect signs, average."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import MagPrunedDeltas, MergedChunks, della_held, model_weights, require_base
from .params import DellaDensity, DellaEpsilon, DivideBy, Normalize, Rescale, Scale, SignFrom, SignMethod
from .registry import Param, register


@register(
    "della",
    summary="MagPrune: keep entries with probability density +- epsilon by magnitude rank, rescale, TIES sign election, add to base",
    paper="Deep et al. 2024, DELLA-Merging: reducing interference with magnitude-based sampling (arXiv 2406.11617)",
    base="required",
    workspace=2,
    prepared_workspace=lambda params, shape: della_held(params["rescale"], shape),
    prepare=lambda tensors, **kw: _prepare(tensors, **kw),
    takes_half=True,  # each block of rows is widened to float32 before it is subtracted (magprune_deltas)
)
def della(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: DellaDensity = 0.7,
    epsilon: DellaEpsilon = 0.15,
    scale: Scale = 1.0,
    rescale: Annotated[Rescale, Param(help="survivors divided by their keep probability (paper), scaled to the delta's L1 norm (mergekit), or none")] = "density",
    sign_method: SignMethod = "sum",
    sign_from: SignFrom = "weighted",
    normalize: Normalize = True,
    divide_by: DivideBy = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(rescale(m_i * delta_i))), m_i ~ Bernoulli(p_i), p_i from delta_i's magnitude ranks."""
    return _prepare(tensors, base=base, weights=weights, generator=generator, density=density, epsilon=epsilon, scale=scale, rescale=rescale,
                    sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by).whole()


def _prepare(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None, generator: torch.Generator | None,
             density: float | Sequence[float], epsilon: float | Sequence[float], scale: float, rescale: str, sign_method: str, sign_from: str,
             normalize: bool, divide_by: str) -> MergedChunks:
    """The MagPruned task vectors (their masks drawn whole, kept as rank codes: :class:`~.ops.MagPrunedDeltas`) and the merge
    they define, a chunk at a time."""
    base = require_base(base, "della")
    dropped = MagPrunedDeltas(tensors, base, density, epsilon, generator, rescale, "della")
    return MergedChunks(dropped, model_weights(weights, len(tensors)), base, scale, sign_method=sign_method, sign_from=sign_from,
                        normalize=normalize, divide_by=divide_by)

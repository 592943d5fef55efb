"""DARE with TIES sign election: randomly drop and rescale task-vector entries, then elect signs.

peft's ``dare_ties`` is ``sign_from: unweighted, divide_by: count`` with base = 0; mergekit's is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import MergedChunks, dare_deltas, dare_held, model_weights, require_base
from .params import Density, DivideBy, Normalize, Rescale, Scale, SignFrom, SignMethod
from .registry import Param, register


@register(
    "dare_ties",
    summary="DARE drop-and-rescale of task vectors, then TIES sign election and disjoint mean, add to base",
    paper="Yu et al. 2024, Language models are Super Mario (DARE) (arXiv 2311.03099); Yadav et al. 2023 (TIES)",
    base="required",
    workspace=1,
    prepared_workspace=lambda params, shape: dare_held(params["rescale"]),
    prepare=lambda tensors, **kw: _prepare(tensors, **kw),
    takes_half=True,
)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    density: Annotated[Density, Param(help="probability of KEEPING each entry")] = 0.5,
    scale: Scale = 1.0,
    rescale: Rescale = "density",
    sign_method: SignMethod = "sum",
    sign_from: SignFrom = "weighted",
    normalize: Normalize = True,
    divide_by: DivideBy = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(rescale(m_i * delta_i))), m_i ~ Bernoulli(density_i)."""
    return _prepare(tensors, base=base, weights=weights, generator=generator, density=density, scale=scale, rescale=rescale,
                    sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by).whole()


def _prepare(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None, generator: torch.Generator | None,
             density: float | Sequence[float], scale: float, rescale: str, sign_method: str, sign_from: str, normalize: bool,
             divide_by: str) -> MergedChunks:
    """The dropped task vectors (masks drawn model after model, kept as booleans; each chunk's deltas made when merged, see
    :class:`~modelsoup.methods.ops.DroppedDeltas`) and the merge they define, a chunk at a time."""
    base = require_base(base, "dare_ties")
    dropped = dare_deltas(tensors, base, density, generator, rescale)
    return MergedChunks(dropped, model_weights(weights, len(tensors)), base, scale, sign_method=sign_method, sign_from=sign_from,
                        normalize=normalize, divide_by=divide_by)

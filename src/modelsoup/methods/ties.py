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
from typing import Annotated

import torch

from .ops import MaskedDeltas, MergedChunks, TrimmedDeltas, add_to_base, combine, model_weights, per_model, require_base, rescale_l1, task_vectors, ties_held, top_k_deltas, top_k_torch_order_mask, trim_top_k, trim_top_k_torch_order
from .params import Density, DivideBy, Normalize, RescaleL1, Scale, SignFrom, SignMethod, TieBreak
from .registry import Param, register


@register(
    "ties",
    summary="trim task vectors to their top-density magnitudes, elect signs, disjoint mean, add to base",
    paper="Yadav et al. 2023, TIES-Merging: resolving interference when merging models (arXiv 2306.01708)",
    base="required",
    prepare=lambda tensors, **kw: _prepare(tensors, **kw),
    prepared_workspace=lambda params, shape: ties_held(params["rescale"], params["tie_break"]),
    takes_half=True,
)
def ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    density: Annotated[Density, Param(help="fraction of each task vector kept (largest magnitudes, per tensor)")] = 0.2,
    scale: Scale = 1.0,
    rescale: RescaleL1 = "none",
    keep_at_least_one: Annotated[bool, Param(help="a positive density keeps at least one entry of every tensor (mergekit)")] = False,
    tie_break: TieBreak = "index",
    sign_method: SignMethod = "sum",
    sign_from: SignFrom = "weighted",
    normalize: Normalize = True,
    divide_by: DivideBy = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * disjoint_mean(elect(trim(delta_i, density_i))), see :func:`ops.combine`.

    Thresholds are found per tensor first; trimming and the merge then run chunk by chunk (the result
    does not depend on the chunking: every stage after the threshold is elementwise), so no task vector
    is held whole.
    """
    election = {"sign_method": sign_method, "sign_from": sign_from, "normalize": normalize, "divide_by": divide_by}
    prepared = _prepare(tensors, base=base, weights=weights, density=density, scale=scale, rescale=rescale,
                        keep_at_least_one=keep_at_least_one, tie_break=tie_break, **election)
    if prepared is not None:
        return prepared.whole()
    # L1 norms of the trimmed vectors, or torch's order of ties at a cut, need each task vector whole
    base = require_base(base, "ties")
    trim = trim_top_k if tie_break == "index" else trim_top_k_torch_order
    deltas = [rescale_l1(trim(d, p, at_least_one=keep_at_least_one), d, rescale)
              for d, p in zip(task_vectors(tensors, base), per_model(density, len(tensors), "density"))]
    return add_to_base(base, combine(deltas, model_weights(weights, len(tensors)), **election), scale)


def _prepare(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None, density: float | Sequence[float],
             scale: float, rescale: str, keep_at_least_one: bool, tie_break: str, sign_method: str, sign_from: str, normalize: bool,
             divide_by: str) -> MergedChunks | None:
    """The thresholds of every task vector, and the merge they define, to be computed a chunk at a time (what the engine
    streams); None where the merge needs each trimmed task vector whole (an L1 rescale, torch's order of ties at a cut)."""
    base = require_base(base, "ties")
    if rescale != "none":
        return None
    densities = per_model(density, len(tensors), "density")
    deltas: TrimmedDeltas | MaskedDeltas = top_k_deltas(tensors, base, densities, at_least_one=keep_at_least_one)
    if tie_break != "index" and deltas.tied_at_cut:  # with no ties at a cut, every tie-break keeps the same entries
        # torch's order of the ties: each model's mask found from its whole |delta|, one model at a time, then kept
        deltas = MaskedDeltas(tensors, base, [top_k_torch_order_mask(t, p, at_least_one=keep_at_least_one, base=base)
                                              for t, p in zip(tensors, densities)])
    return MergedChunks(deltas, model_weights(weights, len(tensors)), base, scale, sign_method=sign_method, sign_from=sign_from,
                        normalize=normalize, divide_by=divide_by)
    return MergedChunks(chunked, model_weights(weights, len(tensors)), base, scale, sign_method=sign_method, sign_from=sign_from,
                        normalize=normalize, divide_by=divide_by)

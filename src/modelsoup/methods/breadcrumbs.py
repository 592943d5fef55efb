"""Model breadcrumbs: drop both the smallest and the largest (outlier) task-vector entries, then combine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import (MaskedDeltas, MergedChunks, TrimmedDeltas, divides_by_plain_weight_sum, model_weights, outlier_deltas, outlier_window, per_model,
                  require_base, rescale_l1, sorted_window_mask, task_vector, trim_outliers)
from .params import Density, DivideBy, Gamma, Normalize, RescaleL1, Scale, SignFrom, SignMethodOrNone, TieBreak
from .registry import register


@register(
    "breadcrumbs",
    summary="drop the largest gamma and smallest magnitudes of each task vector (keep density), combine, add to base",
    paper="Davari & Belilovsky 2024, Model breadcrumbs (arXiv 2312.06795)",
    base="required",
    workspace=2,
    divides_by_weight_sum=divides_by_plain_weight_sum,
    prepare=lambda tensors, **kw: prepare_breadcrumbs(tensors, **kw),
    takes_half=True,
)
def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    density: Density = 0.9,
    gamma: Gamma = 0.01,
    scale: Scale = 1.0,
    rescale: RescaleL1 = "none",
    tie_break: TieBreak = "index",
    sign_method: SignMethodOrNone = "none",
    sign_from: SignFrom = "weighted",
    normalize: Normalize = False,
    divide_by: DivideBy = "weight_sum",
) -> torch.Tensor:
    """theta = base + scale * combine(rescale(trim_outliers(delta_i, density_i, gamma_i))); sign_method sum = :mod:`.breadcrumbs_ties`."""
    return prepare_breadcrumbs(tensors, base=base, weights=weights, density=density, gamma=gamma, scale=scale, rescale=rescale,
                               tie_break=tie_break, sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by).whole()


def prepare_breadcrumbs(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None,
                        density: float | Sequence[float], gamma: float | Sequence[float], scale: float, rescale: str, tie_break: str,
                        sign_method: str, sign_from: str, normalize: bool, divide_by: str) -> MergedChunks:
    """The trimmed task vectors and the merge they define, a chunk at a time.

    The cuts of every task vector are found first, in one sweep (:func:`outlier_deltas`); the trimmed chunks are then
    made when merged, so no task vector is held whole. Where ``tie_break: torch_sort`` meets ties at a cut, torch's
    order of them needs each task vector sorted whole: its boolean mask is kept (:class:`MaskedDeltas`, one byte an
    entry). ``rescale: l1`` needs each trimmed vector whole, so those are kept.
    """
    base = require_base(base, "breadcrumbs")
    dens, gam = per_model(density, len(tensors), "density"), per_model(gamma, len(tensors), "gamma")
    trimmed: list[torch.Tensor] | TrimmedDeltas | MaskedDeltas
    if rescale == "none":
        trimmed = outlier_deltas(tensors, base, dens, gam)
        if tie_break != "index" and trimmed.tied_at_cut:  # with no ties at a cut, every tie-break keeps the same entries
            windows = [outlier_window(base.numel(), p, g) for p, g in zip(dens, gam)]
            trimmed = MaskedDeltas(tensors, base, [None if w is None else sorted_window_mask(t, *w, base=base)
                                                   for t, w in zip(tensors, windows)])
    else:
        trimmed = []
        for t, p, g in zip(tensors, dens, gam):
            d = task_vector(t, base)
            trimmed.append(rescale_l1(trim_outliers(d, p, g, tie_break), d, rescale))
            del d  # one untrimmed task vector at a time
    return MergedChunks(trimmed, model_weights(weights, len(tensors)), base, scale, sign_method=sign_method, sign_from=sign_from,
                        normalize=normalize, divide_by=divide_by)

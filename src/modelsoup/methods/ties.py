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

from ..errors import MethodError
from .ops import CHUNK, DIVIDE_BY_PARAM, SCALE, SIGN_FROM_PARAM, ElectedMean, MagnitudeSource, TopKTrim, density_param, model_weights, normalize_param, per_model, sign_param
from .registry import register


@register(
    "ties",
    summary="trim task vectors to their top-density magnitudes, elect signs, disjoint mean, add to base",
    paper="Yadav et al. 2023, TIES-Merging: resolving interference when merging models (arXiv 2306.01708)",
    params=[density_param(0.2, "fraction of each task vector kept (largest magnitudes, per tensor)"), SCALE, sign_param("sum"), SIGN_FROM_PARAM, normalize_param(True), DIVIDE_BY_PARAM],
    base="required",
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
    """theta = base + scale * disjoint_mean(elect(trim(delta_i, density_i))), see :func:`ops.combine`.

    Thresholds are found per tensor first; trimming and the merge then run chunk by chunk (the result
    does not depend on the chunking: every stage after the threshold is elementwise).
    """
    if base is None:
        raise MethodError("method 'ties' needs a base model (set `base:` / --base)")
    dens = per_model(density, len(tensors), "density")
    w = model_weights(weights, len(tensors))
    srcs = [MagnitudeSource(t, base) for t in tensors]
    trims = TopKTrim.for_sources(srcs, dens)
    flat_base = base.reshape(-1)
    n = flat_base.numel()
    out = torch.empty(n, dtype=torch.float32)
    size = min(n, CHUNK)
    deltas = torch.empty(len(tensors), size, dtype=torch.float32)
    elect = ElectedMean(w, size=size, sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by)
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        for trim, src, row in zip(trims, srcs, deltas):
            trim.apply_(src.delta(i, j, row[: j - i]), i)
        merged = elect(deltas[:, : j - i], out[i:j])
        if scale != 1.0:  # base + scale * merged, rounded as written
            merged.mul_(scale)
        merged.add_(flat_base[i:j])
    return out.view_as(base)

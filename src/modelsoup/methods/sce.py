"""SCE: select the entries where the models disagree most, weight each model by its task vector's energy, erase sign conflicts.

Steps (as mergekit's ``sce``, Wan et al. 2024): (1) Select: keep the k = floor(select_topk * nnz) entries
with the largest variance across the task vectors (nnz = entries with nonzero variance; ties at the cut
broken as ``torch.topk`` breaks them), zero the rest in every task vector; (2) Calculate: weight model i
by mean(delta_i^2), normalised to sum 1 (uniform if the sum is below 1e-6); (3) Erase: elect a sign per
entry from the sum of the deltas and keep only the deltas that have it; average the kept ones with those
weights (the weights' sum floored at 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import require_base, task_vectors
from .reduce import dot64
from .registry import Param, register

# mergekit's floors: a total energy below this gives uniform weights; the divisor is at least this.
WEIGHT_SUM_FLOOR = 1e-6


def select_by_variance(deltas: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """0/1 mask (float) of the floor(fraction * nnz) entries of largest variance across ``deltas``."""
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)  # a float32 product, as mergekit computes it (float64 can round the other way)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.reshape(-1), k=k, largest=True).indices] = 1
    return mask


def energy_weights(deltas: Sequence[torch.Tensor]) -> list[float]:
    """mean(delta_i^2) / sum_j mean(delta_j^2), or 1/n each where the sum is below ``WEIGHT_SUM_FLOOR``.

    The means are float64 sums (:func:`~.reduce.dot64`: the same on any thread count; a float32 mean of a whole tensor is
    split across threads), divided by the entry count."""
    e = [dot64(d, d) / max(d.numel(), 1) for d in deltas]
    total = sum(e)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [1.0 / len(e)] * len(e)
    return [x / total for x in e]


@register(
    "sce",
    summary="keep the top-variance entries, weight models by task-vector energy, erase sign conflicts, add to base",
    paper="Wan et al. 2024, FuseChat: knowledge fusion of chat models (SCE merging) (arXiv 2408.07990)",
    base="required",
    workspace=2,
    takes_weights=False,
)
def sce(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    select_topk: Annotated[float, Param(ge=0, le=1, help="fraction of the nonzero-variance entries kept (largest variance across models)")] = 1.0,
) -> torch.Tensor:
    """theta = base + sum_i a_i m_i delta'_i / max(sum_i a_i m_i, 1e-6), delta'_i = delta_i * S, m_i = [sign delta'_i = elected sign].

    S is the variance selection, a_i = mean(delta'_i^2) / sum_j mean(delta'_j^2), the elected sign is that of sum_i delta'_i
    (+ where it is 0). A zero delta has no sign and is never kept.
    """
    base = require_base(base, "sce")
    deltas = task_vectors(tensors, base)
    if select_topk < 1:
        mask = select_by_variance(deltas, select_topk)
        deltas = [d * mask for d in deltas]
    vote = torch.zeros_like(base)
    for d in deltas:
        vote += d
    elected = torch.where(vote >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(base), torch.zeros_like(base)
    for d, a in zip(deltas, energy_weights(deltas)):
        agree = (torch.sign(d) == elected).to(d.dtype) * a
        num += d * agree
        den += agree
    return num.div_(den.clamp_(min=WEIGHT_SUM_FLOOR)).add_(base)

"""RAM and RAM+ (tensor-local): keep changes only one model makes, average those several models make.

An entry of task vector i counts as changed where |delta_i| > epsilon. Where exactly one model changed
it, that model's delta is kept whole; where several did, their deltas are averaged (unchanged models do
not dilute it). RAM+ multiplies each model's unique deltas by lambda_i = 1 + r clamp(rho_i, 0, alpha),
rho_i = (its shared changed entries) / (its unique changed entries), all counted within the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from .ops import require_base, task_vectors
from .registry import Param, register

Epsilon = Annotated[float, Param(ge=0, help="a task-vector entry counts as changed where its magnitude exceeds this")]


def _ram(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, r: float, alpha: float) -> torch.Tensor:
    deltas = task_vectors(tensors, base)
    changed = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(base)
    for c in changed:
        count += c
    unique, shared = count == 1, count > 1
    share = 1.0 / count.clamp(min=1)
    out = torch.zeros_like(base)
    for d, c in zip(deltas, changed):
        dz = d * c
        lam, n_unique = 1.0, float((c & unique).sum())
        if r != 0 and n_unique > 0:  # without unique changes lambda multiplies nothing (with epsilon 0 mergekit's 0/0 gives NaN there)
            rho = float((c & shared).sum()) / max(n_unique, epsilon)
            lam = 1.0 + r * min(max(rho, 0.0), alpha)
        out += dz * unique * lam + dz * shared * share
    return out.add_(base)


@register(
    "ram",
    summary="changes made by one model kept whole, changes made by several averaged over those models",
    paper="Reinforced Agent Merging (arXiv 2601.13572); as in mergekit",
    base="required",
    workspace=2,
    takes_weights=False,
)
def ram(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    epsilon: Epsilon = 1e-5,
) -> torch.Tensor:
    """theta = base + sum_i delta_i [c_i] ([n = 1] + [n > 1] / n), c_i = |delta_i| > epsilon, n = sum_i c_i, per entry."""
    return _ram(tensors, require_base(base, "ram"), epsilon, 0.0, 0.0)


@register(
    "ramplus_tl",
    summary="RAM with each model's unique changes boosted by 1 + r clamp(shared/unique, 0, alpha), counted per tensor",
    paper="Reinforced Agent Merging Plus (arXiv 2601.13572), tensor-local variant; as in mergekit",
    base="required",
    workspace=2,
    takes_weights=False,
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    r: Annotated[float, Param(ge=0, help="strength of the boost of unique changes")] = 0.1,
    alpha: Annotated[float, Param(ge=0, help="cap on the shared/unique ratio")] = 0.2,
    epsilon: Epsilon = 1e-5,
) -> torch.Tensor:
    """As :func:`ram`, with model i's unique deltas times 1 + r clamp(rho_i, 0, alpha), rho_i = shared_i / max(unique_i, epsilon)."""
    return _ram(tensors, require_base(base, "ramplus_tl"), epsilon, r, alpha)

"""Exponential moving average over an ordered sequence of checkpoints of one run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .linear import weighted_sum
from .registry import Param, register


def _coefficients(n: int, weights: Sequence[float] | None, decay: float) -> list[float]:
    """decay^(n-1) for the oldest checkpoint, (1 - decay) decay^(n-1-k) for checkpoint k >= 1.

    Raises:
        MethodError: weights were given (the order and ``decay`` define them).
    """
    if weights is not None:
        raise MethodError("ema takes no weights: list the checkpoints oldest first and set `decay`")
    return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - k) for k in range(1, n)]


def _chunk(tensors: Sequence[torch.Tensor], *, buffer: Callable[[str, torch.dtype], torch.Tensor], base: torch.Tensor | None = None,
           weights: Sequence[float] | None = None, decay: float = 0.9) -> torch.Tensor:
    return weighted_sum(tensors, _coefficients(len(tensors), weights, decay), None, buffer=buffer)


@register(
    "ema",
    summary="exponential moving average of checkpoints of one run, oldest first: e_k = decay e_(k-1) + (1 - decay) theta_k",
    paper="Polyak & Juditsky 1992; as checkpoint averaging, Izmailov et al. 2018 (SWA, for the plain mean use linear)",
    takes_weights=False,
    pointwise=True,
    takes_half=True,
    chunk_kernel=_chunk,
    carries_nonfinite=True,
)
def ema(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    decay: Annotated[float, Param(ge=0, lt=1, help="weight of the running average at each step")] = 0.9,
) -> torch.Tensor:
    """e_0 = theta_0, e_k = decay * e_(k-1) + (1 - decay) * theta_k, for checkpoints listed oldest first.

    Computed in closed form, e_(n-1) = decay^(n-1) theta_0 + sum_(k>=1) (1 - decay) decay^(n-1-k) theta_k,
    accumulated in float64.

    Raises:
        MethodError: weights were given (the order and ``decay`` define them).
    """
    return weighted_sum(tensors, _coefficients(len(tensors), weights, decay), None)

"""Weighted average of ingredients: the uniform soup, SWA, and WiSE-FT when one ingredient is the base."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch

from .ops import divides_by_plain_weight_sum, normalizing_sum
from .registry import Param, register


def accumulate(acc: torch.Tensor | None, t: torch.Tensor, w: float) -> torch.Tensor:
    """One step of the linear running sum: ``acc + w * t`` in float64, in place (``acc`` None starts it at zero).

    The linear method and the greedy soup's running sum (:mod:`modelsoup.recipes.running`) both build their
    sums with this, member by member in the same order, so a soup scored from a running sum has the bits
    :func:`linear` writes for it.
    """
    if acc is None:
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
    return acc.add_(t, alpha=w)


def finish(acc: torch.Tensor, total: float | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 result of a running sum: divided by ``total`` (the weight sum) when normalising, else as is;
    rounded into ``out`` (float32, ``acc``'s size) when given: divided in float64 and rounded once as it is written,
    the bits of dividing in place and then rounding, one pass fewer."""
    if out is not None:
        return torch.div(acc, total, out=out) if total is not None else out.copy_(acc)
    acc = acc.div_(total) if total is not None else acc
    return acc.to(torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], total: float | None,
                 buffer: Callable[[str, torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """sum_i c_i t_i in float64 (divided by ``total`` if given), rounded to float32: the sums of linear and EMA.

    With ``buffer`` (a streamed chunk, see :attr:`~modelsoup.methods.registry.MergeMethod.chunk_kernel`) the sum and
    the result go into reused buffers instead of fresh ones; the bits are the same.
    """
    acc = buffer("sum", torch.float64).zero_() if buffer is not None else None
    for t, c in zip(tensors, coefficients):
        acc = accumulate(acc, t, c)
    assert acc is not None
    return finish(acc, total, buffer("result", torch.float32) if buffer is not None else None)


def _weights(n: int, weights: Sequence[float] | None, normalize: bool) -> tuple[list[float], float | None]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return w, (normalizing_sum(w) if normalize else None)


def _chunk(tensors: Sequence[torch.Tensor], *, buffer: Callable[[str, torch.dtype], torch.Tensor], base: torch.Tensor | None = None,
           weights: Sequence[float] | None = None, normalize: bool = True) -> torch.Tensor:
    return weighted_sum(tensors, *_weights(len(tensors), weights, normalize), buffer=buffer)


@register(
    "linear",
    summary="weighted average sum_i w_i theta_i / sum_i w_i (uniform soup; SWA; WiSE-FT with the base listed)",
    paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482); Izmailov et al. 2018 (SWA); Wortsman et al. 2022 (WiSE-FT)",
    divides_by_weight_sum=divides_by_plain_weight_sum,
    keeps_identical=lambda p: bool(p["normalize"]),
    pointwise=True,
    takes_half=True,
    chunk_kernel=_chunk,
    carries_nonfinite=True,
)
def linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    normalize: Annotated[bool, Param(help="divide by the sum of the weights")] = True,
) -> torch.Tensor:
    """theta = sum_i w_i theta_i / sum_i w_i (``normalize``) or sum_i w_i theta_i.

    The sum is accumulated in float64 in the order of the models, then divided by the weight sum (rounding
    does not grow with N, and a running sum gives the same bits, see :func:`accumulate`).

    ``base`` is not an ingredient here: list the base among the models for WiSE-FT
    (weights [1 - alpha, alpha]).

    Raises:
        MethodError: weights sum to zero while normalising.
    """
    return weighted_sum(tensors, *_weights(len(tensors), weights, normalize))

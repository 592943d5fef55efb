"""RegMean: each linear layer's weight solved from its models' input Gram matrices; every other tensor averaged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from ..errors import MethodError
from .linear import linear
from .ops import normalizing_sum
from .registry import Param, register


@register(
    "regmean",
    summary="linear weights W = (sum_i w_i W_i G_i)(sum_i w_i G_i)^-1 from each model's input Gram G_i (off-diagonals times alpha); other tensors: weighted mean",
    paper="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models (RegMean, arXiv 2212.09849)",
    divides_by_weight_sum=lambda p: True,
    statistic="gram",
)
def regmean(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    statistics: Sequence[torch.Tensor] | None = None,
    alpha: Annotated[float, Param(ge=0, le=1, help="scale of the Gram matrices' off-diagonal entries (1: exact least squares; 0: per-input weighted mean)")] = 0.9,
    ridge: Annotated[float, Param(ge=0, help="pull toward the weighted mean, relative to the mean diagonal of the summed Gram: keeps inputs the data never excites at the mean")] = 1e-8,
) -> torch.Tensor:
    """For an (out, in) weight with Grams G_i = X_i^T X_i (in, in) of its inputs on model i's data:

    W = argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2, i.e. W^T = (sum_i w_i G~_i + r I)^-1 (sum_i w_i G~_i W_i^T + r Wbar^T),
    with G~_i = alpha G_i + (1 - alpha) diag(G_i) (the paper's shrinkage), Wbar the weighted mean and
    r = ridge * trace(sum_i w_i G~_i) / in (so a direction no model's data excites keeps the mean, and a singular sum
    still solves). With alpha = 1 and ridge = 0 this is least squares on the pooled inputs of all models. Solved in float64.
    ``statistics`` None (a bias, a norm, an embedding: tensors with no Gram) gives the weighted mean.

    Raises:
        MethodError: weights that sum to zero or are negative, or Grams that do not fit the weight.
    """
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    normalizing_sum(w, None)
    if statistics is None:
        return linear(tensors, weights=w)
    if any(x < 0 for x in w):
        raise MethodError(f"regmean weighs each model's Gram matrix by its weight, which must not be negative; got {w}")
    if tensors[0].ndim != 2 or len(statistics) != len(tensors) or any(g.shape != (t.shape[1], t.shape[1]) for g, t in zip(statistics, tensors)):
        raise MethodError(f"regmean needs an (in, in) Gram matrix per model for an (out, in) weight; got {[list(g.shape) for g in statistics]} "
                          f"for a weight of shape {list(tensors[0].shape)}")
    n_in = tensors[0].shape[1]
    a = torch.zeros((n_in, n_in), dtype=torch.float64, device=tensors[0].device)
    b = torch.zeros((n_in, tensors[0].shape[0]), dtype=torch.float64, device=tensors[0].device)
    for t, g, wi in zip(tensors, statistics, w):
        g64 = g.to(torch.float64)
        scale = float(g64.abs().max())
        # X^T X is symmetric positive semi-definite: a Cholesky factor exists once the rounding of its zero eigenvalues is covered
        jitter = torch.eye(n_in, dtype=torch.float64, device=g64.device) * (1e-9 * scale * n_in)
        if scale > 0 and (float((g64 - g64.T).abs().max()) > 1e-6 * scale or int(torch.linalg.cholesky_ex(g64 + jitter).info) != 0):
            raise MethodError("a Gram matrix X^T X is symmetric positive semi-definite; this statistic is not one "
                              "(compute it with `soup statistics --kind gram`)")
        shrunk = g64 * alpha + torch.diag(torch.diagonal(g64)) * (1.0 - alpha)
        a.add_(shrunk, alpha=wi)
        b.add_(shrunk @ t.to(torch.float64).T, alpha=wi)
    trace = float(torch.diagonal(a).sum())
    if not trace > 0:  # no model's data reaches this layer's inputs
        return linear(tensors, weights=w)
    r = ridge * trace / n_in
    if r > 0:  # a sum of Grams plus a ridge is symmetric positive definite: Cholesky, twice as fast as LU
        a.diagonal().add_(r)
        b.add_(linear(tensors, weights=w).T, alpha=r)
        factor, info = torch.linalg.cholesky_ex(a)
        solved = torch.cholesky_solve(b, factor) if int(info) == 0 else torch.linalg.solve(a, b)
    else:  # exact least squares; a singular sum has many solutions, of which this is one
        solved = torch.linalg.lstsq(a, b).solution
    return solved.T.contiguous().to(torch.float32)

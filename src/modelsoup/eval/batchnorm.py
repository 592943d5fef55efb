"""Batch-norm recalibration: recompute running statistics for a soup's own weights.

A soup's running mean/variance are averages of its ingredients' statistics, which are not the
statistics of the soup's activations; Izmailov et al. (SWA, 2018) recompute them with one pass over
training data, as ``torch.optim.swa_utils.update_bn`` does. :func:`recalibrate_bn` follows the same
convention (cumulative average over the whole pass, the module in training mode), so their results agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(module: nn.Module) -> list[str]:
    """Names of the batch-norm layers that track running statistics."""
    return [name for name, m in module.named_modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


def recalibrate_bn(module: nn.Module, loader: Iterable[Any], *, device: str | torch.device | None = None, labels_key: str = "labels") -> int:
    """Reset and recompute the running statistics of every batch-norm layer of ``module`` on ``loader``.

    Each batch is a tensor (the input), a tuple/list whose first item is the input (as in
    ``swa_utils.update_bn``), or a mapping of keyword inputs (``labels_key`` is left out). Statistics
    are a cumulative average over all batches (momentum ``None``), computed in training mode under
    ``no_grad``; momenta and the training flag are restored afterwards.

    Returns:
        The number of layers recalibrated (0 if the module has none; then nothing is run).
    """
    layers = [m for m in module.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not layers:
        return 0
    momenta = {}
    for m in layers:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None
    was_training = module.training
    module.train()
    try:
        with torch.no_grad():
            for batch in loader:
                if isinstance(batch, Mapping):
                    module(**{k: (v.to(device) if device is not None and isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != labels_key})
                    continue
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                module(x.to(device) if device is not None else x)
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        module.train(was_training)
    return len(layers)

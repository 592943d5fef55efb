"""REPAIR: restore the activation statistics of an interpolated model (Jordan et al. 2023, "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair").

Even after alignment, the midpoint ``theta = (1 - alpha) theta_a + alpha theta_b`` of two networks suffers
"variance collapse": its hidden units' pre-activations have a much smaller spread than either endpoint's,
and the collapse compounds layer by layer. REPAIR rescales every permuted channel ``c`` of every hidden
layer so its pre-activation mean and standard deviation are the interpolation of the endpoints':

    mu_t = (1 - alpha) mu_a + alpha mu_b,   sigma_t = (1 - alpha) sigma_a + alpha sigma_b
    y'_c = (y_c - mu_c) * sigma_t / sigma_c + mu_t

measured on some batches, layer after layer (each layer's statistics are measured with the layers before it
already repaired). The affine map is folded into the layer that produces ``y``, so the result is a plain state
of the same architecture: a Linear/Conv's row ``c`` and bias (``W_c *= s``, ``b_c = s b_c + mu_t - s mu_c`` with
``s = sigma_t / sigma_c``), or, where a BatchNorm follows the layer, that BatchNorm's gain and shift.

With BatchNorm, the interpolated model's running statistics are first recomputed on the batches ("reset BN",
the paper's simpler variant; :func:`~modelsoup.eval.batchnorm.recalibrate_bn`); ``variant="reset_bn"`` stops
there. The endpoints' target statistics at a BatchNorm are then measured with their own statistics recomputed on
the same batches (their running averages from training lag their final weights, and a target built on them
pulls the soup away from what the batches show). Measured so, a reset BatchNorm's output already has mean
``beta_t`` and std ``|gamma_t|``, the interpolated targets whenever the endpoints' gains agree in sign: REPAIR at a
BatchNorm then changes little beyond the reset (the paper's observation that resetting BN is REPAIR for BN
networks; docs/align.md measures both). Hidden layers that no BatchNorm follows get REPAIR proper.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .matching import batch_inputs
from .models import example_args
from .spec import AlignmentError, PermutationSpec, permutation_spec

log = logging.getLogger("modelsoup")

VARIANTS = ("repair", "reset_bn")
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def interpolate_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) a + alpha b`` for floating tensors (computed in float32, cast back); other tensors are ``a``'s."""
    out = {}
    for k, v in a.items():
        if v.is_floating_point():
            out[k] = ((1.0 - alpha) * v.float() + alpha * b[k].float()).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _forward(module: nn.Module, batch: Any) -> None:
    args, kwargs = batch_inputs(batch)
    module(*args, **kwargs)


def repair_sites(spec: PermutationSpec, module: nn.Module, batch: Any) -> list[tuple[str, int]]:
    """(module name, channel dim of its output) of every layer REPAIR corrects, in the order a forward pass reaches them.

    A site is a Linear, Conv or BatchNorm whose output units are a permuted group of ``spec`` (one unit per entry:
    attention heads, blocks of rows, are left alone). A Linear/Conv whose output goes straight into a BatchNorm
    is corrected at that BatchNorm instead.
    """
    mods = dict(module.named_modules())
    wanted = {}
    for g in spec.groups:
        for a in g.axes:
            if a.axis == 0 and a.block == 1 and a.tensor.endswith(".weight"):
                name = a.tensor[: -len(".weight")]
                if isinstance(mods.get(name), (*_AFFINE, *_BN)):
                    wanted[name] = mods[name]
    order: list[str] = []
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept so that their ids are not reused
    feeds_bn: set[str] = set()
    handles = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], out: Any, name: str) -> None:
        if name not in order:
            order.append(name)
        if isinstance(m, _BN) and inputs and id(inputs[0]) in outputs:
            feeds_bn.add(outputs[id(inputs[0])][0])
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (name, out)

    for name, m in wanted.items():
        handles.append(m.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)))
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            _forward(module, batch)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    sites = []
    for name in order:
        if name in feeds_bn:
            continue
        m = wanted[name]
        if isinstance(m, _BN) and not m.affine or isinstance(m, _AFFINE) and m.bias is None:
            log.warning("REPAIR: %s has no %s to fold a correction into; left as interpolated", name, "affine parameters" if isinstance(m, _BN) else "bias")
            continue
        sites.append((name, -1 if isinstance(m, nn.Linear) else 1))
    return sites


def channel_stats(module: nn.Module, sites: Sequence[tuple[str, int]], batches: Iterable[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, (mean, std) of each channel of the module's output over ``batches`` (and positions), in float64, eval mode."""
    mods = dict(module.named_modules())
    sums: dict[str, list[Any]] = {name: [0, 0.0, 0.0] for name, _ in sites}
    handles = []

    def hook(out: Any, name: str, dim: int) -> None:
        y = out.detach().double().movedim(dim, -1)
        y = y.reshape(-1, y.shape[-1])
        acc = sums[name]
        acc[0] += y.shape[0]
        acc[1] = acc[1] + y.sum(0)
        acc[2] = acc[2] + (y * y).sum(0)

    for name, dim in sites:
        handles.append(mods[name].register_forward_hook(lambda m, i, o, name=name, dim=dim: hook(o, name, dim)))
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _forward(module, batch)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    out = {}
    for name, (n, s, ss) in sums.items():
        if not n:
            raise AlignmentError(f"REPAIR: layer {name} was not reached by the data's forward passes")
        mean = s / n
        out[name] = (mean, (ss / n - mean * mean).clamp_min(0).sqrt())
    return out


def _fold(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``m``'s output ``scale * y + shift`` per output channel."""
    with torch.no_grad():
        w = m.weight
        w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        m.bias.copy_((m.bias.double() * scale + shift).to(m.bias.dtype))


def repair(model_a: nn.Module, model_b: nn.Module, alpha: float, batches: Iterable[Any], *, spec: PermutationSpec | None = None,
           variant: str = "repair", eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """The interpolation of two aligned models with each hidden channel's statistics repaired (REPAIR, Jordan et al. 2023).

    ``theta = (1 - alpha) theta_a + alpha theta_b``; then, per permuted channel of each hidden Linear/Conv (or of the
    BatchNorm that follows it), in forward order, ``y' = (y - mu) sigma_t / sigma + mu_t`` with the endpoints'
    interpolated statistics ``mu_t = (1 - alpha) mu_a + alpha mu_b``, ``sigma_t = (1 - alpha) sigma_a + alpha sigma_b``,
    folded into that layer's weight and bias (module doc). BatchNorm running statistics are recomputed first.

    Args:
        model_a, model_b: the endpoints, one architecture, ``model_b`` already aligned to ``model_a`` (unchanged here).
        alpha: the weight of ``model_b``.
        batches: inputs the statistics are measured on (training data; tensors, ``(x, y)`` tuples or keyword mappings).
        spec: the permutation groups (default: derived from ``model_a`` by :func:`~modelsoup.align.permutation_spec`).
        variant: ``repair`` (REPAIR proper, after resetting BN) or ``reset_bn`` (only recompute BN statistics).
        eps: added to a channel's std before dividing (dead channels keep their weights).

    Returns:
        The repaired state (the same names, shapes and dtypes as ``model_a``'s state dict).

    Raises:
        AlignmentError: an unknown variant, no batches, ``reset_bn`` for a model without BatchNorm.
    """
    from ..eval.batchnorm import batchnorm_layers, recalibrate_bn

    if variant not in VARIANTS:
        raise AlignmentError(f"REPAIR variant '{variant}': choose repair or reset_bn")
    batches = list(batches)
    if not batches:
        raise AlignmentError("REPAIR needs batches to measure activation statistics on; give data")
    model = copy.deepcopy(model_a)
    model.load_state_dict(interpolate_states(model_a.state_dict(), model_b.state_dict(), alpha))
    has_bn = bool(batchnorm_layers(model))
    if has_bn:
        recalibrate_bn(model, batches)
    elif variant == "reset_bn":
        raise AlignmentError(f"{type(model).__name__} has no BatchNorm layer: reset_bn changes nothing; use variant repair")
    if variant == "repair":
        if spec is None:
            spec = permutation_spec(model_a, example_inputs=example_args(batches[0]))
        sites = repair_sites(spec, model, batches[0])
        ends_models = [model_a, model_b]
        if has_bn:  # the endpoints' statistics on these batches, as the soup's reset ones are (not their training-time running averages)
            ends_models = [copy.deepcopy(m) for m in ends_models]
            for m in ends_models:
                recalibrate_bn(m, batches)
        ends = [channel_stats(m, sites, batches) for m in ends_models]
        mods = dict(model.named_modules())
        for name, dim in sites:
            mean, std = channel_stats(model, [(name, dim)], batches)[name]
            target_mean = (1 - alpha) * ends[0][name][0] + alpha * ends[1][name][0]
            target_std = (1 - alpha) * ends[0][name][1] + alpha * ends[1][name][1]
            scale = target_std / (std + eps)
            _fold(mods[name], scale, target_mean - scale * mean)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

"""The modules alignment runs: built from a user's architecture or a Hugging Face config, loaded with a state, and
the check that a permuted model computes the same function as the original."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EvaluatorError
from .matching import batch_inputs
from .spec import AlignmentError

log = logging.getLogger("modelsoup")

# The aligned model's outputs may differ from the original's by float rounding only: at most this fraction of the
# largest |output| (a permutation reorders sums; float32 rounding is ~1e-7 of a sum's terms).
ALIGN_RTOL = 1e-4

Factory = Callable[[], nn.Module]
_HF_IGNORE = (r"(^|\.)position_ids$",)


def arch_factory(arch: Any) -> Factory:
    """A function building a fresh module from ``arch``: a callable returning one, an ``nn.Module`` (copied), or
    ``"file.py:make_net"`` / ``"package.module:make_net"``.

    Raises:
        AlignmentError: the object cannot be loaded or does not give an ``nn.Module``.
    """
    from ..eval.base import load_object

    what = arch
    if isinstance(arch, str):
        try:
            arch = load_object(arch)
        except EvaluatorError as e:
            msg = str(e).replace(f"evaluator '{what}'", "").strip(" :")
            raise AlignmentError(f"--arch {what}: {msg}; give file.py:make_net or package.module:make_net, a function returning the nn.Module") from None
    if isinstance(arch, nn.Module):
        template = arch
        return lambda: copy.deepcopy(template)
    if not callable(arch):
        raise AlignmentError(f"--arch {what}: is a {type(arch).__name__}; give a function (or class) that returns the nn.Module")

    def build() -> nn.Module:
        try:
            m = arch()
        except Exception as e:  # noqa: BLE001 - the user's code
            raise AlignmentError(f"--arch {what}: calling it failed ({type(e).__name__}: {e}); it must build the module with no arguments") from None
        if not isinstance(m, nn.Module):
            raise AlignmentError(f"--arch {what}: returned a {type(m).__name__}, not an nn.Module")
        return m

    return build


def hf_factory(folder: str | Path) -> Factory:
    """A function building the model of a Hugging Face folder from its config (random weights; the state is loaded after).

    The class is the config's ``architectures[0]`` when transformers has it, else ``AutoModel``.

    Raises:
        AlignmentError: transformers is missing or the config cannot be read.
    """
    try:
        import transformers as tr
    except ImportError:
        raise AlignmentError(f"{folder}: a Hugging Face model needs transformers (pip install transformers)") from None
    from ..eval.text import quiet_transformers

    try:
        with quiet_transformers():
            config = tr.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise AlignmentError(f"{folder}: cannot read config.json ({str(e).splitlines()[0][:200]}); give --arch for a non-transformers model") from None
    cls = next((getattr(tr, a) for a in (config.architectures or []) if hasattr(tr, a)), None)

    def build() -> nn.Module:
        with quiet_transformers():
            return cls(config) if cls is not None else tr.AutoModel.from_config(config)

    return build


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> nn.Module:
    """``module`` with ``state`` loaded (names must match; Hugging Face's ``position_ids`` may be missing), in eval mode."""
    from ..eval.module import load_weights

    ignore = tuple(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()) + _HF_IGNORE
    load_weights(module, state, ignore_unexpected=ignore, label=label)
    return module.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``3x32x32`` (one example, without the batch) -> (3, 32, 32).

    Raises:
        AlignmentError: not positive integers separated by x.
    """
    try:
        shape = tuple(int(x) for x in text.lower().replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise AlignmentError(f"--input-shape {text!r}: give one example's shape without the batch, e.g. 64 or 3x32x32")
    return shape


def random_inputs(module: nn.Module, input_shape: Sequence[int] | None, *, seed: int = 0, batch: int = 8) -> list[Any]:
    """Seeded inputs for the function check when no data is given: token ids for a Hugging Face model, else
    normal noise of ``input_shape`` (or of the first layer's input, a Linear's features or an Embedding's ids).

    Raises:
        AlignmentError: the shape cannot be inferred and was not given.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        ids = torch.randint(0, int(cfg.vocab_size), (4, 16), generator=g)
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    if input_shape is not None:
        return [torch.randn(batch, *input_shape, generator=g)]
    from .spec import infer_input

    found = infer_input(module, batch)
    if found is None:
        raise AlignmentError(f"{type(module).__name__}: the shape of its input cannot be inferred from the first layer, and no data was given; "
                             "give --input-shape (one example, e.g. 3x32x32) or --data")
    shape, dtype = found
    if dtype == torch.long:
        first = next(m for m in module.modules() if isinstance(m, nn.Embedding))
        return [torch.randint(0, first.num_embeddings, tuple(shape), generator=g)]
    return [torch.randn(*shape, generator=g)]


def example_args(batch: Any) -> tuple[Any, ...]:
    """Positional inputs of one batch, for the trace's shape propagation.

    Raises:
        AlignmentError: a batch of keyword inputs (a traced module takes positional ones).
    """
    args, kwargs = batch_inputs(batch)
    if kwargs:
        raise AlignmentError(f"the data gives keyword inputs ({', '.join(kwargs)}), but a traced module takes positional inputs; "
                             "give tensors or (inputs, labels) batches")
    return args


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def output_difference(original: nn.Module, permuted: nn.Module, inputs: Iterable[Any]) -> tuple[float, float]:
    """(max |original - permuted| over every output tensor, max |original output|) on ``inputs``.

    Raises:
        AlignmentError: the module gives no tensor, or outputs of different structure.
    """
    diff, scale = 0.0, 0.0
    with torch.no_grad():
        for batch in inputs:
            args, kwargs = batch_inputs(batch)
            a, b = _tensors(original(*args, **kwargs)), _tensors(permuted(*args, **kwargs))
            if not a or len(a) != len(b):
                raise AlignmentError(f"{type(original).__name__}: its outputs hold no tensor to compare; return the logits")
            for x, y in zip(a, b):
                if not x.is_floating_point():
                    continue
                if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):  # a NaN would hide every difference beside it
                    raise AlignmentError(f"{type(original).__name__}: its outputs on the check's inputs hold NaN/Inf, so they cannot show that "
                                         "the aligned model computes the same function; give inputs it is defined on (--data, the model's own data)")
                diff = max(diff, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
                scale = max(scale, float(x.double().abs().max()) if x.numel() else 0.0)
    if scale == 0.0:
        raise AlignmentError(f"{type(original).__name__}: its outputs on the check's inputs are all zero, so they cannot show that the aligned "
                             "model computes the same function; give inputs that exercise it (--data, the model's own data)")
    return diff, scale


def check_function(factory: Factory, original: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor], inputs: Sequence[Any], *,
                   label: str, rtol: float = ALIGN_RTOL, what: str = "the data") -> tuple[float, float]:
    """Refuse an aligned state whose model does not compute the original's function on ``inputs``.

    Returns:
        (max abs output difference, max abs original output).

    Raises:
        AlignmentError: the difference is above ``rtol`` times the outputs' scale (or not finite).
    """
    diff, scale = output_difference(load_into(factory(), original, label), load_into(factory(), aligned, f"{label} (aligned)"), inputs)
    if not math.isfinite(diff) or diff > rtol * max(scale, 1e-12):
        raise AlignmentError(f"{label}: the aligned model's outputs differ from the original's by up to {diff:.3g} on {what} (largest |output| "
                             f"{scale:.3g}: {diff / max(scale, 1e-12):.2e} of it, over the {rtol:g} allowed): the permutation spec does not "
                             "describe how this model uses its tensors. Nothing was written; declare the spec (--spec) for this model")
    log.debug("%s: aligned outputs within %.3g of the original's (scale %.3g) on %s", label, diff, scale, what)
    return diff, scale


def data_object(spec: str) -> Any:
    """The object ``--data file.py:NAME`` / ``package.module:NAME`` names (batches, a function returning them, an evaluator).

    Raises:
        AlignmentError: it cannot be loaded.
    """
    from ..eval.base import load_object

    try:
        return load_object(spec)
    except EvaluatorError as e:
        msg = str(e).replace(f"evaluator '{spec}'", "").strip(" :")
        raise AlignmentError(f"--data {spec}: {msg}; give file.py:NAME or package.module:NAME naming batches, a function returning them, "
                             "or an evaluator") from None

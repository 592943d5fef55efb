"""Evaluators that run a PyTorch module over batches: classification accuracy/loss, and the shared machinery.

A :class:`ModuleEvaluator` owns one module whose weights it replaces for each evaluation (tensor by
tensor, so a lazy soup is never held whole), runs it under ``torch.inference_mode`` with a progress bar,
and exposes :meth:`ModuleEvaluator.loss` on a batch for any callable with the module's signature: the
learned soup passes a ``torch.func.functional_call`` wrapper there to differentiate through the mixing
coefficients.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import re
import time
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import EvaluatorError, KeyMismatchError, TensorMismatchError
from ..errors import name_mismatch
from .base import Evaluator, PredictionEvaluator, Predictions, Score, classification_metrics, timing
from .batchnorm import batchnorm_layers, recalibrate_bn
from ..progress import progress_on

log = logging.getLogger("modelsoup")


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) or fnmatch.fnmatchcase(name, p) for p in patterns)


# Per module: tensor name -> (the state's token for it, its storage, its version counter and a checksum of its bytes
# after the copy). A tensor is skipped on the next load only if the token is the same and the module's tensor is
# still what was copied: same storage, same version (in-place changes bump it), and the same checksum (writes
# through ``.data`` or a dtype round trip into reused storage do not bump the version, but change the bytes).
_HELD: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[Any, int, int, int]]] = weakref.WeakKeyDictionary()
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum(t: torch.Tensor) -> int:
    """The sum of a tensor's bytes read as integers of its element size: one read pass, changed by any edit of a value."""
    if t.numel() == 0:
        return 0
    flat = t.detach().reshape(-1)
    ints = flat.view(_INT_VIEW[flat.element_size()]) if flat.dtype != torch.bool else flat.view(torch.int8)
    return int(ints.sum(dtype=torch.int64))


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], *, ignore_unexpected: Sequence[str] = (), label: str = "weights") -> None:
    """Copy ``state`` into ``module``'s parameters and buffers, one tensor at a time.

    Unlike ``nn.Module.load_state_dict`` this never materialises ``state`` as a whole (a lazy soup
    computes each tensor when read), reads a tensor shared by tied names once, and casts to the
    module's dtypes.

    Args:
        module: the target; its tensors are overwritten in place.
        state: tensor name -> tensor.
        ignore_unexpected: regex or glob patterns of names in ``state`` that the module may lack
            (e.g. Hugging Face's non-persistent ``position_ids``).
        label: how messages name ``state``.

    Raises:
        KeyMismatchError: names missing from ``state`` (other than tied aliases) or unknown to the module.
        TensorMismatchError: a tensor's shape differs from the module's.
    """
    targets = module.state_dict(keep_vars=True)
    names = list(state.keys())
    have = set(names)
    present = {targets[n].data_ptr() for n in targets if n in have and targets[n].numel()}
    missing = [n for n in targets if n not in have and not (targets[n].numel() and targets[n].data_ptr() in present)]
    unexpected = [n for n in names if n not in targets and not _ignored(n, ignore_unexpected)]
    if missing or unexpected:
        raise KeyMismatchError(
            f"{label} do not fit the evaluator's {type(module).__name__}: " + name_mismatch(missing, unexpected)
            + ". Fix: evaluate checkpoints of the same architecture as the evaluator's model, or strip a wrapper prefix (strip_prefix)."
        )
    done: set[int] = set()
    token_of = getattr(state, "token", None)
    held = _HELD.setdefault(module, {})
    with torch.no_grad():
        for name, target in targets.items():
            if name not in have:
                continue
            ptr = target.data_ptr() if target.numel() else -1
            if ptr in done:
                continue
            token = token_of(name) if token_of is not None else None
            record = held.get(name)
            if token is not None and record is not None and record[:3] == (token, ptr, target._version) and record[3] == _checksum(target):
                done.add(ptr)
                continue  # the module holds this very tensor already, unmodified since
            held.pop(name, None)
            src = state[name]
            if tuple(src.shape) != tuple(target.shape):
                raise TensorMismatchError(f"{label}: tensor '{name}' has shape {list(src.shape)} but the evaluator's model expects {list(target.shape)}")
            target.copy_(src)
            if token is not None:
                held[name] = (token, ptr, target._version, _checksum(target))
            if ptr != -1:
                done.add(ptr)


def model_output_logits(out: Any) -> torch.Tensor:
    """The logits of a module's output: a tensor, ``.logits`` (Hugging Face), a ``logits`` key, or the first item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise EvaluatorError(f"cannot find logits in the model's output of type {type(out).__name__}; return a tensor or an object with .logits")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_into(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _hash_into(h, v)
    else:
        h.update(repr(obj).encode())


class _ModuleSlot:
    """A module shared by evaluators (what it holds is tracked per module by :func:`load_weights`)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device


class ModuleEvaluator(Evaluator):
    """Runs one module over batches. Subclasses define the data (:meth:`batches`) and the loss.

    Args:
        module: the model; each evaluation overwrites its weights in place (pass a copy to keep yours).
        device: where to run (default: the module's device).
        name: names the data in tables and in the cache key; without it the data are hashed once.
        bn_loader: if given, batch-norm statistics are recomputed on it after loading each set of
            weights (averaged running statistics are wrong for soups of BN networks).
        progress: tqdm bars; None = only on a terminal.
        ignore_unexpected: name patterns the weights may have and the module may lack.
    """

    def __init__(self, module: nn.Module, *, device: str | torch.device | None = None, name: str | None = None,
                 bn_loader: Iterable[Any] | None = None, progress: bool | None = None, ignore_unexpected: Sequence[str] = ()) -> None:
        first = next(iter(module.parameters()), None)
        dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self._slot = _ModuleSlot(module.to(dev), dev)
        self.name = name
        self.bn_loader = bn_loader
        self.progress = progress
        self.ignore_unexpected = tuple(ignore_unexpected)
        self._data_hash: str | None = None
        bns = batchnorm_layers(module)
        if bns and bn_loader is None:
            log.warning(
                "%s has %d batch-norm layer(s) (e.g. %s): the running statistics of a soup are averages of the ingredients', "
                "which do not match the soup's activations; pass bn_loader= to the evaluator to recompute them (modelsoup.eval.recalibrate_bn)", type(module).__name__, len(bns), bns[0])

    # -- data and loss ---------------------------------------------------------------------------
    @abstractmethod
    def batches(self) -> Iterable[Any]:
        """The evaluation data, batch by batch, in a fixed order."""

    @abstractmethod
    def batch_loss(self, call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, int]:
        """(summed loss over the batch's items, number of items) for a callable with the module's signature."""

    def loss(self, call: Callable[..., Any], batch: Any) -> torch.Tensor:
        """Mean loss of one batch, differentiable with respect to whatever ``call`` closes over."""
        total, n = self.batch_loss(call, to_device(batch, self.device))
        return total / max(n, 1)

    def data_size(self) -> int | None:
        """Number of examples, for progress bars; None if unknown."""
        return None

    # -- weights ---------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._slot.module

    @property
    def device(self) -> torch.device:
        return self._slot.device

    def load(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> None:
        """Put ``state`` into the module, then recalibrate BN if asked.

        A tensor the module already holds unchanged from the same source (a soup's state gives tokens, see
        :func:`load_weights`) is not copied again: e.g. when a held-out and a test evaluator sharing one module
        score one soup, or when soups of adapters differ only in the adapted tensors.
        """
        load_weights(self.module, state, ignore_unexpected=self.ignore_unexpected, label=label or "weights")
        if self.bn_loader is not None:
            recalibrate_bn(self.module, self.bn_loader, device=self.device)

    def share_module(self, other: ModuleEvaluator) -> None:
        """Use ``other``'s module (e.g. a test-set evaluator beside a held-out one): one copy of the model."""
        self._slot = other._slot

    def data_fingerprint(self) -> str:
        """sha256 of every batch (tensors and values), computed once."""
        if self._data_hash is None:
            h = hashlib.sha256()
            for batch in self.batches():
                _hash_into(h, batch)
            self._data_hash = h.hexdigest()
        return self._data_hash

    def _identity_parts(self) -> dict[str, Any]:
        return {"evaluator": type(self).__name__, "metric": self.metric, "module": type(self.module).__name__,
                "data": self.name or self.data_fingerprint(), "bn_recalibrated": self.bn_loader is not None}

    def identity(self) -> str:
        return json.dumps(self._identity_parts(), sort_keys=True)

    bar_unit = "ex"

    def _bar(self, label: str | None) -> tqdm:
        show = progress_on(self.progress)
        return tqdm(total=self.data_size(), unit=self.bar_unit, desc=f"eval {label or ''}".strip(), disable=not show, leave=False)


class ClassificationEvaluator(ModuleEvaluator, PredictionEvaluator):
    """Accuracy (the score) and cross-entropy of a classifier over a DataLoader.

    Batches are ``(inputs..., labels)`` tuples (the module is called with the inputs) or mappings with
    a labels entry (the module is called with the other entries as keywords, as Hugging Face models
    are). The module's output is the logits, or has them as ``.logits``.

    Args:
        module: the classifier (see :class:`ModuleEvaluator` for the shared options).
        loader: held-out data in a fixed order (a shuffling DataLoader is refused: ensembles need the
            predictions of different models to line up).
        labels_key: the labels entry of mapping batches.
    """

    metric = "accuracy"

    def __init__(self, module: nn.Module, loader: Iterable[Any], *, labels_key: str = "labels", **options: Any) -> None:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise EvaluatorError("the evaluation DataLoader shuffles (shuffle=True); use shuffle=False so that every model sees the examples in the same order")
        self.loader = loader
        self.labels_key = labels_key
        super().__init__(module, **options)

    def batches(self) -> Iterable[Any]:
        return self.loader

    def data_size(self) -> int | None:
        ds = getattr(self.loader, "dataset", None)
        try:
            return len(ds) if ds is not None else None  # type: ignore[arg-type]
        except TypeError:
            return None

    def forward(self, call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of one batch already on the device."""
        if isinstance(batch, Mapping):
            if self.labels_key not in batch:
                raise EvaluatorError(f"a batch has no '{self.labels_key}' entry (entries: {', '.join(map(str, batch))}); set labels_key")
            inputs = {k: v for k, v in batch.items() if k != self.labels_key}
            return model_output_logits(call(**inputs)), batch[self.labels_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return model_output_logits(call(*batch[:-1])), batch[-1]
        raise EvaluatorError(f"a batch is a {type(batch).__name__}; expected (inputs, labels) or a mapping with '{self.labels_key}'")

    def batch_loss(self, call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, int]:
        logits, labels = self.forward(call, batch)
        return torch.nn.functional.cross_entropy(logits.float(), labels.long(), reduction="sum"), int(labels.numel())

    def predict(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Predictions:
        return self.arrange(self.predict_batches(state, label=label))

    def predict_batches(self, state: Mapping[str, torch.Tensor], *, label: str | None = None, start: int = 0, stop: int | None = None) -> Predictions:
        """Logits of batches ``start`` to ``stop`` (all by default) in batch order: a shard of one evaluation.

        Shards of whole batches computed anywhere, concatenated in order and passed through :meth:`arrange` are
        :meth:`predict`'s result: each batch is computed the same way whichever shard it is in.
        """
        self.load(state, label=label)
        self.module.eval()
        logits, labels = [], []
        with torch.inference_mode(), self._bar(label) as bar:
            for batch in itertools.islice(self.batches(), start, stop):
                lg, lb = self.forward(self.module, to_device(batch, self.device))
                logits.append(lg.float().cpu())
                labels.append(lb.long().cpu())
                bar.update(int(lb.numel()))
        if not labels:
            raise EvaluatorError("the evaluation data has no batches" if start == 0 else f"the evaluation data has no batches from {start}")
        return Predictions(torch.cat(logits), torch.cat(labels))

    def arrange(self, predictions: Predictions) -> Predictions:
        """Predictions in batch order -> in the data's order (the same here; an evaluator that sorts its batches undoes it)."""
        return predictions

    def batch_count(self) -> int:
        """How many batches :meth:`batches` yields."""
        try:
            return len(self.batches())  # type: ignore[arg-type]
        except TypeError:
            return sum(1 for _ in self.batches())

    def score(self, predictions: Predictions, *, seconds: float | None = None) -> Score:
        m = timing(classification_metrics(predictions), seconds)
        return Score(m["accuracy"], self.metric, m)

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        s = self.score(self.predict(state, label=label), seconds=time.perf_counter() - t0)
        log.debug("%s: %s (%d examples, %.0f ex/s)", label or "model", s, s.metrics["examples"], s.metrics.get("examples_per_s", 0))
        return s

"""Per-model statistics of data-aware merges: diagonal Fishers (Fisher merging) and input Gram matrices (RegMean).

Each is computed once per model on that model's own data, in one pass of an evaluator's batches, and stored as a
safetensors file keyed by tensor name, beside the weights it describes (same names):

- ``fisher``: for each parameter, F = (1/N) sum_n (d log p(y_n | x_n) / d theta)^2 over the N examples, the diagonal of
  the Fisher information (Matena & Raffel 2022). ``kind="empirical"`` takes y_n from the data's labels;
  ``kind="sampled"`` draws y_n from the model's own prediction (seeded), the Fisher of the model's distribution.
  Each example's gradient is its own backward pass (a squared sum over a batch would be the squared batch gradient,
  another quantity). Float32, one value per weight.
- ``gram``: for each ``nn.Linear`` module, G = sum over every input row x it sees of x^T x (float64, (in, in)), stored
  under its weight's name (RegMean, Jin et al. 2023). Rows at padded positions (``attention_mask`` 0, for batches that
  carry one whose shape matches the layer's input) are left out. A sum, not a mean: RegMean on models with more data
  weighs them more, as least squares on the pooled data would.

The file's metadata records the statistic, the kind, the example count and the evaluator's identity. A cache (default
``<modelsoup cache>/statistics``) keeps the file under a hash of the model's weights (its files' sha256), the
evaluator's identity (which names its data) and the settings, so a second merge with the same models and data reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..errors import EvaluatorError, OptionError
from ..eval.module import ClassificationEvaluator, ModuleEvaluator, to_device
from ..io import Checkpoint, open_checkpoint
from ..io.adapters import adapted
from ..recipe.schema import ModelRef
from ..io.output import cache_root, cached_sha256
from ..progress import progress_on

log = logging.getLogger("modelsoup")

STATISTICS = ("fisher", "gram")
FISHER_KINDS = ("empirical", "sampled")


def _require_classifier(evaluator: Any, what: str) -> ClassificationEvaluator:
    if not isinstance(evaluator, ClassificationEvaluator):
        raise EvaluatorError(f"{what} needs the model's log-likelihood of each example, which {type(evaluator).__name__} does not give; use a "
                             "classification evaluator (the built-in text-classification, or ClassificationEvaluator over your module and data)")
    return evaluator


def open_model(model: Any) -> Checkpoint:
    """The checkpoint of ``model`` as a merge reads it: a path, a state dict or module, or a recipe's
    :class:`~modelsoup.recipe.schema.ModelRef` (its ``key``, ``strip_prefix`` and PEFT ``adapter`` applied)."""
    if isinstance(model, ModelRef):
        source = model.source if model.source is not None else model.resolved
        ck = open_checkpoint(source, label=model.label() if model.source is not None else str(model.path), key=model.key,
                             strip_prefix=model.strip_prefix)
        return ck if model.adapter_resolved is None else adapted(ck, model.adapter_resolved, model.adapter)
    return open_checkpoint(model.state_dict() if isinstance(model, nn.Module) else model)


def weights_digest(ck: Checkpoint, model: Any = None) -> str | None:
    """sha256 naming a model's weights as read: its files' sha256 and the reading options (None for an in-memory model)."""
    if not ck.files:
        return None
    ref = model if isinstance(model, ModelRef) else None
    parts = {"files": [cached_sha256(Path(f)) for f in ck.files], "key": ref.key if ref else None, "strip_prefix": ref.strip_prefix if ref else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load(model: Any, evaluator: ModuleEvaluator) -> tuple[nn.Module, set[str]]:
    """``evaluator``'s module holding ``model``'s weights (a mapping is loaded as is, anything else read whole as
    :func:`open_model` opens it), and the names the weights have (a tied name the checkpoint does not store gets no
    statistic of its own: the merge has none)."""
    if isinstance(model, Mapping):
        evaluator.load(model, label="model")
        return evaluator.module, set(model)
    ck = open_model(model)
    try:
        names = ck.names()
        evaluator.load({name: ck.read(name) for name in names}, label=ck.label)
    finally:
        ck.close()
    return evaluator.module, set(names)


def _parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every name of every floating parameter (tied names included: each name gets the shared tensor's statistic)."""
    return {name: p for name, p in module.named_parameters(remove_duplicate=False) if p.is_floating_point()}


def fisher_statistics(model: Any, evaluator: ModuleEvaluator, *, kind: str = "empirical", seed: int = 0,
                      progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of each parameter of ``model`` on ``evaluator``'s data (see the module docstring).

    Args:
        model: the weights (a path, a state dict or a module of the evaluator's architecture); loaded into the
            evaluator's module, which is run in eval mode (dropout off).
        evaluator: a :class:`~modelsoup.eval.module.ClassificationEvaluator` over this model's own data.
        kind: ``empirical`` (labels from the data) or ``sampled`` (labels drawn from the model's predictions).
        seed: seeds the draws of ``sampled``.
        progress: progress bar; None = only on a terminal.

    Returns:
        parameter name -> float32 tensor of its shape.

    Raises:
        EvaluatorError: an evaluator without per-example log-likelihoods, or data with no examples.
        OptionError: an unknown ``kind``.
    """
    ev = _require_classifier(evaluator, "a Fisher")
    if kind not in FISHER_KINDS:
        raise OptionError(f"the Fisher's kind must be one of {', '.join(FISHER_KINDS)}, got {kind!r}")
    module, stored = _load(model, ev)
    params = {name: p for name, p in _parameters(module).items() if name in stored}
    unique: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in params.items():
        unique.setdefault(id(p), (name, p))
    leaders = [p for _, p in unique.values()]
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in leaders}  # squares add without cancelling
    grad_before = {id(p): p.requires_grad for p in leaders}
    gen = torch.Generator().manual_seed(seed)
    examples = 0
    module.eval()
    try:
        for p in leaders:
            p.requires_grad_(True)
        with tqdm(total=ev.data_size(), unit="ex", desc="fisher", disable=not progress_on(progress), leave=False) as bar:
            for batch in ev.batches():
                for example in _examples(to_device(batch, ev.device)):  # one graph per example: a batch's graph would cost B x per backward
                    logits, labels = ev.forward(module, example)
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    if logp.ndim != 2:
                        raise EvaluatorError(f"a Fisher needs logits of shape (examples, classes); the module gave {list(logits.shape)}")
                    if kind == "empirical":
                        y = labels.long().reshape(-1)
                    else:
                        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).reshape(-1).to(logp.device)
                    picked = logp.gather(1, y[:, None]).reshape(-1)
                    for i in range(picked.shape[0]):
                        grads = torch.autograd.grad(picked[i], leaders, retain_graph=i + 1 < picked.shape[0], allow_unused=True)
                        for p, g in zip(leaders, grads):
                            if g is not None:
                                sums[id(p)].addcmul_(g, g)
                    examples += picked.shape[0]
                    bar.update(picked.shape[0])
    finally:
        for p in leaders:
            p.requires_grad_(grad_before[id(p)])
    if examples == 0:
        raise EvaluatorError("the Fisher's data has no examples")
    return {name: (sums[id(p)] / examples).cpu() for name, p in params.items()}


def _examples(batch: Any) -> list[Any]:
    """A batch as batches of one example each (every tensor sliced along its first dimension, the batch's size), or the
    batch itself when its tensors do not share one (then each example's gradient is taken through the whole batch)."""
    from torch.utils._pytree import tree_flatten, tree_map

    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.ndim else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        return [batch]
    n = sizes.pop()
    return [tree_map(lambda t, i=i: t[i:i + 1] if isinstance(t, torch.Tensor) else t, batch) for i in range(n)]


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's inputs as (rows, in) float64, padded positions left out where the batch's mask fits them."""
    if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(torch.bool)].to(torch.float64)
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def gram_statistics(model: Any, evaluator: ModuleEvaluator, *, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The Gram matrix X^T X of the inputs of every ``nn.Linear`` of ``model`` on ``evaluator``'s data (module docstring).

    Args:
        model: the weights (a path, a state dict or a module of the evaluator's architecture).
        evaluator: a :class:`~modelsoup.eval.module.ModuleEvaluator` over this model's own data (only its batches
            and module are used: no labels needed).
        progress: progress bar; None = only on a terminal.

    Returns:
        ``<linear module>.weight`` -> float64 (in, in) tensor, for every name of every linear layer's weight.

    Raises:
        EvaluatorError: the module has no linear layer, or the data no batch.
    """
    module, stored = _load(model, evaluator)
    linears: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear) and (f"{name}.weight" if name else "weight") in stored:
            linears.setdefault(id(m), (m, []))[1].append(f"{name}.weight" if name else "weight")
    if not linears:
        raise EvaluatorError(f"{type(module).__name__} has no nn.Linear layer, so RegMean has nothing to solve; use another method")
    grams = {key: torch.zeros((m.in_features, m.in_features), dtype=torch.float64, device=evaluator.device) for key, (m, _) in linears.items()}
    mask: list[torch.Tensor | None] = [None]

    def hook(key: int) -> Callable[..., None]:
        def accumulate(mod: nn.Module, args: tuple[Any, ...]) -> None:
            rows = _rows(args[0].detach(), mask[0])
            grams[key].addmm_(rows.T, rows)
        return accumulate

    handles = [m.register_forward_pre_hook(hook(key)) for key, (m, _) in linears.items()]
    batches = 0
    module.eval()
    try:
        with torch.inference_mode(), tqdm(total=evaluator.data_size(), unit="ex", desc="gram", disable=not progress_on(progress), leave=False) as bar:
            for batch in evaluator.batches():
                batch = to_device(batch, evaluator.device)
                mask[0] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                _, n = evaluator.batch_loss(module, batch)
                batches += 1
                bar.update(n)
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise EvaluatorError("the Gram matrices' data has no batches")
    return {name: grams[key].cpu() for key, (_, names) in linears.items() for name in names}


def _evaluator_code(evaluator: ModuleEvaluator) -> dict[str, Any]:
    """What the statistics depend on in the evaluator's code: the module's structure, and the source of a user's class."""
    import inspect

    parts: dict[str, Any] = {"module": hashlib.sha256(repr(evaluator.module).encode()).hexdigest()}
    for cls in type(evaluator).__mro__:
        if cls.__module__.startswith("modelsoup.") or cls.__module__ in ("builtins", "abc"):
            continue
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:
            source = None
        if source and Path(source).is_file():
            parts[f"{cls.__module__}.{cls.__qualname__}"] = cached_sha256(Path(source))
    return parts


def _key(digest: str | None, evaluator: ModuleEvaluator, statistic: str, settings: Mapping[str, Any]) -> str | None:
    """The cache key of a model's statistics: its weights, the evaluator (identity: its data; its code) and the settings."""
    if digest is None:
        return None
    parts = {"statistic": statistic, "settings": dict(settings), "weights": digest, "evaluator": evaluator.identity(),
             "code": _evaluator_code(evaluator), "version": 2}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_statistics_file(ck: Checkpoint, statistic: str, model: Checkpoint, label: str, ref: Any = None) -> None:
    """Refuse a statistics file written for another method's statistic or for other weights (its metadata says which).

    Raises:
        RecipeError: the file's ``statistic`` is not ``statistic``, or its ``weights`` digest is not ``model``'s (read as the
            recipe entry ``ref`` says).
    """
    from safetensors import safe_open

    from ..errors import RecipeError

    if not ck.files or not str(ck.files[0]).endswith(".safetensors"):
        return
    with safe_open(str(ck.files[0]), "pt") as f:
        meta = dict(f.metadata() or {})
    if "statistic" in meta and meta["statistic"] != statistic:
        raise RecipeError([f"{label}: {ck.label} holds {meta['statistic']} statistics, and this method needs {statistic} statistics "
                           f"(soup statistics --kind {statistic})"])
    digest = weights_digest(model, ref)
    if "weights" in meta and digest is not None and meta["weights"] != digest:
        raise RecipeError([f"{label}: {ck.label} was computed for other weights than {model.label}'s (its files or reading options "
                           "changed, or it is another model's); compute this model's statistics again"])


def save_statistics(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write statistics atomically (a temporary file in the same folder, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".soup-stats-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def model_statistics(model: Any, evaluator: ModuleEvaluator, statistic: str, *, kind: str = "empirical", seed: int = 0,
                     output: str | Path | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool | None = None) -> Path:
    """Compute (or find in the cache) one model's statistics and return the safetensors file that holds them.

    Args:
        model: a checkpoint path (file or folder; the cache is keyed by its files' hashes), a recipe's model entry
            (:class:`~modelsoup.recipe.schema.ModelRef`: its key, prefix and adapter applied), or a state dict / module
            (computed every time; give ``output``).
        evaluator: over the model's own data (see :func:`fisher_statistics`, :func:`gram_statistics`).
        statistic: ``fisher`` (for ``method: fisher``) or ``gram`` (for ``method: regmean``).
        kind, seed: the Fisher's labels (:func:`fisher_statistics`).
        output: write the file here too (e.g. next to the model); default: only in the cache.
        cache_dir: the cache folder (default ``<modelsoup cache>/statistics``).
        use_cache: False computes again (and replaces the cached file).

    Raises:
        OptionError: an unknown statistic, or an in-memory model without ``output``.
        EvaluatorError: see :func:`fisher_statistics` and :func:`gram_statistics`.
    """
    if statistic not in STATISTICS:
        raise OptionError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    settings = {"kind": kind, "seed": seed} if statistic == "fisher" else {}
    if isinstance(model, Mapping):
        digest = None
    else:
        ck = open_model(model)
        try:
            digest = weights_digest(ck, model)
        finally:
            ck.close()
    key = _key(digest, evaluator, statistic, settings)
    if key is None and output is None:
        raise OptionError("statistics of an in-memory model are not cached; give output= (a .safetensors path) to keep them")
    cached = Path(cache_dir) if cache_dir is not None else cache_root() / "statistics"
    hit = cached / f"{statistic}-{key}.safetensors" if key is not None else None
    if use_cache and hit is not None and hit.is_file():
        log.info("%s statistics of %s: from the cache (%s)", statistic, model, hit)
        if output is not None:
            import shutil

            tmp = Path(output).with_name(f".soup-stats-{os.getpid()}-{Path(output).name}")
            shutil.copyfile(hit, tmp)
            os.replace(tmp, output)
            return Path(output)
        return hit
    label = model.label() if isinstance(model, ModelRef) else str(model) if isinstance(model, (str, Path)) else type(model).__name__
    log.info("%s statistics of %s on %s", statistic, label, evaluator.name or type(evaluator).__name__)
    if statistic == "fisher":
        tensors = fisher_statistics(model, evaluator, kind=kind, seed=seed, progress=progress)
    else:
        tensors = gram_statistics(model, evaluator, progress=progress)
    examples = evaluator.data_size()
    meta = {"statistic": statistic, "modelsoup": __version__, "evaluator": evaluator.identity(), **{k: str(v) for k, v in settings.items()},
            **({"examples": str(examples)} if examples is not None else {}), **({"weights": digest} if digest is not None else {})}
    written = None
    if hit is not None:
        try:
            written = save_statistics(tensors, hit, meta)
        except OSError as e:  # an unwritable cache costs only the recomputation
            log.warning("cannot write the statistics cache in %s (%s)", cached, e)
    if output is not None:
        return save_statistics(tensors, output, meta)
    if written is None:
        from ..errors import OutputError

        raise OutputError(f"the statistics cache {cached} cannot be written; give another folder (--statistics-cache DIR, cache_dir=) or output=")
    return written


def recipe_statistics(recipe: Any, evaluator_for: Callable[[int, Path], ModuleEvaluator], *, kind: str = "empirical", seed: int = 0,
                      cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool | None = None) -> Any:
    """The recipe with each ingredient's ``statistics:`` computed from its ``data:`` (entries that have statistics are kept).

    Args:
        recipe: a validated :class:`~modelsoup.recipe.Recipe` of a data-aware method (fisher, regmean).
        evaluator_for: ``(model index, data path) -> evaluator`` over that data (one per model: each model's own data).
    """
    import dataclasses

    from ..methods import get_method

    method = get_method(recipe.method)
    if method.statistic is None:
        return recipe
    models: list[Any] = list(recipe.models)
    for i in recipe.ingredients(method.base != "none" and recipe.base is not None):
        m = models[i]
        if m.statistics is not None or m.data_resolved is None:
            continue
        path = model_statistics(m, evaluator_for(i, m.data_resolved), method.statistic, kind=kind, seed=seed, cache_dir=cache_dir,
                                use_cache=use_cache, progress=progress)
        models[i] = dataclasses.replace(m, statistics=str(path), statistics_resolved=path)
    return dataclasses.replace(recipe, models=models)


def statistics_metadata(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The metadata of statistics files (statistic, kind, examples), for a run's record."""
    from safetensors import safe_open

    out = {}
    for p in paths:
        with safe_open(str(p), "pt") as f:
            out[str(p)] = dict(f.metadata() or {})
    return out

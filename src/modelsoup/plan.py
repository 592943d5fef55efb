"""Every decision about a merge, taken once, from metadata alone, before any tensor is read.

:func:`plan_merge` turns a validated recipe and the opened checkpoints into a :class:`MergePlan`: the
method, which listed models are its ingredients, the output's tensor names (key alignment: exact /
intersection / base), each tensor's rule (merge, take from the base or first model, copy an integer
buffer) with its parameters after overrides, gradients and conditionals, which names stay tied, the
output dtype of every tensor, and the output's form (one file or a folder, safetensors or torch).
Every shape or dtype mismatch is reported at once. The engine only runs a plan.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import EmptyMergeError, KeyMismatchError, RecipeError, TensorMismatchError, name_mismatch, short_list
from .io import Checkpoint
from .io.formats import is_file_output, is_torch_file, tensor_nbytes
from .methods import MergeMethod, get_method
from .recipe.schema import OutputOptions, Override, Recipe, Slice, is_number

log = logging.getLogger("modelsoup")

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Layer stacks: `model.layers.12.`, `encoder.layer.3.`, `transformer.h.5.`, `blocks.7.`; then any
# `.<n>.` as mergekit's architecture inference does (mergekit/architecture/auto.py, RE_LAYER_INDEX).
_LAYER_RES = (
    re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."),
    re.compile(r"\.(\d+)\."),
)


# ----------------------------------------------------------------------------------------------
# Per-tensor rules: settings are a scalar | gradient | conditional list (mergekit's grammar,
# mergekit/config.py evaluate_setting), resolved per tensor name and layer position


@dataclass(frozen=True)
class TensorRule:
    """What to do with one tensor.

    Attributes:
        take: None to merge; "base"/"first" to copy the tensor of the base/first model; "skip" to leave it out.
        params: every hyperparameter of the method for this tensor, defaults filled; per-model
            parameters are a tuple with one value per model of ``Recipe.models``.
        weights: one weight per model of ``Recipe.models``, or None when the recipe gives none.
    """

    take: str | None
    params: dict[str, Any]
    weights: tuple[float, ...] | None


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """Value of a setting for tensor ``name`` at layer position ``t`` in [0, 1]; None if no conditional matches.

    A list of numbers is interpolated piecewise-linearly (``t * (len - 1)`` picks the segment), a list of
    other scalars is indexed at ``int(t * (len - 1))``, a list of ``{filter, value}`` mappings picks the
    first entry whose filter is absent, ``"*"``, or a substring of ``name`` -- as mergekit does.
    """
    if isinstance(setting, list):
        if all(is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(not isinstance(e, (list, Mapping)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate_setting(cond["value"], name, t)
        return None
    return setting


def _first_value(name: str, t: float, default: Any, *settings: Any) -> Any:
    for s in settings:
        if s is None:
            continue
        v = evaluate_setting(s, name, t)
        if v is not None:
            return v
    return default


def layer_index(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer index) of a tensor inside a layer stack, or None (embeddings, heads, final norms)."""
    for rx in _LAYER_RES:
        m = rx.search(name)
        if m:
            return name[: m.start(1)], int(m.group(1))
    return None


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Position ``t`` of each tensor for gradients, as mergekit computes it for the whole-model form.

    Layer ``i`` of a stack of ``n`` layers gets ``i / (n - 1)`` (1 when ``n == 1``,
    mergekit/plan.py ``plan_slice``); tensors outside any layer stack get 0 (mergekit plans the
    pre- and post-layer weights with a ``ConfigReader(t=0)`` in ``plan_module``). ``n`` is counted
    per stack prefix from the names, so an encoder and a decoder stack each span [0, 1].
    """
    found = {n: layer_index(n) for n in names}
    counts: dict[str, int] = {}
    for hit in found.values():
        if hit is not None:
            counts[hit[0]] = max(counts.get(hit[0], 0), hit[1] + 1)
    out: dict[str, float] = {}
    for n, hit in found.items():
        if hit is None:
            out[n] = 0.0
        else:
            total = counts[hit[0]]
            out[n] = hit[1] / (total - 1) if total > 1 else 1.0
    return out


def resolve_rule(
    method: MergeMethod, name: str, t: float, overrides: Sequence[Override], entries: Sequence[tuple[Any, Mapping[str, Any]]],
    shared: Sequence[Mapping[str, Any]],
) -> TensorRule:
    """The rule of tensor ``name`` at layer position ``t``.

    A parameter's value is taken from, in order: the first override matching ``name``, the entry's own
    setting (per-model parameters; ``entries`` is one (weight setting, parameter settings) per model),
    each of the ``shared`` settings in turn (a slice's, then the recipe's), the method's default.
    """
    ov = next((o for o in overrides if o.matches(name)), None)
    ov_params = ov.parameters if ov is not None else {}
    params: dict[str, Any] = {}
    for p in method.params:
        common = [ov_params.get(p.name), *(sh.get(p.name) for sh in shared)]
        if p.per_model:
            params[p.name] = tuple(_first_value(name, t, p.default, common[0], own.get(p.name), *common[1:]) for _, own in entries)
        else:
            params[p.name] = _first_value(name, t, p.default, *common)
    weights: tuple[float, ...] | None = None
    if ov is not None and ov.weights is not None:
        weights = tuple(ov.weights)
    elif any(w is not None for w, _ in entries):
        weights = tuple(float(_first_value(name, t, 1.0, w)) for w, _ in entries)
    return TensorRule(take=ov.take if ov is not None else None, params=params, weights=weights)


def tensor_rules(recipe: Recipe, names: Sequence[str]) -> dict[str, TensorRule]:
    """Resolve overrides, conditionals and gradients into one rule per tensor name (see :func:`resolve_rule`).

    Args:
        recipe: a validated recipe.
        names: every tensor name of the merge, in order (layer counts for gradients come from them).

    Returns:
        name -> :class:`TensorRule`.
    """
    method = get_method(recipe.method)
    positions = layer_positions(names)
    entries = [(m.weight, m.parameters) for m in recipe.models]
    return {name: resolve_rule(method, name, positions[name], recipe.overrides, entries, [recipe.parameters]) for name in names}


# Tensors outside the layer stack that come before it (embeddings); the others (final norm, head) come after.
# mergekit reads these from each architecture's definition; a slices recipe takes the ones before the stack
# from its first slice's models and the ones after it from its last slice's.
_BEFORE_LAYERS = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|token_type_embeddings|patch_embed|pos_embed|cls_token")


@dataclass(frozen=True)
class LayerStack:
    """A model's layer stack as a slices recipe sees it: prefix, layer count, tensor names per layer and outside it."""

    prefix: str
    count: int
    layers: dict[int, list[str]]  # layer -> the name suffixes after ``prefix + str(layer)``
    outside: list[str]

    @classmethod
    def of(cls, ck: Checkpoint) -> LayerStack:
        """Read from a checkpoint's names.

        Raises:
            KeyMismatchError: not exactly one layer stack, layers missing from it, or layer numbers with leading zeros.
        """
        prefixes: dict[str, dict[int, list[str]]] = {}
        outside: list[str] = []
        for n in ck.names():
            hit = layer_index(n)
            if hit is None:
                outside.append(n)
                continue
            prefix, i = hit
            digits = n[len(prefix):].split(".", 1)[0]
            if digits != str(i):
                raise KeyMismatchError(f"{ck.label}: '{n}' numbers its layer '{digits}' (leading zeros); a `slices:` recipe renumbers layers "
                                       "and cannot keep that form")
            prefixes.setdefault(prefix, {}).setdefault(i, []).append(n[len(prefix) + len(digits):])
        if len(prefixes) != 1:
            found = ", ".join(sorted(prefixes)) or "none"
            raise KeyMismatchError(f"{ck.label}: a `slices:` recipe needs a model with one stack of numbered layers; found {found}. "
                                   "Merge whole models (`models:`) instead")
        ((prefix, layers),) = prefixes.items()
        gaps = sorted(set(range(max(layers) + 1)) - set(layers))
        if gaps:
            raise KeyMismatchError(f"{ck.label}: its layer stack '{prefix}' has no layer {', '.join(map(str, gaps[:5]))} (of 0 to {max(layers)}); "
                                   "a `slices:` recipe needs every layer")
        return cls(prefix, max(layers) + 1, layers, outside)


def plan_slices(recipe: Recipe, models: Sequence[Checkpoint], method: MergeMethod) -> tuple[list[TensorJob], list[tuple[int, int]]]:
    """The jobs of a ``slices:`` recipe, and the (model, layer) each output layer comes from.

    Output layer ``k`` is numbered in order over the slices; within a slice of ``n`` layers, offset ``i``
    merges layer ``start + i`` of each source at gradient position ``i / (n - 1)`` (1 when n == 1), as
    mergekit's ``plan_slice``. Tensors before the layer stack come from the first slice's sources, those
    after it from the last slice's, at position 0. A source that is the base model is the method's base.

    Raises:
        KeyMismatchError: a layer range beyond a model's layers, or a layer or tensor some source lacks.
        TensorMismatchError: shapes or dtypes that differ.
    """
    stacks = {s.model: LayerStack.of(models[s.model]) for sl in recipe.slices for s in sl.sources}
    present = {k: set(models[k].names()) for k in stacks}
    problems: list[str] = []
    for i, sl in enumerate(recipe.slices):
        for j, s in enumerate(sl.sources):
            st = stacks[s.model]
            if s.layers[1] > st.count:
                problems.append(f"slices[{i}].sources[{j}]: layers {list(s.layers)} but {models[s.model].label} has {st.count} layers (0 to {st.count - 1})")
    prefixes = {st.prefix for st in stacks.values()}
    first_ck = recipe.slices[0].sources[0].model
    for k, st in stacks.items():  # the tensors outside the stack come from the first and last slice: every model must have the same ones
        if sorted(st.outside) != sorted(stacks[first_ck].outside):
            mine, theirs = set(st.outside), set(stacks[first_ck].outside)
            problems.append(f"{models[k].label} and {models[first_ck].label} hold different tensors outside their layers (tied embeddings in one?): "
                            + name_mismatch(sorted(theirs - mine), sorted(mine - theirs)))
    if len(prefixes) > 1:
        problems.append(f"the models' layer stacks are named differently ({', '.join(sorted(prefixes))}); slices stack layers of one architecture")
    if problems:
        raise KeyMismatchError("the slices do not fit the models:\n  " + "\n  ".join(problems))
    uses_base = method.base != "none" and recipe.base is not None
    base_at = {k for k in stacks if uses_base and recipe.base is not None and recipe.models[k].same_as(recipe.base)}
    out_dtype = DTYPE_NAMES[recipe.dtype] if recipe.dtype else None
    jobs: list[TensorJob] = []
    layer_sources: list[tuple[int, int]] = []
    mismatch: list[str] = []

    def add(out_name: str, sl: Slice, in_names: Sequence[str], t: float) -> None:
        for s, n in zip(sl.sources, in_names):
            if n not in present[s.model]:
                mismatch.append(f"'{out_name}' needs '{n}', which {models[s.model].label} lacks")
                return
        ingredients = [(s, n) for s, n in zip(sl.sources, in_names) if s.model not in base_at]
        base_src = next(((s.model, n) for s, n in zip(sl.sources, in_names) if s.model in base_at), None)
        rule = resolve_rule(method, out_name, t, recipe.overrides, [(s.weight, s.parameters) for s, _ in ingredients], [sl.parameters, recipe.parameters])
        if rule.take == "skip":
            if layer_index(out_name) is not None:
                mismatch.append(f"'{out_name}': `take: skip` would leave a hole in a layer the config counts; skip whole slices instead")
            return
        if rule.take == "base" and base_src is None:
            mismatch.append(f"'{out_name}': `take: base` but no source of its slice is the base")
            return
        job = _job(out_name, rule.take, [(s.model, n) for s, n in ingredients], base_src, models, out_dtype, rule.params, rule.weights, None, problems,
                   method.keeps_identical(rule.params))
        if job is not None:
            jobs.append(job)

    first, last = recipe.slices[0], recipe.slices[-1]
    outside = stacks[first.sources[0].model].outside
    for n in (n for n in outside if _BEFORE_LAYERS.search(n)):
        add(n, first, [n] * len(first.sources), 0.0)
    (prefix,) = prefixes
    for sl in recipe.slices:
        ref = sl.sources[0]
        for i in range(sl.length):
            t = i / (sl.length - 1) if sl.length > 1 else 1.0
            k = len(layer_sources)
            suffixes = stacks[ref.model].layers[ref.layers[0] + i]
            aligned = True
            for s in sl.sources[1:]:
                theirs = stacks[s.model].layers.get(s.layers[0] + i, [])
                if sorted(theirs) != sorted(suffixes):
                    aligned = False
                    mismatch.append(f"layer {s.layers[0] + i} of {models[s.model].label} and layer {ref.layers[0] + i} of "
                                    f"{models[ref.model].label} hold different tensors: " + name_mismatch(
                                        [x for x in suffixes if x not in theirs], [x for x in theirs if x not in suffixes]))
            for suffix in suffixes if aligned else ():
                add(f"{prefix}{k}{suffix}", sl, [f"{prefix}{s.layers[0] + i}{suffix}" for s in sl.sources], t)
            layer_sources.append((ref.model, ref.layers[0] + i))
    for n in (n for n in stacks[last.sources[0].model].outside if not _BEFORE_LAYERS.search(n)):
        add(n, last, [n] * len(last.sources), 0.0)
    if mismatch:
        raise KeyMismatchError(f"{len(mismatch)} tensor(s) of the slices cannot be made:\n  " + "\n  ".join(mismatch[:50]))
    _raise_mismatches(problems)
    if out_dtype is None:  # layers of different models: the same tensor of each layer must come in one dtype
        kinds: dict[str, dict[torch.dtype, str]] = {}
        for job in jobs:
            hit = layer_index(job.name)
            if hit is not None and job.dtype.is_floating_point:
                kinds.setdefault(job.name[len(hit[0]) + len(str(hit[1])):], {}).setdefault(job.dtype, job.name)
        mixed = {k: v for k, v in kinds.items() if len(v) > 1}
        if mixed:
            k, v = next(iter(mixed.items()))
            raise TensorMismatchError(f"the slices stack layers of different dtypes ('{k}': " + ", ".join(f"{str(d).replace('torch.', '')} in {n}" for d, n in v.items())
                                      + "); set `dtype:` / --dtype to choose the output dtype")
    return jobs, layer_sources


# ----------------------------------------------------------------------------------------------
# Tensors of the output


# Where a job reads one input tensor: (index into MergePlan.inputs, tensor name in that checkpoint).
Source = tuple[int, str]


@dataclass(frozen=True)
class TensorJob:
    """One output tensor.

    Attributes:
        name: tensor name in the output.
        action: ``merge`` (run the method), ``base``/``first`` (copy from that model), ``nonfloat`` (copy
            an integer/bool tensor after checking that every model agrees).
        dtype: output dtype.
        shape: output shape.
        params: method hyperparameters for this tensor (per-model ones already narrowed to ingredients).
        weights: per-ingredient weights or None.
        alias_of: set when this name shares storage with an earlier one in the inputs (tied weights).
        sources: the method's input tensors, one per ingredient (for ``base``/``first``: the one tensor copied;
            for ``nonfloat``: the tensors that must agree, the first copied).
        base_source: the base tensor the method reads, or None.
        statistic_sources: for a data-aware method, each ingredient's statistic of this tensor (empty: it has none,
            and the method takes the weighted mean).
    """

    name: str
    action: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    alias_of: str | None = None
    sources: tuple[Source, ...] = ()
    base_source: Source | None = None
    statistic_sources: tuple[Source, ...] = ()

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def align_names(models: Sequence[Checkpoint], base: Checkpoint | None, keys: str, base_needed: bool) -> tuple[list[str], set[str]]:
    """Decide which tensor names the output has.

    Returns:
        (output names in reference order, names to take from the base because some model lacks them).

    Raises:
        KeyMismatchError: ``keys: exact`` and the names differ; lists missing and unexpected names per model.
    """
    everyone = list(models) + ([base] if base is not None and base_needed else [])
    ref = base if (base is not None and (base_needed or keys == "base")) else models[0]
    ref_names = ref.names()
    ref_set = set(ref_names)
    if keys == "exact":
        problems = []
        for ck in everyone:
            have = set(ck.names())
            missing = [n for n in ref_names if n not in have]
            extra = [n for n in ck.names() if n not in ref_set]
            if missing or extra:
                problems.append(f"  {ck.label}: " + name_mismatch(missing, extra))
        if problems:
            raise KeyMismatchError(
                f"tensor names do not line up across models (compared with {ref.label}):\n"
                + "\n".join(problems)
                + "\nFix: strip a wrapper prefix (strip_prefix / --strip-prefix), or set `keys: intersection` to merge "
                "only the shared tensors, or `keys: base` to take unmatched tensors from the base model."
            )
        return ref_names, set()
    shared = set.intersection(*(set(ck.names()) for ck in everyone))
    if keys == "intersection":
        dropped = sorted(set().union(*(set(ck.names()) for ck in everyone)) - shared)
        if dropped:
            log.warning("keys: intersection: leaving out %d tensor(s) not in every model: %s", len(dropped), short_list(dropped))
        return [n for n in ref_names if n in shared], set()
    assert base is not None  # keys: base without a base is refused by recipe validation
    from_base = {n for n in ref_names if n not in shared}
    dropped = sorted(set().union(*(set(ck.names()) for ck in models)) - ref_set)
    if from_base:
        log.warning("keys: base: %d tensor(s) missing from some model are taken from the base: %s", len(from_base), short_list(sorted(from_base)))
    if dropped:
        log.warning("keys: base: leaving out %d tensor(s) the base does not have: %s", len(dropped), short_list(dropped))
    return ref_names, from_base


def tied_names(names: Sequence[str], models: Sequence[Checkpoint], base: Checkpoint | None, rules: dict[str, Any]) -> dict[str, str]:
    """Names computed once and written under both (alias -> first name): tied in every input and ruled alike.

    A name tied in one model but not another, or given a different rule (an override, ``take:``), is
    computed on its own: sharing the result would give it the other name's numbers.
    """
    inputs = [*models, *([base] if base is not None else [])]
    if not inputs:
        return {}
    present = set(names)
    tied = {a: t for a, t in inputs[0].aliases().items() if a in present and t in present}
    for ck in inputs[1:]:
        theirs = ck.aliases()
        tied = {a: t for a, t in tied.items() if theirs.get(a) == t}
    return {a: t for a, t in tied.items() if rules[a] == rules[t]}


def _check_inputs(name: str, metas: Sequence[tuple[Checkpoint, torch.dtype, tuple[int, ...]]], out_dtype: torch.dtype | None) -> str | None:
    """Why the tensors ``metas`` (checkpoint, dtype, shape) cannot make output tensor ``name``, or None."""
    shapes = {m[2] for m in metas}
    dtypes = {m[1] for m in metas}
    floats = {d.is_floating_point for d in dtypes}
    if len(shapes) > 1:
        return f"'{name}' has different shapes: " + ", ".join(f"{ck.label}: {list(s)}" for ck, _, s in metas)
    if len(floats) > 1 or (len(dtypes) > 1 and not (floats == {True} and out_dtype is not None)):
        fix = "" if floats != {True} else " (set `dtype:` / --dtype to choose the output dtype)"
        return f"'{name}' has different dtypes: " + ", ".join(f"{ck.label}: {str(d).replace('torch.', '')}" for ck, d, _ in metas) + fix
    return None


def _one_tensor(sources: Sequence[Source], inputs: Sequence[Checkpoint]) -> bool:
    """Whether every source reads one stored tensor (the same file and entry, e.g. a tensor no adapter changes)."""
    ids = {inputs[i].identity(n) for i, n in sources}
    return len(ids) == 1 and None not in ids


def _job(
    name: str, take: str | None, sources: Sequence[Source], base_source: Source | None, inputs: Sequence[Checkpoint],
    out_dtype: torch.dtype | None, params: dict[str, Any], weights: tuple[float, ...] | None, alias_of: str | None, problems: list[str],
    keeps_identical: bool = False,
) -> TensorJob | None:
    """One job: its inputs checked (shapes, dtypes; problems appended), its action decided; None if it cannot be made."""
    copy = sources[:1] if take == "first" else ((base_source,) if take == "base" and base_source is not None else None)
    read = list(copy if copy is not None else ([*sources, base_source] if base_source is not None else sources))
    metas = [(inputs[i], *inputs[i].meta(n)) for i, n in read]
    problem = _check_inputs(name, metas, out_dtype)
    if problem:
        problems.append(problem)
        return None
    in_dtype, shape = metas[0][1], metas[0][2]
    floating = in_dtype.is_floating_point
    if copy is not None:
        action, sources, base_source = take or "first", tuple(copy), None
    elif floating and base_source is None and keeps_identical and (weights is None or sum(weights) != 0) and _one_tensor(sources, inputs):
        action, sources = "first", tuple(sources[:1])  # the mean of copies of one tensor is that tensor
    elif not floating:  # integer buffers are copied from the base (else the first model) after checking they agree
        action, sources, base_source = "nonfloat", tuple(([base_source] if base_source is not None else []) + list(sources)), None
    else:
        action = "merge"
    return TensorJob(name=name, action=action, dtype=(out_dtype or in_dtype) if floating else in_dtype, shape=shape, params=params,
                     weights=weights, alias_of=alias_of, sources=tuple(sources), base_source=base_source)


def build_jobs(
    names: Sequence[str],
    from_base: set[str],
    models: Sequence[Checkpoint],
    ingredients: Sequence[int],
    base: Checkpoint | None,
    method: MergeMethod,
    rules: dict[str, Any],
    dtype: str | None,
) -> list[TensorJob]:
    """Turn aligned names and recipe rules into jobs, checking shapes and dtypes of every tensor.

    Inputs are indexed as in :attr:`MergePlan.inputs`: the models, then the base.

    Raises:
        TensorMismatchError: every tensor whose shape or dtype differs across models, with each model's.
    """
    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    inputs = plan_inputs(models, base)
    base_index = len(models) if base is not None else None
    problems: list[str] = []
    jobs: list[TensorJob] = []
    aliases = tied_names(names, models, base, rules)
    per_model = {p.name for p in method.params if p.per_model}
    for name in names:
        rule = rules[name]
        if rule.take == "skip":
            continue
        take = "base" if name in from_base else rule.take
        reads_base = base_index is not None and (method.base != "none" or take == "base")
        params = {k: (tuple(v[i] for i in ingredients) if k in per_model and isinstance(v, (tuple, list)) else v) for k, v in rule.params.items()}
        weights = tuple(rule.weights[i] for i in ingredients) if rule.weights is not None else None
        sources = [(i, name) for i in ingredients] if take != "first" else [(0, name)]
        job = _job(name, take, sources, (base_index, name) if reads_base else None, inputs, out_dtype, params, weights, aliases.get(name), problems,
                   method.keeps_identical(params))
        if job is not None:
            jobs.append(job)
    _raise_mismatches(problems)
    return jobs


def plan_inputs(models: Sequence[Checkpoint], base: Checkpoint | None) -> list[Checkpoint]:
    """The checkpoints jobs read, as :attr:`TensorJob.sources` index them: the models, then the base."""
    return [*models, *([base] if base is not None else [])]


def _raise_mismatches(problems: Sequence[str]) -> None:
    if problems:
        raise TensorMismatchError(f"{len(problems)} tensor(s) cannot be merged:\n  " + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class OutputPlan:
    """The form of the output, decided from its name and the recipe's output options.

    Attributes:
        path: the output file or folder.
        as_file: a single weights file (its name ends in a weights suffix), else a folder.
        torch_format: a torch pickle (``.pt``/``.pth.tar``..., or ``format: torch`` for a folder), else safetensors.
        options: the recipe's output options (shard size, copied files, model card).
    """

    path: Path
    as_file: bool
    torch_format: bool
    options: OutputOptions

    @classmethod
    def for_path(cls, path: str | Path, options: OutputOptions) -> OutputPlan:
        out = Path(path)
        as_file = is_file_output(out)
        return cls(out, as_file, is_torch_file(out) or (not as_file and options.format == "torch"), options)


@dataclass
class MergePlan:
    """Everything needed to compute and write each output tensor of one merge.

    Attributes:
        recipe: the validated recipe planned.
        models: the listed models (ingredients and possibly the base again).
        base: the base model, if any.
        method: the merge method.
        ingredients: indices into ``models`` of the method's inputs.
        jobs: the planned output tensors.
        output: the output's form, when planned for writing.
        notes: what was detected or decided (logged once).
        layer_sources: for a ``slices:`` recipe, the (model index, layer) each output layer comes from (its
            config follows them); empty for whole models.
    """

    recipe: Recipe
    models: list[Checkpoint]
    base: Checkpoint | None
    method: MergeMethod
    ingredients: list[int]
    jobs: list[TensorJob]
    output: OutputPlan | None = None
    notes: list[str] = field(default_factory=list)
    layer_sources: list[tuple[int, int]] = field(default_factory=list)
    statistics: list[Checkpoint] = field(default_factory=list)

    @property
    def inputs(self) -> list[Checkpoint]:
        """The checkpoints jobs read, as :attr:`TensorJob.sources` index them (:func:`plan_inputs`), then the
        models' statistics (:attr:`TensorJob.statistic_sources`)."""
        return [*plan_inputs(self.models, self.base), *self.statistics]

    @property
    def uses_base(self) -> bool:
        """Whether the method reads the base (a base given to a method that takes none is only for `take: base`)."""
        return self.base is not None and self.method.base != "none"

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def allow_nonfinite(self) -> bool:
        return self.recipe.allow_nonfinite

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def attach_statistics(jobs: list[TensorJob], method: MergeMethod, statistics: Sequence[Checkpoint], first: int, known: set[str]) -> list[TensorJob]:
    """The merge jobs with each ingredient's statistic of their tensor (``statistics[i]`` is ingredient i's, indexed
    from ``first`` among the plan's inputs), after checking each has the shape ``method.statistic`` needs.

    Raises:
        TensorMismatchError: a statistic some models have for a tensor and others lack, or one of the wrong shape or dtype.
    """
    problems: list[str] = []
    out = []
    names_of = [set(ck.names()) for ck in statistics]
    merged = {job.name for job in jobs if job.action == "merge"}
    for ck, held in zip(statistics, names_of):  # a file of another model (or another prefix) would quietly give the plain mean
        foreign = sorted(held - known)
        if foreign or not held & merged:
            why = (f"holds {len(foreign)} tensor(s) the merge does not have ({short_list(foreign)})" if foreign else
                   "has no statistic of any tensor the merge computes")
            problems.append(f"{ck.label} {why}: these are not this model's statistics (computed for another model, or names with another "
                            "prefix?); compute them for this checkpoint as it is merged")
    if problems:
        _raise_mismatches(problems)
    for job in jobs:
        if job.action != "merge":
            out.append(job)
            continue
        have = [job.name in held for held in names_of]
        if not any(have):
            out.append(job)
            continue
        if not all(have):
            lacking = [statistics[k].label for k, h in enumerate(have) if not h]
            problems.append(f"{job.name}: {', '.join(lacking)} lack{'s' if len(lacking) == 1 else ''} it while the others have it; compute every model's "
                            "statistics the same way (same kind, same module)")
            continue
        want = job.shape if method.statistic == "fisher" else ((job.shape[1], job.shape[1]) if len(job.shape) == 2 else None)
        bad = []
        for ck in statistics:
            dtype, shape = ck.meta(job.name)[:2]
            if want is None or tuple(shape) != tuple(want) or not dtype.is_floating_point:
                bad.append(f"{ck.label} {list(shape)} {str(dtype).replace('torch.', '')}")
        if bad:
            expect = (f"a float tensor of shape {list(want)}" if want is not None else "none: only 2-D (out, in) weights have a Gram matrix")
            problems.append(f"{job.name} {list(job.shape)}: its {method.statistic} statistic in {'; '.join(bad)}; expected {expect}")
            continue
        out.append(replace(job, statistic_sources=tuple((first + k, job.name) for k in range(len(statistics)))))
    _raise_mismatches(problems)
    with_stats = {j.name for j in out if j.statistic_sources}
    unused = [f"{j.name} (as {j.alias_of})" for j in out if j.alias_of is not None and j.name in with_stats and j.alias_of not in with_stats]
    if unused:  # one tensor under two names is merged once, under its first name, which has no statistic here
        log.warning("%s: stored as one tensor with a name that has no %s statistic, so merged as that name is (the weighted mean), "
                    "keeping the tie", ", ".join(unused), method.statistic)
    return out


def plan_merge(recipe: Recipe, models: list[Checkpoint], base: Checkpoint | None, output: OutputPlan | None = None,
               statistics: Sequence[Checkpoint] | None = None) -> MergePlan:
    """Plan a merge from a validated recipe and its opened checkpoints (metadata only, no tensor read).

    Args:
        recipe: validated (the model count was checked there, with the recipe's line).
        models: one opened checkpoint per ``recipe.models``, in order.
        base: the opened ``recipe.base``, or None.
        output: the output's form (:meth:`OutputPlan.for_path`), if it will be written.
        statistics: for a data-aware method (fisher, regmean), each ingredient's opened statistics, in ingredient order.

    Raises:
        KeyMismatchError, TensorMismatchError: the inputs cannot be merged as asked.
        RecipeError: a data-aware method without one statistics file per ingredient.
        EmptyMergeError: the output would hold no tensors.
    """
    method = get_method(recipe.method)
    uses_base = method.base != "none" and base is not None
    ingredients = recipe.ingredients(uses_base)
    layer_sources: list[tuple[int, int]] = []
    if recipe.slices:
        names: list[str] = []
        jobs, layer_sources = plan_slices(recipe, models, method)
    else:
        if len(ingredients) < len(models):
            log.info("the base model is also listed among the models; it is not an ingredient of '%s' (as in mergekit)", method.name)
        names, from_base = align_names(models, base, recipe.keys, uses_base)
        rules = tensor_rules(recipe, names)
        jobs = build_jobs(names, from_base, models, ingredients, base, method, rules, recipe.dtype)
    stats = list(statistics or [])
    if method.statistic is not None:
        if len(stats) != len(ingredients):
            raise RecipeError(f"method '{method.name}' merges by each model's {method.statistic} statistics, and {len(stats)} of "
                              f"{len(ingredients)} models have them: compute them from each model's data first (`data:` in the recipe, "
                              "--data MODEL=FILE, or modelsoup.model_statistics)")
        jobs = attach_statistics(jobs, method, stats, len(plan_inputs(models, base)), {n for ck in models for n in ck.names()})
    elif stats:
        raise RecipeError(f"method '{method.name}' uses no statistics, but {len(stats)} statistics file(s) were given")
    if not jobs:
        why = ("the models hold no tensors" if not any(ck.names() for ck in models) else
               "no tensor name is shared by every model (keys: intersection)" if recipe.keys == "intersection" and not names else
               "every tensor is left out (take: skip)")
        raise EmptyMergeError(f"the merge would write a model with no tensors: {why}. Check that the inputs are models of one "
                              "architecture (a wrapper prefix to strip? --strip-prefix), and the recipe's overrides")
    for w in recipe.warnings:
        log.warning(w)
    notes = [f"warning: {w}" for w in recipe.warnings] + list(recipe.notes)
    notes += [f"{ck.label}: {n}" for ck in [*models, *([base] if base else [])] for n in ck.notes]
    for n in notes[len(recipe.warnings):]:
        log.info(n)
    return MergePlan(recipe, models, base, method, ingredients, jobs, output, notes, layer_sources, stats)

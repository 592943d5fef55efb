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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import EmptyMergeError, KeyMismatchError, TensorMismatchError, name_mismatch, short_list
from .io import Checkpoint
from .io.formats import is_file_output, is_torch_file, tensor_nbytes
from .methods import MergeMethod, get_method
from .recipe.schema import OutputOptions, Recipe, is_number

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


def tensor_rules(recipe: Recipe, names: Sequence[str]) -> dict[str, TensorRule]:
    """Resolve overrides, conditionals and gradients into one rule per tensor name.

    The value of a parameter for one tensor is taken from, in order: the first matching override,
    the model entry (per-model parameters), the top-level ``parameters``, the method's default.

    Args:
        recipe: a validated recipe.
        names: every tensor name of the merge, in order (layer counts for gradients come from them).

    Returns:
        name -> :class:`TensorRule`.
    """
    method = get_method(recipe.method)
    positions = layer_positions(names)
    rules: dict[str, TensorRule] = {}
    for name in names:
        t = positions[name]
        ov = next((o for o in recipe.overrides if o.matches(name)), None)
        ov_params = ov.parameters if ov is not None else {}
        params: dict[str, Any] = {}
        for p in method.params:
            if p.per_model:
                params[p.name] = tuple(
                    _first_value(name, t, p.default, ov_params.get(p.name), m.parameters.get(p.name), recipe.parameters.get(p.name))
                    for m in recipe.models
                )
            else:
                params[p.name] = _first_value(name, t, p.default, ov_params.get(p.name), recipe.parameters.get(p.name))
        weights: tuple[float, ...] | None = None
        if ov is not None and ov.weights is not None:
            weights = tuple(ov.weights)
        elif any(m.weight is not None for m in recipe.models):
            weights = tuple(float(_first_value(name, t, 1.0, m.weight)) for m in recipe.models)
        rules[name] = TensorRule(take=ov.take if ov is not None else None, params=params, weights=weights)
    return rules

# ----------------------------------------------------------------------------------------------
# Tensors of the output


@dataclass(frozen=True)
class TensorJob:
    """One output tensor.

    Attributes:
        name: tensor name.
        action: ``merge`` (run the method), ``base``/``first`` (copy from that model), ``nonfloat`` (copy
            an integer/bool tensor after checking that every model agrees).
        dtype: output dtype.
        shape: output shape.
        params: method hyperparameters for this tensor (per-model ones already narrowed to ingredients).
        weights: per-ingredient weights or None.
        alias_of: set when this name shares storage with an earlier one in the inputs (tied weights).
    """

    name: str
    action: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    alias_of: str | None = None

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

    Raises:
        TensorMismatchError: every tensor whose shape or dtype differs across models, with each model's.
    """
    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    problems: list[str] = []
    jobs: list[TensorJob] = []
    aliases = tied_names(names, models, base, rules)
    per_model = {p.name for p in method.params if p.per_model}
    for name in names:
        rule = rules[name]
        if rule.take == "skip":
            continue
        srcs = [models[i] for i in ingredients] if name not in from_base else []
        if base is not None and (method.base != "none" or rule.take == "base" or name in from_base):
            srcs = srcs + [base]
        if rule.take == "first":
            srcs = [models[0]]
        metas = [(ck, *ck.meta(name)) for ck in srcs]
        shapes = {m[2] for m in metas}
        dtypes = {m[1] for m in metas}
        floats = {d.is_floating_point for d in dtypes}
        if len(shapes) > 1:
            problems.append(f"'{name}' has different shapes: " + ", ".join(f"{ck.label}: {list(s)}" for ck, _, s in metas))
            continue
        if len(floats) > 1 or (len(dtypes) > 1 and not (floats == {True} and out_dtype is not None)):
            fix = "" if floats != {True} else " (set `dtype:` / --dtype to choose the output dtype)"
            problems.append(f"'{name}' has different dtypes: " + ", ".join(f"{ck.label}: {str(d).replace('torch.', '')}" for ck, d, _ in metas) + fix)
            continue
        (shape,) = shapes
        in_dtype = metas[0][1]
        floating = in_dtype.is_floating_point
        if name in from_base or rule.take == "base":
            action = "base"
        elif rule.take == "first":
            action = "first"
        elif not floating:
            action = "nonfloat"
        else:
            action = "merge"
        params = {k: (tuple(v[i] for i in ingredients) if k in per_model and isinstance(v, (tuple, list)) else v) for k, v in rule.params.items()}
        weights = tuple(rule.weights[i] for i in ingredients) if rule.weights is not None else None
        jobs.append(
            TensorJob(
                name=name,
                action=action,
                dtype=(out_dtype or in_dtype) if floating else in_dtype,
                shape=shape,
                params=params,
                weights=weights,
                alias_of=aliases.get(name),
            )
        )
    if problems:
        raise TensorMismatchError(f"{len(problems)} tensor(s) cannot be merged:\n  " + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
    return jobs


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
    """

    recipe: Recipe
    models: list[Checkpoint]
    base: Checkpoint | None
    method: MergeMethod
    ingredients: list[int]
    jobs: list[TensorJob]
    output: OutputPlan | None = None
    notes: list[str] = field(default_factory=list)

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


def plan_merge(recipe: Recipe, models: list[Checkpoint], base: Checkpoint | None, output: OutputPlan | None = None) -> MergePlan:
    """Plan a merge from a validated recipe and its opened checkpoints (metadata only, no tensor read).

    Args:
        recipe: validated (the model count was checked there, with the recipe's line).
        models: one opened checkpoint per ``recipe.models``, in order.
        base: the opened ``recipe.base``, or None.
        output: the output's form (:meth:`OutputPlan.for_path`), if it will be written.

    Raises:
        KeyMismatchError, TensorMismatchError: the inputs cannot be merged as asked.
        EmptyMergeError: the output would hold no tensors.
    """
    method = get_method(recipe.method)
    uses_base = method.base != "none" and base is not None
    ingredients = recipe.ingredients(uses_base)
    if len(ingredients) < len(models):
        log.info("the base model is also listed among the models; it is not an ingredient of '%s' (as in mergekit)", method.name)
    names, from_base = align_names(models, base, recipe.keys, uses_base)
    rules = tensor_rules(recipe, names)
    jobs = build_jobs(names, from_base, models, ingredients, base, method, rules, recipe.dtype)
    if not jobs:
        why = ("the models hold no tensors" if not any(ck.names() for ck in models) else
               "no tensor name is shared by every model (keys: intersection)" if recipe.keys == "intersection" and not names else
               "every tensor is left out (take: skip)")
        raise EmptyMergeError(f"the merge would write a model with no tensors: {why}. Check that the inputs are models of one "
                              "architecture (a wrapper prefix to strip? --strip-prefix), and the recipe's overrides")
    notes = list(recipe.notes) + [f"{ck.label}: {n}" for ck in [*models, *([base] if base else [])] for n in ck.notes]
    for n in notes:
        log.info(n)
    return MergePlan(recipe, models, base, method, ingredients, jobs, output, notes)

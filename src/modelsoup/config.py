"""The recipe file schema: parsed and validated as a whole, every problem reported at once, before a tensor is read.

A native recipe (YAML)::

    method: ties
    base: ckpts/base                 # a path, or a mapping like a model entry
    models:
      - ckpts/ft-a                   # shorthand for {path: ckpts/ft-a}
      - path: ckpts/ft-b
        weight: 0.7
        parameters: {density: 0.5}   # per-model values, only for per-model parameters
        key: state_dict              # which entry of a nested torch pickle holds the weights
        strip_prefix: "module."
    parameters: {density: 0.3, scale: 1.0}
    dtype: bfloat16                  # float32 | float16 | bfloat16; absent = keep each tensor's dtype
    keys: exact                      # exact | intersection | base
    seed: 0
    allow_nonfinite: false
    overrides:                       # first matching rule wins
      - match: "*attention*"         # fnmatch glob on the tensor name, or "re:<regex>" (re.search)
        parameters: {t: 0.3}
      - match: "classifier.*"
        take: base                   # base | first | skip
      - match: "*.bias"
        weights: [1, 0]              # one weight per model for these tensors
    output: {shard_size: 5GB, format: safetensors, copy_files: true, model_card: true}

A file with a top-level ``merge_method`` key is a mergekit recipe and is translated by
:mod:`modelsoup.mergekit` into the same :class:`Recipe`.

Parameter values (global, per model, in an override) and model weights follow mergekit's grammar:
a scalar; a *gradient*, a list of numbers interpolated piecewise-linearly over the layer index
(position ``t = i / (n_layers - 1)`` of layer ``i``; tensors outside the layer stack get ``t = 0``);
or a *conditional* list ``[{filter: self_attn, value: 0.3}, {value: 0.5}]`` whose first entry with
``filter`` a substring of the tensor name (or no filter, or ``"*"``) gives the value.
The value of a parameter for one tensor is taken from, in order: the first matching override, the
model entry (per-model parameters), the top-level ``parameters``, the method's default.

Line numbers: the YAML is composed into nodes and each mapping key and sequence item records its
line, keyed by its path (``("models", 1, "weight")``); a problem found at a path (a pydantic error
``loc`` or a check of ours) is reported at the line of its longest recorded prefix.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import MethodError, RecipeError
from .methods import available_methods, get_method
from .methods.ops import weight_sum_problem
from .methods.registry import MergeMethod

PathKey = tuple[Any, ...]

DTYPES = ("float32", "float16", "bfloat16")
KEY_MODES = ("exact", "intersection", "base")
TAKE_CHOICES = ("base", "first", "skip")
OUTPUT_FORMATS = ("safetensors", "torch")
DEFAULT_SHARD_SIZE = 5 * 10**9

# Methods whose ingredients carry no weight: giving one is a mistake worth reporting.
METHODS_WITHOUT_WEIGHTS = frozenset({"slerp", "model_stock", "ema"})
# Methods that divide by the plain sum of the weights when `normalize` is true (TIES-style methods
# divide by the weights that agree with the elected sign, per element, so a zero total is not fatal).
METHODS_DIVIDING_BY_WEIGHT_SUM = frozenset({"linear", "task_arithmetic", "dare_linear", "breadcrumbs"})

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# Layer stacks: `model.layers.12.`, `encoder.layer.3.`, `transformer.h.5.`, `blocks.7.`; then any
# `.<n>.` as mergekit's architecture inference does (mergekit/architecture/auto.py, RE_LAYER_INDEX).
_LAYER_RES = (
    re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."),
    re.compile(r"\.(\d+)\."),
)


# ----------------------------------------------------------------------------------------------
# Resolved recipe


@dataclass(frozen=True)
class ModelRef:
    """One checkpoint of a recipe.

    Attributes:
        path: the path as written (None for an in-memory ``source``).
        resolved: ``path`` with ``~`` expanded, relative paths resolved against the working directory.
        weight: a number, a gradient or a conditional (see module doc); None = not given. Use
            :meth:`Recipe.rules` for the per-tensor value.
        parameters: per-model parameter settings, canonical names.
        key: entry of a nested torch pickle that holds the weights.
        strip_prefix: tensor-name prefix to remove.
        source: an in-memory object (state dict, module) given through the Python API.
    """

    path: str | None = None
    resolved: Path | None = None
    weight: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    strip_prefix: str | None = None
    source: Any = None

    def label(self) -> str:
        return self.path if self.path is not None else f"<in-memory {type(self.source).__name__}>"


@dataclass(frozen=True)
class Override:
    """A per-tensor rule; the first override whose ``match`` fits a tensor name applies to it."""

    match: str
    parameters: dict[str, Any] = field(default_factory=dict)
    take: str | None = None
    weights: tuple[float, ...] | None = None

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.search(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class OutputOptions:
    """How the merged checkpoint is written."""

    shard_size: int = DEFAULT_SHARD_SIZE
    format: str = "safetensors"
    copy_files: bool = True
    model_card: bool = True


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


@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe. Build it with :func:`load_recipe` or :func:`recipe_from_dict`."""

    method: str
    models: list[ModelRef]
    base: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    keys: str = "exact"
    seed: int = 0
    allow_nonfinite: bool = False
    overrides: list[Override] = field(default_factory=list)
    output: OutputOptions = field(default_factory=OutputOptions)
    source_format: Literal["native", "mergekit"] = "native"
    source: str | None = None
    notes: tuple[str, ...] = ()

    def rules(self, names: Sequence[str]) -> dict[str, TensorRule]:
        """Resolve overrides, conditionals and gradients into one rule per tensor name.

        Args:
            names: every tensor name of the merge, in order (layer counts for gradients come from them).

        Returns:
            name -> :class:`TensorRule`.
        """
        method = get_method(self.method)
        positions = layer_positions(names)
        rules: dict[str, TensorRule] = {}
        for name in names:
            t = positions[name]
            ov = next((o for o in self.overrides if o.matches(name)), None)
            ov_params = ov.parameters if ov is not None else {}
            params: dict[str, Any] = {}
            for p in method.params:
                if p.per_model:
                    params[p.name] = tuple(
                        _first_value(name, t, p.default, ov_params.get(p.name), m.parameters.get(p.name), self.parameters.get(p.name))
                        for m in self.models
                    )
                else:
                    params[p.name] = _first_value(name, t, p.default, ov_params.get(p.name), self.parameters.get(p.name))
            weights: tuple[float, ...] | None = None
            if ov is not None and ov.weights is not None:
                weights = tuple(ov.weights)
            elif any(m.weight is not None for m in self.models):
                weights = tuple(float(_first_value(name, t, 1.0, m.weight)) for m in self.models)
            rules[name] = TensorRule(take=ov.take if ov is not None else None, params=params, weights=weights)
        return rules

    def to_yaml(self, relative_to: Path | None = None) -> str:
        """The fully resolved recipe in native form (every parameter with its default filled in).

        It loads back with :func:`recipe_from_yaml_text` into an equal recipe. Models given as in-memory
        objects are written as ``<in-memory ...>`` placeholders, which do not load back.

        Args:
            relative_to: write model paths relative to this folder (where the recipe file will live,
                since a recipe file's relative paths are taken from its folder); None = as given.
        """
        def where(m: ModelRef) -> str:
            if relative_to is None or m.resolved is None:
                return m.label()
            return os.path.relpath(os.path.abspath(m.resolved), os.path.abspath(relative_to))

        def ref(m: ModelRef, with_weight: bool) -> Any:
            entry: dict[str, Any] = {"path": where(m)}
            if with_weight and m.weight is not None:
                entry["weight"] = m.weight
            if m.parameters:
                entry["parameters"] = dict(m.parameters)
            if m.key is not None:
                entry["key"] = m.key
            if m.strip_prefix is not None:
                entry["strip_prefix"] = m.strip_prefix
            return entry["path"] if len(entry) == 1 else entry

        data: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            data["base"] = ref(self.base, with_weight=False)
        data["models"] = [ref(m, with_weight=True) for m in self.models]
        data["parameters"] = dict(self.parameters)
        data["dtype"] = self.dtype
        data["keys"] = self.keys
        data["seed"] = self.seed
        data["allow_nonfinite"] = self.allow_nonfinite
        overrides = []
        for o in self.overrides:
            entry: dict[str, Any] = {"match": o.match}
            if o.parameters:
                entry["parameters"] = dict(o.parameters)
            if o.take is not None:
                entry["take"] = o.take
            if o.weights is not None:
                entry["weights"] = list(o.weights)
            overrides.append(entry)
        data["overrides"] = overrides
        data["output"] = {
            "shard_size": self.output.shard_size,
            "format": self.output.format,
            "copy_files": self.output.copy_files,
            "model_card": self.output.model_card,
        }
        head = ""
        if self.source_format == "mergekit":
            head = f"# translated from the mergekit recipe {self.source or ''}".rstrip() + "\n"
        return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def describe(recipe: Recipe) -> str:
    """A short human summary of a recipe, for ``soup validate``."""
    method = get_method(recipe.method)
    lines = [f"method: {recipe.method}" + (" (from a mergekit recipe)" if recipe.source_format == "mergekit" else "")]
    lines.append(f"base: {recipe.base.label() if recipe.base is not None else '(none)'}")
    lines.append(f"models ({len(recipe.models)}):")
    for m in recipe.models:
        extra = "" if m.weight is None else f"  weight {_short(m.weight)}"
        if m.parameters:
            extra += "  " + ", ".join(f"{k}={_short(v)}" for k, v in m.parameters.items())
        lines.append(f"  - {m.label()}{extra}")
    params = ", ".join(f"{p.name}={_short(recipe.parameters.get(p.name, p.default))}" for p in method.params)
    lines.append(f"parameters: {params or '(none)'}")
    lines.append(f"dtype: {recipe.dtype or 'keep input dtypes'}; keys: {recipe.keys}; seed: {recipe.seed}")
    lines.append(f"overrides: {len(recipe.overrides)}")
    lines += [f"note: {n}" for n in recipe.notes]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
        return "[" + ", ".join(f"{c.get('filter', '*')}: {_short(c.get('value'))}" for c in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------------------------
# Settings: scalar | gradient | conditional list (mergekit's grammar, mergekit/config.py evaluate_setting)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """Value of a setting for tensor ``name`` at layer position ``t`` in [0, 1]; None if no conditional matches.

    A list of numbers is interpolated piecewise-linearly (``t * (len - 1)`` picks the segment), a list of
    other scalars is indexed at ``int(t * (len - 1))``, a list of ``{filter, value}`` mappings picks the
    first entry whose filter is absent, ``"*"``, or a substring of ``name`` -- as mergekit does.
    """
    if isinstance(setting, list):
        if all(_is_number(e) for e in setting):
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


# ----------------------------------------------------------------------------------------------
# Problems and line numbers


class Problems:
    """Collects problems, each placed at a path of the source file; raises them all at once.

    Args:
        source: file name shown in front of line numbers.
        lines: path -> 1-based line, from :func:`load_yaml`.
        remap: turns a path of the native schema into the path it came from (mergekit translation).
        labels: how a path is written, when its source path is not the plain dotted form.
    """

    def __init__(
        self,
        source: str | None = None,
        lines: Mapping[PathKey, int] | None = None,
        remap: Callable[[PathKey], PathKey] | None = None,
    ) -> None:
        self.source = source
        # not copied: load_yaml records lines into the same dict while it reports duplicate keys
        self.lines: Mapping[PathKey, int] = lines if lines is not None else {}
        self.remap = remap
        self.items: list[tuple[int, int, str]] = []

    def line(self, path: PathKey) -> int | None:
        for k in range(len(path), -1, -1):
            if path[:k] in self.lines:
                return self.lines[path[:k]]
        return None

    def add(self, path: PathKey, message: str, *, native: bool = True) -> None:
        """Record a problem at ``path`` (a native-schema path unless ``native`` is false)."""
        if native and self.remap is not None:
            path = self.remap(path)
        line = self.line(path)
        where = f"{self.source}:{line}" if (self.source and line) else (f"line {line}" if line else self.source)
        dotted = dotted_path(path)
        head = ": ".join(x for x in (where, dotted) if x)
        self.items.append((line or 0, len(self.items), f"{head}: {message}" if head else message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError([m for _, _, m in sorted(self.items)], self.source)


def dotted_path(path: PathKey) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# Bounds on what a recipe's YAML may expand to: a recipe is a few dozen lines, so these only stop
# hostile files (alias bombs, which expand exponentially; deep or recursive nesting).
MAX_RECIPE_BYTES = 10 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000

_OPEN_TOKENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_CLOSE_TOKENS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, plus YAML 1.2's floats without a dot (``1e-3``, which 1.1 reads as text).

    mergekit reads such a value as text and its schema turns it into a float, so the same recipe gives
    the same number here.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_error(source: str | None, line: int | None, message: str) -> RecipeError:
    where = f"{source}:{line}" if (source and line) else (f"line {line}" if line else source)
    return RecipeError([f"{where}: {message}" if where else message], source)


def _check_nesting(text: str, source: str | None) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH from the token stream (the scanner does not recurse)."""
    depth = 0
    for tok in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(tok, _OPEN_TOKENS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _yaml_error(source, tok.start_mark.line + 1, f"nesting is deeper than {MAX_YAML_DEPTH} levels; a recipe needs a few")
        elif isinstance(tok, _CLOSE_TOKENS):
            depth -= 1


def _check_expansion(root: yaml.Node, source: str | None) -> None:
    """Refuse a node graph that aliases make recursive, deeper than MAX_YAML_DEPTH or larger than MAX_YAML_NODES.

    Aliases share nodes, so the graph is small even when its expansion is huge (a "billion laughs"
    file); sizes and depths are computed once per node, iteratively (no recursion to exhaust).
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(n: yaml.Node) -> list[yaml.Node]:
        if isinstance(n, yaml.MappingNode):
            return [x for kv in n.value for x in kv]
        if isinstance(n, yaml.SequenceNode):
            return list(n.value)
        return []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            on_path.discard(key)
            if size[key] > MAX_YAML_NODES:
                raise _yaml_error(source, node.start_mark.line + 1, f"expands to more than {MAX_YAML_NODES} values through aliases (an alias bomb?); write the recipe out")
            if depth[key] > MAX_YAML_DEPTH:
                raise _yaml_error(source, node.start_mark.line + 1, f"nests deeper than {MAX_YAML_DEPTH} levels through aliases")
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for c in children(node):
            if id(c) in on_path:
                raise _yaml_error(source, c.start_mark.line + 1, "an alias refers to a value that contains it (a recursive alias); write the value out")
            if id(c) not in size:
                stack.append((c, False))


MAX_NUMBER_CHARS = 400
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _check_scalars(root: yaml.Node, source: str | None) -> None:
    """Refuse numbers written with more than MAX_NUMBER_CHARS characters (no value a recipe needs is that long)."""
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.ScalarNode):
            if n.tag in _NUMBER_TAGS and len(n.value) > MAX_NUMBER_CHARS:
                raise _yaml_error(source, n.start_mark.line + 1, f"a number of {len(n.value)} characters; no setting needs more than {MAX_NUMBER_CHARS}")
        elif isinstance(n, yaml.MappingNode):
            stack += [x for kv in n.value for x in kv]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


def load_yaml(text: str, source: str | None = None) -> tuple[Any, dict[PathKey, int]]:
    """Parse YAML, recording the line of every mapping key and sequence item.

    Nesting, alias expansion and size are bounded before anything is built (see MAX_YAML_*).

    Raises:
        RecipeError: a syntax error, a duplicated key, or a file past the bounds, with its line.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise _yaml_error(source, None, f"the recipe is {len(text)} characters; a recipe over {MAX_RECIPE_BYTES >> 20} MB is refused")
    loader = None
    try:
        loader = _RecipeLoader(text)
        _check_nesting(text, source)
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, source)
            _check_scalars(node, source)
        try:
            data = loader.construct_document(node) if node is not None else None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:  # PyYAML's own conversions
            raise _yaml_error(source, None, f"a value cannot be read ({type(e).__name__}: {str(e)[:100]}); check dates, numbers and !!tags") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise _yaml_error(source, mark.line + 1 if mark else None, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError([f"{source or 'recipe'}: YAML error: {e}"], source) from None
    except RecursionError:
        raise _yaml_error(source, None, "nesting is too deep to read") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[PathKey, int] = {}
    problems = Problems(source, lines)

    def walk(n: yaml.Node, path: PathKey) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else id(k)
                here = (*path, key)
                lines[here] = k.start_mark.line + 1
                if key in seen:
                    problems.add(here, "key given twice (the later one would silently win); keep one")
                seen.add(key)
                walk(v, here)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    problems.raise_if_any()
    return data, lines


# ----------------------------------------------------------------------------------------------
# File schema (types only; meaning is checked in _build)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)


class _ModelEntry(_Schema):
    path: str | None = None
    source: Any = None
    weight: Any = None
    parameters: dict[str, Any] = {}
    key: str | None = None
    strip_prefix: str | None = None


class _OverrideEntry(_Schema):
    match: str
    parameters: dict[str, Any] = {}
    take: Literal["base", "first", "skip"] | None = None
    weights: list[float] | None = None


class _OutputEntry(_Schema):
    shard_size: Any = DEFAULT_SHARD_SIZE
    format: Literal["safetensors", "torch"] = "safetensors"
    copy_files: bool = True
    model_card: bool = True


class _Top(_Schema):
    method: str | None = None
    models: list[Any] | None = None
    base: Any = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    keys: Literal["exact", "intersection", "base"] = "exact"
    seed: int = 0
    allow_nonfinite: bool = False
    overrides: list[Any] = []
    output: Any = None


_TOP_KEYS = tuple(_Top.model_fields)


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def _describe_value(v: Any) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def _pydantic_message(err: Mapping[str, Any], valid_keys: Sequence[str]) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        return f"unknown key '{key}'" + _suggest(key, valid_keys) + f" (valid keys: {', '.join(valid_keys)})"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number, got {_describe_value(got)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {_describe_value(got)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {_describe_value(got)}"
    if kind == "string_type":
        return f"must be a string, got {_describe_value(got)}"
    if kind == "dict_type":
        return f"must be a mapping, got {_describe_value(got)}"
    if kind == "list_type":
        return f"must be a list, got {_describe_value(got)}"
    if kind == "literal_error":
        return f"must be {err['ctx']['expected']}, got {_describe_value(got)}"
    return str(err["msg"])


def _suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _validate_part(schema: type[_Schema], raw: Any, path: PathKey, problems: Problems) -> Any:
    """Validate one part; on errors record them and retry without the offending keys (partial result)."""
    if not isinstance(raw, Mapping):
        problems.add(path, f"must be a mapping, got {_describe_value(raw)}")
        return None
    data = dict(raw)
    valid_keys = list(schema.model_fields)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        bad: set[Any] = set()
        for err in e.errors():
            loc = tuple(err["loc"])
            problems.add((*path, *loc), _pydantic_message(err, valid_keys))
            bad.add(loc[0])
        for k in bad:
            data.pop(k, None)
        try:
            return schema.model_validate(data)
        except ValidationError:
            return None  # a required key is missing; already reported


# ----------------------------------------------------------------------------------------------
# Building and validating


def _backtracks(pattern: str) -> bool:
    """Whether a regex repeats something that itself repeats or branches (catastrophic backtracking).

    Python's ``re`` has no time limit, so such a pattern (``(a+)+$``, ``(x|xy)*z``) can hang a merge on
    one long tensor name; tensor-name patterns never need it.
    """
    try:
        from re import _constants as c, _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT} | ({c.POSSESSIVE_REPEAT} if hasattr(c, "POSSESSIVE_REPEAT") else set())

    def parts(av: Any) -> list[Any]:
        if isinstance(av, parser.SubPattern):
            return list(av)
        if isinstance(av, (list, tuple)):
            return [x for a in av for x in parts(a)]
        return []

    def has(items: list[Any], risky: bool) -> bool:
        for op, av in items:
            if op in repeats:
                _, hi, sub = av
                many = hi is c.MAXREPEAT or hi > 1
                if risky and many:
                    return True
                if has(parts(sub), risky or many):
                    return True
            elif op is c.BRANCH and risky:
                return True
            elif has(parts(av), risky):
                return True
        return False

    return has(list(parser.parse(pattern)), False)


def _listify(value: Any) -> Any:
    """Tuples (natural in Python-API input) as lists, so that they validate like YAML sequences."""
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _listify(v) for k, v in value.items()}
    return value


def _resolve(path: str, root: Path | None = None) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken from ``root`` (the recipe's folder), else the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root if root is not None else Path.cwd()) / p


MAX_SIZE = 2**63 - 1


def parse_size(value: Any) -> int | None:
    """Bytes from an int or a string like ``500MB``, ``5GB`` (powers of 1000) or ``2GiB`` (powers of 1024).

    None when the value is not a size, not positive, or larger than 2**63 - 1 bytes.
    """
    if _is_number(value):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            return None
        n = int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        return None
    return n if 0 < n <= MAX_SIZE else None


def check_setting(value: Any, param_check: Callable[[Any], str | None]) -> str | None:
    """Check a setting (scalar, gradient or conditional list) with a scalar check; a problem or None."""
    if isinstance(value, Mapping):
        return "must be a value, a list of values (gradient) or a list of {filter, value} conditions, got a mapping"
    if isinstance(value, list):
        if not value:
            return "an empty list has no value; give a number or a non-empty gradient"
        if all(isinstance(e, Mapping) for e in value):
            for i, cond in enumerate(value):
                unknown = set(cond) - {"filter", "value"}
                if unknown:
                    return f"condition [{i}] has unknown key(s) {sorted(unknown)}; a condition is {{filter: <substring>, value: ...}}"
                if "value" not in cond:
                    return f"condition [{i}] needs a `value:`"
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    return f"condition [{i}]: filter must be a string, got {cond['filter']!r}"
                inner = cond["value"]
                if isinstance(inner, list) and any(isinstance(e, (list, Mapping)) for e in inner):
                    return f"condition [{i}]: value must be a scalar or a gradient"
                msg = check_setting(inner, param_check)
                if msg:
                    return f"condition [{i}]: {msg}"
            return None
        if any(isinstance(e, (list, Mapping)) for e in value):
            return "a gradient must be a flat list of values"
        for i, e in enumerate(value):
            msg = param_check(e)
            if msg:
                return f"gradient [{i}]: {msg}"
        return None
    return param_check(value)


def _check_weight(value: Any) -> str | None:
    if not _is_number(value):
        hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _looks_numeric(value) else ""
        return f"must be a number, got {_describe_value(value)}{hint}"
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        return f"must be a number in float range, got an integer of {value.bit_length()} bits"
    return None if finite else f"must be a finite number, got {value!r}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _param_names(method: MergeMethod) -> str:
    out = []
    for p in method.params:
        out.append(p.name + (f" (alias {', '.join(p.aliases)})" if p.aliases else "") + (" [per model]" if p.per_model else ""))
    return ", ".join(out) if out else "(none)"


def _check_params(
    given: Mapping[str, Any], method: MergeMethod | None, path: PathKey, problems: Problems, *, per_model: bool
) -> dict[str, Any]:
    """Validate parameter settings; returns them under canonical names."""
    out: dict[str, Any] = {}
    first_name: dict[str, str] = {}
    for key, value in given.items():
        if method is None:
            continue
        here = (*path, key)
        p = method.param(str(key))
        if p is None:
            names = [q.name for q in method.params] + [a for q in method.params for a in q.aliases]
            problems.add(here, f"unknown parameter '{key}' for method '{method.name}'{_suggest(str(key), names)}; valid: {_param_names(method)}")
            continue
        if per_model and not p.per_model:
            problems.add(here, f"'{key}' is not a per-model parameter of '{method.name}'; set it under the top-level `parameters:`")
            continue
        if p.name in first_name:
            problems.add(here, f"'{p.name}' is given twice (as '{first_name[p.name]}' and '{key}'); keep one")
            continue
        first_name[p.name] = str(key)
        msg = check_setting(value, p.check)
        if msg:
            problems.add(here, msg)
            continue
        out[p.name] = value
    return out


def _same_checkpoint(a: ModelRef, b: ModelRef) -> bool:
    if a.source is not None or b.source is not None:
        return a.source is b.source
    assert a.resolved is not None and b.resolved is not None
    return a.resolved.resolve() == b.resolved.resolve() and a.key == b.key and a.strip_prefix == b.strip_prefix


def _model_ref(raw: Any, path: PathKey, method: MergeMethod | None, problems: Problems, *, is_base: bool, root: Path | None = None) -> ModelRef | None:
    if isinstance(raw, (str, Path)):
        raw = {"path": str(raw)}
    elif isinstance(raw, Mapping):
        raw = dict(raw)
        if isinstance(raw.get("path"), Path):
            raw["path"] = str(raw["path"])
        for k in ("weight", "parameters"):
            if k in raw:
                raw[k] = _listify(raw[k])
    entry = _validate_part(_ModelEntry, raw, path, problems)
    if entry is None:
        return None
    ok = True
    if entry.path is None and entry.source is None:
        problems.add(path, "needs `path:` (a checkpoint file or folder)")
        ok = False
    if entry.path is not None and entry.source is not None:
        problems.add(path, "give either `path:` or an in-memory `source`, not both")
        ok = False
    resolved = None
    if entry.path is not None:
        try:
            resolved = _resolve(entry.path, root)
            found = resolved.exists()
        except (OSError, RuntimeError) as e:  # a name too long; ~user that does not exist
            problems.add((*path, "path"), f"'{entry.path}' cannot be looked up ({getattr(e, 'strerror', None) or e}); check the path")
            return None
        if not found:
            problems.add(
                (*path, "path"),
                f"'{entry.path}' does not exist (looked for {resolved}); modelsoup reads local files and folders only "
                "and cannot fetch Hugging Face hub ids: download the model first "
                "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and give that folder",
            )
    weight = entry.weight
    if weight is not None:
        if is_base:
            problems.add((*path, "weight"), "the base takes no weight; remove it (list the base under `models:` to make it an ingredient)")
        elif method is not None and method.name in METHODS_WITHOUT_WEIGHTS:
            problems.add((*path, "weight"), f"method '{method.name}' takes no weights; remove `weight:`")
        else:
            msg = check_setting(weight, _check_weight)
            if msg:
                problems.add((*path, "weight"), msg)
    params: dict[str, Any] = {}
    if entry.parameters:
        if is_base:
            problems.add((*path, "parameters"), "the base takes no per-model parameters; remove them")
        else:
            params = _check_params(entry.parameters, method, (*path, "parameters"), problems, per_model=True)
    if not ok:
        return None
    return ModelRef(
        path=entry.path, resolved=resolved, weight=weight, parameters=params,
        key=entry.key, strip_prefix=entry.strip_prefix, source=entry.source,
    )


def _normalizes_by_sum(method: MergeMethod, params: Mapping[str, Any]) -> bool:
    if method.name not in METHODS_DIVIDING_BY_WEIGHT_SUM:
        return False
    p = method.param("normalize")
    normalize = params.get("normalize", p.default if p else False)
    if method.name == "breadcrumbs" and params.get("sign_method", "none") != "none":
        return False
    return normalize is True


def _zero_sum_problem(weights: Sequence[Any], method: MergeMethod) -> str | None:
    if not weights or any(_check_weight(w) for w in weights):  # a bad weight is reported on its own
        return None
    problem = weight_sum_problem([float(w) for w in weights])
    if problem:
        return f"{problem}, but '{method.name}' divides by their sum (normalize: true); change the weights or set `normalize: false`"
    return None


def build_recipe(
    data: Any,
    *,
    source: str | None = None,
    lines: Mapping[PathKey, int] | None = None,
    problems: Problems | None = None,
    source_format: Literal["native", "mergekit"] = "native",
    notes: Sequence[str] = (),
    yaml_input: bool = False,
    check_count: bool = True,
    root: Path | None = None,
) -> Recipe:
    """Validate native-form recipe data as a whole and build a :class:`Recipe`.

    ``problems`` may already hold problems (the mergekit translator passes its own, with a path remap);
    ``check_count`` false skips the model-count check (the translator already reported why models are missing).
    ``root`` is the folder relative model paths are taken from (a recipe file's own folder); None = the
    working directory.

    Raises:
        RecipeError: every problem found, each with its place.
    """
    problems = problems if problems is not None else Problems(source, lines)
    if not isinstance(data, Mapping):
        problems.add((), f"a recipe must be a mapping with `method:` and `models:`, got {_describe_value(data)}")
        problems.raise_if_any()
    raw = {k: v for k, v in data.items() if not (v is None and k in ("parameters", "overrides", "output"))}
    for k in ("parameters", "overrides"):
        if k in raw:
            raw[k] = _listify(raw[k])
    top = _validate_part(_Top, raw, (), problems)
    if top is None:  # only when `raw` is not a mapping; handled above
        problems.raise_if_any()
    assert top is not None

    method: MergeMethod | None = None
    if top.method is None:
        if raw.get("method") is None:  # absent or null (a value of the wrong type is reported by the schema)
            problems.add(("method",), "is required; one of: " + ", ".join(m.name for m in available_methods()))
    else:
        try:
            method = get_method(top.method)
        except MethodError:
            valid = [m.name for m in available_methods()]
            problems.add(("method",), f"unknown merge method '{top.method}'{_suggest(top.method, valid)}; valid methods: {', '.join(valid)}")

    params = _check_params(top.parameters, method, ("parameters",), problems, per_model=False)
    if method is not None:
        params = {p.name: params.get(p.name, p.default) for p in method.params}

    base: ModelRef | None = None
    if yaml_input and isinstance(top.base, Mapping) and "source" in top.base:
        problems.add(("base", "source"), "`source` is only for in-memory objects given through the Python API; use `path:`")
    elif top.base is not None:
        base = _model_ref(top.base, ("base",), method, problems, is_base=True, root=root)

    models: list[ModelRef] = []
    models_ok = top.models is not None
    if top.models is None and raw.get("models") is None:
        problems.add(("models",), "is required: a list of checkpoint paths")
    for i, m in enumerate(top.models or []):
        if yaml_input and isinstance(m, Mapping) and "source" in m:
            problems.add(("models", i, "source"), "`source` is only for in-memory objects given through the Python API; use `path:`")
            models_ok = False
            continue
        ref = _model_ref(m, ("models", i), method, problems, is_base=False, root=root)
        if ref is None:
            models_ok = False
        else:
            models.append(ref)

    if method is not None and models_ok and check_count:
        uses_base = method.base != "none" and base is not None
        n = sum(1 for m in models if not (uses_base and base is not None and _same_checkpoint(m, base)))
        msg = method.count_problem(n, top.base is not None)
        if msg:
            problems.add(("models",), msg)
        if _normalizes_by_sum(method, params) and any(m.weight is not None for m in models):
            msg = _zero_sum_problem([1.0 if m.weight is None else m.weight for m in models], method)
            if msg:
                problems.add(("models",), msg)

    dtype = top.dtype
    if dtype is not None and dtype not in DTYPES:
        problems.add(("dtype",), f"unknown dtype '{dtype}'{_suggest(dtype, DTYPES)}; valid: {', '.join(DTYPES)} (or leave it out to keep each tensor's dtype)")
    if top.keys == "base" and top.base is None:
        problems.add(("keys",), "`keys: base` takes missing tensors from the base, but the recipe has no `base:`")
    if top.seed < 0 or top.seed >= 2**63:
        problems.add(("seed",), f"must be in [0, 2**63), got {top.seed}")

    overrides: list[Override] = []
    for i, raw_ov in enumerate(top.overrides):
        here: PathKey = ("overrides", i)
        ov = _validate_part(_OverrideEntry, raw_ov, here, problems)
        if ov is None:
            continue
        if ov.match.startswith("re:"):
            try:
                re.compile(ov.match[3:])
            except re.error as e:
                problems.add((*here, "match"), f"regular expression {ov.match[3:]!r} does not compile: {e}")
            else:
                if _backtracks(ov.match[3:]):
                    problems.add((*here, "match"), f"regular expression {ov.match[3:]!r} repeats a group that itself repeats or branches "
                                 "(like (a+)+), which can take exponential time on a long name; write it without the nested repeat, or use a glob")
        ov_params = _check_params(ov.parameters, method, (*here, "parameters"), problems, per_model=False)
        if ov.take == "base" and top.base is None:
            problems.add((*here, "take"), "`take: base` needs a `base:` model in the recipe")
        if ov.take is not None and (ov.parameters or ov.weights is not None):
            problems.add((*here, "take"), f"`take: {ov.take}` leaves the tensor unmerged, so `parameters`/`weights` have no effect; remove them")
        if ov.weights is not None:
            if method is not None and method.name in METHODS_WITHOUT_WEIGHTS:
                problems.add((*here, "weights"), f"method '{method.name}' takes no weights; remove `weights:`")
            elif models_ok and len(ov.weights) != len(models):
                problems.add((*here, "weights"), f"gives {len(ov.weights)} weight(s) but the recipe has {len(models)} model(s); give one per model, in order")
            elif method is not None and any(not math.isfinite(w) for w in ov.weights):
                problems.add((*here, "weights"), f"must be finite numbers, got {ov.weights}")
            elif method is not None and _normalizes_by_sum(method, {**params, **ov_params}):
                msg = _zero_sum_problem(ov.weights, method)
                if msg:
                    problems.add((*here, "weights"), msg)
        overrides.append(Override(match=ov.match, parameters=ov_params, take=ov.take, weights=tuple(ov.weights) if ov.weights is not None else None))

    output = OutputOptions()
    if top.output is not None:
        out = _validate_part(_OutputEntry, top.output, ("output",), problems)
        if out is not None:
            size = parse_size(out.shard_size)
            if size is None:
                problems.add(("output", "shard_size"), f"cannot read {_short_repr(out.shard_size)} as a size; give bytes (a positive integer up to 2**63 - 1) or e.g. '500MB', '5GB', '2GiB'")
                size = DEFAULT_SHARD_SIZE
            output = OutputOptions(shard_size=size, format=out.format, copy_files=out.copy_files, model_card=out.model_card)

    problems.raise_if_any()
    assert method is not None and top.method is not None
    return Recipe(
        method=method.name, models=models, base=base, parameters=params, dtype=dtype, keys=top.keys, seed=top.seed,
        allow_nonfinite=top.allow_nonfinite, overrides=overrides, output=output, source_format=source_format,
        source=source, notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# Public entry points


def _from_data(data: Any, source: str | None, lines: Mapping[PathKey, int], yaml_input: bool, root: Path | None = None) -> Recipe:
    if isinstance(data, Mapping) and "merge_method" in data:
        from .mergekit import recipe_from_mergekit

        # mergekit takes relative paths from the working directory; the same recipe means the same models here
        return recipe_from_mergekit(data, source=source, lines=lines)
    return build_recipe(data, source=source, lines=lines, yaml_input=yaml_input, root=root)


def recipe_from_yaml_text(text: str, source: str | None = None, root: Path | None = None) -> Recipe:
    """Parse and validate a recipe from YAML text (native or mergekit form).

    Args:
        text: the YAML.
        source: the file name shown in messages.
        root: the folder relative model paths of a native recipe are taken from (None = working directory).

    Raises:
        RecipeError: every problem, each with its line.
    """
    data, lines = load_yaml(text, source)
    return _from_data(data, source, lines, yaml_input=True, root=root)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; a top-level ``merge_method`` key marks the mergekit form.

    Relative model paths of a native recipe are taken from the recipe file's folder (so the
    ``recipe.yaml`` written next to an output re-runs from anywhere); a mergekit recipe's from the
    working directory, as mergekit takes them.

    Raises:
        RecipeError: the file cannot be read, is not UTF-8 text, or every problem of its content.
    """
    p = Path(path)
    try:
        if p.exists() and not p.is_file():
            raise RecipeError([f"{path}: is not a regular file (a FIFO or device?); give a recipe file"], str(path))
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: the recipe file is {p.stat().st_size} bytes; a recipe over {MAX_RECIPE_BYTES >> 20} MB is refused"], str(path))
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecipeError([f"{path}: cannot read the recipe file: {e.strerror or e}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise RecipeError([f"{path}: is not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8"], str(path)) from None
    return recipe_from_yaml_text(text, str(path), root=p.expanduser().absolute().parent)


def recipe_from_dict(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe given as a dict (same schema as the YAML; models may be ``{"source": obj}``).

    Raises:
        RecipeError: every problem found.
    """
    return _from_data(data, source, {}, yaml_input=False)


__all__ = [
    "ModelRef", "Override", "OutputOptions", "Problems", "Recipe", "TensorRule", "build_recipe", "check_setting",
    "describe", "evaluate_setting", "layer_index", "layer_positions", "load_recipe", "load_yaml", "parse_size",
    "recipe_from_dict", "recipe_from_yaml_text",
]

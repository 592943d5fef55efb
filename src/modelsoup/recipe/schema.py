"""The recipe, resolved: what a validated recipe file (or API call) says, and how it is written back as YAML.

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
    output: {shard_size: 5GB, format: safetensors, copy_files: true, copy_tokenizer: true, model_card: true}

A file with a top-level ``merge_method`` key is a mergekit recipe and is translated by
:mod:`modelsoup.recipe.mergekit` into the same :class:`Recipe`.

Parameter values (global, per model, in an override) and model weights follow mergekit's grammar:
a scalar; a *gradient*, a list of numbers interpolated piecewise-linearly over the layer index
(position ``t = i / (n_layers - 1)`` of layer ``i``; tensors outside the layer stack get ``t = 0``);
or a *conditional* list ``[{filter: self_attn, value: 0.3}, {value: 0.5}]`` whose first entry with
``filter`` a substring of the tensor name (or no filter, or ``"*"``) gives the value.
The value of a parameter for one tensor is taken from, in order: the first matching override, the
model entry (per-model parameters), the top-level ``parameters``, the method's default.

"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml

from ..methods import get_method

DTYPES = ("float32", "float16", "bfloat16")
KEY_MODES = ("exact", "intersection", "base")
TAKE_CHOICES = ("base", "first", "skip")
OUTPUT_FORMATS = ("safetensors", "torch")
DEFAULT_SHARD_SIZE = 5 * 10**9

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = 2**63 - 1


def is_number(x: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)



def parse_size(value: Any) -> int | None:
    """Bytes from an int or a string like ``500MB``, ``5GB`` (powers of 1000) or ``2GiB`` (powers of 1024).

    None when the value is not a size, not positive, or larger than 2**63 - 1 bytes.
    """
    if is_number(value):
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
        adapter: a PEFT LoRA adapter folder applied to the model at ``path`` (the ingredient is that
            model with the adapter merged in), as written; ``adapter_resolved`` resolved like ``path``.
        statistics: for a data-aware method (fisher, regmean): the model's per-tensor statistics, a safetensors file
            (as written; ``statistics_resolved`` resolved like ``path``) or, through the Python API, a mapping of tensors.
        data: the model's own data, from which its statistics are computed (as written; ``data_resolved`` resolved).
    """

    path: str | None = None
    resolved: Path | None = None
    weight: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    strip_prefix: str | None = None
    source: Any = None
    adapter: str | None = None
    adapter_resolved: Path | None = None
    statistics: Any = None
    statistics_resolved: Path | None = None
    data: str | None = None
    data_resolved: Path | None = None

    def label(self) -> str:
        model = self.path if self.path is not None else f"<in-memory {type(self.source).__name__}>"
        return f"{self.adapter} (on {model})" if self.adapter is not None else model

    def same_as(self, other: ModelRef) -> bool:
        """Whether both refer to the same checkpoint read the same way (one object, or one real path with the same key and prefix)."""
        if self.source is not None or other.source is not None:
            return self.source is other.source
        if self.resolved is None or other.resolved is None:
            return False
        if (self.adapter_resolved is None) != (other.adapter_resolved is None):
            return False
        if self.adapter_resolved is not None and other.adapter_resolved is not None and self.adapter_resolved.resolve() != other.adapter_resolved.resolve():
            return False
        return self.resolved.resolve() == other.resolved.resolve() and self.key == other.key and self.strip_prefix == other.strip_prefix


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
class SliceSource:
    """One model's layers in a slice: layers ``layers[0]`` to ``layers[1] - 1`` of ``Recipe.models[model]``.

    Attributes:
        model: index into :attr:`Recipe.models`.
        layers: [start, end) of its layer stack.
        weight: its weight setting in this slice (None = not given).
        parameters: its per-model parameter settings in this slice, canonical names.
    """

    model: int
    layers: tuple[int, int]
    weight: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Slice:
    """A run of output layers, each merged from the same-offset layer of every source (mergekit's output slice).

    Attributes:
        sources: the models and their layer ranges, all of one length.
        parameters: settings for this slice, over the recipe's ``parameters`` (canonical names).
    """

    sources: tuple[SliceSource, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class OutputOptions:
    """How the merged checkpoint is written."""

    shard_size: int = DEFAULT_SHARD_SIZE
    format: str = "safetensors"
    copy_files: bool = True
    model_card: bool = True
    copy_tokenizer: bool = True  # with copy_files: the tokenizer files too (mergekit's --copy-tokenizer)
    # mergekit's tokenizer_source / tokenizer.source: "base", "union", or a model folder (resolved); None = the base's (or
    # first model's) files, copied without a check. Given, every model must share that tokenizer's vocabulary (io/tokenizers.py).
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # jinja text, or "auto" (the models' most common template)


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
    warnings: tuple[str, ...] = ()  # parts of a foreign recipe that are ignored, as that tool ignores them
    slices: tuple[Slice, ...] = ()  # layer ranges stacked into the output; empty = whole models (``models`` are the ingredients)

    def ingredients(self, uses_base: bool) -> list[int]:
        """Indices of the models that are the method's ingredients.

        With a method that takes a base, a listed copy of the base is not an ingredient (as in
        mergekit); this is the one place that decides it.
        """
        if not uses_base or self.base is None:
            return list(range(len(self.models)))
        return [i for i, m in enumerate(self.models) if not m.same_as(self.base)]

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
                return m.path if m.path is not None else f"<in-memory {type(m.source).__name__}>"
            return os.path.relpath(os.path.abspath(m.resolved), os.path.abspath(relative_to))

        def ref(m: ModelRef, with_weight: bool) -> Any:
            entry: dict[str, Any] = {"path": where(m)}
            if m.adapter is not None:
                entry["adapter"] = (m.adapter if relative_to is None or m.adapter_resolved is None
                                    else os.path.relpath(os.path.abspath(m.adapter_resolved), os.path.abspath(relative_to)))
            if with_weight and m.weight is not None:
                entry["weight"] = m.weight
            if m.parameters:
                entry["parameters"] = dict(m.parameters)
            if m.key is not None:
                entry["key"] = m.key
            if m.strip_prefix is not None:
                entry["strip_prefix"] = m.strip_prefix
            for what in ("statistics", "data"):
                given, resolved = getattr(m, what), getattr(m, f"{what}_resolved")
                if given is not None:
                    entry[what] = (given if not isinstance(given, str) else given if relative_to is None or resolved is None
                                   else os.path.relpath(os.path.abspath(resolved), os.path.abspath(relative_to)))
                    if not isinstance(entry[what], str):
                        entry[what] = f"<in-memory {type(given).__name__}>"
            return entry["path"] if len(entry) == 1 else entry

        data: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            data["base"] = ref(self.base, with_weight=False)
        if self.slices:
            data["slices"] = []
            for sl in self.slices:
                sources = []
                for src in sl.sources:
                    entry = ref(self.models[src.model], with_weight=False)
                    entry = {"path": entry} if isinstance(entry, str) else entry
                    entry["layers"] = list(src.layers)
                    if src.weight is not None:
                        entry["weight"] = src.weight
                    if src.parameters:
                        entry["parameters"] = dict(src.parameters)
                    sources.append(entry)
                data["slices"].append({"sources": sources, **({"parameters": dict(sl.parameters)} if sl.parameters else {})})
        else:
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
            "copy_tokenizer": self.output.copy_tokenizer,
            **{k: getattr(self.output, k) for k in ("tokenizer_source", "pad_to_multiple_of", "chat_template") if getattr(self.output, k) is not None},
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
    if recipe.slices:
        lines.append(f"slices ({len(recipe.slices)}, {sum(sl.length for sl in recipe.slices)} output layers):")
    out_layer = 0
    for i, sl in enumerate(recipe.slices):
        parts = [f"{recipe.models[s.model].label()} [{s.layers[0]}, {s.layers[1]})" + ("" if s.weight is None else f" weight {_short(s.weight)}")
                 for s in sl.sources]
        lines.append(f"  {i}: layers {out_layer}-{out_layer + sl.length - 1} from " + " + ".join(parts))
        out_layer += sl.length
    params = ", ".join(f"{p.name}={_short(recipe.parameters.get(p.name, p.default))}" for p in method.params)
    lines.append(f"parameters: {params or '(none)'}")
    lines.append(f"dtype: {recipe.dtype or 'keep input dtypes'}; keys: {recipe.keys}; seed: {recipe.seed}")
    lines.append(f"overrides: {len(recipe.overrides)}")
    lines += [f"warning: {w}" for w in recipe.warnings]
    lines += [f"note: {n}" for n in recipe.notes]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
        return "[" + ", ".join(f"{c.get('filter', '*')}: {_short(c.get('value'))}" for c in value) + "]"
    return str(value)


"""Recipe data validated as a whole: every problem found, each at its place in the file, before a tensor is read.

The file's types are checked against the shape of each part (unknown keys, missing keys, wrong types),
then the meaning by the checks here: the method and its parameters (names, aliases, ranges, per-model use), model paths,
weights, overrides (patterns that compile and cannot backtrack catastrophically), output options.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from ..errors import MethodError
from ..io.adapters import ADAPTER_CONFIG, is_adapter
from ..methods import available_methods, get_method
from ..methods.ops import weight_sum_problem
from ..methods.registry import MergeMethod, yaml_number_hint
from .loader import PathKey, Problems
from .schema import DEFAULT_SHARD_SIZE, DTYPES, KEY_MODES, OUTPUT_FORMATS, TAKE_CHOICES, ModelRef, OutputOptions, Override, Recipe, Slice, SliceSource, is_number, parse_size


# Outputs of earlier stages of a multi-stage recipe: models that will exist when this stage runs (see .stages).
PENDING_OUTPUTS: ContextVar[frozenset[Path]] = ContextVar("PENDING_OUTPUTS", default=frozenset())


# The shape of each part of a recipe: its keys, each with a strict type check and a default. Strict as in
# YAML: a string is not a number, 1 is not true, 1.0 is not an integer (a number list takes integers).
_REQUIRED = object()


class _Invalid(Exception):
    """A value of the wrong type: the problems, each (place below the key, message)."""

    def __init__(self, *found: tuple[PathKey, str]) -> None:
        super().__init__(found)
        self.found = found


def _got(expected: str, value: Any) -> _Invalid:
    return _Invalid(((), f"must be {expected}, got {_describe_value(value)}"))


def _place(key: Any) -> Any:
    """A mapping key as a path item: a string or a 64-bit integer as itself (True as 1), anything else as its repr."""
    if isinstance(key, str):
        return str.__str__(key)
    try:
        index = operator.index(key)
    except TypeError:
        return repr(key)
    return index if -(2**63) <= index < 2**63 else repr(key)


def _string(v: Any) -> str:
    if isinstance(v, str):
        return str.__str__(v)  # a str subclass (a str enum) as the plain string
    raise _got("a string", v)


def _integer(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return int.__int__(v)
    raise _got("an integer", v)


def _boolean(v: Any) -> bool:
    if v is True or v is False:
        return v
    raise _got("true or false", v)


def _anything(v: Any) -> Any:
    return v


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _got("a mapping", v)
    bad = [((_place(k), "[key]"), f"must be a string, got {_describe_value(k)}") for k in v if not isinstance(k, str)]
    if bad:
        raise _Invalid(*bad)
    return {str.__str__(k): x for k, x in v.items()}


def _items(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise _got("a list", v)
    return list(v)


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real number (an int, a float, a numpy scalar; not a bool or a string), else None."""
    kind = type(v)
    if kind is bool or not (hasattr(kind, "__float__") or hasattr(kind, "__index__")):
        return None
    try:
        return float(v)
    except Exception:  # noqa: BLE001 - whatever __float__ raises: an int too large for a float, a tensor of several elements
        return None


def _numbers(v: Any) -> list[float]:
    if not isinstance(v, list):
        raise _got("a list", v)
    out: list[float] = []
    bad: list[tuple[PathKey, str]] = []
    for i, x in enumerate(v):
        f = _number(x)
        if f is None:
            bad.append(((i,), f"must be a number, got {_describe_value(x)}"))
        else:
            out.append(f)
    if bad:
        raise _Invalid(*bad)
    return out


def _one_of(*choices: str) -> Callable[[Any], str]:
    expected = repr(choices[0]) if len(choices) == 1 else ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"

    def check(v: Any) -> str:
        if isinstance(v, str) and v in choices:
            return str.__str__(v)
        raise _got(expected, v)

    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


class _Shape:
    """The keys one mapping of a recipe may have: name -> (check, default); a default of ``dict`` or ``list``
    is a new empty one each time, :data:`_REQUIRED` makes the key required."""

    def __init__(self, **keys: tuple[Callable[[Any], Any], Any]) -> None:
        self.keys = keys

    def check(self, data: dict[Any, Any]) -> tuple[SimpleNamespace | None, list[tuple[PathKey, str]]]:
        """The entry (each key's value converted, or its default), or None with the problems: each key's in
        the order above, then unknown keys in the order given."""
        values: dict[str, Any] = {}
        found: list[tuple[PathKey, str]] = []
        for name, (check, default) in self.keys.items():
            if name in data:
                try:
                    values[name] = check(data[name])
                except _Invalid as e:
                    found.extend(((name, *at), message) for at, message in e.found)
            elif default is _REQUIRED:
                found.append(((name,), "is required"))
            else:
                values[name] = default() if default in (dict, list) else default
        valid = list(self.keys)
        for key in data:
            if not isinstance(key, str):
                found.append(((_place(key),), "Keys should be strings"))
            elif key not in self.keys:
                name = str.__str__(key)
                found.append(((name,), f"unknown key '{name}'" + _suggest(name, valid) + f" (valid keys: {', '.join(valid)})"))
        return (None if found else SimpleNamespace(**values)), found


_ModelEntry = _Shape(
    path=(_optional(_string), None),
    source=(_anything, None),
    weight=(_anything, None),
    parameters=(_mapping, dict),
    key=(_optional(_string), None),
    strip_prefix=(_optional(_string), None),
    adapter=(_optional(_string), None),
    statistics=(_anything, None),
    data=(_optional(_string), None),
)

_OverrideEntry = _Shape(
    match=(_string, _REQUIRED),
    parameters=(_mapping, dict),
    take=(_optional(_one_of(*TAKE_CHOICES)), None),
    weights=(_optional(_numbers), None),
)

_OutputEntry = _Shape(
    shard_size=(_anything, DEFAULT_SHARD_SIZE),
    format=(_one_of(*OUTPUT_FORMATS), "safetensors"),
    copy_files=(_boolean, True),
    copy_tokenizer=(_boolean, True),
    model_card=(_boolean, True),
    tokenizer_source=(_optional(_string), None),
    pad_to_multiple_of=(_optional(_integer), None),
    chat_template=(_optional(_string), None),
)

_SliceEntry = _Shape(
    sources=(_items, _REQUIRED),
    parameters=(_mapping, dict),
)

_Top = _Shape(
    method=(_optional(_string), None),
    models=(_optional(_items), None),
    slices=(_optional(_items), None),
    base=(_anything, None),
    parameters=(_mapping, dict),
    dtype=(_optional(_string), None),
    keys=(_one_of(*KEY_MODES), "exact"),
    seed=(_integer, 0),
    allow_nonfinite=(_boolean, False),
    overrides=(_items, list),
    output=(_anything, None),
)


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def _describe_value(v: Any) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def _suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _validate_part(shape: _Shape, raw: Any, path: PathKey, problems: Problems) -> Any:
    """Check one part; on errors record them and retry without the offending keys (partial result)."""
    if not isinstance(raw, Mapping):
        problems.add(path, f"must be a mapping, got {_describe_value(raw)}")
        return None
    data = dict(raw)
    entry, found = shape.check(data)
    if entry is not None:
        return entry
    for at, message in found:
        problems.add((*path, *at), message)
    for key in {at[0] for at, _ in found}:
        data.pop(key, None)
    return shape.check(data)[0]  # None: a required key is missing; already reported


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
    if not is_number(value):
        hint = yaml_number_hint(value)
        return f"must be a number, got {_describe_value(value)}{hint}"
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        return f"must be a number in float range, got an integer of {value.bit_length()} bits"
    return None if finite else f"must be a finite number, got {value!r}"


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
            found = resolved.exists() or resolved in PENDING_OUTPUTS.get()
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
    adapter, adapter_resolved = entry.adapter, None
    if adapter is not None:
        adapter_resolved = _adapter_path(adapter, (*path, "adapter"), root, problems)
        if adapter_resolved is None:
            ok = False
        elif is_base:
            problems.add((*path, "adapter"), "the base is the model adapters are applied to, and takes no adapter itself; "
                         "list the adapted model under `models:` (with the base it needs as its `path:`)")
            ok = False
    elif resolved is not None and is_adapter(resolved):
        if is_base:
            problems.add((*path, "path"), f"'{entry.path}' is a PEFT adapter, not a model; the base must be the full model the adapters were trained on")
            ok = False
        else:  # a bare adapter: applied to the recipe's base (see _attach_base)
            adapter, adapter_resolved, entry.path, resolved = entry.path, resolved, None, None
    weight = entry.weight
    if weight is not None:
        if is_base:
            problems.add((*path, "weight"), "the base takes no weight; remove it (list the base under `models:` to make it an ingredient)")
        elif method is not None and not method.takes_weights:
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
    stats, stats_resolved, data_resolved = entry.statistics, None, None
    if (stats is not None or entry.data is not None) and (is_base or (method is not None and method.statistic is None)):
        what = "statistics" if stats is not None else "data"
        problems.add((*path, what), "the base is not merged by statistics; remove it" if is_base else
                     f"method '{method.name}' uses no per-model data; `{what}:` is for fisher and regmean, remove it")  # type: ignore[union-attr]
        ok = False
    if isinstance(stats, (str, Path)):
        stats_resolved = _resolve(str(stats), root)
        stats = str(stats)
        if not stats_resolved.is_file() and stats_resolved not in PENDING_OUTPUTS.get():
            problems.add((*path, "statistics"), f"'{stats}' is not a file (looked for {stats_resolved}); give the .safetensors file of this "
                         "model's statistics (`soup statistics`), or its `data:` to compute them")
            ok = False
    elif stats is not None and not isinstance(stats, Mapping):
        problems.add((*path, "statistics"), f"must be the path of a statistics file, got {_describe_value(stats)}")
        ok = False
    if entry.data is not None:
        data_resolved = _resolve(entry.data, root)
        if not data_resolved.exists():
            problems.add((*path, "data"), f"'{entry.data}' does not exist (looked for {data_resolved}); give this model's own data file")
            ok = False
    if not ok:
        return None
    return ModelRef(
        path=entry.path, resolved=resolved, weight=weight, parameters=params,
        key=entry.key, strip_prefix=entry.strip_prefix, source=entry.source, adapter=adapter, adapter_resolved=adapter_resolved,
        statistics=stats, statistics_resolved=stats_resolved, data=entry.data, data_resolved=data_resolved,
    )


def _adapter_path(adapter: str, at: PathKey, root: Path | None, problems: Problems) -> Path | None:
    """The resolved folder of an ``adapter:`` entry, or None with a problem recorded."""
    try:
        resolved = _resolve(adapter, root)
        if is_adapter(resolved):
            return resolved
        why = "does not exist" if not resolved.exists() else f"has no {ADAPTER_CONFIG}"
    except (OSError, RuntimeError) as e:
        why = f"cannot be looked up ({getattr(e, 'strerror', None) or e})"
    problems.add(at, f"'{adapter}' {why}; `adapter:` is a PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors)")
    return None


def _attach_base(ref: ModelRef | None, at: PathKey, base: ModelRef | None, problems: Problems) -> ModelRef | None:
    """``ref``, or for a bare adapter (``path:`` naming an adapter folder) the recipe's base with it applied; None (a
    problem recorded) when there is no base to apply it to, or ``ref`` is already None."""
    if ref is None or ref.adapter is None or ref.path is not None or ref.source is not None:
        return ref
    if base is None or base.resolved is None:
        problems.add((*at, "path"), f"'{ref.adapter}' is a PEFT adapter: it changes a model, so give the model it was trained on as "
                     "`base:` (--base B), or write the entry as `path: MODEL` with `adapter: ADAPTER`")
        return None
    return dataclasses.replace(ref, path=base.path, resolved=base.resolved, key=base.key, strip_prefix=base.strip_prefix)


def _layer_range(value: Any, path: PathKey, problems: Problems) -> tuple[int, int] | None:
    """``layers: [start, end)`` as two integers with 0 <= start < end, or None (a problem recorded)."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok:
        problems.add(path, f"must be [start, end], two layer indices (end excluded), got {_short_repr(value)}")
        return None
    start, end = value
    if not 0 <= start < end:
        problems.add(path, f"must satisfy 0 <= start < end (end excluded), got [{start}, {end}]")
        return None
    return int(start), int(end)


def _slices(
    raw: list[Any], method: MergeMethod | None, base: ModelRef | None, problems: Problems, root: Path | None, check_count: bool
) -> tuple[list[ModelRef], tuple[Slice, ...]]:
    """The ``slices:`` of a recipe: the distinct models their sources read, and each slice (sources, parameters).

    Each source is a model entry (``path``, ``weight``, ``parameters``, ``key``, ``strip_prefix``) plus
    ``layers: [start, end]``; the sources of a slice span the same number of layers, name distinct models,
    and are as many as the method takes (a source that is the base is the method's base, not an ingredient).
    """
    models: list[ModelRef] = []
    out: list[Slice] = []
    if not raw and check_count:
        problems.add(("slices",), "must list at least one slice (`- sources: [{path: ..., layers: [0, N]}]`)")
    for i, raw_slice in enumerate(raw):
        here: PathKey = ("slices", i)
        entry = _validate_part(_SliceEntry, _listify(raw_slice), here, problems)
        if entry is None:
            continue
        params = _check_params(entry.parameters, method, (*here, "parameters"), problems, per_model=False)
        sources: list[SliceSource] = []
        complete = bool(entry.sources)
        if not entry.sources:
            problems.add((*here, "sources"), "must list at least one source (`- path: ...` with `layers: [start, end]`)")
        for j, raw_src in enumerate(entry.sources):
            at: PathKey = (*here, "sources", j)
            if not isinstance(raw_src, Mapping):
                problems.add(at, f"must be a mapping with `path:` and `layers: [start, end]`, got {_describe_value(raw_src)}")
                complete = False
                continue
            fields = dict(raw_src)
            layers = _layer_range(fields.pop("layers", None), (*at, "layers"), problems) if "layers" in fields else None
            if "layers" not in raw_src:
                problems.add((*at, "layers"), "is required: [start, end], the layer indices taken from this model (end excluded)")
            ref = _attach_base(_model_ref(fields, at, method, problems, is_base=False, root=root), at, base, problems)
            if ref is None or layers is None:
                complete = False
                continue
            bare = ModelRef(path=ref.path, resolved=ref.resolved, key=ref.key, strip_prefix=ref.strip_prefix, source=ref.source,
                            adapter=ref.adapter, adapter_resolved=ref.adapter_resolved)
            k = next((n for n, m in enumerate(models) if m.same_as(bare)), None)
            if k is None:
                models.append(bare)
                k = len(models) - 1
            if any(s.model == k for s in sources):
                problems.add(at, f"'{ref.label()}' is already a source of this slice; a slice merges distinct models")
                complete = False
                continue
            sources.append(SliceSource(k, layers, ref.weight, ref.parameters))
        lengths = sorted({s.length for s in sources})
        if len(lengths) > 1:
            problems.add((*here, "sources"), f"every source of a slice must span the same number of layers, got {lengths}")
        if method is not None and complete and check_count:
            uses_base = method.base != "none" and base is not None
            n_base = sum(1 for s in sources if uses_base and base is not None and models[s.model].same_as(base))
            if uses_base and not n_base and base is not None:
                problems.add((*here, "sources"), f"method '{method.name}' reads the base in every slice: list the base ({base.label()}) "
                             "among this slice's sources, with the layers it contributes")
            else:
                msg = method.count_problem(len(sources) - n_base, n_base > 0)
                if msg:
                    problems.add((*here, "sources"), msg)
        if sources:
            out.append(Slice(tuple(sources), params))
    return models, tuple(out)


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
    warnings: Sequence[str] = (),
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
    slices: tuple[Slice, ...] = ()
    if top.slices is not None:
        if top.models is not None:
            problems.add(("slices",), "give either `models:` (whole models) or `slices:` (layer ranges of models), not both")
        models, slices = _slices(top.slices, method, base, problems, root, check_count)
    elif top.models is None and raw.get("models") is None:
        problems.add(("models",), "is required: a list of checkpoint paths")
    for i, m in enumerate(top.models or []):
        if yaml_input and isinstance(m, Mapping) and "source" in m:
            problems.add(("models", i, "source"), "`source` is only for in-memory objects given through the Python API; use `path:`")
            models_ok = False
            continue
        if yaml_input and isinstance(m, Mapping) and isinstance(m.get("statistics"), Mapping):
            problems.add(("models", i, "statistics"), "in a recipe file, `statistics:` is the path of a statistics file (`soup statistics`)")
            models_ok = False
            continue
        ref = _attach_base(_model_ref(m, ("models", i), method, problems, is_base=False, root=root), ("models", i), base, problems)
        if ref is None:
            models_ok = False
        else:
            models.append(ref)

    if method is not None and models_ok and check_count:
        uses_base = method.base != "none" and base is not None
        n = sum(1 for m in models if not (uses_base and base is not None and m.same_as(base)))
        msg = method.count_problem(n, top.base is not None)
        if msg:
            problems.add(("models",), msg)
        if method.statistic is not None and not slices:
            for i, m in enumerate(models):
                if m.statistics is None and m.data is None and not (uses_base and base is not None and m.same_as(base)):
                    problems.add(("models", i), f"method '{method.name}' weighs each model by its {method.statistic} statistics: give `data:` "
                                 "(the model's own data, --data MODEL=FILE) or `statistics:` (a file from `soup statistics`)")
        elif method.statistic is not None:
            problems.add(("slices",), f"method '{method.name}' merges whole models by their statistics; it does not take `slices:`")
        if method.divides_by_weight_sum(params) and any(m.weight is not None for m in models):
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
            if method is not None and not method.takes_weights:
                problems.add((*here, "weights"), f"method '{method.name}' takes no weights; remove `weights:`")
            elif slices:
                problems.add((*here, "weights"), "overrides cannot give weights in a `slices:` recipe (each slice has its own sources); give `weight:` on the slice's sources")
            elif models_ok and len(ov.weights) != len(models):
                problems.add((*here, "weights"), f"gives {len(ov.weights)} weight(s) but the recipe has {len(models)} model(s); give one per model, in order")
            elif method is not None and any(not math.isfinite(w) for w in ov.weights):
                problems.add((*here, "weights"), f"must be finite numbers, got {ov.weights}")
            elif method is not None and method.divides_by_weight_sum({**params, **ov_params}):
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
            tok = out.tokenizer_source
            if tok == "base" and top.base is None:
                problems.add(("output", "tokenizer_source"), "`base` names the base model's tokenizer, but the recipe has no `base:`")
            elif tok is not None and tok not in ("base", "union"):
                where = _resolve(tok, root)
                pending = where.absolute() in PENDING_OUTPUTS.get()  # an earlier stage's output
                if not pending and not (where / "config.json").exists() and not any((where / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
                    problems.add(("output", "tokenizer_source"), f"'{tok}' is not a model folder with a tokenizer (looked in {where}); give base, union "
                                 "or the folder of one of the models")
                tok = str(where)
            if out.pad_to_multiple_of is not None and out.pad_to_multiple_of < 1:
                problems.add(("output", "pad_to_multiple_of"), f"must be a positive integer, got {out.pad_to_multiple_of}")
            if out.chat_template is not None and out.chat_template != "auto" and "{" not in out.chat_template:
                problems.add(("output", "chat_template"), f"{_short_repr(out.chat_template)}: give the template's jinja text, or auto (the models' most "
                             "common template); mergekit's bundled named templates are not shipped with modelsoup")
            output = OutputOptions(shard_size=size, format=out.format, copy_files=out.copy_files, copy_tokenizer=out.copy_tokenizer,
                                   model_card=out.model_card, tokenizer_source=tok, pad_to_multiple_of=out.pad_to_multiple_of,
                                   chat_template=out.chat_template)

    problems.raise_if_any()
    assert method is not None and top.method is not None
    return Recipe(
        method=method.name, models=models, base=base, parameters=params, dtype=dtype, keys=top.keys, seed=top.seed,
        allow_nonfinite=top.allow_nonfinite, overrides=overrides, output=output, source_format=source_format,
        source=source, notes=tuple(notes), warnings=tuple(warnings), slices=slices,
    )


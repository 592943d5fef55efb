"""Registry of merge methods: a decorator that checks each method's signature at import.

A merge method is a pure function over the tensors of ONE parameter::

    fn(tensors, *, base=None, weights=None, [generator=None,] **hyper) -> Tensor

``tensors`` are the ingredients (the base excluded), already upcast to float32 by the engine;
``weights`` is one float per ingredient or None (uniform). The function never mutates its inputs
and does no I/O. Hyperparameters are keyword-only with defaults, and each is declared as a
:class:`Param` so that a recipe can be validated (names, types, ranges) before any tensor is read.
Random methods also take ``generator``, a ``torch.Generator`` seeded per (seed, tensor name).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import MethodError

BaseUse = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a merge method.

    Attributes:
        name: keyword name in the function and in recipes.
        default: default value (must equal the function's default).
        help: one line for ``soup methods``.
        kind: float, int, bool or str.
        low, high: inclusive/exclusive bounds for numbers (None = unbounded).
        choices: allowed values for strings.
        aliases: other names accepted in recipes (e.g. mergekit's ``lambda``).
        per_model: may be given per ingredient (the function then receives a tuple, one per model).
    """

    name: str
    default: Any
    help: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    per_model: bool = False

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return "any " + self.kind.__name__
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def check(self, value: Any) -> str | None:
        """Return a problem description for ``value``, or None if it is acceptable."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind is str:
            if not isinstance(value, str):
                return f"must be a string, got {value!r}"
            if self.choices and value not in self.choices:
                return f"must be {self.describe_range()}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _looks_numeric(value) else ""
            return f"must be a number, got {value!r}{hint}"
        try:
            v = float(value)
        except OverflowError:
            return f"must be a number in float range, got an integer of {value.bit_length()} bits"
        if self.kind is int and not v.is_integer():
            return f"must be an integer, got {value!r}"
        if math.isnan(v):
            return "must be a number, got NaN"
        bad_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        bad_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if bad_low or bad_high:
            return f"must be in {self.describe_range()}, got {value!r}"
        return None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what it needs."""

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    paper: str
    params: tuple[Param, ...]
    base: BaseUse
    min_models: int
    max_models: int | None
    random: bool
    aliases: dict[str, str] = field(default_factory=dict)
    workspace: int = 0

    def param(self, name: str) -> Param | None:
        """Find a parameter by name or alias."""
        canonical = self.aliases.get(name, name)
        return next((p for p in self.params if p.name == canonical), None)

    def count_problem(self, n_models: int, has_base: bool) -> str | None:
        """Describe why ``n_models`` ingredients (base excluded) cannot be merged, or None."""
        if self.base == "required" and not has_base:
            return f"method '{self.name}' needs a base model (set `base:`)"
        lo, hi = self.min_models, self.max_models
        if n_models < lo or (hi is not None and n_models > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            extra = " besides the base" if has_base and self.base != "none" else ""
            return f"method '{self.name}' takes {want} model{'s' if (hi or lo) != 1 else ''}{extra}, got {n_models}"
        return None

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        weights: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        **hyper: Any,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"base": base, "weights": weights, **hyper}
        if self.random:
            kwargs["generator"] = generator
        return self.fn(list(tensors), **kwargs)


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    summary: str,
    paper: str,
    params: Sequence[Param] = (),
    base: BaseUse = "none",
    min_models: int = 1,
    max_models: int | None = None,
    workspace: int = 0,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a merge method; checks its signature against ``params`` at import.

    ``workspace`` is how many tensor-sized float32 buffers the method holds per ingredient besides its
    inputs (e.g. one task vector each); the engine counts it against its memory budget.

    Raises:
        MethodError: duplicate name, or a signature that does not follow the method contract.
    """

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise MethodError(f"merge method '{name}' is registered twice ({_REGISTRY[name].fn.__module__} and {fn.__module__})")
        sig = inspect.signature(fn)
        ps = list(sig.parameters.values())
        where = f"{fn.__module__}.{fn.__name__}"
        if not ps or ps[0].name != "tensors" or ps[0].kind not in (ps[0].POSITIONAL_ONLY, ps[0].POSITIONAL_OR_KEYWORD):
            raise MethodError(f"{where}: first parameter must be positional `tensors`")
        kw = {p.name: p for p in ps[1:]}
        for p in ps[1:]:
            if p.kind is not p.KEYWORD_ONLY:
                raise MethodError(f"{where}: parameter `{p.name}` must be keyword-only (put it after `*`)")
        for required in ("base", "weights"):
            if required not in kw or kw[required].default is not None:
                raise MethodError(f"{where}: needs keyword-only `{required}=None`")
        is_random = "generator" in kw
        hyper = {k: v for k, v in kw.items() if k not in ("base", "weights", "generator")}
        declared = {p.name: p for p in params}
        if set(hyper) != set(declared):
            raise MethodError(
                f"{where}: hyperparameters {sorted(hyper)} do not match the declared params {sorted(declared)}"
            )
        for pname, p in declared.items():
            if hyper[pname].default != p.default:
                raise MethodError(f"{where}: default of `{pname}` is {hyper[pname].default!r} but declared {p.default!r}")
        aliases = {a: p.name for p in params for a in p.aliases}
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            summary=summary,
            paper=paper,
            params=tuple(params),
            base=base,
            min_models=min_models,
            max_models=max_models,
            random=is_random,
            aliases=aliases,
            workspace=workspace,
        )
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """Look up a method by name.

    Raises:
        MethodError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown merge method '{name}'; valid methods: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[MergeMethod]:
    """All registered methods, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]

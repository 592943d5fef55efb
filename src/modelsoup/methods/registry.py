"""Registry of merge methods: a decorator that reads each method's schema from its signature at import.

A merge method is a pure function over the tensors of ONE parameter::

    fn(tensors, *, base=None, weights=None, [generator=None,] **hyper) -> Tensor

``tensors`` are the ingredients (the base excluded), already upcast to float32 by the engine;
``weights`` is one float per ingredient or None (uniform). The function never mutates its inputs
and does no I/O. Random methods also take ``generator``, a ``torch.Generator`` seeded per
(seed, tensor name).

Each hyperparameter is declared once, on the function parameter, so that a recipe can be validated
(names, types, ranges) before any tensor is read::

    density: Annotated[PerModel[float], Param(gt=0, le=1, help="fraction of each task vector kept")] = 0.2
    sign_method: Annotated[Literal["sum", "count"], Param(help="...")] = "sum"

The name and default come from the parameter, the kind from the annotation (``float``, ``int``,
``bool``, ``str``, or a ``Literal`` of strings, which gives the choices), ``PerModel[...]`` marks a
value that may be given per ingredient, and the :class:`Param` gives the bounds, help and aliases.
Shared declarations are ``Annotated`` aliases (see :mod:`.params`); a second ``Param`` in an
annotation refines the first for one method (``Annotated[Density, Param(help="...")]``).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field, replace
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import torch

from ..errors import MethodError

if sys.version_info >= (3, 12):
    from typing import TypeAliasType
else:  # a dependency of torch
    from typing_extensions import TypeAliasType

BaseUse = Literal["none", "optional", "required"]
# What a data-aware method reads per model beside its weights: a diagonal Fisher (one value per weight) or the Gram
# matrix X^T X of a linear layer's inputs (in x in for an (out, in) weight); see :mod:`modelsoup.recipes.statistics`.
Statistic = Literal["fisher", "gram"]
STATISTICS: tuple[str, ...] = ("fisher", "gram")

_T = TypeVar("_T")
# A hyperparameter that may be given once or per ingredient (the function then receives one value per model).
PerModel = TypeAliasType("PerModel", _T | Sequence[_T], type_params=(_T,))


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a merge method.

    In a method's signature only ``help``, the bounds (``gt``/``ge``/``lt``/``le``) and ``aliases`` are
    given; :func:`register` fills in the rest from the parameter and its annotation.

    Attributes:
        name: keyword name in the function and in recipes.
        default: default value (the function's default).
        help: one line for ``soup methods``.
        kind: float, int, bool or str.
        low, high: bounds for numbers (None = unbounded); ``low_open``/``high_open`` make them exclusive.
        choices: allowed values for strings.
        aliases: other names accepted in recipes (e.g. mergekit's ``lambda``).
        per_model: may be given per ingredient (the function then receives a tuple, one per model).
    """

    name: str = ""
    default: Any = _UNSET
    help: str = ""
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    per_model: bool = False
    _: KW_ONLY
    gt: InitVar[float | None] = None
    ge: InitVar[float | None] = None
    lt: InitVar[float | None] = None
    le: InitVar[float | None] = None

    def __post_init__(self, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> None:
        for side, (open_, closed), given in (("low", (gt, ge), self.low), ("high", (lt, le), self.high)):
            if open_ is None and closed is None:
                continue
            if (open_ is not None and closed is not None) or given is not None:
                raise MethodError(f"Param: give one {side} bound ({'gt or ge' if side == 'low' else 'lt or le'}), not several")
            object.__setattr__(self, side, float(open_ if open_ is not None else closed))  # type: ignore[arg-type]
            object.__setattr__(self, f"{side}_open", open_ is not None)

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
            return f"must be a number, got {value!r}{yaml_number_hint(value)}"
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


def yaml_number_hint(value: Any) -> str:
    """The fix for text that Python reads as a number (YAML 1.1 reads ``1e-3`` as a string), else ""."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML reads a number like 1e-3 as text: write 1.0e-3)"


@dataclass(frozen=True)
class Reduction:
    """How a method that reduces over each tensor, then combines it pointwise, is streamed (slerp: norms and a dot product).

    The method's own whole-tensor code must be ``apply(sums of partial over chunk-sized slices, tensors)``, so
    that the engine, summing ``partial`` over the same slices of a file in the same order (as Python floats, from
    0.0) and then running ``apply`` on its own chunks, gives the same bits.

    Attributes:
        chunk: elements per slice of the reduction (part of the numerics: the sums are taken slice by slice).
        partial: ``partial(tensors, base=, weights=, **params) -> tuple[float, ...]`` of flat slices.
        apply: ``apply(sums, tensors, base=, weights=, **params) -> Tensor``, pointwise given ``sums``.
        applies: given the resolved hyperparameters, whether this merge is a reduction at all (None = always); where it
            is not, the method's own whole-tensor path runs.
        then: later passes, for sums that need earlier ones (multislerp: the norms, then the mean's norm, ...): each
            ``then[k](sums, tensors, base=, weights=, **params) -> tuple[float, ...]`` is summed over the slices like
            ``partial``, given the sums of every pass before it (concatenated, in order); ``apply`` gets them all. Each
            pass reads the inputs again.
    """

    chunk: int
    partial: Callable[..., tuple[float, ...]]
    apply: Callable[..., torch.Tensor]
    applies: Callable[[Mapping[str, Any]], bool] | None = None
    then: tuple[Callable[..., tuple[float, ...]], ...] = ()

    def sums(self, slices: Callable[[int, int], tuple[list[torch.Tensor], torch.Tensor | None]], n: int, weights: Sequence[float] | None,
             params: Mapping[str, Any]) -> tuple[float, ...]:
        """Every pass's sums over the ``chunk``-sized slices of n entries, in order, as Python floats from 0.0;
        ``slices(i, j)`` gives entries [i, j) of each input and of the base (or None)."""
        done: tuple[float, ...] = ()
        for k, step in enumerate((self.partial, *self.then)):
            total: tuple[float, ...] | None = None
            for i in range(0, max(n, 1), self.chunk):  # an empty tensor is one empty slice: every pass has its sums
                tensors, base = slices(i, min(i + self.chunk, n))
                part = step(tensors, base=base, weights=weights, **params) if k == 0 else step(done, tensors, base=base, weights=weights, **params)
                total = tuple(a + b for a, b in zip(total or (0.0,) * len(part), part))  # from 0.0, as a sum loop does
            done += total or ()
        return done

    def whole(self, tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None, weights: Sequence[float] | None,
              **params: Any) -> torch.Tensor:
        """The merge of whole tensors, by the steps the engine streams (:meth:`sums`, then ``apply``): the same bits."""
        flat = [t.reshape(-1) for t in tensors]
        flat_base = base.reshape(-1) if base is not None else None
        n = flat[0].numel()

        def slices(i: int, j: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            return [t[i:j] for t in flat], flat_base[i:j] if flat_base is not None else None

        sums = self.sums(slices, n, weights, params)
        out: torch.Tensor | None = None
        for i in range(0, n, self.chunk):  # apply is pointwise: a slice at a time holds no tensor-sized temporaries
            ts, b = slices(i, min(i + self.chunk, n))
            part = self.apply(sums, ts, base=b, weights=weights, **params)
            if out is None:
                out = torch.empty(n, dtype=part.dtype, device=part.device)
            out[i : i + part.numel()] = part
        if out is None:  # no entries
            out = self.apply(sums, [t[:0] for t in flat], base=None if flat_base is None else flat_base[:0], weights=weights, **params)
        return out.view(tensors[0].shape)

    def streams(self, params: Mapping[str, Any]) -> bool:
        """Whether a merge with these (fully resolved) hyperparameters is computed this way; ``applies`` None = always
        (nuslerp reduces a flattened tensor to three sums, but not row by row)."""
        return self.applies is None or self.applies(params)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what it needs.

    Attributes:
        takes_weights: whether recipes may give ingredient weights (slerp, model_stock and ema take none).
        weight_sum_rule: given the resolved hyperparameters, whether the method divides by the plain sum of
            the weights (None = never); see :meth:`divides_by_weight_sum`.
        pointwise: each output element is a function of the inputs' elements at the same position only (no
            reduction over a tensor, no random draws), so the engine may run the method on flat slices of a tensor.
        reduction: for a method that reduces each tensor to a few numbers and then combines it pointwise, how the
            engine streams it in two passes (:class:`Reduction`); None = it needs whole tensors.
        prepare: for a method that analyses its whole inputs (TIES: the top-k thresholds) and then computes its result
            a chunk at a time: ``prepare(tensors, base=, weights=, **params)`` returns an object whose ``chunk(i, j)``
            gives entries [i, j) of the flat result (by the operations the method's own whole-tensor path runs), or
            None where this merge needs the whole-tensor path; the engine then streams the result to the sink.
        takes_half: on the streamed paths the method widens its inputs itself, exactly (linear: to float64; TIES's
            ``prepare``: each chunk to float32; slerp: its sums' slices to float64, its interpolation to float32), so the
            engine may hand it float16 and bfloat16 inputs as stored
            instead of their float32 copies (the same values, one pass and, for whole inputs, a fresh copy fewer).
            Its whole-tensor path still gets float32 (unless ``whole_half``).
        whole_half: the whole-tensor path, too, takes float16 and bfloat16 inputs as stored and widens them exactly
            itself (karcher: a slice at a time), so the engine makes no float32 copy of each input (half the memory).
        chunk_kernel: for a pointwise method, the same arithmetic on one chunk into buffers the engine reuses:
            ``chunk_kernel(tensors, *, base=, weights=, buffer=, **params)``, where ``buffer(role, dtype)`` is a flat
            buffer of the chunk's length that this thread gets back, unchanged in size, for every chunk (its contents
            are stale); the result may be one of them. Bit-identical to ``fn`` on those elements; it spares the fresh
            temporaries of every chunk. None = the engine calls ``fn`` on each chunk.
        carries_nonfinite: a NaN or Inf in any input (base included) makes the result NaN or Inf at that position (sums
            and products only, nothing that compares or selects), so the streaming engine checks only each result chunk
            and leaves the input chunks unchecked; a non-finite result sends the tensor to the whole-tensor path, which
            names the input.
    """

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
    takes_weights: bool = True
    weight_sum_rule: Callable[[Mapping[str, Any]], bool] | None = None
    identity_rule: Callable[[Mapping[str, Any]], bool] | None = None
    pointwise: bool = False
    reduction: Reduction | None = None
    prepare: Callable[..., Any] | None = None
    prepared_workspace: Callable[[Mapping[str, Any], tuple[int, ...]], float] | None = None
    takes_half: bool = False
    whole_half: bool = False
    statistic: Statistic | None = None
    chunk_kernel: Callable[..., torch.Tensor] | None = None
    carries_nonfinite: bool = False

    def filled(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """These hyperparameters with the method's defaults filled in (as its signature fills them in)."""
        return {p.name: p.default for p in self.params} | dict(params)

    def streamed_reduction(self, params: Mapping[str, Any]) -> Reduction | None:
        """The :class:`Reduction` that streams a merge with these hyperparameters (defaults filled in here), or None."""
        if self.reduction is None:
            return None
        return self.reduction if self.reduction.streams(self.filled(params)) else None

    def prepared_buffers(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> float:
        """Tensor-sized float32 buffers' worth of bytes the prepared form of a merge with these hyperparameters holds per
        ingredient, for a tensor of this shape (the engine counts it against its memory budget)."""
        if self.prepared_workspace is None:
            return float(self.workspace)
        return self.prepared_workspace(self.filled(params), shape)

    def keeps_identical(self, params: Mapping[str, Any]) -> bool:
        """Whether, with these hyperparameters, inputs that are all one tensor give that tensor back (the
        weighted mean of copies of x is x): a plan then copies the tensor instead of computing it, so the
        result is exact and a soup of adapters that leave a tensor alone is that tensor, bit for bit."""
        if self.identity_rule is None:
            return False
        given = {self.aliases.get(k, k): v for k, v in params.items()}
        return bool(self.identity_rule({p.name: given.get(p.name, p.default) for p in self.params}))

    def param(self, name: str) -> Param | None:
        """Find a parameter by name or alias."""
        canonical = self.aliases.get(name, name)
        return next((p for p in self.params if p.name == canonical), None)

    def divides_by_weight_sum(self, params: Mapping[str, Any]) -> bool:
        """Whether, with these hyperparameters, the method divides by sum_i w_i (so weights summing to zero fail).

        ``params`` may be partial and use aliases; a missing one takes its default.
        """
        if self.weight_sum_rule is None:
            return False
        given = {self.aliases.get(k, k): v for k, v in params.items()}
        return bool(self.weight_sum_rule({p.name: given.get(p.name, p.default) for p in self.params}))

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
        if self.statistic is None:
            kwargs.pop("statistics", None)
        if self.random:
            kwargs["generator"] = generator
        return self.fn(list(tensors), **kwargs)


_REGISTRY: dict[str, MergeMethod] = {}
_CONTRACT = ("base", "weights", "generator", "statistics")


def register(
    name: str,
    *,
    summary: str,
    paper: str,
    base: BaseUse = "none",
    min_models: int = 1,
    max_models: int | None = None,
    workspace: int = 0,
    takes_weights: bool = True,
    divides_by_weight_sum: Callable[[Mapping[str, Any]], bool] | None = None,
    keeps_identical: Callable[[Mapping[str, Any]], bool] | None = None,
    pointwise: bool = False,
    reduction: Reduction | None = None,
    prepare: Callable[..., Any] | None = None,
    prepared_workspace: Callable[[Mapping[str, Any], tuple[int, ...]], float] | None = None,
    takes_half: bool = False,
    whole_half: bool = False,
    statistic: Statistic | None = None,
    chunk_kernel: Callable[..., torch.Tensor] | None = None,
    carries_nonfinite: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a merge method; reads its hyperparameters from its signature and checks it at import.

    Args:
        name: the method's name in recipes.
        summary: one line: what it computes.
        paper: where it comes from.
        base: whether it needs a base model.
        min_models, max_models: how many ingredients it takes (base excluded; None = no limit).
        workspace: how many tensor-sized float32 buffers the method holds per ingredient besides its
            inputs (e.g. one task vector each); the engine counts it against its memory budget.
        takes_weights: False if ingredient weights mean nothing to the method (recipes may not give them).
        divides_by_weight_sum: given the resolved hyperparameters, whether the method divides by the plain
            sum of the weights (recipe validation then refuses weights summing to zero); None = never.
        keeps_identical: given the resolved hyperparameters, whether identical inputs (no base read) give that
            input back exactly in exact arithmetic; None = never (see :meth:`MergeMethod.keeps_identical`).
        pointwise: the result at each position depends only on the inputs at that position, computed by the
            same elementwise kernels whatever the tensor's size: the engine then streams the method over flat
            chunks of each tensor (bit-identical to one call on the whole tensor; tests check each such method).
        reduction: streams a reduce-then-combine method in two passes (:class:`Reduction`); tests check it as pointwise.
        prepare: streams the result of a method that needs its whole inputs (:attr:`MergeMethod.prepare`).
        prepared_workspace: what the prepared form holds per ingredient, in tensor-sized float32 buffers, given the
            hyperparameters (defaults filled in) and the tensor's shape (e.g. 0.25 for a boolean mask each); None:
            ``workspace`` (see :meth:`MergeMethod.prepared_buffers`).
        takes_half: half-precision inputs may reach the method as stored (:attr:`MergeMethod.takes_half`).
        whole_half: and on its whole-tensor path (:attr:`MergeMethod.whole_half`).
        statistic: the per-model statistic the method weighs its inputs by (``fisher`` or ``gram``); the function then
            takes ``statistics=None``, one tensor per ingredient for the tensors that have one, None for the others.
        chunk_kernel: a pointwise method's chunk of work into reused buffers (:attr:`MergeMethod.chunk_kernel`).
        carries_nonfinite: NaN/Inf inputs always give a NaN/Inf result (:attr:`MergeMethod.carries_nonfinite`).

    Raises:
        MethodError: duplicate name, a signature that does not follow the method contract, or a pointwise method that draws random numbers.
    """

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise MethodError(f"merge method '{name}' is registered twice ({_REGISTRY[name].fn.__module__} and {fn.__module__})")
        params = _read_signature(fn)
        random = "generator" in inspect.signature(fn).parameters
        takes_statistics = "statistics" in inspect.signature(fn).parameters
        if statistic is not None and statistic not in STATISTICS:
            raise MethodError(f"merge method '{name}': statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if takes_statistics != (statistic is not None):
            raise MethodError(f"merge method '{name}': a method takes `statistics=None` exactly when it is registered with statistic=")
        if (pointwise or reduction is not None) and random:
            raise MethodError(f"merge method '{name}' draws random numbers, so it cannot be pointwise (chunks would draw differently)")
        if (chunk_kernel is not None or carries_nonfinite) and not pointwise:
            raise MethodError(f"merge method '{name}': chunk_kernel and carries_nonfinite are for pointwise methods (register it pointwise=True)")
        aliases = {a: p.name for p in params for a in p.aliases}
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            summary=summary,
            paper=paper,
            params=params,
            base=base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            aliases=aliases,
            workspace=workspace,
            takes_weights=takes_weights,
            weight_sum_rule=divides_by_weight_sum,
            identity_rule=keeps_identical,
            pointwise=pointwise,
            reduction=reduction,
            prepare=prepare,
            prepared_workspace=prepared_workspace,
            takes_half=takes_half,
            whole_half=whole_half,
            statistic=statistic,
            chunk_kernel=chunk_kernel,
            carries_nonfinite=carries_nonfinite,
        )
        return fn

    return decorate


def _read_signature(fn: Callable[..., torch.Tensor]) -> tuple[Param, ...]:
    """The hyperparameters of ``fn``, in signature order, after checking it follows the method contract."""
    where = f"{fn.__module__}.{fn.__name__}"
    ps = list(inspect.signature(fn).parameters.values())
    if not ps or ps[0].name != "tensors" or ps[0].kind not in (ps[0].POSITIONAL_ONLY, ps[0].POSITIONAL_OR_KEYWORD):
        raise MethodError(f"{where}: first parameter must be positional `tensors`")
    kw = {p.name: p for p in ps[1:]}
    for p in ps[1:]:
        if p.kind is not p.KEYWORD_ONLY:
            raise MethodError(f"{where}: parameter `{p.name}` must be keyword-only (put it after `*`)")
    for required in ("base", "weights"):
        if required not in kw or kw[required].default is not None:
            raise MethodError(f"{where}: needs keyword-only `{required}=None`")
    for optional in ("generator", "statistics"):
        if optional in kw and kw[optional].default is not None:
            raise MethodError(f"{where}: `{optional}` must default to None")
    hyper = [p for p in ps[1:] if p.name not in _CONTRACT]
    try:
        hints = get_type_hints(fn, include_extras=True)
    except (NameError, AttributeError, TypeError, SyntaxError) as e:  # an annotation that does not evaluate in its module
        raise MethodError(f"{where}: annotations cannot be read ({type(e).__name__}: {e})") from None
    markers = {p.name: [m for m in getattr(hints.get(p.name), "__metadata__", ()) if isinstance(m, Param)] for p in hyper}
    declared = sorted(n for n, ms in markers.items() if ms)
    if len(declared) != len(hyper):
        raise MethodError(
            f"{where}: hyperparameters {sorted(markers)} do not match the declared params {declared}: declare each as "
            "`name: Annotated[type, Param(help=...)] = default`"
        )
    params = tuple(_param(where, p, hints[p.name], markers[p.name]) for p in hyper)
    names = [p.name for p in params]
    for p in params:
        for a in p.aliases:
            if a in names or a in _CONTRACT or sum(a in q.aliases for q in params) > 1:
                raise MethodError(f"{where}: alias '{a}' of `{p.name}` is already a name or alias of another parameter")
    return params


def _param(where: str, sig: inspect.Parameter, hint: Any, markers: list[Param]) -> Param:
    """The :class:`Param` of one hyperparameter: its markers, completed from the signature."""
    spec = markers[0]
    for m in markers[1:]:  # a later marker refines an earlier one: it replaces what it gives
        given: dict[str, Any] = {"help": m.help} if m.help else {}
        if m.low is not None:
            given |= {"low": m.low, "low_open": m.low_open}
        if m.high is not None:
            given |= {"high": m.high, "high_open": m.high_open}
        if m.aliases:
            given["aliases"] = m.aliases
        spec = replace(spec, **given)
    if any(m.name or m.default is not _UNSET or m.choices is not None or m.per_model for m in markers):
        raise MethodError(f"{where}: `{sig.name}`: name, default, choices and per-model come from the signature, not from Param(...)")
    if sig.default is inspect.Parameter.empty:
        raise MethodError(f"{where}: hyperparameter `{sig.name}` needs a default")
    typ = get_args(hint)[0]  # Annotated[typ, *metadata]
    per_model = get_origin(typ) is PerModel
    if per_model:
        (typ,) = get_args(typ)
    if typ in (bool, int, float, str):
        kind, choices = typ, None
    elif get_origin(typ) is Literal and all(isinstance(c, str) for c in get_args(typ)):
        kind, choices = str, get_args(typ)
    else:
        raise MethodError(f"{where}: `{sig.name}` is annotated {typ!r}; a hyperparameter is a float, int, bool, str or Literal of strings")
    p = replace(spec, name=sig.name, default=sig.default, kind=kind, choices=choices, per_model=per_model)
    if not p.help:
        raise MethodError(f"{where}: `{sig.name}` needs a help line (Param(help=...))")
    problem = p.check(p.default)
    if problem:
        raise MethodError(f"{where}: default of `{sig.name}` {problem}")
    return p


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

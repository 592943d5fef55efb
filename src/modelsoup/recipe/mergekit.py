"""Run mergekit recipes of the whole-model form (``models:``) unchanged: translate them into a :class:`Recipe`.

A mergekit recipe means mergekit's conventions, so every mergekit default is written out explicitly
here (our own defaults differ: our ``ties`` keeps density 0.2 by default, mergekit's keeps everything).
Read against mergekit (arcee-ai/mergekit, 2025 tree):

==================  ===============================================================================
mergekit            modelsoup
==================  ===============================================================================
linear              linear; normalize=true. Every listed model is an ingredient, base_model too when
                    it is listed; an unlisted base_model is appended by mergekit as one more input and
                    then needs a global ``weight`` (else mergekit fails; refused here).
task_arithmetic     task_arithmetic; scale=lambda (1.0), normalize=false.
ties                ties; density=1.0, scale=lambda (1.0), normalize=true, rescale=l1 (rescale: true) /
                    none, keep_at_least_one=true, sign_method=sum, sign_from=weighted, divide_by=weight_sum.
dare_ties           dare_ties; density=1.0, scale=lambda (1.0), rescale=l1 (rescale: true) / none,
                    normalize=false, sign_method=sum, sign_from=weighted, divide_by=weight_sum.
dare_linear         dare_linear; density=1.0, scale=lambda (1.0), rescale=l1 / none, normalize=false.
breadcrumbs         breadcrumbs; density=1.0, gamma=0.01, scale=lambda (1.0), rescale=none, sign_method=none,
                    normalize=false.
breadcrumbs_ties    breadcrumbs_ties; as above with sign_method=sum, sign_from=weighted, divide_by=weight_sum.
della               della; density=1.0, epsilon=0.15, rescale=l1, normalize=true, TIES sign election.
della_linear        della_linear; density=1.0, epsilon=0.15, rescale=l1, normalize=false.
slerp               slerp with base=base_model (the t=0 end) and the one other model (t=1); ``t`` is
                    required (no default); dot_threshold=0.9995, eps=1e-8.
nuslerp             nuslerp; weights give t; nuslerp_flatten=true, nuslerp_row_wise=false, eps=1e-8;
                    base_model optional (then on task vectors).
multislerp          multislerp; weight required, normalize_weights=true, eps=1e-8, base_model optional.
karcher             karcher; max_iter=10, tol=1e-5; every model weighs the same (mergekit reads no
                    weight), base_model is one more input.
model_stock         model_stock; filter_wise=false; base_model required, >= 2 other models.
sce                 sce; select_topk=1.0; reads no weight.
nearswap            nearswap; ``t`` required; base_model and exactly one other model.
arcee_fusion        arcee_fusion; base_model and exactly one other model.
ram, ramplus_tl     ram (epsilon=1e-5), ramplus_tl (r=0.1, alpha=0.2, epsilon=1e-5); read no weight.
passthrough         passthrough; scale per model (1.0); one model.
==================  ===============================================================================

Mergekit's parameters and defaults are written in :data:`MERGEKIT_METHODS`; what follows from our method is
read from its registration (:func:`modelsoup.methods.get_method`): whether it takes weights (then mergekit
requires one per model; otherwise a weight is ignored), whether it uses a base (then mergekit requires
base_model and does not merge it as an ingredient), our name for each parameter (``lambda`` is an alias of
``scale``), which parameters it lacks (``rescale`` then refused unless false, ``density`` noted and ignored),
and whether it is random (DARE).

Evidence (paths in arcee-ai/mergekit):

* ``mergekit/merge_methods/registry.py``: the GeneralizedTaskArithmeticMerge instances and their
  ``default_normalize``/``default_rescale`` (task_arithmetic F/F, ties T/F, dare_ties F/T, dare_linear F/T,
  breadcrumbs F/F, breadcrumbs_ties F/F with consensus sum).
* ``mergekit/merge_methods/generalized_task_arithmetic.py``: ``parameters()`` = int8_mask (False),
  normalize, rescale, lambda (1.0); ``tensor_parameters()`` = weight (required), density (1.0), gamma
  (0.01, magnitude_outliers only); ``rescale_norm=RescaleNorm.l1 if parameters["rescale"]``;
  ``get_task_vectors`` skips ``model == base_model``; the sign mask is elected on ``weighted_deltas``
  (``get_mask(weighted_deltas, ...)``, majority ``sum >= 0``) and the divisor is ``(weights * mask).sum``;
  ``lambda`` multiplies the mixed delta after normalisation.
* ``mergekit/sparsify.py``: ``bernoulli``/``magnitude``/``magnitude_outliers`` return the tensor untouched
  when ``density >= 1``; rescaling matches the L1 norm of the unpruned delta (``rescaled_masked_tensor``).
  Older mergekit (before RescaleNorm) divided by density instead: that is our ``rescale: density``.
* ``mergekit/merge_methods/linear.py``: normalize default true, weight required.
* ``mergekit/merge_methods/slerp.py``: ``t`` required; the base model's tensor is ``v0`` (t=0);
  ``slerp(..., DOT_THRESHOLD=0.9995, eps=1e-8)``.
* ``mergekit/merge_methods/model_stock.py``: ``filter_wise`` default false; base plus >= 2 models.
* ``mergekit/config.py``: ``evaluate_setting`` (gradients, conditionals: first entry whose ``filter`` is
  None, ``"*"`` or a substring of the tensor name); ``ConfigReader.parameter`` looks at the model's
  parameters first, then the global ones, then the method default.
* ``mergekit/plan.py``: ``normalize_config`` turns ``models:`` into one slice per model covering all its
  layers and appends an unlisted base_model; ``plan_slice`` gives layer ``i`` of ``n`` the position
  ``t = i / (n - 1)`` (1 when n == 1); ``plan_module`` plans the weights outside the layer stack
  (embeddings, final norm, lm_head) with ``ConfigReader(t=0)``. (Releases before the ``modules:``
  rewrite used t=1 for the post-layer weights.) The same rule lives in
  :func:`modelsoup.plan.layer_positions`.
* ``mergekit/common.py``: model references ``path+lora`` and hub ids; ``torch.`` prefixes on dtype names.

``model+lora`` references are the model with the PEFT adapter applied (``path`` + ``adapter`` natively), as in
mergekit; a ``base_model`` or ``tokenizer_source`` with a LoRA is refused. Not supported (each refused with a problem that
says so): the ``modules:`` form, a per-slice ``base_model``, added ``tokens:`` in the ``tokenizer:`` block. ``tokenizer_source``
(base, union, a model) and ``tokenizer: {source, pad_to_multiple_of}`` run where every model shares that
vocabulary with one row per token, and are refused otherwise (:mod:`modelsoup.io.tokenizers`); ``chat_template``
(jinja text or ``auto``) is written into the output's tokenizer files. Parameters mergekit's method does not read are ignored with a warning
naming the parameter and the method (mergekit ignores them silently, and a recipe that runs there must
run here). Accepted and ignored, with a note: ``int8_mask`` (the mask holds the same 0/1 values in int8),
weights given to methods that read none (slerp,
model_stock, karcher, sce, ram, nearswap, arcee_fusion: mergekit ignores them), ``density``/``rescale``
for task_arithmetic (no sparsification). Known numeric differences: DARE and DELLA masks come from our
generator (seeded per tensor), not torch's global RNG as in mergekit; mergekit computes in ``dtype``
while modelsoup computes in float32 and casts at the end; arcee_fusion's quartiles are exact where mergekit
samples 10^6 entries of larger tensors.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..methods import MergeMethod, get_method
from .loader import PathKey, Problems
from .schema import DTYPES, Recipe
from .validate import _resolve, build_recipe, check_setting

TOP_KEYS = (
    "merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "slices", "modules",
)


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method maps onto ours.

    What mergekit reads and its defaults are written here; what our method can do (take weights, use a
    base, the name of each parameter, aliases such as ``lambda``) comes from its registration.

    Attributes:
        name: mergekit's name for the method.
        ours: the registered method that computes it.
        globals_: mergekit's global parameters -> mergekit's default (None = required).
        tensor: mergekit's per-model parameters other than ``weight`` -> mergekit's default.
        fixed: our parameters that encode mergekit's algorithm.
        interpolates: mergekit interpolates base_model (t=0) and exactly one other model (t=1).
        one_other: mergekit merges base_model with exactly one other model (slerp, nearswap, arcee_fusion).
        weighted: whether mergekit reads a ``weight`` per model (None = whether our method takes weights).
    """

    name: str
    ours: str
    globals_: dict[str, Any]
    tensor: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    interpolates: bool = False
    one_other: bool = False
    weighted: bool | None = None

    @property
    def method(self) -> MergeMethod:
        """Our registered method."""
        return get_method(self.ours)

    @property
    def uses_base(self) -> bool:
        """Whether base_model is required and is no ingredient (task vectors, slerp's t=0 end, model stock's anchor)."""
        return self.method.base != "none"

    @property
    def reads_weight(self) -> bool:
        """Whether mergekit's method reads a (required) ``weight`` per model."""
        return self.method.takes_weights if self.weighted is None else self.weighted

    @property
    def per_model(self) -> dict[str, Any]:
        """Mergekit's per-model parameters: a required ``weight`` where the method is weighted, then the others."""
        return {"weight": None, **self.tensor} if self.reads_weight else dict(self.tensor)

    def reads(self, pname: Any) -> bool:
        """Whether mergekit's method reads the parameter ``pname`` (globally or per model)."""
        return pname in self.globals_ or pname in self.per_model

    def unread(self, pname: Any, where: str) -> str:
        """The warning for a parameter mergekit's method does not read (mergekit ignores it, and so do we)."""
        valid = ", ".join([*self.globals_, *self.per_model]) or "(none)"
        close = difflib.get_close_matches(str(pname), [*self.globals_, *self.per_model], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: mergekit's '{self.name}' does not read a parameter '{pname}'; ignored, as mergekit ignores it{hint} (it reads: {valid})"


_GTA_GLOBALS = {"int8_mask": False, "normalize": None, "rescale": None, "lambda": 1.0}
_TIES_FIXED = {"sign_method": "sum", "sign_from": "weighted", "divide_by": "weight_sum"}


def _gta(name: str, ours: str, normalize: bool, rescale: bool, fixed: dict[str, Any], gamma: bool = False, epsilon: bool = False) -> MergekitMethod:
    """A GeneralizedTaskArithmeticMerge of mergekit, with its ``default_normalize`` and ``default_rescale``."""
    tensor: dict[str, Any] = {"density": 1.0, **({"gamma": 0.01} if gamma else {}), **({"epsilon": 0.15} if epsilon else {})}
    return MergekitMethod(name, ours, {**_GTA_GLOBALS, "normalize": normalize, "rescale": rescale}, tensor, fixed)


MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod("linear", "linear", {"normalize": True}),
        _gta("task_arithmetic", "task_arithmetic", False, False, {}),
        _gta("ties", "ties", True, False, {**_TIES_FIXED, "keep_at_least_one": True, "tie_break": "torch_sort"}),
        _gta("dare_ties", "dare_ties", False, True, _TIES_FIXED),
        _gta("dare_linear", "dare_linear", False, True, {}),
        _gta("breadcrumbs", "breadcrumbs", False, False, {"sign_method": "none", "tie_break": "torch_sort"}, gamma=True),
        _gta("breadcrumbs_ties", "breadcrumbs_ties", False, False, {**_TIES_FIXED, "tie_break": "torch_sort"}, gamma=True),
        _gta("della", "della", True, True, _TIES_FIXED, epsilon=True),
        _gta("della_linear", "della_linear", False, True, {}, epsilon=True),
        MergekitMethod("slerp", "slerp", {"t": None}, fixed={"dot_threshold": 0.9995, "eps": 1e-8}, interpolates=True, one_other=True),
        MergekitMethod("nuslerp", "nuslerp", {"nuslerp_row_wise": False, "nuslerp_flatten": True}, fixed={"eps": 1e-8}),
        MergekitMethod("multislerp", "multislerp", {"normalize_weights": True, "eps": 1e-8}),
        MergekitMethod("karcher", "karcher", {"max_iter": 10, "tol": 1e-5}, weighted=False),
        MergekitMethod("model_stock", "model_stock", {"filter_wise": False}),
        MergekitMethod("sce", "sce", {"int8_mask": False, "select_topk": 1.0}),
        MergekitMethod("nearswap", "nearswap", {"t": None}, one_other=True),
        MergekitMethod("arcee_fusion", "arcee_fusion", {}, one_other=True),
        MergekitMethod("ram", "ram", {"epsilon": 1e-5}),
        MergekitMethod("ramplus_tl", "ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
        # mergekit's scale is optional (None = unchanged); 1.0 is the same tensor
        MergekitMethod("passthrough", "passthrough", {}, tensor={"scale": 1.0}),
    )
}

# mergekit parameters that do nothing here (memory options).
_MEMORY_OPTIONS = {"int8_mask"}  # an int8 sign mask holds the same 0/1 values: results are identical
# mergekit parameters that some of its methods read but do not use (ours lack them), and why: noted when given.
_UNUSED = {"density": "no sparsification", "rescale": "no sparsification"}


@dataclass
class _Translation:
    """What a translation collects: problems at mergekit paths, notes, and where each native path came from."""

    source: str | None
    lines: Mapping[PathKey, int] | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    malformed: set[PathKey] = field(default_factory=set)  # parameters given in a form that cannot be read (already problems)
    origin: dict[PathKey, PathKey] = field(default_factory=lambda: {("method",): ("merge_method",), ("base",): ("base_model",)})
    problems: Problems = field(init=False)

    def __post_init__(self) -> None:
        self.problems = Problems(self.source, self.lines, remap=self.mergekit_path)

    def mergekit_path(self, path: PathKey) -> PathKey:
        """The mergekit path a native path came from (by its longest recorded prefix)."""
        for k in range(len(path), 0, -1):
            if path[:k] in self.origin:
                return self.origin[path[:k]] + path[k:]
        return path

    def bad(self, path: PathKey, msg: str) -> None:
        """Record a problem at a path of the mergekit file."""
        self.problems.add(path, msg, native=False)

    def where(self, path: PathKey) -> str:
        """A path of the mergekit file as ``file:line: a.b[0]`` (line where known), for warnings."""
        line = self.lines.get(path) if self.lines else None
        return f"{self.source or 'recipe'}" + (f":{line}" if line else "") + f": {_dotted(path)}"


def _dotted(path: PathKey) -> str:
    """A path of the mergekit file as ``models[0].parameters``."""
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))


@dataclass(frozen=True)
class _Entry:
    """One model mergekit merges: its path and mergekit parameters, and where it stands in the mergekit file.

    ``where`` is ``("models", i)``, ``("slices", i, "sources", j)``, or ``("base_model",)`` for a base_model
    that is not listed (then ``where`` is the model reference itself: ``ref_key`` None).
    """

    path: str
    parameters: dict[str, Any]
    where: PathKey
    ref_key: str | None = "model"
    lora: str | None = None  # the adapter of a ``model+lora`` reference

    @property
    def path_where(self) -> PathKey:
        """The path of its model reference in the mergekit file."""
        return (*self.where, self.ref_key) if self.ref_key else self.where


def _is_conditional(setting: Any) -> bool:
    """Whether a setting is a list of ``{filter, value}`` conditions."""
    return isinstance(setting, list) and bool(setting) and all(isinstance(e, Mapping) for e in setting)


def _has_catch_all(setting: Any) -> bool:
    """Whether a setting gives a value for every tensor (it is not conditional, or one condition matches all)."""
    if not _is_conditional(setting):
        return True
    return any(c.get("filter") in (None, "*") for c in setting)


def _close(setting: Any, fallback: Any) -> Any:
    """Append a fallback setting (mergekit's default, or the global one) to a conditional list that misses tensors."""
    if _has_catch_all(setting):
        return setting
    return [*setting, *(fallback if _is_conditional(fallback) else [{"value": fallback}])]


def _map_leaves(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """A setting with ``fn`` applied to each of its scalar values."""
    if isinstance(setting, list):
        return [({**c, "value": _map_leaves(c["value"], fn)} if isinstance(c, Mapping) else fn(c)) for c in setting]
    return fn(setting)


def _rescale_value(v: Any) -> Any:
    """mergekit's boolean ``rescale`` (L1 norm or nothing) as our ``rescale``."""
    return ("l1" if v else "none") if isinstance(v, bool) else v


def _dtype(value: Any) -> Any:
    """A dtype name without mergekit's ``torch.`` prefix."""
    return value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value


def _lora(path: str) -> str:
    """The problem with a LoRA reference (``model+lora``) where modelsoup takes none."""
    return f"LoRA references ('{path}') are not supported here (only as a merged model); merge the adapter into its model first"


def _model_ref(path: str, where: PathKey, t: _Translation) -> tuple[str, str | None] | None:
    """A mergekit model reference split into (model, LoRA adapter or None), as mergekit parses ``model+lora``; None (a problem) if malformed."""
    if "+" not in path:
        return path, None
    parts = path.split("+")
    if len(parts) != 2 or not all(parts):
        t.bad(where, f"'{path}' is not a model reference: mergekit reads `MODEL+LORA` with exactly one '+'")
        return None
    return parts[0], parts[1]


def _mapping(value: Any, where: PathKey, t: _Translation) -> Mapping[Any, Any]:
    """A `parameters:` block as a mapping (absent = empty); anything else is a problem and counts as empty."""
    value = value or {}
    if not isinstance(value, Mapping):
        t.bad(where, f"must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _check_top_keys(data: Mapping[str, Any], t: _Translation) -> None:
    """Warn of unknown top-level keys (mergekit ignores them); refuse the `modules:` form."""
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            t.warnings.append(f"{t.where((key,))}: unknown mergekit key '{key}' ignored, as mergekit ignores it{hint} (mergekit keys: {', '.join(TOP_KEYS)})")
    if data.get("modules") is not None:
        t.bad(("modules",), "the `modules:` form (several sub-models, e.g. vision and text towers) is not supported; modelsoup runs "
              "mergekit's `models:` and `slices:` forms")


def _mergekit_method(data: Mapping[str, Any], t: _Translation) -> MergekitMethod | None:
    """The mergekit method named by `merge_method:`, or None (a problem) where it is not supported."""
    name = data.get("merge_method")
    spec = MERGEKIT_METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        t.bad(("merge_method",), f"mergekit method {name!r} is not supported; supported: {', '.join(MERGEKIT_METHODS)}")
    return spec


def _tokenizer(data: Mapping[str, Any], t: _Translation) -> dict[str, Any]:
    """The native output options for mergekit's ``tokenizer_source``, ``tokenizer:`` block and ``chat_template``.

    A tokenizer source is run when every model shares its vocabulary (then mergekit's re-ordering of token rows
    is the identity; checked when the models are opened, see :mod:`modelsoup.io.tokenizers`); added ``tokens:``
    would build new rows and are refused.
    """
    out: dict[str, Any] = {}
    src = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if block is not None:
        if src is not None:
            t.bad(("tokenizer",), "give `tokenizer_source:` or the `tokenizer:` block, not both (mergekit refuses both)")
        if not isinstance(block, Mapping):
            t.bad(("tokenizer",), f"must be a mapping with `source:`, got {type(block).__name__}")
            block = {}
        for k in block:
            if k not in ("source", "tokens", "pad_to_multiple_of"):
                t.warnings.append(f"{t.where(('tokenizer', k))}: unknown key '{k}' in the tokenizer block ignored, as mergekit ignores it")
        if block.get("tokens"):
            t.bad(("tokenizer", "tokens"), "added or re-sourced `tokens:` build new embedding rows, which is not supported; remove them")
        src = block.get("source", "union")
        t.origin[("output", "tokenizer_source")] = ("tokenizer", "source")
        t.origin[("output", "pad_to_multiple_of")] = ("tokenizer", "pad_to_multiple_of")
        if block.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = block["pad_to_multiple_of"]
    else:
        t.origin[("output", "tokenizer_source")] = ("tokenizer_source",)
    if src is not None:
        if isinstance(src, str) and "+" in src:
            t.bad(t.origin[("output", "tokenizer_source")], _lora(src))
        elif not isinstance(src, str):
            t.bad(t.origin[("output", "tokenizer_source")], "must be base, union or a model path")
        else:
            out["tokenizer_source"] = src
    if data.get("chat_template") is not None:
        t.origin[("output", "chat_template")] = ("chat_template",)
        out["chat_template"] = data["chat_template"]
    return out


def _output_dtype(data: Mapping[str, Any], t: _Translation) -> Any:
    """The output dtype: ``out_dtype``, else ``dtype`` (mergekit computes in ``dtype`` and casts to ``out_dtype``)."""
    key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    dtype = _dtype(data.get(key))
    if dtype is not None:
        t.origin[("dtype",)] = (key,)
        if isinstance(dtype, str) and dtype in DTYPES and dtype != "float32" and data.get("dtype") is not None:
            t.notes.append(f"mergekit computes in {_dtype(data.get('dtype'))}; modelsoup computes in float32 and casts to {dtype}, so values may differ by rounding")
    return dtype


def _models_list(data: Mapping[str, Any], t: _Translation) -> list[Any] | None:
    """The `models:` list, or None (a problem where it is missing or not a list)."""
    raw = data.get("models")
    if raw is None and data.get("slices") is None and data.get("modules") is None:
        t.bad(("models",), "is required: a list of `- model: PATH` entries")
    if raw is not None and not isinstance(raw, list):
        t.bad(("models",), f"must be a list, got {type(raw).__name__}")
        return None
    return raw


def _base_model(data: Mapping[str, Any], t: _Translation) -> str | None:
    """The `base_model:` path, or None where it is absent or not a plain path (a problem)."""
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        t.bad(("base_model",), "must be a path string (mergekit's mapping form of a model reference is not supported)")
        return None
    if isinstance(base, str) and "+" in base:
        t.bad(("base_model",), _lora(base))
        return None
    return base


def _global_settings(raw: Mapping[Any, Any], spec: MergekitMethod, t: _Translation, at: PathKey = ("parameters",)) -> dict[Any, Any]:
    """The `parameters:` at ``at`` (top level, or a slice's) that mergekit's method reads, each a well-formed setting (values are checked later, by ours)."""
    given: dict[Any, Any] = {}
    for pname, value in raw.items():
        where: PathKey = (*at, pname)
        if not spec.reads(str(pname)):
            t.warnings.append(spec.unread(pname, t.where(where)))
            continue
        msg = check_setting(value, lambda v: None)
        if msg:
            t.bad(where, msg)
            t.malformed.add(where)
            continue
        given[pname] = value
    return given


def _listed_model(i: int, item: Any, t: _Translation) -> _Entry | None:
    """One `models:` entry (`- model: PATH` with optional `parameters:`), or None (a problem) where it cannot be read."""
    here: PathKey = ("models", i)
    if isinstance(item, str):
        t.bad(here, f"a mergekit model entry is a mapping `- model: {item}`")
        return None
    if not isinstance(item, Mapping):
        t.bad(here, f"must be a mapping with `model:`, got {type(item).__name__}")
        return None
    for k in item:
        if k not in ("model", "parameters"):
            t.warnings.append(f"{t.where((*here, k))}: unknown key '{k}' in a mergekit model entry ignored, as mergekit ignores it (it reads: model, parameters)")
    path = item.get("model")
    if not isinstance(path, str):
        t.bad((*here, "model"), "is required: the model's path" if path is None else "must be a path string")
        return None
    ref = _model_ref(path, (*here, "model"), t)
    if ref is None:
        return None
    return _Entry(ref[0], dict(_mapping(item.get("parameters"), (*here, "parameters"), t)), here, lora=ref[1])


@dataclass
class _Ingredients:
    """The models mergekit merges, as far as they could be read."""

    entries: list[_Entry]
    base_listed: bool  # base_model is among the listed models
    complete: bool  # every model could be read (else the native model count is not checked: the problem is reported)


def _ingredients(raw_models: list[Any] | None, base: str | None, spec: MergekitMethod, t: _Translation) -> _Ingredients:
    """The listed models mergekit merges: each entry read, duplicates dropped, and the base where it is no ingredient."""
    out = _Ingredients([], base_listed=False, complete=raw_models is not None)
    seen: set[str] = set()
    for i, item in enumerate(raw_models or []):
        entry = _listed_model(i, item, t)
        if entry is None:
            out.complete = False
            continue
        is_base = base is not None and entry.lora is None and (entry.path == base or _resolve(entry.path) == _resolve(base))
        out.base_listed = out.base_listed or is_base
        key = str(_resolve(entry.path)) + ("" if entry.lora is None else "+" + str(_resolve(entry.lora)))
        if key in seen:
            t.notes.append(f"models[{i}] ({entry.path}) is listed twice; mergekit uses it once, with the parameters of its first entry")
            continue
        seen.add(key)
        if not (is_base and spec.uses_base):
            out.entries.append(entry)
    return out


def _check_base(
    data: Mapping[str, Any], raw_models: list[Any] | None, base: str | None, models: _Ingredients, spec: MergekitMethod,
    given: Mapping[Any, Any], t: _Translation,
) -> None:
    """Check base_model against what mergekit's method does with it; add it where linear averages it unlisted."""
    if spec.method.base == "required" and base is None and raw_models is not None:
        t.bad(("base_model",) if "base_model" in data else ("merge_method",),
              f"mergekit's '{spec.name}' needs `base_model:`" + (" (the t=0 end of the interpolation)" if spec.interpolates else ""))
        models.complete = False
    if spec.one_other and base is not None and models.complete and len(models.entries) != 1:
        what = "interpolates base_model (t=0) and exactly one other model (t=1)" if spec.interpolates else "merges base_model with exactly one other model"
        t.bad(("models",), f"mergekit's {spec.name} {what}; got {len(models.entries)} other model(s)")
        models.complete = False
    if not spec.uses_base and base is not None and not models.base_listed:
        if not spec.reads_weight:
            models.entries.append(_Entry(base, {}, ("base_model",), None))
            t.notes.append(f"mergekit's {spec.name} merge takes base_model as one more input (it is not listed under models)")
        elif "weight" in given:
            models.entries.append(_Entry(base, {}, ("base_model",), None))
            t.notes.append(f"mergekit's {spec.name} merge averages base_model too (it is not listed under models); it takes the global weight")
        else:
            t.bad(("base_model",), f"mergekit's {spec.name} merge also averages base_model when it is not listed under `models:`, and then "
                  "needs a weight for it (mergekit fails without one); list it under `models:` with a weight, or remove base_model")


def _our_name(pname: Any, value: Any, spec: MergekitMethod, t: _Translation, *, given: bool) -> str | None:
    """Our name for a mergekit parameter, or None where our method lacks it (refused where mergekit would use it, else noted)."""
    p = spec.method.param(pname)
    if p is not None:
        return p.name
    if given:
        t.notes.append(f"{pname} is ignored by {spec.ours} ({_UNUSED[pname]}), as in mergekit")
    return None


def _model_weight(weight: Any, native_at: PathKey, entry: _Entry, spec: MergekitMethod, given: Mapping[Any, Any], t: _Translation) -> Any:
    """A model's weight: its own, else the global one (which also closes a conditional list); None where there is none."""
    if not spec.reads_weight:
        if weight is not None:
            t.notes.append(f"{_dotted(entry.where)}: mergekit's '{spec.name}' takes no weight; the weight is ignored, as in mergekit")
        return None
    g_weight = given.get("weight")
    t.origin[(*native_at, "weight")] = (*entry.where, "parameters", "weight") if weight is not None else ("parameters", "weight")
    if weight is None:
        weight = g_weight
    elif g_weight is not None:
        weight = _close(weight, g_weight)
    if weight is None or not _has_catch_all(weight):
        t.bad((*entry.where, "parameters", "weight") if weight is not None else entry.where,
              f"mergekit's '{spec.name}' needs a weight for every model (mergekit fails with 'Missing required parameter weight'); "
              "give `parameters: {weight: ...}` here or a global `weight`"
              + ("" if weight is None else " (this conditional list has no entry without a filter)"))
        return None
    return weight


def _model_settings(entry: _Entry, spec: MergekitMethod, t: _Translation) -> tuple[Any, dict[Any, Any]]:
    """A model's own weight and the other per-model parameters mergekit reads (the rest are problems)."""
    settings = dict(entry.parameters)
    weight = settings.pop("weight", None)
    read: dict[Any, Any] = {}
    for pname, value in settings.items():
        where = (*entry.where, "parameters", pname)
        if pname in spec.globals_:
            t.warnings.append(f"{t.where(where)}: '{pname}' is a global parameter of mergekit's '{spec.name}'; mergekit ignores it "
                              "per model, and so does modelsoup (move it to the top-level `parameters:` to use it)")
        elif not spec.reads(pname):
            t.warnings.append(spec.unread(pname, t.where(where)))
        else:
            read[pname] = value
    return weight, read


def _native_model(native_at: PathKey, entry: _Entry, spec: MergekitMethod, given: Mapping[Any, Any], t: _Translation) -> dict[str, Any]:
    """The native model entry at ``native_at`` (``models[j]``, a slice source): the path, the weight, the per-model parameters under our names."""
    t.origin[native_at] = entry.where
    t.origin[(*native_at, "path")] = entry.path_where
    weight, read = _model_settings(entry, spec, t)
    native: dict[str, Any] = {"path": entry.path}
    if entry.lora is not None:
        native["adapter"] = entry.lora
        t.origin[(*native_at, "adapter")] = entry.path_where
    weight = _model_weight(weight, native_at, entry, spec, given, t)
    if weight is not None:
        native["weight"] = weight
    for pname, value in read.items():
        ours = _our_name(pname, value, spec, t, given=True)
        if ours is not None:
            t.origin[(*native_at, "parameters", ours)] = (*entry.where, "parameters", pname)
            native.setdefault("parameters", {})[ours] = value
    return native


_SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
_SOURCE_KEYS = ("model", "layer_range", "parameters")


def _slice_source(at: PathKey, item: Any, t: _Translation) -> tuple[_Entry, Any] | None:
    """One slice source (`- model: PATH` with `layer_range: [start, end]` and optional `parameters:`), or None (a problem)."""
    if not isinstance(item, Mapping):
        t.bad(at, f"a slice source is a mapping with `model:` and `layer_range:`, got {type(item).__name__}")
        return None
    for k in item:
        if k not in _SOURCE_KEYS:
            t.warnings.append(f"{t.where((*at, k))}: unknown key '{k}' in a mergekit slice source ignored, as mergekit ignores it "
                              f"(it reads: {', '.join(_SOURCE_KEYS)})")
    path = item.get("model")
    if not isinstance(path, str):
        t.bad((*at, "model"), "is required: the model's path" if path is None else "must be a path string")
        return None
    ref = _model_ref(path, (*at, "model"), t)
    if ref is None:
        return None
    if item.get("layer_range") is None:
        t.bad((*at, "layer_range"), "is required: [start, end], the layers taken from this model (end excluded)")
        return None
    return _Entry(ref[0], dict(_mapping(item.get("parameters"), (*at, "parameters"), t)), at, lora=ref[1]), item["layer_range"]


def _slices(raw: Any, spec: MergekitMethod, given: Mapping[Any, Any], t: _Translation) -> tuple[list[dict[str, Any]], bool]:
    """The native ``slices:`` (each source a native model entry with ``layers``; slice parameters over the global ones),
    and whether every slice could be read (a slice with a problem is left out, its problem reported)."""
    if not isinstance(raw, list):
        t.bad(("slices",), f"must be a list of `- sources: [...]`, got {type(raw).__name__}")
        return [], False
    complete = True
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        here: PathKey = ("slices", i)
        t.origin[here] = here
        if not isinstance(item, Mapping):
            t.bad(here, f"a slice is a mapping with `sources:`, got {type(item).__name__}")
            complete = False
            continue
        for k in item:
            if k not in _SLICE_KEYS:
                t.warnings.append(f"{t.where((*here, k))}: unknown key '{k}' in a mergekit slice ignored, as mergekit ignores it "
                                  f"(it reads: {', '.join(_SLICE_KEYS)})")
        if item.get("base_model") is not None:
            t.bad((*here, "base_model"), "a per-slice base_model is not supported; set the top-level `base_model:`")
        if item.get("residual_weight") is not None:
            t.warnings.append(f"{t.where((*here, 'residual_weight'))}: mergekit reads residual_weight but no merge method uses it; ignored")
        own = _global_settings(_mapping(item.get("parameters"), (*here, "parameters"), t), spec, t, at=(*here, "parameters"))
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            t.bad((*here, "sources"), "is required: a non-empty list of `- model: PATH` with `layer_range: [start, end]`")
            complete = False
            continue
        native_sources = []
        read_all = True
        for j, raw_src in enumerate(sources):
            at: PathKey = (*here, "sources", j)
            read = _slice_source(at, raw_src, t)
            if read is None:
                read_all = False
                continue
            entry, layers = read
            native = _native_model(at, entry, spec, {**given, **own}, t)
            native["layers"] = layers
            t.origin[(*at, "layers")] = (*at, "layer_range")
            native_sources.append(native)
        native_slice: dict[str, Any] = {"sources": native_sources}
        for pname, value in own.items():
            if pname == "weight" or pname in _MEMORY_OPTIONS:  # the weight went to each source; memory options do nothing
                continue
            ours = _our_name(pname, value, spec, t, given=True)
            if ours is not None:
                t.origin[(*here, "parameters", ours)] = (*here, "parameters", pname)
                native_slice.setdefault("parameters", {})[ours] = _map_leaves(value, _rescale_value) if pname == "rescale" else value
        if read_all:
            out.append(native_slice)
        complete = complete and read_all
    return out, complete


def _method_setting(pname: str, default: Any, spec: MergekitMethod, given: Mapping[Any, Any], missing_at: PathKey, t: _Translation) -> Any:
    """A global parameter as mergekit resolves it: given (closed by the default where conditional), else the default; None = a problem."""
    value = given.get(pname)
    if value is None:
        if default is None and ("parameters", pname) not in t.malformed:  # a malformed one is reported as such
            t.bad(missing_at, f"mergekit's '{spec.name}' needs the parameter '{pname}' (it has no default)")
        return default
    if not _has_catch_all(value) and default is None:
        t.bad(("parameters", pname), f"this conditional list has no entry without a filter, and '{pname}' has no default in mergekit "
              "(mergekit fails on tensors no filter matches); add `- value: ...`")
        return None
    return _close(value, default)


def _method_parameters(data: Mapping[str, Any], spec: MergekitMethod, given: Mapping[Any, Any], t: _Translation) -> dict[str, Any]:
    """Our method's parameters: mergekit's algorithm fixed, then each mergekit parameter, given or with mergekit's default."""
    out: dict[str, Any] = dict(spec.fixed)
    missing_at: PathKey = ("parameters",) if "parameters" in data else ("merge_method",)
    for pname, default in {**spec.globals_, **spec.tensor}.items():
        if pname in _MEMORY_OPTIONS:
            if given.get(pname) is not None:
                t.notes.append(f"{pname} is a mergekit memory option; ignored")
            continue
        value = _method_setting(pname, default, spec, given, missing_at, t)
        if value is None:
            continue
        ours = _our_name(pname, value, spec, t, given=pname in given)
        if ours is not None:
            t.origin[("parameters", ours)] = ("parameters", pname)
            out[ours] = _map_leaves(value, _rescale_value) if pname == "rescale" else value
    return out


def recipe_from_mergekit(data: Mapping[str, Any], *, source: str | None = None, lines: Mapping[PathKey, int] | None = None) -> Recipe:
    """Translate and validate a mergekit recipe (whole-model form).

    Args:
        data: the parsed YAML mapping (it has a top-level ``merge_method``).
        source: file name for messages.
        lines: path -> line, from :func:`modelsoup.recipe.load_yaml`.

    Returns:
        A :class:`Recipe` with ``source_format == "mergekit"`` whose rules give the numbers mergekit would use.

    Raises:
        RecipeError: every problem, placed at its line in the mergekit file.
    """
    t = _Translation(source, lines)
    _check_top_keys(data, t)
    spec = _mergekit_method(data, t)
    tokenizer = _tokenizer(data, t)
    dtype = _output_dtype(data, t)
    raw_models = _models_list(data, t)
    base = _base_model(data, t)
    raw_params = _mapping(data.get("parameters"), ("parameters",), t)
    if spec is None:  # nothing to read the parameters against
        t.problems.raise_if_any()
    assert spec is not None

    given = _global_settings(raw_params, spec, t)
    native: dict[str, Any] = {"method": spec.ours}
    if data.get("slices") is not None:
        if spec.method.base == "required" and base is None:
            t.bad(("base_model",) if "base_model" in data else ("merge_method",), f"mergekit's '{spec.name}' needs `base_model:`")
        native["slices"], complete = _slices(data.get("slices"), spec, given, t)
    else:
        models = _ingredients(raw_models, base, spec, t)
        _check_base(data, raw_models, base, models, spec, given, t)
        native["models"] = [_native_model(("models", j), entry, spec, given, t) for j, entry in enumerate(models.entries)]
        complete = models.complete
    native["parameters"] = _method_parameters(data, spec, given, t)
    if spec.method.random:
        t.notes.append("DARE drops entries with modelsoup's generator (seeded per tensor), so the random masks differ from mergekit's")
    if base is not None:
        native["base"] = {"path": base}
    if dtype is not None:
        native["dtype"] = dtype
    if tokenizer:
        native["output"] = tokenizer
    return build_recipe(
        native, source=source, lines=lines, problems=t.problems, source_format="mergekit", notes=t.notes, warnings=t.warnings,
        check_count=complete,
    )


__all__ = ["MERGEKIT_METHODS", "MergekitMethod", "recipe_from_mergekit"]

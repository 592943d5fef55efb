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
ties                ties; density=1.0, scale=lambda (1.0), normalize=true, sign_method=sum,
                    sign_from=weighted, divide_by=weight_sum.
dare_ties           dare_ties; density=1.0, rescale=l1 (rescale: true) / none, normalize=false,
                    sign_method=sum, sign_from=weighted, divide_by=weight_sum.
dare_linear         dare_linear; density=1.0, rescale=l1 / none, normalize=false.
breadcrumbs         breadcrumbs; density=1.0, gamma=0.01, sign_method=none, normalize=false.
breadcrumbs_ties    breadcrumbs; as above with sign_method=sum, sign_from=weighted, divide_by=weight_sum.
slerp               slerp with base=base_model (the t=0 end) and the one other model (t=1); ``t`` is
                    required (no default); dot_threshold=0.9995, eps=1e-8.
model_stock         model_stock; filter_wise=false; base_model required, >= 2 other models.
==================  ===============================================================================

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

Not supported (each refused with a problem that says so): the ``slices:`` and ``modules:`` forms,
methods other than the ones above, LoRA references (``model+lora``), ``tokenizer_source`` other than
``base`` or absent, the ``tokenizer:`` block (it can add tokens and so resize embeddings), ``rescale: true``
for ties/breadcrumbs, parameters mergekit's method does not read (mergekit ignores them silently; here
they are almost always typos). Accepted and ignored, with a note: ``int8_mask`` (a memory option),
``chat_template`` (only affects the tokenizer files), weights given to slerp/model_stock (mergekit ignores
them), ``density`` for task_arithmetic (no sparsification). Known numeric differences: DARE masks come from
our generator (seeded per tensor), not torch's global RNG as in mergekit; mergekit computes in ``dtype``
while modelsoup computes in float32 and casts at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .loader import PathKey, Problems
from .schema import DTYPES, Recipe
from .validate import _resolve, build_recipe, check_setting

TOP_KEYS = (
    "merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "slices", "modules",
)


@dataclass(frozen=True)
class _MkMethod:
    """How one mergekit method maps onto ours."""

    ours: str
    globals_: dict[str, Any]  # mergekit global parameter -> mergekit default (None = required)
    tensor: dict[str, Any]  # mergekit per-model parameter -> default (None = required)
    fixed: dict[str, Any] = field(default_factory=dict)  # our parameters that encode mergekit's algorithm
    family: str = "gta"  # gta | linear | slerp | model_stock


_GTA_GLOBALS = {"int8_mask": False, "normalize": None, "rescale": None, "lambda": 1.0}
_TIES_FIXED = {"sign_method": "sum", "sign_from": "weighted", "divide_by": "weight_sum"}


def _gta(ours: str, normalize: bool, rescale: bool, fixed: dict[str, Any], gamma: bool = False) -> _MkMethod:
    tensor: dict[str, Any] = {"weight": None, "density": 1.0}
    if gamma:
        tensor["gamma"] = 0.01
    return _MkMethod(ours, {**_GTA_GLOBALS, "normalize": normalize, "rescale": rescale}, tensor, fixed)


MERGEKIT_METHODS: dict[str, _MkMethod] = {
    "linear": _MkMethod("linear", {"normalize": True}, {"weight": None}, family="linear"),
    "task_arithmetic": _gta("task_arithmetic", False, False, {}),
    "ties": _gta("ties", True, False, _TIES_FIXED),
    "dare_ties": _gta("dare_ties", False, True, _TIES_FIXED),
    "dare_linear": _gta("dare_linear", False, True, {}),
    "breadcrumbs": _gta("breadcrumbs", False, False, {"sign_method": "none"}, gamma=True),
    "breadcrumbs_ties": _gta("breadcrumbs", False, False, _TIES_FIXED, gamma=True),
    "slerp": _MkMethod("slerp", {"t": None}, {}, {"dot_threshold": 0.9995, "eps": 1e-8}, family="slerp"),
    "model_stock": _MkMethod("model_stock", {"filter_wise": False}, {}, family="model_stock"),
}

# mergekit name -> our name, where they differ.
_RENAMED = {"lambda": "scale"}
# mergekit parameters that do nothing here (memory options, or read but unused by the method).
_IGNORED = {"int8_mask"}


def _is_conditional(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and all(isinstance(e, Mapping) for e in setting)


def _has_catch_all(setting: Any) -> bool:
    if not _is_conditional(setting):
        return True
    return any(c.get("filter") in (None, "*") for c in setting)


def _close(setting: Any, default: Any) -> Any:
    """Append mergekit's default to a conditional list no entry of which matches every tensor."""
    if _has_catch_all(setting):
        return setting
    return [*setting, {"value": default}]


def _map_leaves(setting: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(setting, list):
        return [({**c, "value": _map_leaves(c["value"], fn)} if isinstance(c, Mapping) else fn(c)) for c in setting]
    return fn(setting)


def _leaves(setting: Any) -> list[Any]:
    if isinstance(setting, list):
        out: list[Any] = []
        for c in setting:
            out += _leaves(c["value"]) if isinstance(c, Mapping) else [c]
        return out
    return [setting]


def _rescale_value(v: Any) -> Any:
    return ("l1" if v else "none") if isinstance(v, bool) else v


def _dtype(value: Any) -> Any:
    return value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value


def _model_path(ref: Any) -> str | None:
    return ref if isinstance(ref, str) else None


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
    remap_table: dict[PathKey, PathKey] = {("method",): ("merge_method",), ("base",): ("base_model",)}

    def remap(path: PathKey) -> PathKey:
        for k in range(len(path), 0, -1):
            if path[:k] in remap_table:
                return remap_table[path[:k]] + path[k:]
        return path

    problems = Problems(source, lines, remap=remap)
    notes: list[str] = []

    def bad(path: PathKey, msg: str) -> None:
        problems.add(path, msg, native=False)

    for key in data:
        if key not in TOP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            bad((key,), f"unknown mergekit key '{key}'{hint} (mergekit keys: {', '.join(TOP_KEYS)})")
    for form in ("slices", "modules"):
        if data.get(form) is not None:
            bad((form,), f"the `{form}:` form is not supported; modelsoup runs mergekit's whole-model form "
                "(`models:` with `model:` entries). If every slice spans all layers of every model, list the models under `models:` instead")

    name = data.get("merge_method")
    spec = MERGEKIT_METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        bad(("merge_method",), f"mergekit method {name!r} is not supported; supported: {', '.join(MERGEKIT_METHODS)}")

    # tokenizer / chat template
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        bad(("tokenizer_source",), f"tokenizer_source {tok!r} is not supported: modelsoup copies the tokenizer files of the base "
            "model (or the first model) unchanged; use `tokenizer_source: base` or leave it out")
    elif tok == "base":
        notes.append("tokenizer_source: base -- the tokenizer files are copied from the base model; all models must share its vocabulary")
    if data.get("tokenizer") is not None:
        bad(("tokenizer",), "the `tokenizer:` block is not supported (it can add tokens and resize embeddings); "
            "remove it, modelsoup copies the base model's tokenizer files")
    if data.get("chat_template") is not None:
        notes.append("chat_template is not applied: the tokenizer files are copied unchanged; set the template in tokenizer_config.json afterwards")

    # dtype: the output dtype is out_dtype, else dtype (mergekit computes in `dtype` and casts to out_dtype)
    dtype_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    dtype = _dtype(data.get(dtype_key))
    if dtype is not None:
        remap_table[("dtype",)] = (dtype_key,)
        if isinstance(dtype, str) and dtype in DTYPES and dtype != "float32" and data.get("dtype") is not None:
            notes.append(f"mergekit computes in {_dtype(data.get('dtype'))}; modelsoup computes in float32 and casts to {dtype}, so values may differ by rounding")

    # models
    raw_models = data.get("models")
    if raw_models is None and data.get("slices") is None and data.get("modules") is None:
        bad(("models",), "is required: a list of `- model: PATH` entries")
    if raw_models is not None and not isinstance(raw_models, list):
        bad(("models",), f"must be a list, got {type(raw_models).__name__}")
        raw_models = None
    base_path = data.get("base_model")
    if base_path is not None and _model_path(base_path) is None:
        bad(("base_model",), "must be a path string (mergekit's mapping form of a model reference is not supported)")
        base_path = None
    if isinstance(base_path, str) and "+" in base_path:
        bad(("base_model",), f"LoRA references ('{base_path}') are not supported; merge the adapter into its model first")
        base_path = None

    g_raw = data.get("parameters") or {}
    if not isinstance(g_raw, Mapping):
        bad(("parameters",), f"must be a mapping, got {type(g_raw).__name__}")
        g_raw = {}

    def known(pname: str) -> bool:
        return spec is not None and (pname in spec.globals_ or pname in spec.tensor)

    def valid_names() -> str:
        return ", ".join([*spec.globals_, *spec.tensor]) if spec else ""

    if spec is None:
        problems.raise_if_any()
    assert spec is not None and isinstance(name, str)

    # global parameters
    global_params: dict[str, Any] = {}
    global_tensor: dict[str, Any] = {}
    for pname, value in g_raw.items():
        where: PathKey = ("parameters", pname)
        if not known(str(pname)):
            bad(where, f"mergekit's '{name}' does not read a parameter '{pname}' (mergekit would silently ignore it); valid: {valid_names()}")
            continue
        msg = check_setting(value, lambda v: None)
        if msg:
            bad(where, msg)
            continue
        if pname in spec.tensor:
            global_tensor[pname] = value
        else:
            global_params[pname] = value

    # models: drop base_model from the ingredients where mergekit does (task vectors, slerp end, model stock)
    entries: list[tuple[int, str, dict[str, Any]]] = []
    seen: set[str] = set()
    base_listed = False
    models_broken = raw_models is None
    for i, item in enumerate(raw_models or []):
        here: PathKey = ("models", i)
        if isinstance(item, str):
            bad(here, f"a mergekit model entry is a mapping `- model: {item}`")
            models_broken = True
            continue
        if not isinstance(item, Mapping):
            bad(here, f"must be a mapping with `model:`, got {type(item).__name__}")
            models_broken = True
            continue
        for k in item:
            if k not in ("model", "parameters"):
                bad((*here, k), f"unknown key '{k}' in a mergekit model entry (valid: model, parameters)")
        path = item.get("model")
        if _model_path(path) is None:
            bad((*here, "model"), "is required: the model's path" if path is None else "must be a path string")
            models_broken = True
            continue
        assert isinstance(path, str)
        if "+" in path:
            bad((*here, "model"), f"LoRA references ('{path}') are not supported; merge the adapter into its model first")
            models_broken = True
            continue
        m_params = item.get("parameters") or {}
        if not isinstance(m_params, Mapping):
            bad((*here, "parameters"), f"must be a mapping, got {type(m_params).__name__}")
            m_params = {}
        is_base = base_path is not None and (path == base_path or _resolve(path) == _resolve(base_path))
        if is_base:
            base_listed = True
        key = str(_resolve(path))
        if key in seen:
            notes.append(f"models[{i}] ({path}) is listed twice; mergekit uses it once, with the parameters of its first entry")
            continue
        seen.add(key)
        if is_base and spec.family != "linear":
            continue  # mergekit: the base is not an ingredient (task vectors, slerp's t=0 end, model stock's anchor)
        entries.append((i, path, dict(m_params)))

    if spec.family in ("gta", "slerp", "model_stock") and base_path is None and raw_models is not None:
        bad(("base_model",) if "base_model" in data else ("merge_method",),
            f"mergekit's '{name}' needs `base_model:`" + (" (the t=0 end of the interpolation)" if spec.family == "slerp" else ""))
        models_broken = True
    if spec.family == "slerp" and base_path is not None and not models_broken and len(entries) != 1:
        bad(("models",), f"mergekit's slerp interpolates base_model (t=0) and exactly one other model (t=1); got {len(entries)} other model(s)")
        models_broken = True
    if spec.family == "linear" and base_path is not None and not base_listed:
        if "weight" in global_tensor:
            entries.append((-1, base_path, {}))
            notes.append("mergekit's linear merge averages base_model too (it is not listed under models); it takes the global weight")
        else:
            bad(("base_model",), "mergekit's linear merge also averages base_model when it is not listed under `models:`, and then needs a "
                "weight for it (mergekit fails without one); list it under `models:` with a weight, or remove base_model")

    # per-model parameters and weights
    models_out: list[dict[str, Any]] = []
    for j, (i, path, m_params) in enumerate(entries):
        src: PathKey = ("models", i) if i >= 0 else ("base_model",)
        remap_table[("models", j)] = src
        remap_table[("models", j, "path")] = (*src, "model") if i >= 0 else src
        entry: dict[str, Any] = {"path": path}
        params: dict[str, Any] = {}
        weight = m_params.pop("weight", None)
        for pname, value in m_params.items():
            where = (*src, "parameters", pname)
            if pname in spec.globals_:
                bad(where, f"'{pname}' is a global parameter of mergekit's '{name}' (mergekit ignores it per model); move it to the top-level `parameters:`")
                continue
            if not known(pname):
                bad(where, f"mergekit's '{name}' does not read a parameter '{pname}' (mergekit would silently ignore it); valid: {valid_names()}")
                continue
            params[pname] = value
        if "weight" in spec.tensor:
            g_weight = global_tensor.get("weight")
            remap_table[("models", j, "weight")] = (*src, "parameters", "weight") if weight is not None else ("parameters", "weight")
            if weight is None:
                weight = g_weight
            elif not _has_catch_all(weight) and g_weight is not None:
                weight = [*weight, *(g_weight if _is_conditional(g_weight) else [{"value": g_weight}])]
            if weight is None or not _has_catch_all(weight):
                bad((*src, "parameters", "weight") if weight is not None else src,
                    f"mergekit's '{name}' needs a weight for every model (mergekit fails with 'Missing required parameter weight'); "
                    "give `parameters: {weight: ...}` here or a global `weight`"
                    + ("" if weight is None else " (this conditional list has no entry without a filter)"))
            else:
                entry["weight"] = weight
        elif weight is not None:
            notes.append(f"models[{i}]: mergekit's '{name}' takes no weight; the weight is ignored, as in mergekit")
        for pname, value in params.items():
            if pname == "density" and spec.ours == "task_arithmetic":
                notes.append("density is ignored by task_arithmetic (no sparsification), as in mergekit")
                continue
            ours = _RENAMED.get(pname, pname)
            remap_table[("models", j, "parameters", ours)] = (*src, "parameters", pname)
            entry.setdefault("parameters", {})[ours] = value
        models_out.append(entry)

    # global parameters with mergekit's defaults written out
    out_params: dict[str, Any] = dict(spec.fixed)
    for pname, default in {**spec.globals_, **spec.tensor}.items():
        if pname == "weight":
            continue
        value = global_params.get(pname, global_tensor.get(pname))
        if pname in _IGNORED:
            if value is not None:
                notes.append(f"{pname} is a mergekit memory option; ignored")
            continue
        if value is None:
            if default is None:
                bad(("parameters",) if "parameters" in data else ("merge_method",),
                    f"mergekit's '{name}' needs the parameter '{pname}' (it has no default)")
                continue
            value = default
        elif not _has_catch_all(value):
            if default is None:
                bad(("parameters", pname), f"this conditional list has no entry without a filter, and '{pname}' has no default in mergekit "
                    "(mergekit fails on tensors no filter matches); add `- value: ...`")
                continue
            value = _close(value, default)
        if pname == "rescale":
            if spec.ours in ("dare_ties", "dare_linear"):
                out_params["rescale"] = _map_leaves(value, _rescale_value)
                remap_table[("parameters", "rescale")] = ("parameters", "rescale")
            elif any(v is not False for v in _leaves(value)):
                bad(("parameters", "rescale"), f"rescale: true (L1-norm rescaling after pruning) is not supported for '{name}'; remove it")
            continue
        if pname == "density" and spec.ours == "task_arithmetic":
            if pname in global_tensor:
                notes.append("density is ignored by task_arithmetic (no sparsification), as in mergekit")
            continue
        ours = _RENAMED.get(pname, pname)
        remap_table[("parameters", ours)] = ("parameters", pname)
        out_params[ours] = value
    if spec.ours in ("dare_ties", "dare_linear"):
        notes.append("DARE drops entries with modelsoup's generator (seeded per tensor), so the random masks differ from mergekit's")

    native: dict[str, Any] = {"method": spec.ours, "models": models_out, "parameters": out_params}
    if base_path is not None:
        native["base"] = {"path": base_path}
    if dtype is not None:
        native["dtype"] = dtype
    return build_recipe(
        native, source=source, lines=lines, problems=problems, source_format="mergekit", notes=notes, check_count=not models_broken
    )


__all__ = ["MERGEKIT_METHODS", "recipe_from_mergekit"]

"""PEFT LoRA adapters, read lazily, and the model an adapter makes of its base.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``). Its
tensors are, per adapted module ``M`` of the base model (names as peft saves them, ``base_model.model.``
prefix removed):

* ``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r) for a linear layer (``nn.Linear``, or
  GPT-2's ``Conv1D`` with ``fan_in_fan_out``), or ``M.lora_embedding_A`` (r, vocab) and
  ``M.lora_embedding_B`` (dim, r) for an embedding. The change to the base weight ``M.weight`` is
  ``scaling * B @ A`` (transposed for ``fan_in_fan_out`` and embeddings), ``scaling = alpha / r``, or
  ``alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``alpha`` may differ per module (``rank_pattern``,
  ``alpha_pattern``, matched as peft matches them).
* any other tensor (``modules_to_save`` copies such as a classifier head, biases trained with
  ``bias: all``) is a full tensor that replaces the base's.

Anything else an adapter may hold changes the model in a way a weight delta does not express (DoRA
magnitudes, LoRA biases, trainable tokens, aLoRA, layer replication, a base altered by PiSSA/OLoRA/CorDA/
LoftQ initialisation) and is refused with :class:`~modelsoup.errors.AdapterError`, as is an adapter
whose factors do not fit its base. :class:`AdaptedCheckpoint` is the base with an adapter applied, read
tensor by tensor like any checkpoint, so every merge method and soup takes adapters.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError
from .checkpoints import Checkpoint, SafetensorsCheckpoint, _torch_checkpoint, inside_folder

log = logging.getLogger("modelsoup")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
MAX_CONFIG = 1 << 20
MAX_PATTERN = 1000

# Config keys that change nothing about what the saved tensors mean (or only matter with a feature refused below).
_HARMLESS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_type", "peft_version", "auto_mapping",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out", "bias",
    "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "ensure_weight_tying",
    "init_lora_weights", "eva_config", "qalora_group_size", "megatron_core", "loftq_config", "target_modules_to_tie",
})
# Config keys whose (truthy) value makes the adapter more than a weight delta on its base: key -> what it is.
_REFUSED = {
    "use_dora": "a DoRA adapter: its magnitude vectors rescale each column of the adapted weight, which is not a sum of deltas "
                "(merge it into its base with peft's merge_and_unload and soup the full models)",
    "lora_bias": "LoRA with a bias on lora_B (lora_bias: true)",
    "layer_replication": "layer replication: the adapted model has more layers than its base",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "an activated LoRA (aLoRA): it applies only after its invocation tokens, so merging it into the weights changes the model",
    "megatron_config": "a Megatron-parallel LoRA (megatron_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing among several LoRAs (arrow_config)",
    "lora_ga_config": "LoRA-GA (lora_ga_config), whose initialisation changes the base weights",
    "kasa_config": "KaSA (kasa_config), which changes the base weights",
    "corda_config": "CorDA (corda_config), whose initialisation changes the base weights",
}
# init_lora_weights values that change the base weights the adapter was trained on.
_BASE_CHANGING_INIT = re.compile(r"^(pissa|olora|corda|loftq|lora_ga)", re.IGNORECASE)

_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_LORA_PART = re.compile(r"(^|\.)(lora_[A-Za-z_]+|hada_w[12]_[ab]|lokr_w[12](_[ab])?|ia3_l|trainable_tokens_[a-z]+)(\.|$)")


# A group followed by a quantifier: the shape of patterns whose matching can backtrack exponentially ('(.|..)+!').
_QUANTIFIED_GROUP = re.compile(r"\)(\*|\+|\{|\?\?)")
# Model types whose linear layers are transformers' Conv1D (weight stored (in, out)), and the names of those layers.
CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_LAYERS = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Architectures with an output head that tie_word_embeddings ties to the input embedding.
_LM_HEAD_ARCHS = ("LMHead", "CausalLM", "MaskedLM", "ConditionalGeneration", "PreTraining")


def _positive(v: Any) -> bool:
    """Whether a config value is a finite positive number (a 400-digit JSON integer is not: it has no float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:
        return False


def model_config(ck: Checkpoint) -> dict[str, Any]:
    """The base's ``config.json`` (empty when it has none or it cannot be read)."""
    if ck.folder is None:
        return {}
    try:
        cfg = json.loads((ck.folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def ties_output_head(cfg: Mapping[str, Any]) -> bool:
    """Whether a model of this config ties an output head to its input embedding."""
    archs = cfg.get("architectures") or []
    has_head = isinstance(archs, list) and any(isinstance(a, str) and any(k in a for k in _LM_HEAD_ARCHS) for a in archs)
    return has_head and cfg.get("tie_word_embeddings", True) is not False


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    p = Path(path)
    try:
        return p.is_dir() and (p / ADAPTER_CONFIG).exists()
    except OSError:
        return False


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of the base.

    Attributes:
        module: its name in the model peft wrapped (``bert.encoder.layer.0.attention.self.query``).
        a, b: the names of its factors in the adapter file.
        embedding: factors of an embedding (``lora_embedding_A/B``): the delta is ``(B @ A).T``.
        transpose: the delta is ``(B @ A).T`` (an embedding). Whether a linear layer stores its weight transposed
            (GPT-2's Conv1D) is decided against the base, per layer, by :class:`AdaptedCheckpoint`.
        rank, alpha: as the config gives them for this module (patterns applied).
        scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        shape: the shape of the delta in the layer's own layout ((out, in) for a linear layer, (vocab, dim) for an embedding).
    """

    module: str
    a: str
    b: str
    embedding: bool
    transpose: bool
    rank: int
    alpha: float
    scaling: float
    shape: tuple[int, ...]


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first key of a peft rank/alpha pattern that matches ``module`` (as ``peft.utils.other.get_pattern_key``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class Adapter:
    """A PEFT LoRA adapter, opened lazily: its config, and its factors and full tensors by module.

    Attributes:
        label: how messages name it (its path).
        folder: the adapter folder.
        config: ``adapter_config.json``.
        files: the weight file (for hashing).
        modules: adapted modules by name, in file order.
        full: full tensors (``modules_to_save`` copies, trained biases): name in the model -> name in the file.
        dtype: the dtype of the factors.
    """

    def __init__(self, folder: Path, label: str | None = None) -> None:
        self.folder = folder
        self.label = label or str(folder)
        self.config = self._read_config()
        self.reader = self._open_weights()
        self.files = [self.folder / ADAPTER_CONFIG, *self.reader.files]  # the config decides what the factors mean: hashed with them
        names = self.reader.names()
        prefix = PEFT_PREFIX if names and all(n.startswith(PEFT_PREFIX) for n in names) else ""
        self._name = {n[len(prefix):]: n for n in names}
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}
        self.base_weights: dict[str, str] = {}  # module -> its saved layer weight (the delta adds to it, not to the base's)
        self.ignored: list[str] = []  # tensors peft would not load (a base_layer tensor of a module without LoRA)
        self._scan()

    # -- reading -----------------------------------------------------------------------------------
    def _bad(self, why: str) -> AdapterError:
        return AdapterError(f"{self.label}: {why}")

    def _read_config(self) -> dict[str, Any]:
        path = inside_folder(self.folder, ADAPTER_CONFIG, f"{self.label}: the adapter config")
        try:
            if path.stat().st_size > MAX_CONFIG:
                raise self._bad(f"{ADAPTER_CONFIG} is {path.stat().st_size} bytes, over the {MAX_CONFIG >> 10} KB a config may have")
            cfg = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise self._bad(f"{ADAPTER_CONFIG} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(cfg, dict):
            raise self._bad(f"{ADAPTER_CONFIG} holds a {type(cfg).__name__}, not an object")
        kind = cfg.get("peft_type")
        if kind != "LORA":
            what = f"a {kind} adapter" if isinstance(kind, str) else "an adapter config without peft_type: LORA"
            raise self._bad(f"is {what}; modelsoup reads LoRA adapters only (merge it into its base with peft's merge_and_unload and soup the full models)")
        for key, what in _REFUSED.items():
            if cfg.get(key):
                raise self._bad(f"is {what}, which modelsoup cannot merge exactly; refused rather than merged wrongly "
                                f"({ADAPTER_CONFIG}: {key} = {json.dumps(cfg[key])[:60]})")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and _BASE_CHANGING_INIT.match(init):
            raise self._bad(f"was initialised with init_lora_weights = '{init}', which changes the base weights the adapter was trained on; "
                            "convert it to a plain LoRA first (peft's save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        if cfg.get("loftq_config"):
            raise self._bad("uses LoftQ (loftq_config), whose base weights are not the original model's; merge it with peft instead")
        unknown = sorted(k for k, v in cfg.items() if k not in _HARMLESS and k not in _REFUSED and v not in (None, False, {}, [], ""))
        if unknown:
            raise self._bad(f"{ADAPTER_CONFIG} sets {', '.join(repr(k) for k in unknown[:4])}, LoRA option(s) modelsoup does not know; "
                            "refused, since they may change what the factors mean (upgrade modelsoup, or merge the adapter with peft)")
        for key in ("r", "lora_alpha"):
            if not _positive(cfg.get(key)):
                raise self._bad(f"{ADAPTER_CONFIG}: {key} = {json.dumps(cfg.get(key))[:40]}, expected a positive number")
        for key in ("rank_pattern", "alpha_pattern"):
            pat = cfg.get(key) or {}
            if not isinstance(pat, dict):
                raise self._bad(f"{ADAPTER_CONFIG}: {key} is a {type(pat).__name__}, expected an object of module pattern -> number")
            for k, v in pat.items():
                if len(k) > MAX_PATTERN:
                    raise self._bad(f"{ADAPTER_CONFIG}: a {key} key is {len(k)} characters long (at most {MAX_PATTERN})")
                if _QUANTIFIED_GROUP.search(k):
                    raise self._bad(f"{ADAPTER_CONFIG}: {key} key '{k[:60]}' repeats a group ('(...)+', '(...)*'), which can make matching "
                                    "take exponential time; modelsoup refuses such patterns (name the modules plainly, e.g. 'layers.0.self_attn.q_proj')")
                try:
                    re.compile(rf"(.*\.)?({k})$")  # as peft places it (an inline flag inside a group fails only there)
                except re.error as e:
                    raise self._bad(f"{ADAPTER_CONFIG}: {key} key '{k[:60]}' is not a valid pattern as peft matches it ({e})") from None
                if not _positive(v):
                    raise self._bad(f"{ADAPTER_CONFIG}: {key}['{k[:60]}'] = {json.dumps(v)[:40]}, expected a positive number")
        if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
            raise self._bad(f"{ADAPTER_CONFIG}: bias = {json.dumps(cfg.get('bias'))[:40]}, expected none, all or lora_only")
        return cfg

    def _open_weights(self) -> Checkpoint:
        present = [w for w in ADAPTER_WEIGHTS if (self.folder / w).exists()]
        if not present:
            raise self._bad(f"the folder has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}; the adapter is incomplete")
        path = inside_folder(self.folder, present[0], f"{self.label}: the adapter weights")
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(self.label, [path])
        return _torch_checkpoint(self.label, [path], None, None)

    def _scan(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        rest: list[str] = []
        for name in self._name:
            m = _FACTOR.match(name)
            if m:
                parts.setdefault(m["module"], {})[m["part"]] = name
            elif _LORA_PART.search(name):
                hit = _LORA_PART.search(name)
                assert hit is not None
                what = ("a DoRA magnitude vector" if "magnitude" in hit[2] else "a LoRA bias" if name.endswith("lora_B.bias")
                        else f"an adapter tensor of a kind modelsoup does not merge ('{hit[2]}')")
                raise self._bad(f"tensor '{self._name[name]}' is {what}; refused rather than merged wrongly "
                                "(merge the adapter into its base with peft's merge_and_unload and soup the full models)")
            else:
                rest.append(name)
        for name in rest:
            if ".original_module." in name:  # peft's wrapper keeps the base's own copy there (saved by bias: all)
                continue
            if ".base_layer." in name:  # a LoRA-wrapped layer's own tensors: peft loads them only into an adapted module
                module, param = name.split(".base_layer.", 1)
                if module not in parts:
                    self.ignored.append(self._name[name])  # peft has no such parameter and ignores it on load
                    continue
                if param == "weight":  # the layer's weight saved with the adapter (an lm_head or resized embedding): W = it + delta
                    self.base_weights[module] = self._name[name]
                    continue
            # a modules_to_save wrapper keeps its trained copy under modules_to_save (bias: all saves it there as well as plainly)
            plain = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            if plain in self.full:
                self._same(plain, name)
                if plain != name:
                    continue
            elif plain != name and plain in self._name:
                self._same(plain, name)
                continue
            self.full[plain] = self._name[name]
        for module, got in parts.items():
            emb = "lora_embedding_A" in got or "lora_embedding_B" in got
            need = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            lacking = [p for p in need if p not in got]
            if lacking or len(got) != 2:
                raise self._bad(f"module '{module}' has {', '.join(sorted(got))} but not {', '.join(lacking) or 'a matching pair'}; "
                                "each adapted module needs both factors (a damaged or mixed adapter file)")
            a, b = self._name[got[need[0]]], self._name[got[need[1]]]
            a_dtype, a_shape = self.reader.meta(a)
            b_dtype, b_shape = self.reader.meta(b)
            if not (a_dtype.is_floating_point and b_dtype.is_floating_point):
                raise self._bad(f"module '{module}': factors of dtype {a_dtype} / {b_dtype}; quantized or integer factors are not supported")
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise self._bad(f"module '{module}': factors of shapes {list(a_shape)} and {list(b_shape)}; modelsoup merges LoRA on linear "
                                "layers and embeddings (2-D factors), not on convolutions")
            rank = a_shape[0]
            if b_shape[1] != rank:
                raise self._bad(f"module '{module}': lora_A has rank {a_shape[0]} but lora_B {list(b_shape)} has {b_shape[1]} columns; the factors do not fit")
            r_key = _pattern_key(self.config.get("rank_pattern") or {}, module)
            a_key = _pattern_key(self.config.get("alpha_pattern") or {}, module)
            r = (self.config.get("rank_pattern") or {}).get(r_key, self.config["r"]) if r_key else self.config["r"]
            alpha = float((self.config.get("alpha_pattern") or {}).get(a_key, self.config["lora_alpha"]) if a_key else self.config["lora_alpha"])
            if r != rank:
                raise self._bad(f"module '{module}': the factors have rank {rank} but {ADAPTER_CONFIG} gives r = {r} for it"
                                f"{f' (rank_pattern {r_key!r})' if r_key else ''}; the scaling alpha/r would be wrong, so it is refused")
            scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
            delta = (b_shape[0], a_shape[1])  # B @ A: (out, in); an embedding's weight is its transpose
            self.modules[module] = LoraModule(module, a, b, emb, emb, int(rank), alpha, scaling, delta[::-1] if emb else delta)
        if not self.modules and not self.full:
            raise self._bad("the adapter holds no tensors")

    def _same(self, plain: str, other: str) -> None:
        """Two saved copies of one full tensor must agree (peft saves some twice)."""
        a, b = self.reader.read(self._name[plain]), self.reader.read(self._name[other])
        if a.shape != b.shape or not torch.equal(a, b):
            raise self._bad(f"tensors '{self._name[plain]}' and '{self._name[other]}' are two copies of one tensor but differ; "
                            "the adapter file is inconsistent")

    # -- tensors -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        first = next(iter(self.modules.values()), None)
        return self.reader.meta(first.a)[0] if first is not None else torch.float32

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a module in float32, as stored (embeddings: ``lora_embedding_A/B``)."""
        m = self.modules[module]
        return self.reader.read(m.a).to(torch.float32), self.reader.read(m.b).to(torch.float32)

    def delta(self, module: str, transpose: bool | None = None) -> torch.Tensor:
        """``scaling * B @ A`` of a module in float32, transposed for embeddings (or when ``transpose`` says so)."""
        m = self.modules[module]
        a, b = self.factors(module)
        d = (b @ a) * m.scaling
        return d.T.contiguous() if (m.transpose if transpose is None else transpose) else d

    def read_full(self, name: str) -> torch.Tensor:
        return self.reader.read(self.full[name])

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Open a PEFT LoRA adapter folder (headers and config only).

    Raises:
        AdapterError: not an adapter folder, an adapter that is not plain LoRA, or damaged factors.
        CheckpointError: an unreadable weight file.
    """
    folder = Path(path)
    if not is_adapter(folder):
        raise AdapterError(f"{label or path}: not a PEFT adapter folder (no {ADAPTER_CONFIG} in it)")
    return Adapter(folder, label)


def bind(adapter: Adapter, base_names: list[str]) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Which base tensor each adapted module and each full tensor of ``adapter`` changes.

    peft names modules as they are in the model it wrapped; the base may be saved with or without the task
    model's wrapper prefix (``bert.``): one rewrite (drop a leading name component, or add one) is chosen
    that fits every tensor of the adapter, or none is.

    Returns:
        (module -> base weight name, full tensor name -> base name, a note on the rewrite or None).

    Raises:
        AdapterError: no rewrite, or several, fit every tensor of the adapter.
    """
    have = set(base_names)
    wanted = [m + ".weight" for m in adapter.modules] + list(adapter.full)
    if not wanted:
        return {}, {}, None
    prefixes = {""}
    first = wanted[0]
    for n in base_names:  # prefixes the base adds in front of the adapter's names
        for cut in _cuts(first):
            tail = first[cut:]
            if n.endswith("." + tail):
                prefixes.add(n[: -len(tail)])
    found: dict[tuple[str, ...], tuple[int, str]] = {}  # distinct mappings -> the simplest rewrite that gives it
    closest: tuple[int, str] = (-1, wanted[0])  # (tensors the best partial rewrite fits, the first it misses)
    for cut in range(0, 3):
        for pre in sorted(prefixes):
            mapped = tuple(_rewrite(n, cut, pre) for n in wanted)
            fit = [bool(m) and m in have for m in mapped]
            if all(fit):
                found.setdefault(mapped, (cut, pre))
            elif sum(fit) > closest[0]:
                closest = (sum(fit), wanted[fit.index(False)])
    if not found:
        missing = closest[1]
        raise AdapterError(
            f"{adapter.label}: changes '{missing}', which the base does not have (nor under a wrapper prefix added or removed); "
            "give as base the model the adapter was trained on. A classifier head in modules_to_save needs a base with that head: "
            "save the task model (e.g. AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N).save_pretrained(DIR)) and give DIR")
    exact = tuple(wanted)
    if exact in found:
        mapped, (cut, pre) = exact, (0, "")
    elif len(found) > 1:
        shown = "; ".join(f"'{wanted[0]}' -> '{m[0]}'" for m in list(found)[:3])
        raise AdapterError(f"{adapter.label}: its tensor names fit the base in several ways ({shown}); refused as ambiguous")
    else:
        mapped, (cut, pre) = next(iter(found.items()))
    note = None if (cut, pre) == (0, "") else f"{adapter.label}: its module names were matched to the base's by " + (
        f"dropping {cut} leading part(s)" if cut else "") + (" and " if cut and pre else "") + (f"adding '{pre}'" if pre else "")
    by_name = dict(zip(wanted, mapped))
    seen: dict[str, str] = {}
    for n in adapter.full:
        if by_name[n] in seen:
            raise AdapterError(f"{adapter.label}: tensors '{seen[by_name[n]]}' and '{n}' both become the base's '{by_name[n]}'; refused as ambiguous")
        seen[by_name[n]] = n
    modules = {m: by_name[m + ".weight"] for m in adapter.modules}
    full = {n: by_name[n] for n in adapter.full}
    return modules, full, note


def _rewrite(name: str, cut: int, prefix: str) -> str:
    """``name`` without its first ``cut`` dotted parts, with ``prefix`` in front ("" when nothing would be left)."""
    parts = name.split(".")
    return prefix + ".".join(parts[cut:]) if len(parts) > cut + 1 else ""


def _cuts(name: str) -> list[int]:
    """Start offsets of the dotted suffixes of ``name`` that keep at least three parts (``query.weight`` alone says too little)."""
    starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]
    return starts[: max(1, len(starts) - 2)]


class AdaptedCheckpoint(Checkpoint):
    """A base model with a LoRA adapter applied, read tensor by tensor: ``W = W_base + scaling * B @ A`` for
    every adapted weight (computed in float32 and returned in float32, so a merge sees the exact delta),
    the adapter's full tensors in place of the base's, every other tensor the base's.

    Names, dtypes and shapes are the base's, so merges, soups and evaluators take it like any checkpoint.

    Raises:
        AdapterError: the adapter does not fit the base (a tensor it changes is missing, has another
            shape or is not floating point, or two of its entries change one tied tensor).
    """

    kind = "adapter"

    def __init__(self, base: Checkpoint, adapter: Adapter) -> None:
        super().__init__(f"{adapter.label} (on {base.label})")
        self.base, self.adapter = base, adapter
        self.files = [*base.files, *adapter.files]
        self.folder = base.folder
        self.layout = dict(base.layout)
        self.notes = list(base.notes)
        self._meta = {n: base.meta(n) for n in base.names()}
        self._alias = base.aliases()
        cfg = model_config(base)
        tied_head = ties_output_head(cfg)
        for module in adapter.modules:
            if module.split(".")[-1] == "lm_head" and f"{module}.weight" not in self._meta and tied_head:
                raise AdapterError(self._tied(module, "the base stores no lm_head: it is tied to the input embedding (tie_word_embeddings)"))
        modules, full, note = bind(adapter, base.names())
        if note:
            self.notes.append(note)
        if adapter.ignored:
            self.notes.append(f"{adapter.label}: ignored {len(adapter.ignored)} tensor(s) of layers without LoRA, as peft ignores them: "
                              + ", ".join(adapter.ignored[:3]))
        kind = cfg.get("model_type")
        self._delta: dict[str, str] = {}
        self._transpose: dict[str, bool] = {}
        self._full: dict[str, str] = {}
        self._layer_weight: dict[str, str] = {}  # target -> the adapter's saved layer weight the delta adds to
        tied = set(self._alias) | set(self._alias.values())
        for module, name in modules.items():
            target = self._alias.get(name, name)
            dtype, shape = base.meta(target)
            m = adapter.modules[module]
            if not dtype.is_floating_point:
                raise AdapterError(f"{adapter.label}: adapts '{name}', a {dtype} tensor of the base; only floating-point weights can take a delta")
            if name in tied or (m.embedding and tied_head):
                raise AdapterError(self._tied(module, f"'{name}' is tied to another tensor of the base"
                                              if name in tied else "the base ties its output head to this embedding (tie_word_embeddings)"))
            self._transpose[target] = self._layout(module, name, m, tuple(shape), kind)
            if target in self._delta:
                raise AdapterError(f"{adapter.label}: modules '{self._delta[target]}' and '{module}' both change '{target}'; refused")
            self._delta[target] = module
            if module in adapter.base_weights:
                saved = adapter.base_weights[module]
                if tuple(adapter.reader.meta(saved)[1]) != tuple(shape):
                    raise AdapterError(f"{adapter.label}: its saved layer weight '{saved}' is {list(adapter.reader.meta(saved)[1])} but the base's "
                                       f"'{name}' is {list(shape)}; give as base the model the adapter was trained on")
                self._layer_weight[target] = saved
        for fname, name in full.items():
            dtype, shape = adapter.reader.meta(adapter.full[fname])
            bdtype, bshape = base.meta(name)
            if tuple(shape) != tuple(bshape) or dtype.is_floating_point != bdtype.is_floating_point:
                raise AdapterError(f"{adapter.label}: its full tensor '{fname}' is {str(dtype).replace('torch.', '')} {list(shape)} but the base's "
                                   f"'{name}' is {str(bdtype).replace('torch.', '')} {list(bshape)}; give as base the model the adapter was trained on")
            if name in self._delta or self._alias.get(name, name) in self._delta:
                raise AdapterError(f"{adapter.label}: '{name}' is both adapted by LoRA factors and saved whole; refused as ambiguous")
            if name in tied:
                raise AdapterError(f"{adapter.label}: saves '{name}' whole, but it is tied to another tensor in the base; refused "
                                   "(untie the weights before training, or merge with peft)")
            self._full[name] = fname

    def _tied(self, module: str, why: str) -> str:
        return (f"{self.adapter.label}: adapts '{module}', but {why}. peft applies the adapter to one side only while it runs, and folding the "
                "delta into the shared tensor changes both sides, so the merged model would not be the adapted one; refused "
                "(untie the weights, or train the adapter on untied layers)")

    def _layout(self, module: str, name: str, m: LoraModule, shape: tuple[int, ...], kind: Any) -> bool:
        """Whether this linear layer stores its weight transposed (GPT-2's Conv1D), as peft decides it: from the layer, not the config flag.

        With the base's config the model type says it (Conv1D layers of GPT-2-like models); without it, the shape must:
        a square weight is then ambiguous unless the adapter claims no transposed layer at all.
        """
        if m.embedding:
            if shape != m.shape:
                raise AdapterError(f"{self.adapter.label}: embedding '{module}' makes a delta of shape {list(m.shape)} but the base's '{name}' is "
                                   f"{list(shape)}; give as base the model the adapter was trained on")
            return True
        plain, flipped = shape == m.shape, shape == m.shape[::-1]
        if isinstance(kind, str):
            conv1d = kind in CONV1D_MODELS and module.split(".")[-1] in CONV1D_LAYERS
            if (flipped if conv1d else plain):
                return conv1d
            layout = "Conv1D, stored (in, out)" if conv1d else "nn.Linear, stored (out, in)"
            raise AdapterError(f"{self.adapter.label}: module '{module}' makes a delta of shape {list(m.shape if not conv1d else m.shape[::-1])} "
                               f"but the base's '{name}' is {list(shape)} ({kind}: {layout}); give as base the model the adapter was trained on")
        if plain and flipped and self.adapter.config.get("fan_in_fan_out"):
            raise AdapterError(f"{self.adapter.label}: module '{module}' has a square weight and the adapter says fan_in_fan_out, but the base has "
                               "no config.json to tell a transposed (Conv1D) layer from nn.Linear; give the base as a model folder")
        if plain or flipped:
            return not plain
        raise AdapterError(f"{self.adapter.label}: module '{module}' makes a delta of shape {list(m.shape)} but the base's '{name}' is "
                           f"{list(shape)}; give as base the model the adapter was trained on")

    @property
    def adapted(self) -> dict[str, str]:
        """Base weight name -> the adapter module that changes it."""
        return dict(self._delta)

    @property
    def replaced(self) -> dict[str, str]:
        """Base tensor name -> the adapter's full tensor that replaces it."""
        return dict(self._full)

    def transposed(self, name: str) -> bool:
        """Whether the base stores adapted weight ``name`` transposed from the layer's (out, in) (an embedding, GPT-2's Conv1D)."""
        return self._transpose[self._alias.get(name, name)]

    def layer_weight(self, name: str) -> torch.Tensor | None:
        """The layer weight the adapter saved for adapted tensor ``name`` (its delta adds to it), or None (it adds to the base's)."""
        saved = self._layer_weight.get(self._alias.get(name, name))
        return self.adapter.reader.read(saved) if saved is not None else None

    def changes(self, name: str) -> bool:
        """Whether the adapter changes tensor ``name`` (through its factors or a full copy)."""
        return self._alias.get(name, name) in self._delta or name in self._full

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's change to base tensor ``name`` in float32, in the base's layout (only for adapted names)."""
        target = self._alias.get(name, name)
        return self.adapter.delta(self._delta[target], self._transpose[target])

    def identity(self, name: str) -> tuple[Any, ...] | None:
        if not self.changes(name):
            return self.base.identity(name)
        return None

    def read(self, name: str) -> torch.Tensor:
        target = self._alias.get(name, name)
        if target in self._delta:
            saved = self._layer_weight.get(target)
            w = self.adapter.reader.read(saved) if saved is not None else self.base.read(target)
            return w.to(torch.float32) + self.delta(target)
        if name in self._full:
            return self.adapter.read_full(self._full[name])
        return self.base.read(name)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


def adapted(base: Checkpoint, adapter_path: Path, label: str | None = None) -> AdaptedCheckpoint:
    """``base`` (opened; closed with the result, or here on failure) with the adapter at ``adapter_path`` applied."""
    try:
        ad = open_adapter(adapter_path, label)
    except BaseException:
        base.close()
        raise
    try:
        return AdaptedCheckpoint(base, ad)
    except BaseException:
        ad.close()
        base.close()
        raise

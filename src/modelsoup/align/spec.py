"""Permutation specs: which hidden units of a model can be permuted together, and which tensor axes each permutation touches.

A hidden unit of a network (a neuron of a Linear, a channel of a Conv, an attention head) can be moved to
another position without changing the function the network computes, provided every tensor that reads
or writes that unit is permuted the same way: the rows of the layer that produces it (weight axis 0,
bias, BatchNorm statistics and gains), the columns of every layer that consumes it (weight axis 1).
A :class:`PermutationSpec` lists these groups (Ainsworth et al. 2023, "Git Re-Basin: merging models
modulo permutation symmetries", section 2): each :class:`Group` has a size ``n`` and the
``(tensor, axis, block)`` triples it permutes. ``block > 1`` means each unit spans ``block`` consecutive
entries of that axis: a channel of a conv seen by a Linear after ``flatten`` (``H * W`` inputs each),
an attention head seen as its ``head_dim`` rows of the query/key/value projections.

Three sources of specs, in order of preference:

- a ``torch.fx`` trace of a user's ``nn.Module`` (:func:`trace_spec`), with shapes propagated from an
  example input. Linear/Conv chains with elementwise activations, BatchNorm, LayerNorm over the last
  dimension, pooling, flatten/reshape that keep a unit's entries contiguous, and residual additions
  (both operands of an add must share one permutation: the groups are joined by union-find) are
  followed. The model's inputs and outputs are never permuted: a group that reaches either is dropped.
  Anything else that sees a permuted unit (an unknown op, a grouped conv, attention, concatenation,
  slicing) is refused with an :class:`AlignmentError` naming the node: declare a spec instead.
- a Hugging Face config of a BERT-style encoder (:func:`config_spec`): per layer, the FFN's
  intermediate units and the attention heads (whole heads: query/key/value rows in head blocks,
  attention.output.dense columns in the same blocks). The residual stream is left as it is.
- a declared spec file (JSON or YAML, :func:`load_spec`), checked against the model's tensors.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import SoupError, short_list

FIXED = 0  # the union-find root of everything that must not be permuted (inputs, outputs)


class AlignmentError(SoupError):
    """A model cannot be aligned: its permutation structure is unknown or unsupported, a spec does not fit its
    tensors, or the aligned model would not compute the same function."""


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor that a group permutes.

    Attributes:
        tensor: the tensor's name in the state dict.
        axis: the permuted axis.
        block: entries per unit along ``axis`` (the axis has ``size * block`` entries; unit ``i`` is ``[i*block, (i+1)*block)``).
    """

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Site:
    """Where a group's units can be observed as activations (for activation matching and REPAIR).

    Attributes:
        name: an fx node name (``kind == "node"``) or a module name (``kind == "module"``, its forward output).
        kind: ``node`` or ``module``.
        dim: the dimension of the value that holds the units.
        block: entries per unit along ``dim``.
        block_as: ``samples`` (each of a unit's ``block`` entries is another observation of it: spatial positions
            after a flatten) or ``features`` (a unit is a ``block``-vector: an attention head).
        output_index: for a module returning a tuple, the item holding the value.
    """

    name: str
    kind: str = "node"
    dim: int = -1
    block: int = 1
    block_as: str = "samples"
    output_index: int | None = None


@dataclass(frozen=True)
class Group:
    """One permutation: ``size`` units and every tensor axis they index.

    Attributes:
        name: a readable name (the layer that produces the units).
        size: the number of units.
        axes: the tensor axes permuted together.
        sites: where the units are seen as activations.
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    sites: tuple[Site, ...] = ()

    def tensors(self) -> list[str]:
        return list(dict.fromkeys(a.tensor for a in self.axes))


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation groups of a model.

    Attributes:
        groups: the groups; no tensor axis belongs to two of them.
        source: how the spec was made (``fx``, ``config``, ``declared``).
        notes: what was left out and why (e.g. a group that reaches the output).
    """

    groups: tuple[Group, ...]
    source: str = "declared"
    notes: tuple[str, ...] = field(default=())

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise AlignmentError(f"the spec has no group '{name}' (groups: {short_list([g.name for g in self.groups])})")

    def by_tensor(self) -> dict[str, list[tuple[str, Axis]]]:
        """tensor name -> the (group name, axis) pairs that permute it."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for g in self.groups:
            for a in g.axes:
                out.setdefault(a.tensor, []).append((g.name, a))
        return out

    def check(self, shapes: Mapping[str, Sequence[int]], label: str = "the model") -> None:
        """Refuse a spec that does not fit ``shapes`` (tensor name -> shape), listing every problem at once.

        Raises:
            AlignmentError: a tensor missing, an axis out of range, an axis whose length is not ``size * block``,
                an axis in two groups, duplicate group names, an empty group.
        """
        problems = []
        seen: dict[tuple[str, int], str] = {}
        names = [g.name for g in self.groups]
        for n in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"group name '{n}' is used more than once")
        for g in self.groups:
            if g.size < 1:
                problems.append(f"group '{g.name}': size {g.size}; give 1 or more units")
            if not g.axes:
                problems.append(f"group '{g.name}': permutes no tensor axis")
            for a in g.axes:
                if a.tensor not in shapes:
                    problems.append(f"group '{g.name}': tensor '{a.tensor}' is not in {label}")
                    continue
                shape = tuple(shapes[a.tensor])
                if not -len(shape) <= a.axis < len(shape):
                    problems.append(f"group '{g.name}': tensor '{a.tensor}' has {len(shape)} axes, axis {a.axis} does not exist")
                    continue
                if a.block < 1 or shape[a.axis] != g.size * a.block:
                    problems.append(f"group '{g.name}': tensor '{a.tensor}' axis {a.axis} has {shape[a.axis]} entries, but the group's "
                                    f"{g.size} units x block {a.block} cover {g.size * a.block}")
                key = (a.tensor, a.axis % len(shape))
                if key in seen and seen[key] != g.name:
                    problems.append(f"tensor '{a.tensor}' axis {a.axis} is in groups '{seen[key]}' and '{g.name}'; one axis takes one permutation")
                seen.setdefault(key, g.name)
        if problems:
            raise AlignmentError(f"the permutation spec ({self.source}) does not fit {label}:\n" + "\n".join(f"  - {p}" for p in problems)
                                 + "\nFix the spec (or let modelsoup derive it: --arch for your module, a config.json for BERT-style encoders).")

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "notes": list(self.notes), "groups": [
            {"name": g.name, "size": g.size, "axes": [{"tensor": a.tensor, "axis": a.axis, "block": a.block} for a in g.axes],
             "sites": [{"name": s.name, "kind": s.kind, "dim": s.dim, "block": s.block, "block_as": s.block_as, "output_index": s.output_index}
                       for s in g.sites]} for g in self.groups]}


# -- declared specs -----------------------------------------------------------------------------------------------


def spec_from_dict(data: Any, source: str = "the spec") -> PermutationSpec:
    """A spec from its JSON form (``{"groups": [{"name", "size", "axes": [[tensor, axis(, block)] | {tensor, axis, block}], "sites": [...]}]}``).

    Raises:
        AlignmentError: every structural problem at once.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping) or not isinstance(data.get("groups"), list):
        raise AlignmentError(f"{source}: expected a mapping with a 'groups' list, e.g. "
                             "groups: [{name: fc1, size: 128, axes: [[fc1.weight, 0], [fc1.bias, 0], [fc2.weight, 1]]}]")
    groups = []
    for i, g in enumerate(data["groups"]):
        where = f"groups[{i}]"
        if not isinstance(g, Mapping):
            problems.append(f"{where}: expected a mapping with name, size and axes")
            continue
        name = str(g.get("name", f"group{i}"))
        size = g.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"{where} ({name}): size {size!r}; give the number of units, a positive integer")
            size = 0
        axes = []
        raw_axes = g.get("axes")
        if not isinstance(raw_axes, list) or not raw_axes:
            problems.append(f"{where} ({name}): axes must be a non-empty list of [tensor, axis] or [tensor, axis, block]")
            raw_axes = []
        for j, a in enumerate(raw_axes):
            if isinstance(a, Mapping):
                a = [a.get("tensor"), a.get("axis"), a.get("block", 1)]
            if not isinstance(a, (list, tuple)) or len(a) not in (2, 3) or not isinstance(a[0], str) \
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in a[1:]):
                problems.append(f"{where} ({name}) axes[{j}]: {a!r}; expected [tensor name, axis] or [tensor name, axis, block]")
                continue
            axes.append(Axis(a[0], int(a[1]), int(a[2]) if len(a) == 3 else 1))
        sites = []
        for j, s in enumerate(g.get("sites") or []):
            if not isinstance(s, Mapping) or not isinstance(s.get("name") or s.get("module"), str):
                problems.append(f"{where} ({name}) sites[{j}]: expected {{module: NAME, dim: -1}}")
                continue
            kind = "module" if "module" in s else str(s.get("kind", "module"))
            block_as = str(s.get("block_as", "samples"))
            if kind not in ("module", "node") or block_as not in ("samples", "features"):
                problems.append(f"{where} ({name}) sites[{j}]: kind must be module or node, block_as samples or features")
                continue
            sites.append(Site(str(s.get("module") or s.get("name")), kind, int(s.get("dim", -1)), int(s.get("block", 1)), block_as,
                              s.get("output_index")))
        groups.append(Group(name, int(size), tuple(axes), tuple(sites)))
    if problems:
        raise AlignmentError(f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n" + "\n".join(f"  - {p}" for p in problems))
    return PermutationSpec(tuple(groups), str(data.get("source", "declared")), tuple(str(n) for n in data.get("notes", ()) or ()))


def load_spec(path: str | Path) -> PermutationSpec:
    """Read a declared spec from a JSON or YAML file (YAML parsed with the recipe loader's bounds).

    Raises:
        AlignmentError: the file cannot be read or parsed, or its structure is wrong.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise AlignmentError(f"--spec {p}: cannot be read ({getattr(e, 'strerror', None) or e}); give a JSON or YAML spec file") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise AlignmentError(f"--spec {p}: not valid JSON ({e})") from None
    else:
        from ..errors import RecipeError
        from ..recipe import load_yaml

        try:
            data, _ = load_yaml(text, str(p))
        except RecipeError as e:
            raise AlignmentError(f"--spec {p}: cannot be parsed ({'; '.join(e.problems)})") from None
    return spec_from_dict(data, f"--spec {p}")


# -- Hugging Face BERT-style encoders --------------------------------------------------------------------------------

# Encoders whose layers are named and wired as BERT's: encoder.layer.N.{attention.self.{query,key,value},
# attention.output.dense, intermediate.dense, output.dense}.
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text"})
_QUERY = re.compile(r"^(.*?)encoder\.layer\.(\d+)\.attention\.self\.query\.weight$")


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, Path)):
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        try:
            return dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise AlignmentError(f"{p}: cannot read the model's config ({e}); give a Hugging Face folder with config.json") from None
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise AlignmentError(f"a config is a path, a mapping or a transformers PretrainedConfig, got {type(config).__name__}")


def config_spec(config: Any, names: Iterable[str] | None = None) -> PermutationSpec:
    """The spec of a BERT-style encoder from its config: per layer, its FFN units and its attention heads.

    FFN group of layer ``l`` (``intermediate_size`` units): rows of ``intermediate.dense`` (weight and bias) and
    columns of ``output.dense``. Head group (``num_attention_heads`` units of ``head_dim = hidden_size / heads``
    entries): rows of ``query``, ``key`` and ``value`` (weights and biases) in head blocks and the same column
    blocks of ``attention.output.dense``. Permuting whole heads leaves every head's attention pattern as it was;
    the residual stream (embeddings, LayerNorms, the dense outputs' rows) is not permuted.

    Args:
        config: a transformers config, its dict, or a path to ``config.json`` / its folder.
        names: the checkpoint's tensor names, to find where the encoder sits (``bert.``, ``roberta.``, none);
            default: none (a bare ``BertModel``).

    Raises:
        AlignmentError: an unsupported model type or layout (cross-attention, names that do not follow BERT's).
    """
    cfg = _config_dict(config)
    mtype = str(cfg.get("model_type", ""))
    if mtype not in BERT_LIKE:
        raise AlignmentError(f"model_type '{mtype or '(none)'}': modelsoup derives permutations from the config only for BERT-style encoders "
                             f"({', '.join(sorted(BERT_LIKE))}); declare the spec (--spec) for this model")
    if cfg.get("add_cross_attention") or cfg.get("is_decoder"):
        raise AlignmentError(f"model_type '{mtype}' with cross-attention / as a decoder: its cross-attention heads are not in the derived spec; "
                             "declare the spec (--spec)")
    try:
        layers, heads, hidden, inter = (int(cfg[k]) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"))
    except (KeyError, TypeError, ValueError):
        raise AlignmentError(f"the {mtype} config lacks num_hidden_layers, num_attention_heads, hidden_size or intermediate_size") from None
    if heads < 1 or hidden % heads:
        raise AlignmentError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hidden // heads
    prefix = ""
    if names is not None:
        found: dict[str, set[int]] = {}
        for n in names:
            m = _QUERY.match(n)
            if m:
                found.setdefault(m.group(1), set()).add(int(m.group(2)))
        if len(found) != 1:
            what = f"several encoders ({', '.join(repr(p) for p in found)})" if found else "no encoder.layer.N.attention.self.query.weight"
            raise AlignmentError(f"the checkpoint's names do not follow BERT's layout ({what}); declare the spec (--spec)")
        prefix, idx = next(iter(found.items()))
        if idx != set(range(layers)):
            raise AlignmentError(f"the checkpoint holds layers {sorted(idx)} but the config says num_hidden_layers {layers}")
    groups = []
    for i in range(layers):
        lp = f"{prefix}encoder.layer.{i}."
        ffn = (Axis(f"{lp}intermediate.dense.weight", 0), Axis(f"{lp}intermediate.dense.bias", 0), Axis(f"{lp}output.dense.weight", 1))
        groups.append(Group(f"layer{i}.ffn", inter, ffn, (Site(f"{lp}intermediate", "module", -1),)))
        qkv = [Axis(f"{lp}attention.self.{p}.{w}", 0, head_dim) for p in ("query", "key", "value") for w in ("weight", "bias")]
        groups.append(Group(f"layer{i}.heads", heads, (*qkv, Axis(f"{lp}attention.output.dense.weight", 1, head_dim)),
                            (Site(f"{lp}attention.self", "module", -1, head_dim, "features", 0),)))
    return PermutationSpec(tuple(groups), "config", (f"{mtype}: {layers} layers, {heads} heads of {head_dim}, FFN {inter}; residual stream left as it is",))


def is_bert_like(module: nn.Module) -> bool:
    cfg = getattr(module, "config", None)
    return cfg is not None and getattr(cfg, "model_type", None) in BERT_LIKE


# -- torch.fx tracing -----------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,  # softmax commutes with a permutation of its own dim and of the others
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
F = torch.nn.functional
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.abs, torch.neg, operator.neg, F.dropout, torch.sqrt,
    torch.square, torch.clamp, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "contiguous", "float", "double", "half", "bfloat16", "to",
                        "clone", "detach", "softmax", "log_softmax", "sqrt", "square", "pow", "relu_", "type_as"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
                     operator.iadd, operator.imul, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "maximum", "minimum"}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "var", "std"}
_SHAPE_ONLY = {"size", "dim"}


@dataclass
class _Value:
    """What the tracer knows of one node's output: the group of its units (FIXED: not permuted), their dim and block."""

    gid: int
    dim: int | None = None
    block: int = 1


class _Tracer:
    """Walks an fx graph and builds the groups (see the module doc)."""

    def __init__(self, gm: Any, state_names: set[str]) -> None:
        self.gm = gm
        self.state_names = state_names
        self.parent = [FIXED]
        self.size: list[int | None] = [None]
        self.names: list[str] = ["(fixed)"]
        self.members: dict[tuple[str, int], tuple[int, int]] = {}
        self.order: list[tuple[str, int]] = []
        self.values: dict[Any, _Value | None] = {}
        self.carriers: list[tuple[Any, _Value]] = []

    # union-find
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, node: Any) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED in (ra, rb):
            self.parent[rb if ra == FIXED else ra] = FIXED
            return FIXED
        if self.size[ra] != self.size[rb]:
            raise self.refuse(node, f"joins {self.size[ra]} units of {self.names[ra]} with {self.size[rb]} of {self.names[rb]}")
        self.parent[rb] = ra
        return ra

    def new_group(self, size: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.names.append(name)
        return len(self.parent) - 1

    def member(self, gid: int, tensor: str, axis: int, block: int, node: Any) -> None:
        if tensor not in self.state_names:
            return  # not a persistent tensor (a non-persistent buffer): nothing to permute in the state
        key = (tensor, axis)
        if key in self.members:
            old, old_block = self.members[key]
            if old_block != block and self.find(gid) != FIXED:
                raise self.refuse(node, f"uses '{tensor}' axis {axis} with {block} entries per unit, elsewhere with {old_block}")
            self.union(old, gid, node)
            return
        self.members[key] = (gid, block)
        self.order.append(key)

    def refuse(self, node: Any, why: str) -> AlignmentError:
        what = f"{node.op} {node.target if isinstance(node.target, str) else getattr(node.target, '__name__', node.target)}"
        if node.op == "call_module":
            what = f"module '{node.target}' ({type(self.gm.get_submodule(node.target)).__name__})"
        return AlignmentError(f"node '{node.name}' ({what}) {why}: modelsoup cannot permute the hidden units there. Declare the permutations "
                              "in a spec file (--spec, see docs/align.md), or align a model built from Linear/Conv layers, elementwise "
                              "activations, BatchNorm/LayerNorm, pooling, flatten and residual additions")

    def permuted(self, v: _Value | None) -> bool:
        return v is not None and self.find(v.gid) != FIXED

    def walk(self) -> None:
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)
            v = self.values[node]
            if self.permuted(v):
                self.carriers.append((node, v))  # type: ignore[arg-type]

    def inputs(self, node: Any) -> list[tuple[Any, _Value | None]]:
        out: list[tuple[Any, _Value | None]] = []

        def collect(a: Any) -> None:
            if isinstance(a, torch.fx.Node):
                out.append((a, self.values.get(a)))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    collect(x)
            elif isinstance(a, Mapping):
                for x in a.values():
                    collect(x)

        collect(node.args)
        collect(node.kwargs)
        return out

    def visit(self, node: Any) -> _Value | None:
        if node.op == "placeholder":
            return _Value(FIXED)
        if node.op == "get_attr":
            return _Value(FIXED)
        if node.op == "output":
            for _, v in self.inputs(node):
                if v is not None:
                    self.union(v.gid, FIXED, node)
            return None
        ins = self.inputs(node)
        perm = [(n, v) for n, v in ins if self.permuted(v)]
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target), ins, perm)
        t = node.target
        if node.op == "call_method" and t in _SHAPE_ONLY or node.op == "call_function" and t is getattr:
            return None  # x.size(), x.shape: numbers, no units
        if not perm:
            return _Value(FIXED)
        if node.op == "call_function" and t in _ELEMENTWISE_FUNCTIONS or node.op == "call_method" and t in _ELEMENTWISE_METHODS:
            return self.elementwise(node, perm)
        if node.op == "call_function" and t in _BINARY_FUNCTIONS or node.op == "call_method" and t in _BINARY_METHODS:
            return self.binary(node, ins)
        if node.op == "call_function" and t in _POOL_FUNCTIONS:
            return self.pool(node, perm)
        if node.op == "call_function" and t in _RESHAPE_FUNCTIONS or node.op == "call_method" and t in _RESHAPE_METHODS:
            return self.reshape(node, perm)
        if node.op == "call_function" and t in _REDUCE_FUNCTIONS or node.op == "call_method" and t in _REDUCE_METHODS:
            return self.reduce(node, perm)
        if node.op == "call_function" and t is torch.cat:
            raise self.refuse(node, "concatenates permuted units (their positions would shift)")
        if node.op == "call_function" and t is operator.getitem:
            raise self.refuse(node, "indexes or slices a tensor of permuted units")
        raise self.refuse(node, f"is an operation modelsoup does not know, applied to the units of {self.names[self.find(perm[0][1].gid)]}")  # type: ignore[union-attr]

    def elementwise(self, node: Any, perm: list[tuple[Any, _Value | None]]) -> _Value:
        others = [n for n, v in self.inputs(node) if v is not None and _shape(n) is not None]
        if len(perm) > 1 or len(others) > 1:  # a tensor argument (clamp's per-unit max, pow's exponents) is combined with the units
            return self.binary(node, self.inputs(node))
        v = perm[0][1]
        assert v is not None
        src, out = _shape(perm[0][0]), _shape(node)
        if src is None or out is None or len(src) != len(out):
            raise self.refuse(node, "changes the shape of permuted units")
        return _Value(v.gid, v.dim, v.block)

    def binary(self, node: Any, ins: list[tuple[Any, _Value | None]]) -> _Value:
        out_shape = _shape(node)
        if out_shape is None:
            raise self.refuse(node, "gives no tensor shape")
        tensors = [(n, v, _shape(n)) for n, v in ins if v is not None and _shape(n) is not None]
        perm = [(n, v, s) for n, v, s in tensors if self.permuted(v)]
        rights = {len(s) - 1 - v.dim for _, v, s in perm}  # type: ignore[operator]
        if len(rights) != 1:
            raise self.refuse(node, "combines tensors whose permuted units sit on different dimensions")
        r = rights.pop()
        v0 = perm[0][1]
        gid, block = v0.gid, v0.block  # type: ignore[union-attr]
        for n, v, s in tensors:
            if len(s) <= r or s[len(s) - 1 - r] == 1:
                continue  # broadcast along the units: no constraint
            if self.permuted(v):
                if v.block != block:  # type: ignore[union-attr]
                    raise self.refuse(node, "combines units laid out in different blocks")
                gid = self.union(gid, v.gid, node)  # type: ignore[union-attr]
            elif n.op == "get_attr":
                if n.target not in self.state_names:
                    raise self.refuse(node, f"combines the units with the constant '{n.target}', which is not in the state dict")
                self.member(gid, n.target, len(s) - 1 - r, block, node)
            else:
                gid = self.union(gid, FIXED, node)  # an unpermuted tensor (the input) added to units: they must stay in place
        return _Value(gid, len(out_shape) - 1 - r, block)

    def pool(self, node: Any, perm: list[tuple[Any, _Value | None]]) -> _Value:
        v = perm[0][1]
        assert v is not None
        if v.dim != 1 or v.block != 1:
            raise self.refuse(node, "pools a tensor whose units are not its channels (dim 1)")
        return _Value(v.gid, 1, 1)

    def reshape(self, node: Any, perm: list[tuple[Any, _Value | None]]) -> _Value:
        src_node, v = perm[0]
        assert v is not None and v.dim is not None
        src, out = _shape(src_node), _shape(node)
        if src is None or out is None:
            raise self.refuse(node, "reshapes to a shape the tracer could not see")
        d = v.dim
        pre, inner, units = math.prod(src[:d]), math.prod(src[d + 1:]), src[d]
        for k in range(len(out)):
            if math.prod(out[:k]) == pre and out[k] % units == 0:
                extra = out[k] // units
                if inner % extra == 0 and math.prod(out[k + 1:]) * extra == inner:
                    return _Value(v.gid, k, v.block * extra)
            if math.prod(out[:k]) > pre:
                break
        raise self.refuse(node, f"reshapes {list(src)} to {list(out)}, which splits or interleaves the units on dim {d}")

    def reduce(self, node: Any, perm: list[tuple[Any, _Value | None]]) -> _Value:
        src_node, v = perm[0]
        assert v is not None and v.dim is not None
        src = _shape(src_node)
        assert src is not None
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else False))
        if dims is None:
            return _Value(FIXED)
        dims = {int(x) % len(src) for x in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if v.dim in dims:
            return _Value(FIXED)  # summed over the units: the same whatever their order
        return _Value(v.gid, v.dim if keep else v.dim - sum(1 for x in dims if x < v.dim), v.block)

    def visit_module(self, node: Any, m: nn.Module, ins: list[tuple[Any, _Value | None]], perm: list[tuple[Any, _Value | None]]) -> _Value:
        name = str(node.target)
        pre = f"{name}." if name else ""
        x = ins[0][1] if ins else None
        if isinstance(m, nn.Linear):
            if self.permuted(x):
                assert x is not None
                if x.dim != len(_shape(ins[0][0]) or ()) - 1:
                    raise self.refuse(node, "takes permuted units on a dimension other than its input features")
                self.member(x.gid, pre + "weight", 1, x.block, node)
            else:
                self.member(FIXED, pre + "weight", 1, 1, node)
            g = self.new_group(m.out_features, name)
            self.member(g, pre + "weight", 0, 1, node)
            self.member(g, pre + "bias", 0, 1, node)
            return _Value(g, len(_shape(node) or (0, 0)) - 1)
        if isinstance(m, _CONV):
            if m.groups != 1:
                raise self.refuse(node, f"is a grouped convolution (groups={m.groups}): its channels are tied in groups")
            if self.permuted(x):
                assert x is not None
                if x.dim != 1 or x.block != 1:
                    raise self.refuse(node, "takes permuted units that are not its input channels")
                self.member(x.gid, pre + "weight", 1, 1, node)
            else:
                self.member(FIXED, pre + "weight", 1, 1, node)
            g = self.new_group(m.out_channels, name)
            self.member(g, pre + "weight", 0, 1, node)
            self.member(g, pre + "bias", 0, 1, node)
            return _Value(g, 1)
        if isinstance(m, _BN) or isinstance(m, nn.GroupNorm) and m.num_groups in (1, m.num_channels):
            gid = x.gid if self.permuted(x) else FIXED  # type: ignore[union-attr]
            if gid != FIXED and (x.dim != 1 or x.block != 1):  # type: ignore[union-attr]
                raise self.refuse(node, "normalises a tensor whose units are not its channels (dim 1)")
            for t in ("weight", "bias", "running_mean", "running_var"):
                self.member(gid, pre + t, 0, 1, node)
            return _Value(gid, 1) if gid != FIXED else _Value(FIXED)
        if isinstance(m, nn.GroupNorm):
            if self.permuted(x):
                raise self.refuse(node, f"is a GroupNorm with {m.num_groups} groups: it mixes channels within groups")
            return _Value(FIXED)
        if isinstance(m, nn.LayerNorm):
            # LayerNorm's mean and variance are sums over every normalised feature, so it commutes with their permutation
            if not self.permuted(x):
                for t in ("weight", "bias"):
                    self.member(FIXED, pre + t, 0, 1, node)
                return _Value(FIXED)
            assert x is not None
            if len(m.normalized_shape) != 1 or x.dim != len(_shape(ins[0][0]) or ()) - 1 or x.block != 1:
                raise self.refuse(node, "is a LayerNorm over more than the permuted units' dimension")
            for t in ("weight", "bias"):
                self.member(x.gid, pre + t, 0, 1, node)
            return _Value(x.gid, x.dim)
        if isinstance(m, nn.Embedding):
            if self.permuted(x):
                raise self.refuse(node, "is an embedding indexed by permuted values")
            g = self.new_group(m.embedding_dim, name)
            self.member(g, pre + "weight", 1, 1, node)
            return _Value(g, len(_shape(node) or (0,)) - 1)
        if isinstance(m, nn.PReLU) and m.num_parameters > 1:
            gid = x.gid if self.permuted(x) else FIXED  # type: ignore[union-attr]
            if gid != FIXED and (x.dim != 1 or x.block != 1):  # type: ignore[union-attr]
                raise self.refuse(node, "has one slope per channel, but the permuted units are not its channels")
            self.member(gid, pre + "weight", 0, 1, node)
            return _Value(gid, 1) if gid != FIXED else _Value(FIXED)
        if isinstance(m, (*_ELEMENTWISE_MODULES, nn.PReLU)):
            return self.elementwise(node, perm) if perm else _Value(FIXED)
        if isinstance(m, _POOL_MODULES):
            if getattr(m, "return_indices", False) and perm:
                raise self.refuse(node, "returns pooling indices")
            return self.pool(node, perm) if perm else _Value(FIXED)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, perm) if perm else _Value(FIXED)
        own = [pre + n for n, _ in m.named_parameters()]
        if perm:
            hint = " (attention mixes units across heads and positions)" if isinstance(m, nn.MultiheadAttention) else ""
            raise self.refuse(node, f"is a module modelsoup does not know{hint}, applied to permuted units")
        for n in own:  # its parameters read unpermuted inputs: keep them in place
            for axis in range(len(self.gm.get_parameter(n).shape)):
                self.member(FIXED, n, axis, 1, node)
        return _Value(FIXED)

    def spec(self) -> PermutationSpec:
        roots: dict[int, list[Axis]] = {}
        for key in self.order:
            gid, block = self.members[key]
            r = self.find(gid)
            if r != FIXED:
                roots.setdefault(r, []).append(Axis(key[0], key[1], block))
        sites: dict[int, list[Site]] = {}
        for node, v in self.carriers:
            r = self.find(v.gid)
            if r == FIXED:
                continue
            users = list(node.users)
            if any(not self.permuted(self.values.get(u)) or self.find(self.values[u].gid) != r for u in users):  # type: ignore[union-attr]
                sites.setdefault(r, []).append(Site(node.name, "node", v.dim if v.dim is not None else -1, v.block, "samples"))
        groups, names = [], set()
        for r, axes in roots.items():
            joined = [self.names[g] for g in range(1, len(self.parent)) if self.find(g) == r]
            name = joined[0] + (f"+{len(joined) - 1}" if len(joined) > 1 else "")
            while name in names:
                name += "'"
            names.add(name)
            groups.append(Group(name, int(self.size[r] or 0), tuple(axes), tuple(sites.get(r, ()))))
        dropped = [self.names[g] for g in range(1, len(self.parent)) if self.find(g) == FIXED]
        notes = (f"not permuted (reach the model's inputs or outputs): {short_list(dropped)}",) if dropped else ()
        return PermutationSpec(tuple(groups), "fx", notes)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def fx_trace(module: nn.Module) -> Any:
    """``torch.fx.symbolic_trace(module)``, with a trace failure turned into an :class:`AlignmentError`."""
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises whatever the module's Python does on proxies
        raise AlignmentError(f"{type(module).__name__}: torch.fx cannot trace it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                             "data-dependent control flow and unsupported Python do not trace. Declare the spec (--spec)") from None


def trace_spec(module: nn.Module, example_inputs: Sequence[Any]) -> PermutationSpec:
    """Derive the spec of ``module`` by a ``torch.fx`` trace with shapes propagated from ``example_inputs``.

    Args:
        module: the network (its weights do not matter).
        example_inputs: positional inputs of one forward pass (shapes only matter).

    Raises:
        AlignmentError: the module does not trace, or a node it cannot follow sees permuted units (named in the message).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx_trace(module)
    was = module.training
    module.eval()  # shapes only: no batch-norm statistics of the caller's module are updated
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001
        raise AlignmentError(f"{type(module).__name__}: a forward pass on inputs of shape "
                             f"{[list(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]} fails ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); give inputs the model takes (--input-shape, --data)") from None
    finally:
        module.train(was)
    tracer = _Tracer(gm, set(module.state_dict()))
    tracer.walk()
    return tracer.spec()


def infer_input(module: nn.Module, batch: int = 8) -> tuple[torch.Size, torch.dtype] | None:
    """(shape, dtype) of an input the first layer takes, when that layer tells: a Linear (features) or an Embedding (ids)."""
    gm = fx_trace(module)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    for u in placeholders[0].users:
        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            if isinstance(m, nn.Linear):
                return torch.Size([batch, m.in_features]), torch.float32
            if isinstance(m, nn.Embedding):
                return torch.Size([batch, 16]), torch.long
    return None


def permutation_spec(module_or_config: Any, *, example_inputs: Sequence[Any] | None = None, names: Iterable[str] | None = None) -> PermutationSpec:
    """The permutation spec of a model: traced from an ``nn.Module``, or derived from a BERT-style config.

    Args:
        module_or_config: an ``nn.Module`` (a Hugging Face BERT-style model uses its config), a transformers config,
            its dict, or a path to ``config.json``.
        example_inputs: positional inputs for the trace's shape propagation (default: inferred from the first
            layer, a Linear or an Embedding).
        names: for a config, the checkpoint's tensor names (finds the encoder's prefix); default: the module's.

    Raises:
        AlignmentError: see :func:`trace_spec` and :func:`config_spec`; no example input and none can be inferred.
    """
    if not isinstance(module_or_config, nn.Module):
        return config_spec(module_or_config, names)
    module = module_or_config
    if is_bert_like(module):
        return config_spec(module.config, names if names is not None else module.state_dict().keys())
    if example_inputs is None:
        shape = infer_input(module)
        if shape is None:
            raise AlignmentError(f"{type(module).__name__}: the shape of its input cannot be inferred from the first layer; give one "
                                 "(--input-shape 3x32x32, or --data)")
        example_inputs = (torch.zeros(shape[0], dtype=shape[1]),)
    return trace_spec(module, example_inputs)

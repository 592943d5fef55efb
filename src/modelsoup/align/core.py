"""``align``: permute models' hidden units to match a reference, check each still computes its function, and write them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import name_mismatch
from .matching import (
    Perms,
    activation_matching,
    apply_permutation,
    weight_distance,
    weight_matching_run,
)
from .models import (
    ALIGN_RTOL,
    Factory,
    arch_factory,
    check_function,
    example_args,
    hf_factory,
    load_into,
    random_inputs,
)
from .spec import (
    AlignmentError,
    PermutationSpec,
    is_bert_like,
    load_spec,
    permutation_spec,
)

log = logging.getLogger("modelsoup")

METHODS = ("weight", "activation")
CHECK_BATCHES = 4  # batches of the data the function check runs on


@dataclass
class ModelAlignment:
    """One model aligned to the reference.

    Attributes:
        label: the model.
        perms: group name -> permutation (unit ``i`` of the aligned model is unit ``perms[g][i]`` of the model).
        state: the aligned weights (same names, shapes and dtypes as the model's).
        groups: per group: ``name``, ``size``, ``moved`` (fraction of units not in place), ``distance_before``,
            ``distance_after`` (L2 distance to the reference over the tensors the group touches), ``permutation``.
        distance_before, distance_after: L2 distance to the reference over every floating tensor.
        max_logit_diff: the function check's largest |original - aligned| output.
        logit_scale: the largest |original output| on the same inputs.
        sweeps: weight matching's coordinate-descent sweeps (None for activation matching).
    """

    label: str
    perms: Perms
    state: dict[str, torch.Tensor]
    groups: list[dict[str, Any]]
    distance_before: float
    distance_after: float
    max_logit_diff: float
    logit_scale: float
    sweeps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "distance_before": self.distance_before, "distance_after": self.distance_after,
                "max_logit_diff": self.max_logit_diff, "logit_scale": self.logit_scale, "sweeps": self.sweeps, "groups": self.groups}


@dataclass
class AlignResult:
    """Models aligned to a reference.

    Attributes:
        reference: the reference's label.
        method: ``weight`` or ``activation``.
        spec: the permutation groups used.
        models: one :class:`ModelAlignment` per model, in input order.
        checked_on: what the function check ran on (the data, or seeded random inputs).
        reference_state: the reference's weights.
        seconds: wall time.
        factory: builds a fresh module of the architecture (for REPAIR and evaluation).
        rtol: the function check's tolerance, relative to the largest |output|.
    """

    reference: str
    method: str
    spec: PermutationSpec
    models: list[ModelAlignment]
    checked_on: str
    reference_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    seconds: float = 0.0
    factory: Factory | None = field(repr=False, default=None)
    rtol: float = ALIGN_RTOL

    @property
    def states(self) -> list[dict[str, torch.Tensor]]:
        return [m.state for m in self.models]

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "method": self.method, "checked_on": self.checked_on, "tolerance": self.rtol,
                "seconds": round(self.seconds, 3), "spec": {"source": self.spec.source, "notes": list(self.spec.notes),
                                                              "groups": [{"name": g.name, "size": g.size} for g in self.spec.groups]},
                "models": [m.to_json() for m in self.models]}

    def to_markdown(self) -> str:
        lines = [(f"Aligned to {self.reference} by {self.method} matching ({len(self.spec.groups)} permutation groups, spec from "
                  f"{self.spec.source}); function checked on {self.checked_on}."), "",
                 "| model | units moved | weight distance before | after | max logit diff (of max logit) |", "|---|---:|---:|---:|---:|"]
        for m in self.models:
            units = sum(g["size"] for g in m.groups)
            moved = sum(g["moved"] * g["size"] for g in m.groups) / max(units, 1)
            lines.append(f"| {m.label} | {moved:.1%} of {units} | {m.distance_before:.4g} | {m.distance_after:.4g} | "
                         f"{m.max_logit_diff:.2e} ({m.max_logit_diff / max(m.logit_scale, 1e-12):.1e}) |")
        for m in self.models:
            lines += ["", f"{m.label}, per group:", "", "| group | units | moved | distance before | after |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {g['name']} | {g['size']} | {g['moved']:.1%} | {g['distance_before']:.4g} | {g['distance_after']:.4g} |" for g in m.groups]
        return "\n".join(lines) + "\n"


def read_state(source: Any, *, label: str | None = None, key: str | None = None, strip_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(every tensor of a checkpoint, the checkpoint's folder or None), read through :func:`modelsoup.io.open_checkpoint`."""
    from ..io import open_checkpoint

    with open_checkpoint(source, label=label, key=key, strip_prefix=strip_prefix) as ck:
        return {n: ck.read(n) for n in ck.names()}, ck.folder


def _same_layout(ref: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], ref_label: str, label: str) -> None:
    missing, unexpected = [n for n in ref if n not in state], [n for n in state if n not in ref]
    if missing or unexpected:
        raise AlignmentError(f"{label}: its tensors differ from the reference {ref_label}'s ({name_mismatch(missing, unexpected)}); "
                             "align models of one architecture")
    bad = next((n for n in ref if tuple(ref[n].shape) != tuple(state[n].shape) or ref[n].dtype != state[n].dtype), None)
    if bad is not None:
        raise AlignmentError(f"{label}: tensor '{bad}' is {list(state[bad].shape)} {state[bad].dtype}, the reference's {list(ref[bad].shape)} "
                             f"{ref[bad].dtype}; align models of one architecture and dtype")


def as_batches(data: Any) -> list[Any] | None:
    """The batches of ``data`` as a list: an evaluator's, a function's result, an iterable's items, one tensor; None for None."""
    if data is None:
        return None
    from ..eval.module import ModuleEvaluator

    if isinstance(data, ModuleEvaluator):
        return list(data.batches())
    if callable(data) and not isinstance(data, nn.Module):
        data = data()
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        out = list(data)
    except TypeError:
        raise AlignmentError(f"data is a {type(data).__name__}; give an iterable of batches (a DataLoader, a list of tensors) or an evaluator") from None
    if not out:
        raise AlignmentError("the data holds no batch; give one or more batches")
    return out


def _label(source: Any, i: int) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"model[{i}]"


def align(reference: Any, models: Sequence[Any], *, method: str = "weight", arch: Any = None, data: Any = None,
          spec: PermutationSpec | str | Path | None = None, input_shape: Sequence[int] | None = None, seed: int = 0, max_iter: int = 100,
          rtol: float = ALIGN_RTOL, labels: Sequence[str] | None = None, key: str | None = None, strip_prefix: str | None = None) -> AlignResult:
    """Permute each model's hidden units to match ``reference`` (Git Re-Basin, Ainsworth et al. 2023), checking each aligned
    model computes the function the model computed.

    Args:
        reference: the model the others are aligned to (path, state dict or ``nn.Module``); it is never changed.
        models: the models to align (same architecture).
        method: ``weight`` (weight matching, no data) or ``activation`` (activation matching on ``data``).
        arch: the architecture: ``file.py:make_net`` / ``package.module:make_net``, a function returning the module,
            or an ``nn.Module`` (copied). Default: the reference's Hugging Face config, or the reference itself when
            it is a module.
        data: batches (tensors, ``(x, y)`` tuples or keyword mappings), a function returning them, or an evaluator
            (its batches). Needed by activation matching; the function check runs on its first batches.
        spec: the permutation groups (a :class:`PermutationSpec` or a JSON/YAML file); default: derived (fx trace,
            or the config of a BERT-style encoder).
        input_shape: one example's input shape for the trace and the check when no data is given.
        seed: weight matching's group order, and the check's random inputs.
        max_iter: weight matching's sweeps at most.
        rtol: the function check's tolerance, relative to the largest |output|.
        labels: names of the models (default: their paths).
        key, strip_prefix: see :func:`modelsoup.io.open_checkpoint`.

    Returns:
        The aligned states with their permutations and summaries.

    Raises:
        AlignmentError: an unknown method, models of different layouts, an architecture the spec cannot be derived
            for, a spec that does not fit, no data for activation matching, or an aligned model that fails the check.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise AlignmentError(f"method '{method}': choose weight (weight matching, no data) or activation (activation matching, needs data)")
    if not models:
        raise AlignmentError("give one or more models to align to the reference")
    ref_label = _label(reference, -1) if isinstance(reference, (str, Path)) else "reference"
    labels = list(labels) if labels is not None else [_label(m, i) for i, m in enumerate(models)]
    ref_state, folder = read_state(reference, label=ref_label, key=key, strip_prefix=strip_prefix)
    states = []
    for m, lab in zip(models, labels):
        s, _ = read_state(m, label=lab, key=key, strip_prefix=strip_prefix)
        _same_layout(ref_state, s, ref_label, lab)
        states.append(s)
    factory = _factory(arch, reference, folder)
    batches = as_batches(data)
    template = factory()
    if batches is not None:
        check_inputs, checked_on = batches[:CHECK_BATCHES], f"{min(len(batches), CHECK_BATCHES)} batch(es) of the data"
    else:
        check_inputs, checked_on = random_inputs(template, input_shape, seed=seed), "seeded random inputs"
    spec = _spec(spec, template, ref_state, check_inputs, batches)
    if not spec.groups:
        raise AlignmentError(f"{type(template).__name__}: no hidden unit can be permuted ({'; '.join(spec.notes) or 'the spec is empty'}); "
                             "nothing to align")
    if method == "activation" and batches is None:
        raise AlignmentError("activation matching needs data: give --data (batches of inputs), or use --method weight")
    ref_module = load_into(factory(), ref_state, ref_label) if method == "activation" else None
    done = []
    for s, lab in zip(states, labels):
        sweeps = None
        if method == "weight":
            perms, sweeps = weight_matching_run(spec, ref_state, s, seed=seed, max_iter=max_iter)
        else:
            perms = activation_matching(spec, ref_module, load_into(factory(), s, lab), batches)  # type: ignore[arg-type]
        aligned = apply_permutation(spec, s, perms)
        diff, scale = check_function(factory, s, aligned, check_inputs, label=lab, rtol=rtol, what=checked_on)
        done.append(_summary(spec, lab, perms, ref_state, s, aligned, diff, scale, sweeps))
        log.info("%s: weight distance to %s %.4g -> %.4g", lab, ref_label, done[-1].distance_before, done[-1].distance_after)
    return AlignResult(ref_label, method, spec, done, checked_on, ref_state, time.perf_counter() - t0, factory, rtol)


def _factory(arch: Any, reference: Any, folder: Path | None) -> Factory:
    if arch is not None:
        return arch_factory(arch)
    if isinstance(reference, nn.Module):
        return arch_factory(reference)
    if folder is not None:
        return hf_factory(folder)
    raise AlignmentError(f"{reference}: a weights file does not say which module it belongs to; give the architecture "
                         "(--arch file.py:make_net or package.module:make_net, a function returning the nn.Module), or a Hugging Face folder")


def _spec(spec: Any, template: nn.Module, ref_state: Mapping[str, torch.Tensor], check_inputs: list[Any], batches: list[Any] | None) -> PermutationSpec:
    shapes = {k: tuple(v.shape) for k, v in ref_state.items()}
    if spec is None:
        if is_bert_like(template):
            spec = permutation_spec(template, names=list(ref_state))
        else:
            spec = permutation_spec(template, example_inputs=example_args(check_inputs[0]))
    elif not isinstance(spec, PermutationSpec):
        spec = load_spec(spec)
    spec.check(shapes, "the reference")
    return spec


def _summary(spec: PermutationSpec, label: str, perms: Perms, ref: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
             aligned: Mapping[str, torch.Tensor], diff: float, scale: float, sweeps: int | None) -> ModelAlignment:
    groups = []
    for g in spec.groups:
        p = perms[g.name]
        names = g.tensors()
        groups.append({"name": g.name, "size": g.size, "moved": float((p != torch.arange(g.size)).double().mean()),
                       "distance_before": weight_distance(ref, state, names), "distance_after": weight_distance(ref, aligned, names),
                       "permutation": [int(i) for i in p]})
    return ModelAlignment(label, perms, dict(aligned), groups, weight_distance(ref, state), weight_distance(ref, aligned), diff, scale, sweeps)


# -- output --------------------------------------------------------------------------------------------------------

_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def output_names(sources: Sequence[Any]) -> list[str]:
    """Output names derived from the inputs: a file's name without its weight suffix, a folder's name, ``model-i`` for
    in-memory models; repeats get ``-2``, ``-3``..."""
    out: list[str] = []
    for i, s in enumerate(sources):
        if isinstance(s, (str, Path)):
            p = Path(s)
            name = p.parent.name if p.name.endswith(".index.json") else p.name
            for suf in _SUFFIXES:
                name = name.removesuffix(suf)
        else:
            name = f"model-{i}"
        name = name or f"model-{i}"
        base, k = name, 2
        while name in out or name in ("align", "soup_manifest"):
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def save_aligned(result: AlignResult, output: str | Path, *, sources: Sequence[Any], reference: Any = None, overwrite: bool = False) -> list[Path]:
    """Write each aligned model into the folder ``output``, with ``align.json`` and ``align.md``, atomically.

    A model given as a file becomes ``output/NAME.safetensors``; a Hugging Face folder becomes the folder
    ``output/NAME`` (``model.safetensors`` plus the input's config, tokenizer and other small files), which loads
    where the input loaded. ``align.json`` holds the summary (per group: units moved, weight distance to the
    reference before and after; the function check's max logit difference) and the inputs' sha256. The output is
    staged (:func:`modelsoup.io.output.staged_output`): nothing half-written is left, and it never replaces an input.

    Args:
        result: from :func:`align`.
        output: the folder.
        sources: the models as given to :func:`align` (names the files; paths are kept clear of).
        reference: the reference as given (kept clear of, and recorded).
        overwrite: replace an earlier modelsoup output.

    Returns:
        The files and folders written, in ``output``.
    """
    from safetensors.torch import save

    from .. import __version__
    from ..io import open_checkpoint
    from ..io.output import cached_sha256, copy_model_files, staged_output

    out = Path(output)
    paths = [s for s in [reference, *sources] if isinstance(s, (str, Path))]
    names = output_names(sources)
    written = []
    inputs = []
    for role, s in [("reference", reference), *(("model", s) for s in sources)]:
        if isinstance(s, (str, Path)):
            with open_checkpoint(s) as ck:
                inputs.append({"role": role, "path": str(s), "files": {f.name: cached_sha256(f) for f in ck.files}})
    with staged_output(out, overwrite, inputs=paths) as tmp:
        for name, src, m in zip(names, sources, result.models):
            data = save({k: v.detach().contiguous().clone() for k, v in m.state.items()}, metadata={"format": "pt"})
            folder = Path(src) if isinstance(src, (str, Path)) and Path(src).is_dir() and (Path(src) / "config.json").is_file() else None
            if folder is not None:
                (tmp / name).mkdir()
                copy_model_files(folder, tmp / name)
                (tmp / name / "model.safetensors").write_bytes(data)
                written.append(out / name)
            else:
                (tmp / f"{name}.safetensors").write_bytes(data)
                written.append(out / f"{name}.safetensors")
        record = {"modelsoup_version": __version__, "outputs": {m.label: p.name for m, p in zip(result.models, written)}, "inputs": inputs,
                  **result.to_json()}
        (tmp / "align.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "align.md").write_text("# Permutation alignment\n\n" + result.to_markdown())
    return [*written, out / "align.json", out / "align.md"]


def aligned_modules(result: AlignResult) -> tuple[nn.Module, list[nn.Module]]:
    """(the reference, the aligned models) as modules of the result's architecture, in eval mode."""
    if result.factory is None:
        raise AlignmentError("this result has no architecture to build modules from; pass arch= to align")
    build = result.factory
    return load_into(build(), result.reference_state, result.reference), [load_into(build(), m.state, m.label) for m in result.models]

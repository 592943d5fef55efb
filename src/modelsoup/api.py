"""Public Python API: merge checkpoints to a folder, or state dicts / modules in memory."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .engine import collect, run_jobs
from .errors import RecipeError, TokenizerError
from .io import Checkpoint, open_checkpoint
from .io.adapters import adapted
from .io.output import cached_sha256, check_output, copy_model_files, input_paths, scratch_folder, staged_output
from .io.records import hub_ids, input_record, set_config_dtype, set_config_layers, write_records
from .io.sinks import SafetensorsSink, Sink, TorchSink
from .methods import get_method
from .io.tokenizers import VOCAB_TENSOR, chat_template_text, shared_vocabulary, write_chat_template
from .plan import MergePlan, OutputPlan, plan_merge
from .recipe import Recipe, read_recipe, read_recipe_text, recipe_from_dict
from .recipe.stages import load_stages

log = logging.getLogger("modelsoup")


@dataclass
class MergeResult:
    """What a merge wrote.

    Attributes:
        output: the output folder or file.
        files: output files with their sha256 (empty digests when hashing was off).
        tensors: number of output tensors.
        bytes: bytes of tensor data written.
        seconds: wall time.
        notes: what was detected or decided along the way (also logged).
    """

    output: Path
    files: dict[str, str]
    tensors: int
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _recipe(recipe: Recipe | str | Path | Mapping[str, Any] | None, models: Sequence[Any] | None, options: dict[str, Any]) -> Recipe:
    """The recipe of a call: given (a file was read by :func:`merge`), as a mapping, or built from ``models`` and ``options``."""
    if recipe is not None:
        if models is not None:
            raise TypeError("pass either a recipe or models, not both")
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return recipe_from_dict(dict(recipe))
        raise TypeError(f"recipe must be a Recipe, a mapping or a recipe file path, got {type(recipe).__name__}")
    if not models:
        raise TypeError("pass a recipe or a list of models")

    def ref(m: Any) -> dict[str, Any]:
        if isinstance(m, (str, Path)):
            return {"path": str(m)}
        if isinstance(m, Mapping) and "path" in m and not any(isinstance(v, torch.Tensor) for v in m.values()):
            return dict(m)  # a recipe model entry: {"path": BASE, "adapter": ADAPTER, ...}
        return {"source": m}

    weights = options.pop("weights", None)
    if weights is not None and len(weights) != len(models):
        raise RecipeError([f"weights: {len(weights)} given for {len(models)} model(s); give exactly one weight per model, in order"])
    statistics = options.pop("statistics", None)
    if statistics is not None and len(statistics) != len(models):
        raise RecipeError([f"statistics: {len(statistics)} given for {len(models)} model(s); give one per model, in order"])
    data: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    data["models"] = [ref(m) | ({"weight": _number(weights[i])} if weights is not None else {})
                      | ({"statistics": statistics[i]} if statistics is not None else {}) for i, m in enumerate(models)]
    if data.get("base") is not None:
        data["base"] = ref(data["base"])
    return recipe_from_dict(data)


def _number(value: Any) -> Any:
    """A weight as a float where it is one (numpy and torch scalars included); else as given, for validation to name."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return value


def _options(method: str, base: Any, weights: Sequence[float] | None, parameters: Mapping[str, Any] | None,
             overrides: Sequence[Mapping[str, Any]] | None, dtype: str | None, keys: str | None, seed: int | None,
             allow_nonfinite: bool | None, statistics: Sequence[Any] | None = None) -> dict[str, Any]:
    """Keyword options of the API as recipe fields (None = the recipe default)."""
    return {"method": method, "base": base, "weights": weights, "parameters": dict(parameters) if parameters else None,
            "overrides": list(overrides) if overrides else None, "dtype": dtype, "keys": keys, "seed": seed, "allow_nonfinite": allow_nonfinite,
            "statistics": statistics}


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The files and folders a recipe reads (in-memory models left out), for the output checks."""
    refs = [*recipe.models, *([recipe.base] if recipe.base is not None else [])]
    donor = recipe.output.tokenizer_source
    extra = [Path(donor)] if donor not in (None, "base", "union") else []
    extra += [r.adapter_resolved for r in refs if r.adapter_resolved is not None]
    extra += [r.statistics_resolved for r in refs if r.statistics_resolved is not None]
    return input_paths([*(r.resolved for r in refs if r.source is None and r.resolved is not None), *extra])


@contextmanager
def _opened(recipe: Recipe, allow_globals: Sequence[str] = ()) -> Iterator[tuple[list[Checkpoint], Checkpoint | None, list[Checkpoint] | None]]:
    """The recipe's models and base, and for a data-aware method its ingredients' statistics, opened (headers only), closed on exit.

    Raises:
        RecipeError: a data-aware method's ingredient whose statistics are not computed yet (it has only `data:`).
    """
    def one(ref: Any, label: str) -> Checkpoint:
        in_memory = ref.source is not None
        ck = open_checkpoint(ref.source if in_memory else ref.resolved, label=label if in_memory else str(ref.path), key=ref.key,
                             strip_prefix=ref.strip_prefix, allow_globals=allow_globals)
        return ck if ref.adapter_resolved is None else adapted(ck, ref.adapter_resolved, ref.adapter)

    opened: list[Checkpoint] = []
    try:
        for i, m in enumerate(recipe.models):
            opened.append(one(m, f"model[{i}]"))
        base = one(recipe.base, "base") if recipe.base is not None else None
        if base is not None:
            opened.append(base)
        stats: list[Checkpoint] | None = None
        method = get_method(recipe.method)
        if method.statistic is not None:
            stats = []
            for i in recipe.ingredients(method.base != "none" and recipe.base is not None):
                m = recipe.models[i]
                if m.statistics is None:
                    raise RecipeError([f"models[{i}] ({m.label()}): its {method.statistic} statistics are not computed yet; `soup merge` computes "
                                       "them from `data:` with the evaluation options (--eval, --model), or call modelsoup.model_statistics and "
                                       "pass the file as `statistics:`"])
                src = m.statistics if m.statistics_resolved is None else m.statistics_resolved
                ck = open_checkpoint(src, label=f"the statistics of model[{i}]" if m.statistics_resolved is None else str(m.statistics))
                opened.append(ck)
                from .recipes.statistics import check_statistics_file

                check_statistics_file(ck, method.statistic, opened[i], f"models[{i}]", m)
                stats.append(ck)
        yield opened[: len(recipe.models)], base, stats
    finally:
        for ck in opened:
            ck.close()


def merge(
    recipe: Recipe | str | Path | Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    *,
    models: Sequence[Any] | None = None,
    method: str = "linear",
    base: Any = None,
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    overrides: Sequence[Mapping[str, Any]] | None = None,
    dtype: str | None = None,
    keys: str | None = None,
    seed: int | None = None,
    allow_nonfinite: bool | None = None,
    statistics: Sequence[Any] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
    hash_files: bool = True,
    allow_globals: Sequence[str] = (),
    device: str | torch.device | None = None,
    dry_run: bool = False,
    _stages_yaml: str | None = None,
) -> Any:
    """Merge checkpoints into a new checkpoint on disk, streaming tensor by tensor.

    Either give a ``recipe`` (a :class:`Recipe`, a YAML path, native or mergekit form, or a dict), or
    ``models`` plus options. A model is a path, an in-memory state dict or module, or a recipe model entry
    (``{"path": BASE, "adapter": LORA_FOLDER}``); a PEFT adapter folder given as a path is applied to ``base``. ``output`` is a folder (Hugging Face layout: sharded safetensors, config and
    tokenizer files copied from the base or first model, ``recipe.yaml``, ``README.md`` model card and
    ``soup_manifest.json`` with sha256 of every input and output file) or a single file
    (``x.safetensors``, or ``x.pt`` / ``x.pth.tar`` for a torch pickle nested like the first input).
    The output never is, holds or sits inside an input, and ``overwrite`` replaces only an earlier
    modelsoup output (see :mod:`modelsoup.io.output`). Relative paths in the ``recipe.yaml`` written
    beside it are relative to the output's folder, so it re-runs from anywhere.

    ``statistics``: for the data-aware methods (``fisher``, ``regmean``), one statistics file (or mapping of tensors) per
    model, from :func:`modelsoup.model_statistics`.
    ``allow_globals``: further ``module.Class`` names torch pickles may hold, loaded as inert data.
    ``device``: where merged tensors are computed (``cpu``, the default; ``cuda``, ``cuda:N``): inputs are read
    and the output written on the CPU, each tensor's method runs on the device (see :mod:`modelsoup.engine`).
    ``dry_run``: plan the merge, time a small sample of it and return its
    :class:`~modelsoup.estimate.MergeEstimate` (bytes read and written, memory, disk, tensors, time); nothing is
    written, no input file is hashed. A real run is refused before the first tensor is read when the output
    cannot fit on its disk.
    (``_stages_yaml`` is :func:`merge_stages`' record of the whole multi-stage recipe, for the last stage.)

    Returns:
        What was written (:class:`MergeResult`), or with ``dry_run`` the :class:`~modelsoup.estimate.MergeEstimate`.

    Raises:
        RecipeError, CheckpointError, KeyMismatchError, TensorMismatchError, NonFiniteError, MethodError,
        OutputExistsError, OutputError: bad input or an output that would lose data (or not fit); nothing is written.
        OptionError: a ``device`` that is not available, or ``dry_run``/``device`` with a multi-stage recipe.
    """
    from .devices import resolve_device
    from .estimate import check_disk_space, estimate_merge

    dev = resolve_device(device, "device=")
    if output is None:
        raise TypeError("merge() needs an output path")
    if isinstance(recipe, (str, Path)) and models is None:
        loaded, _ = read_recipe(recipe)
        if loaded is None:  # several documents: a multi-stage recipe
            if dry_run or dev.type != "cpu":
                from .errors import OptionError

                raise OptionError(f"{recipe}: a multi-stage recipe is merged on the CPU and has no dry run (its later stages read the "
                                  "outputs of earlier ones, which do not exist yet); plan or merge each stage's recipe on its own")
            return merge_stages(recipe, output, overwrite=overwrite, workers=workers, progress=progress, hash_files=hash_files,
                                allow_globals=allow_globals)
        recipe = loaded
    rec = _recipe(recipe, models, _options(method, base, weights, parameters, overrides, dtype, keys, seed, allow_nonfinite, statistics))
    paths = recipe_inputs(rec)
    form = OutputPlan.for_path(output, rec.output)
    check_output(form.path, overwrite, inputs=paths, as_file=form.as_file)
    t0 = time.perf_counter()
    with _opened(rec, allow_globals) as (cks, base_ck, stats):
        plan = plan_merge(rec, cks, base_ck, form, stats)
        tokenizer = _tokenizer(plan)
        if dry_run:
            return estimate_merge(plan, workers=workers, device=dev, measure=True)
        check_disk_space(estimate_merge(plan, workers=workers, device=dev, measure=False))
        files = list(dict.fromkeys(f for ck in [*cks, *([base_ck] if base_ck else []), *(stats or [])] for f in ck.files))
        hasher = ThreadPoolExecutor(1, thread_name_prefix="soup-hash")  # inputs are hashed beside the merge
        try:
            digests = {f: hasher.submit(cached_sha256, f) for f in files} if hash_files else {}
            with staged_output(form.path, overwrite, inputs=[*paths, *files], as_file=form.as_file) as tmp:
                out_hashes = _write_tensors(plan, tmp, workers, progress, hash_files, dev)
                if not form.as_file:
                    _write_folder_files(plan, tmp, out_hashes, {f: d.result() for f, d in digests.items()}, tokenizer, _stages_yaml)
        finally:
            hasher.shutdown(cancel_futures=True)
    dt = time.perf_counter() - t0
    log.debug("wrote %s: %d tensors, %.1f MB in %.1f s", form.path, len(plan.jobs), plan.nbytes / 1e6, dt)
    return MergeResult(form.path, out_hashes, len(plan.jobs), plan.nbytes, dt, plan.notes)


def merge_stages(
    recipe: str | Path,
    output: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
    hash_files: bool = True,
    allow_globals: Sequence[str] = (),
) -> MergeResult:
    """Run a multi-stage recipe (``mergekit-multi``: ``---`` separated documents with ``name:``), see :mod:`modelsoup.recipe.stages`.

    Every stage is validated before the first is merged. The named stages are written to
    ``intermediate_dir/<name>`` and kept there when ``intermediate_dir`` is given; otherwise to a temporary
    folder beside ``output``, removed at the end. The final stage is written to ``output``.

    Returns:
        What the final stage wrote (its notes list the stages run before it).

    Raises:
        As :func:`merge`, for any stage; a failed stage leaves no output of its own and the final output unwritten.
    """
    out = Path(output)
    run: dict[str, Any] = {"overwrite": overwrite, "workers": workers, "progress": progress, "hash_files": hash_files, "allow_globals": allow_globals}
    keep = intermediate_dir is not None
    text = read_recipe_text(recipe)
    folder = Path(intermediate_dir) if keep else scratch_folder(out, "stages")
    try:
        stages = load_stages(text, str(recipe), folder)
        final = stages[-1]
        given = [p for st in stages for p in recipe_inputs(st.recipe) if os.path.lexists(p)]
        check_output(out, overwrite, inputs=[*given, folder], as_file=OutputPlan.for_path(out, final.recipe.output).as_file)
        for st in stages[:-1]:  # every stage's output keeps clear of every stage's inputs (an -I inside a model folder)
            check_output(folder / str(st.name), overwrite, inputs=[p for p in given if p != folder / str(st.name)])
        done: list[str] = []
        for st in stages[:-1]:
            folder.mkdir(parents=True, exist_ok=True)
            assert st.name is not None
            merge(st.recipe, folder / st.name, **run)
            done.append(f"stage '{st.name}' ({st.recipe.method}) merged into {folder / st.name}" + ("" if keep else " (a temporary folder, removed)"))
            log.info(done[-1])
        result = merge(final.recipe, out, **run, _stages_yaml=None if keep else text)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return dataclasses.replace(result, notes=[*done, *result.notes])


def _sink(plan: MergePlan, folder: Path, hash_files: bool) -> Sink:
    """The sink the plan's output form asks for, writing into ``folder``."""
    out = plan.output
    assert out is not None
    specs = [(j.name, j.dtype, j.shape) for j in plan.jobs]
    if out.torch_format:
        layout = plan.models[0].layout
        aliases = {j.name: j.alias_of for j in plan.jobs if j.alias_of is not None}
        return TorchSink(folder / (out.path.name if out.as_file else "pytorch_model.bin"), specs, aliases=aliases, key=layout.get("key"),
                         prefix=layout.get("prefix", ""), hash_files=hash_files)
    meta = {"modelsoup_version": __version__, "modelsoup_method": plan.method.name}
    if out.as_file:
        meta["modelsoup_recipe"] = plan.recipe.to_yaml(relative_to=out.path.absolute().parent)
    return SafetensorsSink(folder, specs, shard_size=out.options.shard_size, metadata=meta, file_name=out.path.name if out.as_file else None,
                           hash_files=hash_files)


def _write_tensors(plan: MergePlan, folder: Path, workers: int | None, progress: bool | None, hash_files: bool,
                   device: torch.device | None = None) -> dict[str, str]:
    """Run the plan into its sink in ``folder`` (methods computed on ``device``); return {file name: sha256 or ""}."""
    sink = _sink(plan, folder, hash_files)
    try:
        run_jobs(plan, sink.write, workers=workers, progress=progress, order=sink.order, device=device,
                 write_range=getattr(sink, "write_range", None))
    except BaseException:
        sink.abort()
        raise
    return sink.close()


def _tokenizer(plan: MergePlan) -> tuple[Path | None, str | None]:
    """The folder the output's tokenizer files come from (None: the config's folder) and its chat template, checked before any write.

    Raises:
        TokenizerError: a ``tokenizer_source`` whose vocabulary some model does not share, or a chat template that cannot be found.
    """
    opts = plan.recipe.output
    readers = [plan.inputs[i] for i in sorted({s[0] for j in plan.jobs for s in (*j.sources, *([j.base_source] if j.base_source else []))})]
    folder: Path | None = None
    if opts.tokenizer_source is not None:
        src = opts.tokenizer_source
        if src == "union":  # the union of identical vocabularies is that vocabulary: the base's, else the first model's
            ck = plan.base if plan.base is not None else plan.models[0]
            label, folder = ck.label, ck.folder
        elif src == "base":
            assert plan.base is not None
            label, folder = plan.base.label, plan.base.folder
        else:
            label, folder = src, Path(src)
        rows = {j.shape[0] for j in plan.jobs if VOCAB_TENSOR.search(j.name) and j.shape}
        shared_vocabulary((label, folder), [(ck.label, ck.folder) for ck in readers], max(rows) if rows else None, opts.pad_to_multiple_of)
        if len(rows) > 1:
            raise TokenizerError(f"the vocabulary tensors have different row counts ({sorted(rows)}); cannot check them against one tokenizer")
    template = chat_template_text(opts.chat_template, [ck.folder for ck in readers]) if opts.chat_template is not None else None
    return folder, template


def _write_folder_files(plan: MergePlan, folder: Path, out_hashes: dict[str, str], in_hashes: dict[Path, str],
                        tokenizer: tuple[Path | None, str | None] = (None, None), stages_yaml: str | None = None) -> None:
    """A folder output's other files: config and tokenizer copied from the base or first model folder (the tokenizer from
    ``tokenizer[0]`` when given), the chat template ``tokenizer[1]``, and the records."""
    rec, out = plan.recipe, plan.output
    assert out is not None
    sources = [*([plan.base] if plan.base is not None else []), *plan.models]
    hf_src = next((ck.folder for ck in sources if ck.folder is not None), None)
    tok_src, template = tokenizer
    own_tokenizer = out.options.copy_tokenizer and tok_src is None
    copied = copy_model_files(hf_src, folder, tokenizer=own_tokenizer) if (hf_src is not None and out.options.copy_files) else []
    if out.options.copy_files and out.options.copy_tokenizer and tok_src is not None:
        copied += copy_model_files(tok_src, folder, only_tokenizer=True)
    if template is not None:
        write_chat_template(folder, template)
        copied.append("chat_template.jinja")
    if rec.dtype is not None and "config.json" in copied:
        set_config_dtype(folder / "config.json", rec.dtype)
    if plan.layer_sources and "config.json" in copied:
        configs = [ck.folder / "config.json" if ck.folder is not None else None for ck in plan.models]
        set_config_layers(folder / "config.json", [(configs[m], layer) for m, layer in plan.layer_sources], f"{hf_src / 'config.json'}")
    roles = [("model", m, ck) for m, ck in zip(rec.models, plan.models)] + ([("base", rec.base, plan.base)] if plan.base is not None else [])
    inputs = [input_record(role, ref.label() if ref.source is None else "(in memory)", ck.kind, ck.files, in_hashes, ck.notes)
              for role, ref, ck in roles]
    write_records(folder, name=out.path.name, recipe_yaml=rec.to_yaml(relative_to=out.path.absolute()), method=plan.method, inputs=inputs,
                  outputs=out_hashes, copied=copied, notes=plan.notes, hf=hf_src is not None, base_models=hub_ids(ck.folder for ck in sources),
                  card=out.options.model_card, version=__version__, stages_yaml=stages_yaml)


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    method: str = "linear",
    base: Mapping[str, torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    overrides: Sequence[Mapping[str, Any]] | None = None,
    dtype: str | None = None,
    keys: str | None = None,
    seed: int | None = None,
    allow_nonfinite: bool | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor] | str | Path] | None = None,
    workers: int | None = 1,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or ``nn.Module``s) and return the merged tensors.

    Same methods, parameters, overrides, key handling and numerics as :func:`merge` (``statistics``: one mapping
    or file per model for ``fisher`` and ``regmean``); inputs are never modified and the result shares no memory with them.

    Raises:
        RecipeError, KeyMismatchError, TensorMismatchError, NonFiniteError, MethodError: bad input.
    """
    rec = _recipe(None, list(state_dicts), _options(method, base, weights, parameters, overrides, dtype, keys, seed, allow_nonfinite, statistics))
    with _opened(rec) as (cks, base_ck, stats):
        return collect(plan_merge(rec, cks, base_ck, statistics=stats), workers=workers, progress=False)


def merge_modules(modules: Sequence[torch.nn.Module], *, base: torch.nn.Module | None = None, **options: Any) -> torch.nn.Module:
    """Merge modules of one architecture and return a new module (a deep copy of the base or first one).

    Takes the options of :func:`merge_state_dicts`. Tied parameters stay tied; integer buffers follow
    the non-floating rule (copied, never averaged).
    """
    merged = merge_state_dicts([m.state_dict() for m in modules], base=base.state_dict() if base is not None else None, **options)
    out = copy.deepcopy(base if base is not None else modules[0])
    out.load_state_dict(merged, strict=True)
    return out

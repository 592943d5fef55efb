"""Public Python API: merge checkpoints to a folder, or state dicts / modules in memory."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import Recipe, load_recipe, recipe_from_dict
from .engine import MergeSession, collect, run_jobs
from .errors import RecipeError
from .io import Checkpoint, open_checkpoint
from .io.card import hub_ids, model_card, set_config_dtype, write_manifest
from .io.formats import is_file_output, is_torch_file
from .io.output import cached_sha256, check_output, copy_model_files, input_paths, sha256_file, staged_output
from .io.writer import SafetensorsWriter

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
    if recipe is not None:
        if models is not None:
            raise TypeError("pass either a recipe or models, not both")
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return recipe_from_dict(dict(recipe))
        return load_recipe(recipe)
    if not models:
        raise TypeError("pass a recipe or a list of models")

    def ref(m: Any) -> dict[str, Any]:
        return {"path": str(m)} if isinstance(m, (str, Path)) else {"source": m}

    weights = options.pop("weights", None)
    if weights is not None and len(weights) != len(models):
        raise RecipeError([f"weights: {len(weights)} given for {len(models)} model(s); give exactly one weight per model, in order"])
    data: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    data["models"] = [ref(m) | ({"weight": _number(weights[i])} if weights is not None else {}) for i, m in enumerate(models)]
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
             allow_nonfinite: bool | None) -> dict[str, Any]:
    """Keyword options of the API as recipe fields (None = the recipe default)."""
    return {"method": method, "base": base, "weights": weights, "parameters": dict(parameters) if parameters else None,
            "overrides": list(overrides) if overrides else None, "dtype": dtype, "keys": keys, "seed": seed, "allow_nonfinite": allow_nonfinite}


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The files and folders a recipe reads (in-memory models left out), for the output checks."""
    refs = [*recipe.models, *([recipe.base] if recipe.base is not None else [])]
    return input_paths(r.resolved for r in refs if r.source is None and r.resolved is not None)


def _open_all(recipe: Recipe, allow_globals: Sequence[str] = ()) -> tuple[list[Checkpoint], Checkpoint | None, list[bool]]:
    def open_ref(ref: Any, label: str) -> Checkpoint:
        src = ref.source if getattr(ref, "source", None) is not None else ref.resolved
        return open_checkpoint(src, label=label if getattr(ref, "source", None) is not None else str(ref.path), key=ref.key,
                               strip_prefix=ref.strip_prefix, allow_globals=allow_globals)

    models = [open_ref(m, f"model[{i}]") for i, m in enumerate(recipe.models)]
    base = open_ref(recipe.base, "base") if recipe.base is not None else None

    def same(m: Any) -> bool:
        b = recipe.base
        if b is None:
            return False
        if getattr(m, "source", None) is not None or getattr(b, "source", None) is not None:
            return getattr(m, "source", None) is getattr(b, "source", None)
        return bool(Path(m.resolved).resolve() == Path(b.resolved).resolve() and m.key == b.key and m.strip_prefix == b.strip_prefix)

    return models, base, [same(m) for m in recipe.models]


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
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
    hash_files: bool = True,
    allow_globals: Sequence[str] = (),
) -> MergeResult:
    """Merge checkpoints into a new checkpoint on disk, streaming tensor by tensor.

    Either give a ``recipe`` (a :class:`Recipe`, a YAML path, native or mergekit form, or a dict), or
    ``models`` plus options. ``output`` is a folder (Hugging Face layout: sharded safetensors, config and
    tokenizer files copied from the base or first model, ``recipe.yaml``, ``README.md`` model card and
    ``soup_manifest.json`` with sha256 of every input and output file) or a single file
    (``x.safetensors``, or ``x.pt`` / ``x.pth.tar`` for a torch pickle nested like the first input).
    The output never is, holds or sits inside an input, and ``overwrite`` replaces only an earlier
    modelsoup output (see :mod:`modelsoup.io.output`). Relative paths in the ``recipe.yaml`` written
    beside it are relative to the output's folder, so it re-runs from anywhere.

    ``allow_globals``: further ``module.Class`` names torch pickles may hold, loaded as inert data.

    Returns:
        What was written.

    Raises:
        RecipeError, CheckpointError, KeyMismatchError, TensorMismatchError, NonFiniteError, MethodError,
        OutputExistsError, OutputError: bad input or an output that would lose data; nothing is written.
    """
    if output is None:
        raise TypeError("merge() needs an output path")
    out = Path(output)
    single_file = is_file_output(out)
    rec = _recipe(recipe, models, _options(method, base, weights, parameters, overrides, dtype, keys, seed, allow_nonfinite))
    paths = recipe_inputs(rec)
    check_output(out, overwrite, inputs=paths, as_file=single_file)
    t0 = time.perf_counter()
    cks, base_ck, same = _open_all(rec, allow_globals)
    try:
        session = MergeSession.plan(rec, cks, base_ck, same)
        inputs = [("model", m, ck) for m, ck in zip(rec.models, cks)] + ([("base", rec.base, base_ck)] if base_ck else [])
        unique_files = list(dict.fromkeys(f for _, _, ck in inputs for f in ck.files))
        hasher = ThreadPoolExecutor(1, thread_name_prefix="soup-hash") if hash_files else None
        digests = {f: hasher.submit(cached_sha256, f) for f in unique_files} if hasher else {}
        try:
            with staged_output(out, overwrite, inputs=[*paths, *unique_files], as_file=single_file) as tmp:
                out_hashes, nbytes = _write(rec, session, tmp, out, workers, progress, hash_files)
                sources = ([base_ck] if base_ck else []) + cks
                hf_src = next((ck.folder for ck in sources if ck.folder is not None), None)
                if not single_file:
                    copied = copy_model_files(hf_src, tmp) if (hf_src is not None and rec.output.copy_files) else []
                    if rec.dtype is not None and "config.json" in copied:
                        set_config_dtype(tmp / "config.json", rec.dtype)
                    _write_records(rec, session, tmp, out, inputs, {f: d.result() for f, d in digests.items()}, out_hashes, copied,
                                   hf_src is not None, hub_ids(ck.folder for ck in sources))
        finally:
            if hasher:
                hasher.shutdown(cancel_futures=True)
    finally:
        for ck in cks + ([base_ck] if base_ck else []):
            ck.close()
    dt = time.perf_counter() - t0
    log.info("wrote %s: %d tensors, %.1f MB in %.1f s", out, len(session.jobs), nbytes / 1e6, dt)
    return MergeResult(out, out_hashes, len(session.jobs), nbytes, dt, session.notes)


def _write(rec: Recipe, session: MergeSession, tmp: Path, out: Path, workers: int | None, progress: bool | None, hash_files: bool) -> tuple[dict[str, str], int]:
    """Write the merged tensors into ``tmp``; return {file name: sha256 or ""} and bytes of tensor data."""
    plan = [(j.name, j.dtype, j.shape) for j in session.jobs]
    nbytes = sum(j.nbytes for j in session.jobs)
    single_file = is_file_output(out)
    torch_out = is_torch_file(out) or (not single_file and rec.output.format == "torch")
    if torch_out:
        tensors = collect(session, workers=workers, progress=progress)
        layout = session.models[0].layout
        sd = {layout.get("prefix", "") + j.name: tensors[j.name] for j in session.jobs}
        obj: Any = {layout["key"]: sd} if layout.get("key") else sd
        path = tmp / (out.name if single_file else "pytorch_model.bin")
        _torch_save(obj, path)
        return {path.name: sha256_file(path) if hash_files else ""}, nbytes
    meta = {"modelsoup_version": __version__, "modelsoup_method": rec.method}
    if single_file:
        meta["modelsoup_recipe"] = rec.to_yaml(relative_to=out.absolute().parent)
    writer = SafetensorsWriter(tmp, plan, rec.output.shard_size, meta, file_name=out.name if single_file else None, hash_files=hash_files)
    try:
        run_jobs(session, writer.write, workers=workers, progress=progress, order=writer.order)
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    return (writer.digests() if hash_files else {f.name: "" for f in files}), nbytes


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a write error (full disk) surfaces as the OSError it is."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch wraps the file's OSError; hand the OSError on
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _write_records(rec: Recipe, session: MergeSession, tmp: Path, out: Path, inputs: list[tuple[str, Any, Checkpoint]],
                   in_hashes: dict[Path, str], out_hashes: dict[str, str], copied: list[str], hf: bool, hub: list[str]) -> None:
    recipe_yaml = rec.to_yaml(relative_to=out.absolute())
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    records = [
        {"role": role, "path": str(ref.path) if getattr(ref, "source", None) is None else "(in memory)",
         "format": ck.kind, "files": {str(f.name): in_hashes.get(f, "") for f in ck.files}, "notes": ck.notes}
        for role, ref, ck in inputs
    ]
    m = session.method
    if rec.output.model_card:
        (tmp / "README.md").write_text(model_card(name=out.name, method=m.name, summary=m.summary, paper=m.paper, base_models=hub,
                                                   inputs=records, outputs=out_hashes, recipe_yaml=recipe_yaml, version=__version__, hf=hf))
    write_manifest(tmp / "soup_manifest.json", {"modelsoup_version": __version__, "method": m.name, "recipe": "recipe.yaml", "inputs": records,
                                                "outputs": out_hashes, "copied_files": copied, "notes": session.notes})


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
    workers: int | None = 1,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or ``nn.Module``s) and return the merged tensors.

    Same methods, parameters, overrides, key handling and numerics as :func:`merge`; inputs are never
    modified and the result shares no memory with them.

    Raises:
        RecipeError, KeyMismatchError, TensorMismatchError, NonFiniteError, MethodError: bad input.
    """
    rec = _recipe(None, list(state_dicts), _options(method, base, weights, parameters, overrides, dtype, keys, seed, allow_nonfinite))
    cks, base_ck, same = _open_all(rec)
    session = MergeSession.plan(rec, cks, base_ck, same)
    return collect(session, workers=workers, progress=False)


def merge_modules(modules: Sequence[torch.nn.Module], *, base: torch.nn.Module | None = None, **options: Any) -> torch.nn.Module:
    """Merge modules of one architecture and return a new module (a deep copy of the base or first one).

    Takes the options of :func:`merge_state_dicts`. Tied parameters stay tied; integer buffers follow
    the non-floating rule (copied, never averaged).
    """
    merged = merge_state_dicts([m.state_dict() for m in modules], base=base.state_dict() if base is not None else None, **options)
    out = copy.deepcopy(base if base is not None else modules[0])
    out.load_state_dict(merged, strict=True)
    return out

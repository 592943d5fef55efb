"""Merges whose output is a PEFT LoRA adapter: several adapters of one base combined into one, and an
adapter extracted from a full fine-tune.

``cat`` and ``svd`` write, as an adapter, the very merge :func:`modelsoup.merge` would write for the same
adapters, method, weights, parameters and seed (planned by the same planner, computed in float32):

* ``cat`` (exact): for a weighted sum of the adapters' changes ``d_i = s_i B_i A_i`` (methods ``linear``, with
  weights normalised to sum 1, and ``task_arithmetic``), ``A = [c_1 s_1 A_1; ...; c_n s_n A_n]`` stacked by rows
  and ``B = [B_1, ..., B_n]`` by columns, so ``B A = sum_i c_i d_i``; rank = the sum of the ranks. A layer weight
  an adapter saved (``base_layer.weight``) is combined the same way.
* ``svd``: each adapted tensor computed by the merge (any method), and its change from the base truncated to
  rank ``r`` by its SVD: ``B = U_r S_r``, ``A = V_r^T``, with the relative error ``||D - B A||_F / ||D||_F``
  reported per module. At full rank it is the merge exactly.

A tensor no adapter changes must come out as the base's (else the merge is not an adapter and is refused), and
full tensors (``modules_to_save`` heads) are the merge's own. The output has ``lora_alpha = r`` per module
(scaling 1) and no rslora, so its factors carry the whole change.

* ``linear`` is peft's ``add_weighted_adapter(combination_type="linear")`` and its factor-wise relatives (ties,
  dare_linear, dare_ties): the method is applied to the A factors and to the B factors separately, with weights
  ``sqrt(|w_i s_i|)`` (the sign on A's side), the weights as given (default 1/n); same rank only. This is **not**
  the average of the adapters' updates (the product of combined factors has cross terms ``B_i A_j``: two copies
  of one adapter at weights 1/2 give twice its update); it is here to reproduce peft.

peft's conventions, for agreement with ``add_weighted_adapter``: its weights are task arithmetic's (not
normalised: ``method="task_arithmetic"`` for cat and svd), and its ``ties`` elects signs on unweighted deltas and
divides by the count (``sign_from: unweighted, divide_by: count``).

``extract_lora``: per 2-D weight, the rank-``r`` SVD of ``W_ft - W_base`` as a LoRA module; other changed
tensors (norms, biases) are saved whole in ``modules_to_save`` form or refused, as asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .engine import tensor_seed
from .errors import AdapterError, OptionError
from .io import Checkpoint, open_checkpoint
from .io.adapters import PEFT_PREFIX, AdaptedCheckpoint, adapted, model_config
from .io.output import cached_sha256, input_paths, staged_output
from .methods import get_method
from .methods.registry import MergeMethod
from .progress import progress_on
from .recipe import Recipe

log = logging.getLogger("modelsoup")

COMBINATIONS = ("cat", "svd", "linear")


@dataclass
class AdapterResult:
    """What an adapter-output merge wrote.

    Attributes:
        output: the adapter folder.
        rank: the output's largest rank.
        modules: per output module, its rank and (svd, extract) the relative error of the truncation
            ``||D - B A||_F / ||D||_F`` and the retained energy ``sum_{k<r} s_k^2 / sum_k s_k^2``.
        full: names of the tensors saved whole (modules_to_save).
        seconds: wall time.
        notes: what was decided along the way.
    """

    output: Path
    rank: int
    modules: dict[str, dict[str, float]]
    full: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def worst_error(self) -> float:
        return max((m.get("relative_error", 0.0) for m in self.modules.values()), default=0.0)


def truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ``delta`` (out, in): (B, A, relative Frobenius error, retained energy)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    r = min(rank, s.numel())
    energy = float((s ** 2).sum())
    kept = float((s[:r] ** 2).sum())
    err = math.sqrt(max(energy - kept, 0.0) / energy) if energy > 0 else 0.0
    b = (u[:, :r] * s[:r]).to(torch.float32)
    a = vh[:r].to(torch.float32)
    return b.contiguous(), a.contiguous(), err, (kept / energy if energy > 0 else 1.0)


def cat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ``B A = sum_i c_i B_i A_i`` from ``factors`` (A_i, B_i): A's stacked by rows (each times its coefficient), B's side by side."""
    a = torch.cat([c * a for (a, _), c in zip(factors, coefficients)], dim=0)
    b = torch.cat([b for _, b in factors], dim=1)
    return b, a


def _combine_dense(method: MergeMethod, tensors: list[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any], seed: int, name: str) -> torch.Tensor:
    """The method over deltas (a zero base where it takes one)."""
    base = torch.zeros_like(tensors[0]) if method.base != "none" else None
    gen = torch.Generator().manual_seed(tensor_seed(seed, name)) if method.random else None
    return method(tensors, base=base, weights=list(weights), generator=gen, **params)


def _put_factors(tensors: dict[str, torch.Tensor], module: str, embedding: bool, a: torch.Tensor, b: torch.Tensor) -> None:
    """Store a module's factors under the names peft saves them (``lora_embedding_A/B`` for an embedding)."""
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    tensors[f"{PEFT_PREFIX}{module}.{names[0]}"], tensors[f"{PEFT_PREFIX}{module}.{names[1]}"] = a.contiguous(), b.contiguous()


def _module_name(name: str, users: Sequence[tuple[int, str]]) -> str:
    """The one module name the adapters give the layer of base tensor ``name``.

    Raises:
        AdapterError: the adapters name it differently (made on different model classes).
    """
    found = {module for _, module in users}
    if len(found) > 1:
        raise AdapterError(f"the adapters name the module of '{name}' differently ({', '.join(sorted(found))}): they were made on different "
                           "model classes; one adapter must load into one model")
    return users[0][1]


def _output_config(cks: Sequence[AdaptedCheckpoint], modules: Mapping[str, Mapping[str, float]], full: Sequence[str]) -> dict[str, Any]:
    """adapter_config.json of an output combining ``cks``: their modules_to_save that cover the full tensors written."""
    to_save = sorted({s for ck in cks for s in (ck.adapter.config.get("modules_to_save") or []) if any(n == s or n.startswith(s + ".") for n in full)})
    fifo = {bool(ck.adapter.config.get("fan_in_fan_out")) for ck in cks}
    ranks = {mod: int(v["rank"]) for mod, v in modules.items()}
    return _config(cks[0].adapter.config, ranks, to_save, fifo.pop() if len(fifo) == 1 else False)


def _rank_pattern(ranks: Mapping[str, int], r: int) -> dict[str, int]:
    """peft's rank_pattern for the modules whose rank is not ``r`` (keys matched as ``(.*\\.)?(key)$``)."""
    return {re.escape(m): k for m, k in ranks.items() if k != r}


def _config(first: Mapping[str, Any], modules: Mapping[str, int], to_save: Sequence[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """adapter_config.json of the output: plain LoRA, scaling 1 in every module (alpha = rank)."""
    r = max(modules.values(), default=1)
    pattern = _rank_pattern(modules, r)
    keep = {k: first[k] for k in ("base_model_name_or_path", "revision", "task_type") if k in first}
    return {**keep, "peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(modules), "modules_to_save": sorted(set(to_save)) or None, "fan_in_fan_out": fan_in_fan_out,
            "bias": "none", "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "init_lora_weights": True,
            "inference_mode": True}


def _write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], record: dict[str, Any],
                   recipe_yaml: str | None = None) -> None:
    from safetensors.torch import save

    # serialised here and written by open(), so the file gets the user's umask (save_file's temporary file is 0600)
    (folder / "adapter_model.safetensors").write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "soup_manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    if recipe_yaml is not None:  # re-runs: soup merge recipe.yaml OUT --as-adapter (or without it, as a full model)
        (folder / "recipe.yaml").write_text(recipe_yaml)
    lines = [f"# {folder.name}", "", f"A PEFT LoRA adapter written by modelsoup {__version__}: {record['what']}.", "",
             "Load it with `PeftModel.from_pretrained(BASE_MODEL, THIS_FOLDER)`.", "", "| input | sha256 |", "|---|---|"]
    lines += [f"| {i['path']} | {', '.join(f'{n}: {h[:12]}' for n, h in i['files'].items())} |" for i in record["inputs"]]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _inputs_record(cks: Sequence[Any], labels: Sequence[str], hash_files: bool) -> list[dict[str, Any]]:
    return [{"path": label, "files": {f.name: (cached_sha256(f) if hash_files else "") for f in ck.files}} for ck, label in zip(cks, labels)]


def _resolve_method(method: str, parameters: Mapping[str, Any] | None) -> tuple[MergeMethod, dict[str, Any]]:
    m = get_method(method)
    given = dict(parameters or {})
    unknown = [k for k in given if m.param(k) is None]
    if unknown:
        raise OptionError(f"method '{m.name}' has no parameter {', '.join(map(repr, unknown))}; it takes: {', '.join(p.name for p in m.params) or 'none'}")
    return m, m.filled({m.param(k).name: v for k, v in given.items()})  # type: ignore[union-attr]


def merge_adapters(
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    base: str | Path,
    combination: str = "cat",
    method: str = "linear",
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    hash_files: bool = True,
) -> AdapterResult:
    """Combine LoRA adapters of one base into one PEFT adapter folder (see the module doc for ``combination``).

    ``cat`` and ``svd`` write the merge that :func:`modelsoup.merge` would write for the same adapters, method,
    weights, parameters and seed, as an adapter: ``cat`` exactly (linear and task_arithmetic only), ``svd``
    truncated to ``rank``. ``linear`` is peft's factor-wise combination.

    Args:
        adapters: adapter folders, all trained on ``base``.
        output: the adapter folder to write (staged, moved into place at the end).
        base: the model the adapters change.
        combination: ``cat``, ``svd`` or ``linear``.
        method: the merge method (``svd``: any; ``cat``: linear or task_arithmetic; ``linear``: linear,
            task_arithmetic, ties, dare_linear or dare_ties applied to the factors).
        weights: one per adapter; None = the method's default (``linear`` combination: 1/n each).
        parameters: the method's hyperparameters.
        rank: the output rank of ``svd`` (default: the largest input rank).
        seed: seed of random methods (per tensor name, as in merges).

    Raises:
        OptionError / RecipeError: a combination that cannot do what is asked, bad weights or parameters;
            AdapterError: adapters that do not fit the base or each other; OutputExistsError / OutputError:
            see :func:`modelsoup.merge`.
    """
    if combination not in COMBINATIONS:
        raise OptionError(f"unknown adapter combination '{combination}'; choose one of {', '.join(COMBINATIONS)}")
    if not adapters:
        raise OptionError("give at least one adapter to combine")
    if weights is not None and len(weights) != len(adapters):
        raise OptionError(f"--weights: {len(weights)} given for {len(adapters)} adapter(s); give one weight per adapter, in order")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if rank is not None and combination != "svd":
        raise OptionError(f"--rank is the output rank of --as-adapter svd; {combination} decides its own rank")
    if combination == "linear":
        return _factor_wise_merge(adapters, Path(output), base, method, weights, parameters, seed, overwrite, progress, hash_files)
    from .recipe import recipe_from_dict

    models = [{"path": str(base), "adapter": str(a)} | ({"weight": float(weights[i])} if weights is not None else {}) for i, a in enumerate(adapters)]
    recipe = recipe_from_dict({"method": method, "models": models, "base": {"path": str(base)}, "parameters": dict(parameters or {}), "seed": seed},
                              source="--as-adapter")
    return recipe_adapter(recipe, output, combination=combination, rank=rank, overwrite=overwrite, progress=progress, hash_files=hash_files)


CAT_METHODS = ("linear", "task_arithmetic")


def _cat_coefficients(method: MergeMethod, job: Any) -> list[float]:
    """Each source's coefficient in the job's merge when it is a weighted sum of the models' changes (cat's case).

    Raises:
        OptionError: a merge that also scales the base (weights not summing to 1 without normalisation).
    """
    n = len(job.sources)
    w = list(job.weights) if job.weights is not None else [1.0] * n
    normalize = bool(job.params.get("normalize", True))
    total = sum(w)
    if method.name == "linear":
        if normalize:
            if total == 0:
                raise OptionError(f"'{job.name}': the weights sum to zero, so the normalised linear merge is undefined")
            return [x / total for x in w]
        if abs(total - 1) > 1e-9:
            raise OptionError(f"'{job.name}': linear weights summing to {total:g} without normalisation also scale the base's weights, "
                              "which no adapter can express; normalise, use task_arithmetic, or write a full model")
        return w
    scale = float(job.params.get("scale", 1.0))
    if normalize and total == 0:
        raise OptionError(f"'{job.name}': the weights sum to zero, so the normalised task arithmetic is undefined")
    return [scale * x / (total if normalize else 1.0) for x in w]


def recipe_adapter(recipe: Recipe, output: str | Path, *, combination: str = "cat", rank: int | None = None, overwrite: bool = False,
                   progress: bool | None = None, hash_files: bool = True) -> AdapterResult:
    """Write a merge of adapters of one base (a recipe whose models are all adapters of it) as one adapter.

    The merge is planned as :func:`modelsoup.merge` plans it (per-tensor weights and overrides, ``take:``,
    seeds by tensor name) in float32. ``cat`` writes each adapted tensor's weighted sum of the adapters' factors
    (methods linear and task_arithmetic), with a layer weight an adapter saved (``base_layer.weight``) combined
    the same way; ``svd`` computes each adapted tensor as the merge does and truncates its change from the base.
    Full tensors (heads) are the merge's own tensors. A tensor no adapter changes must come out as the base's.

    Raises:
        OptionError: not a merge of adapters of one base, a combination other than cat / svd, a method cat
            cannot express, ``take: skip``, or a merge that changes a tensor no adapter changes.
    """
    from .engine import MergeRun
    from .plan import plan_merge

    t0 = time.perf_counter()
    if combination not in ("cat", "svd"):
        raise OptionError(f"a merge is written as an adapter by cat (exact) or svd (truncated), not {combination!r}")
    if combination == "cat" and recipe.method not in CAT_METHODS:
        raise OptionError(f"cat is exact only for a weighted sum of the adapters' updates (methods {', '.join(CAT_METHODS)}); "
                          f"for '{recipe.method}' use --as-adapter svd")
    plain = [m.label() for m in recipe.models if m.adapter_resolved is None or m.resolved is None]
    if plain:
        raise OptionError(f"{plain[0]} is not an adapter: a merge that holds full models cannot be written as an adapter; write full models instead")
    bases = {m.resolved.resolve() for m in [*recipe.models, *([recipe.base] if recipe.base is not None else [])] if m.resolved is not None}
    if len(bases) != 1:
        raise OptionError("the adapters are applied to different base models (or the recipe's base is another model); an adapter has one base")
    out = Path(output)
    paths = input_paths([*bases, *(m.adapter_resolved for m in recipe.models if m.adapter_resolved is not None)])
    rec = dataclasses.replace(recipe, dtype="float32")  # every computed tensor exact in float32
    cks: list[AdaptedCheckpoint] = []
    base_ck: Checkpoint | None = None
    try:
        for m in recipe.models:
            assert m.resolved is not None and m.adapter_resolved is not None
            cks.append(adapted(open_checkpoint(m.resolved, key=m.key, strip_prefix=m.strip_prefix), m.adapter_resolved, m.adapter))
        if recipe.base is not None:
            base_ck = open_checkpoint(recipe.base.resolved, key=recipe.base.key, strip_prefix=recipe.base.strip_prefix)
        plan = plan_merge(rec, list(cks), base_ck)
        result = _plan_to_adapter(plan, MergeRun(plan), cks, combination, rank, progress)
        tensors, modules, full, notes = result
        if not modules:
            raise OptionError("the merge changes no tensor through LoRA factors (only whole tensors, or nothing); an adapter needs at least one "
                              "adapted layer: write a full model instead")
        config = _output_config(cks, modules, full)
        what = f"{recipe.method} of {len(cks)} adapter(s) as {combination}" + (f" (rank {config['r']})" if combination == "svd" else "")
        record = {"modelsoup_version": __version__, "what": what, "combination": combination, "recipe": recipe.to_yaml(),
                  "inputs": _inputs_record([ck.adapter for ck in cks], [str(m.adapter) for m in recipe.models], hash_files),
                  "modules": modules, "full_tensors": sorted(full), "notes": notes}
        with staged_output(out, overwrite, inputs=paths) as tmp:
            _write_adapter(tmp, config, tensors, record, recipe.to_yaml(relative_to=out.absolute()))
    finally:
        for ck in cks:
            ck.close()
        if base_ck is not None:
            base_ck.close()
    for n in notes:
        log.info(n)
    return AdapterResult(out, config["r"], modules, sorted(full), time.perf_counter() - t0, notes)


def _plan_to_adapter(plan: Any, run: Any, cks: Sequence[AdaptedCheckpoint], combination: str, rank: int | None,
                     progress: bool | None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], list[str], list[str]]:
    """The output adapter's tensors, per-module records, full tensor names and notes, job by job of ``plan``."""
    base = cks[0].base
    planned = {j.name for j in plan.jobs}
    skipped = [n for n in base.names() if n not in planned]
    if skipped:
        raise OptionError(f"the merge leaves out {len(skipped)} tensor(s) (take: skip), e.g. '{skipped[0]}'; an adapter changes a model and "
                          "cannot remove tensors from it: write a full model instead")
    r_out = rank if rank is not None else max((md.rank for ck in cks for md in ck.adapter.modules.values()), default=1)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, float]] = {}
    full: list[str] = []
    show = progress_on(progress)
    bar = tqdm(total=len(plan.jobs), desc=f"adapter ({combination})", unit="tensor", disable=not show, leave=False)
    last_log = time.monotonic()
    for k, job in enumerate(plan.jobs):
        bar.update(1)
        if not show and time.monotonic() - last_log > 30:
            log.info("adapter (%s): %d/%d tensors", combination, k + 1, len(plan.jobs))
            last_log = time.monotonic()
        name = job.name
        if job.alias_of is not None or job.action == "base":
            continue  # written with the tensor it is tied to / the base's own tensor
        users = [(i, ck) for i, ck in enumerate(cks) if name in ck.adapted]
        owners = [ck for ck in cks if name in ck.replaced]
        if users and owners:
            raise OptionError(f"'{name}' is changed by LoRA factors in one adapter and saved whole in another; one adapter cannot hold both")
        if not users and not owners:
            if job.action == "first":
                continue  # copies of the base's own tensor
            got = run.compute(job)
            if not torch.equal(got, base.read(name).to(torch.float32)):
                raise OptionError(f"the merge changes '{name}', which no adapter changes ({plan.method.name} does not give the base back there, "
                                  "e.g. weights that do not sum to 1 without normalisation); an adapter cannot express it: write a full model")
            continue
        if owners:
            dtype = owners[0].adapter.reader.meta(owners[0].adapter.full[owners[0].replaced[name]])[0]
            tensors[PEFT_PREFIX + owners[0].replaced[name]] = run.compute(job).to(dtype)
            full.append(name)
            continue
        module = _module_name(name, [(i, ck.adapted[name]) for i, ck in users])
        info = users[0][1].adapter.modules[module]
        if combination == "cat":
            if job.action != "merge":
                raise OptionError(f"'{name}' is taken from one model (take: {job.action}), which cat cannot express; use svd")
            coef = _cat_coefficients(plan.method, job)
            by_model = {src[0]: c for src, c in zip(job.sources, coef)}
            facs, cs = [], []
            for i, ck in users:
                facs.append(ck.adapter.factors(ck.adapted[name]))
                cs.append(by_model.get(i, 0.0) * ck.adapter.modules[ck.adapted[name]].scaling)
            b, a = cat_factors(facs, cs)
            modules[module] = {"rank": a.shape[0]}
            layers = [(by_model.get(i, 0.0), saved) for i, ck in enumerate(cks) if (saved := ck.layer_weight(name)) is not None]
            if layers:  # the layer weights the adapters saved, combined like their changes: base + sum_i c_i (S_i - base)
                w0 = base.read(name).to(torch.float32)
                layer = w0 + sum((c * (saved.to(torch.float32) - w0) for c, saved in layers), torch.zeros_like(w0))
                tensors[f"{PEFT_PREFIX}{module}.base_layer.weight"] = layer.to(base.meta(name)[0])
        else:
            delta = run.compute(job) - base.read(name).to(torch.float32)
            layer_delta = delta.T if users[0][1].transposed(name) else delta  # the layer's own (out, in) layout, as B @ A
            b, a, err, energy = truncate(layer_delta, r_out)
            modules[module] = {"rank": a.shape[0], "relative_error": err, "retained_energy": energy}
        _put_factors(tensors, module, info.embedding, a, b)
    bar.close()
    notes = []
    if combination == "svd" and modules:
        worst = max(modules.items(), key=lambda kv: kv[1]["relative_error"])
        notes.append(f"svd to rank {r_out}: largest relative error {worst[1]['relative_error']:.3g} ({worst[0]})")
    return tensors, modules, full, notes


FACTOR_WISE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def _factor_wise_merge(adapters: Sequence[str | Path], out: Path, base: str | Path, method: str, weights: Sequence[float] | None,
                       parameters: Mapping[str, Any] | None, seed: int, overwrite: bool, progress: bool | None, hash_files: bool) -> AdapterResult:
    """peft's factor-wise combination (``add_weighted_adapter`` linear, ties, dare_linear, dare_ties): the weights as given
    (default 1/n each), ``sqrt(|w s|)`` on each factor, the sign on A's side. Full tensors: base + sum_i w_i (H_i - base)."""
    t0 = time.perf_counter()
    m, params = _resolve_method(method, parameters)
    if m.name not in FACTOR_WISE_METHODS:
        raise OptionError(f"--as-adapter linear combines factors with {', '.join(FACTOR_WISE_METHODS)} (peft's factor-wise methods), not "
                          f"'{m.name}'; use --as-adapter svd")
    if m.name in ("linear", "task_arithmetic") and parameters:
        raise OptionError(f"--as-adapter linear sums the factors with the weights as given (peft's convention); '{m.name}' takes no "
                          f"parameters here (got {', '.join(parameters)})")
    w = [1.0 / len(adapters)] * len(adapters) if weights is None else [float(x) for x in weights]
    paths = input_paths([base, *adapters])
    cks: list[AdaptedCheckpoint] = []
    try:
        for a in adapters:
            cks.append(adapted(open_checkpoint(base), Path(a), str(a)))
        ranks_in = {md.rank for ck in cks for md in ck.adapter.modules.values()}
        if len(ranks_in) > 1:
            raise OptionError(f"--as-adapter linear combines the factors entry by entry and needs one rank, got ranks {sorted(ranks_in)}; use cat or svd")
        layered = [ck.adapter.label for ck in cks if ck.adapter.base_weights]
        if layered:
            raise OptionError(f"{layered[0]} saves a layer's own weight (base_layer.weight), which a factor-wise combination cannot carry; use cat or svd")
        targets: dict[str, list[tuple[int, str]]] = {}
        for i, ck in enumerate(cks):
            for name, module in ck.adapted.items():
                targets.setdefault(name, []).append((i, module))
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, float]] = {}
        for name, users in targets.items():
            module = _module_name(name, users)
            b, a = _factor_wise(m, params, [cks[i] for i, _ in users], [w[i] for i, _ in users], users, seed, name)
            modules[module] = {"rank": a.shape[0]}
            _put_factors(tensors, module, cks[users[0][0]].adapter.modules[module].embedding, a, b)
        if not modules:
            raise OptionError("the adapters hold no LoRA factors (only whole tensors); an adapter needs at least one adapted layer: write a full model instead")
        full = _full_tensors(cks, w, tensors)
        config = _output_config(cks, modules, full)
        what = f"peft's factor-wise {m.name} of {len(cks)} adapter(s), weights {', '.join(f'{x:g}' for x in w)}"
        record = {"modelsoup_version": __version__, "what": what, "combination": "linear", "method": m.name, "parameters": _jsonable(params),
                  "weights": w, "seed": seed, "base": str(base), "inputs": _inputs_record([ck.adapter for ck in cks], [str(a) for a in adapters], hash_files),
                  "modules": modules, "full_tensors": sorted(full), "notes": []}
        with staged_output(out, overwrite, inputs=paths) as tmp:
            _write_adapter(tmp, config, tensors, record)
    finally:
        for ck in cks:
            ck.close()
    return AdapterResult(out, config["r"], modules, sorted(full), time.perf_counter() - t0, [])


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def _factor_wise(m: MergeMethod, params: Mapping[str, Any], cks: Sequence[AdaptedCheckpoint], w: Sequence[float],
                 users: Sequence[tuple[int, str]], seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factor-wise combination: the method over the A's with weights sign*sqrt(|w s|), over the B's with sqrt(|w s|)."""
    as_, bs, wa, wb = [], [], [], []
    for ck, wi, (_, mod) in zip(cks, w, users):
        a, b = ck.adapter.factors(mod)
        ws = wi * ck.adapter.modules[mod].scaling
        as_.append(a)
        bs.append(b)
        wa.append(math.copysign(math.sqrt(abs(ws)), ws))
        wb.append(math.sqrt(abs(ws)))
    if m.name in ("linear", "task_arithmetic"):  # peft's task_arithmetic: the weighted sum
        return sum((x * f for x, f in zip(wb, bs)), torch.zeros_like(bs[0])), sum((x * f for x, f in zip(wa, as_)), torch.zeros_like(as_[0]))
    a = _combine_dense(m, as_, wa, params, seed, name + ".lora_A")
    b = _combine_dense(m, bs, wb, params, seed, name + ".lora_B")
    return b, a


def _full_tensors(cks: Sequence[AdaptedCheckpoint], w: Sequence[float], out: dict[str, torch.Tensor]) -> list[str]:
    """The adapters' full tensors (modules_to_save) as base + sum_i w_i (H_i - base), into ``out``; their names."""
    names = list(dict.fromkeys(n for ck in cks for n in ck.replaced))
    for name in names:
        base = cks[0].base.read(name).to(torch.float32)
        merged = base + sum((wi * (ck.read(name).to(torch.float32) - base) for ck, wi in zip(cks, w) if name in ck.replaced), torch.zeros_like(base))
        first = next(ck for ck in cks if name in ck.replaced)
        dtype = first.adapter.reader.meta(first.adapter.full[first.replaced[name]])[0]
        out[PEFT_PREFIX + first.replaced[name]] = merged.to(dtype)
    return names


def extract_lora(
    finetuned: str | Path,
    output: str | Path,
    *,
    base: str | Path,
    rank: int,
    others: str = "save",
    overwrite: bool = False,
    progress: bool | None = None,
    hash_files: bool = True,
    min_change: float = 0.0,
) -> AdapterResult:
    """Extract a LoRA adapter from a full fine-tune: per 2-D weight that changed, the rank-``rank`` SVD of ``W_ft - W_base``.

    Args:
        finetuned, base: full models of one architecture.
        output: the adapter folder to write.
        rank: the rank of every extracted module (lower when the weight is smaller).
        others: what to do with changed tensors that are not 2-D weights (norms, biases): ``save`` them whole
            (``modules_to_save`` of their module), or ``refuse`` (an error listing them).
        min_change: weights whose largest absolute change is at most this are left out (0: any change counts).

    Raises:
        OptionError: a bad rank or option; AdapterError: changed tensors refused, or nothing changed;
            KeyMismatchError-like CheckpointError when the models differ in tensor names or shapes.
    """
    t0 = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if others not in ("save", "refuse"):
        raise OptionError(f"--others must be save or refuse, got {others!r}")
    out = Path(output)
    paths = input_paths([base, finetuned])
    with open_checkpoint(finetuned) as ft, open_checkpoint(base) as bs:
        _same_layout(ft, bs)
        layers = model_layers(bs)
        missing = [n for n in ft.names() if n not in layers.param_module]
        if missing:
            raise AdapterError(f"{finetuned}: tensor '{missing[0]}' is not a parameter of the {layers.arch} that {base}/config.json describes; "
                               "extract from a Hugging Face folder saved by that model class")
        tied = {n for group in layers.tied for n in group}
        lora: dict[str, torch.Tensor] = {}  # module -> its weight's change
        others_changed: list[str] = []
        unchanged = 0
        show = progress_on(progress)
        for name in tqdm(ft.names(), desc="extracting", unit="tensor", disable=not show, leave=False):
            dtype = ft.meta(name)[0]
            if not dtype.is_floating_point:
                if not torch.equal(ft.read(name), bs.read(name)):
                    raise AdapterError(f"{finetuned}: non-floating tensor '{name}' differs from the base's; an adapter cannot carry it")
                continue
            d = ft.read(name).to(torch.float32) - bs.read(name).to(torch.float32)
            if not bool((d.abs() > min_change).any()):
                unchanged += 1
                continue
            if name in tied:
                group = next(g for g in layers.tied if name in g)
                raise AdapterError(f"{finetuned}: '{name}' changed, and it is tied to {', '.join(sorted(set(group) - {name}))} in the base; a LoRA "
                                   "on one side of a tie cannot change both the way the fine-tune did: refused (extract from an untied model)")
            module, param = layers.param_module[name], name.rsplit(".", 1)[1]
            if param == "weight" and layers.kind.get(module) in ("linear", "conv1d", "embedding"):
                lora[module] = d
            else:
                others_changed.append(name)
        if not lora and not others_changed:
            raise AdapterError(f"{finetuned}: no tensor differs from the base {base}; there is nothing to extract")
        if others_changed and others == "refuse":
            raise AdapterError(f"{finetuned}: {len(others_changed)} changed tensor(s) are not weights of linear layers or embeddings and cannot be "
                               f"LoRA factors: {', '.join(others_changed[:6])}{'...' if len(others_changed) > 6 else ''}; use --others save to keep "
                               "them whole (modules_to_save)")
        whole = {layers.param_module[n] for n in others_changed if layers.param_module[n] not in lora}
        whole = {m for m in whole if not any(m != o and m.startswith(o + ".") for o in whole)}  # the outermost of nested ones
        inside = sorted(m for m in lora if any(m.startswith(o + ".") for o in whole))
        for m in inside:  # a layer inside a module saved whole goes with it (peft cannot adapt a layer of a module it saves)
            del lora[m]
        tied_inside = sorted(n for n in tied for o in whole if n.startswith(o + "."))
        if tied_inside:
            raise AdapterError(f"{finetuned}: saving '{next(o for o in whole if tied_inside[0].startswith(o + '.'))}' whole would copy '{tied_inside[0]}', "
                               "which is tied to another tensor in the base, and untie it; refused (use --others refuse to see what changed)")
        if not lora:
            raise AdapterError(f"{finetuned}: only tensors that LoRA cannot carry changed ({', '.join(others_changed[:4])}); an adapter needs at "
                               "least one adapted layer and peft would not load one without: write a full model instead")
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, float]] = {}
        bias_all = False
        for module, d in lora.items():
            kind = layers.kind[module]
            b, a, err, energy = truncate(d if kind == "linear" else d.T, rank)  # the layer's own (out, in) layout, as B @ A
            _put_factors(tensors, module, kind == "embedding", a, b)
            modules[module] = {"rank": a.shape[0], "relative_error": err, "retained_energy": energy}
        for name in others_changed:
            module, param = layers.param_module[name], name.rsplit(".", 1)[1]
            if module in lora:  # a changed bias of an extracted layer: peft keeps it on the wrapped layer (bias: all)
                tensors[f"{PEFT_PREFIX}{module}.base_layer.{param}"] = ft.read(name).clone()
                bias_all = True
        for module in sorted(whole):  # every tensor of a module saved whole (modules_to_save)
            for n in ft.names():
                if n.startswith(module + "."):
                    tensors[PEFT_PREFIX + n] = ft.read(n).clone()
        ranks = {mod: int(v["rank"]) for mod, v in modules.items()}
        config = _config({}, ranks, sorted(whole), any(layers.kind[m] == "conv1d" for m in modules))
        if bias_all:
            config["bias"] = "all"
        worst = max(modules.items(), key=lambda kv: kv[1]["relative_error"])
        notes = [f"{len(modules)} weight(s) extracted at rank {rank}, {len(whole)} module(s) saved whole, {unchanged} unchanged tensor(s) left out",
                 f"largest relative error {worst[1]['relative_error']:.3g} ({worst[0]}), least retained energy "
                 f"{min(v['retained_energy'] for v in modules.values()):.4f}"]
        if inside:
            notes.append(f"{len(inside)} changed layer(s) inside modules saved whole go with them: {', '.join(inside[:4])}")
        record = {"modelsoup_version": __version__, "what": f"rank-{rank} LoRA extracted from {finetuned} against {base}", "combination": "extract",
                  "rank": rank, "base": str(base), "inputs": _inputs_record([ft, bs], [str(finetuned), str(base)], hash_files),
                  "modules": modules, "full_tensors": sorted(n for n in tensors if not any(p in n for p in ("lora_A", "lora_B", "lora_embedding_"))),
                  "notes": notes}
        with staged_output(out, overwrite, inputs=paths) as tmp:
            _write_adapter(tmp, config, tensors, record)
    for n in notes:
        log.info(n)
    return AdapterResult(out, max(ranks.values(), default=0), modules, record["full_tensors"], time.perf_counter() - t0, notes)



@dataclass(frozen=True)
class ModelLayers:
    """What a Hugging Face model's classes say about its tensors (a skeleton built on the meta device, no weights).

    Attributes:
        arch: the model class.
        param_module: tensor name -> the module that holds it.
        kind: module -> ``linear`` (nn.Linear), ``conv1d`` (transformers' Conv1D, weight stored (in, out)),
            ``embedding`` (nn.Embedding) or ``other``.
        tied: groups of tensor names that are one parameter (tied weights).
    """

    arch: str
    param_module: dict[str, str]
    kind: dict[str, str]
    tied: list[tuple[str, ...]]


def model_layers(ck: Checkpoint) -> ModelLayers:
    """The layer types and ties of ``ck``'s model, from its config.json and its transformers class.

    Raises:
        AdapterError: no config.json, no architecture that transformers knows, or transformers missing.
    """
    cfg = model_config(ck)
    archs = cfg.get("architectures") or []
    if ck.folder is None or not archs:
        raise AdapterError(f"{ck.label}: extracting LoRA needs the base as a Hugging Face model folder whose config.json names its architecture, "
                           "to know which tensors are linear layers, embeddings or transposed Conv1D layers")
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError as e:
        raise AdapterError("extracting LoRA reads the model's layer types with transformers, which is not installed; pip install transformers") from e
    cls = getattr(transformers, str(archs[0]), None)
    if cls is None:
        raise AdapterError(f"{ck.label}: transformers has no model class '{archs[0]}' (config.json architectures); cannot tell its layer types")
    config = transformers.AutoConfig.from_pretrained(ck.folder, local_files_only=True)
    with torch.device("meta"):
        model = cls(config)
    kind: dict[str, str] = {}
    for name, mod in model.named_modules():
        kind[name] = ("conv1d" if isinstance(mod, Conv1D) else "linear" if isinstance(mod, torch.nn.Linear)
                      else "embedding" if isinstance(mod, torch.nn.Embedding) else "other")
    param_module: dict[str, str] = {}
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        param_module[name] = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(id(t), []).append(name)
    return ModelLayers(type(model).__name__, param_module, kind, [tuple(g) for g in groups.values() if len(g) > 1])


def _same_layout(ft: Checkpoint, bs: Checkpoint) -> None:
    """The fine-tune and the base must hold the same tensors with the same shapes."""
    from .errors import KeyMismatchError, TensorMismatchError, name_mismatch

    a, b = set(ft.names()), set(bs.names())
    if a != b:
        raise KeyMismatchError(f"{ft.label} and {bs.label} hold different tensors: " + name_mismatch(sorted(b - a), sorted(a - b))
                               + "; extract from a fine-tune of this base")
    bad = next((n for n in ft.names() if ft.meta(n)[1] != bs.meta(n)[1]), None)
    if bad is not None:
        raise TensorMismatchError(f"'{bad}' has shape {list(ft.meta(bad)[1])} in {ft.label} but {list(bs.meta(bad)[1])} in the base")

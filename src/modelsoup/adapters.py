"""Merges whose output is a PEFT LoRA adapter: several adapters of one base combined into one, and an
adapter extracted from a full fine-tune.

Combining adapters ``d_i = s_i B_i A_i`` (each module's delta, ``s_i`` its scaling) with weights ``w_i``:

* ``cat`` (exact): ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]`` stacked by rows, ``B = [B_1, ..., B_n]`` by
  columns, so ``B A = sum_i w_i d_i``; rank = the sum of the ranks. Only for a weighted sum of deltas
  (the ``linear`` method; ``w`` normalised to sum 1 unless ``normalize: false``, as the merge would).
* ``svd``: the merged dense delta ``D = method(d_1, ..., d_n)`` (any merge method: linear, ties, dare...,
  applied to the deltas with a zero base), truncated to rank ``r`` by its SVD: ``B = U_r S_r``, ``A = V_r^T``.
  The relative error ``||D - B A||_F / ||D||_F`` is reported per module. At full rank it equals ``cat``.
* ``linear``: peft's ``add_weighted_adapter(combination_type="linear")`` and its factor-wise relatives: the
  method is applied to the A factors and to the B factors separately, with weights ``sqrt(|w_i s_i|)`` (the
  sign on A's side); same rank only. This is **not** the average of the adapters' updates (the product of
  the averaged factors has cross terms ``B_i A_j``); it is here to reproduce peft.

peft's conventions, for agreement with ``add_weighted_adapter``: weights are not normalised there (use
``normalize: false`` with ``linear``), and peft's ``ties`` elects signs on unweighted deltas and divides by
the count (``sign_from: unweighted, divide_by: count``).

Full tensors (``modules_to_save`` copies) merge as deltas against the base's tensor with the same method and
weights (for the normalised linear method: the weighted mean of the copies). The output adapter has
``lora_alpha = r`` per module (scaling 1) and no rslora, so its factors carry the whole delta.

``extract_lora``: per 2-D weight, the rank-``r`` SVD of ``W_ft - W_base`` as a LoRA module; other changed
tensors (norms, biases) are saved whole in ``modules_to_save`` form or refused, as asked.
"""

from __future__ import annotations

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
from .io.adapters import CONV1D_MODELS, PEFT_PREFIX, AdaptedCheckpoint, adapted, model_config
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


def _method_weights(method: MergeMethod, params: Mapping[str, Any], weights: Sequence[float]) -> list[float]:
    """The coefficient of each delta in a linear merge: the weights, normalised when the method divides by their sum."""
    if method.divides_by_weight_sum(params):
        total = sum(weights)
        if total == 0:
            raise OptionError("the weights sum to zero, so the normalised linear merge is undefined; give other weights or normalize=false")
        return [w / total for w in weights]
    return list(weights)


def _combine_dense(method: MergeMethod, tensors: list[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any], seed: int, name: str) -> torch.Tensor:
    """The method over deltas (a zero base where it takes one)."""
    base = torch.zeros_like(tensors[0]) if method.base != "none" else None
    gen = torch.Generator().manual_seed(tensor_seed(seed, name)) if method.random else None
    return method(tensors, base=base, weights=list(weights), generator=gen, **params)


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
            "inference_mode": True, "modelsoup_version": __version__}


def _write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    from safetensors.torch import save

    # serialised here and written by open(), so the file gets the user's umask (save_file's temporary file is 0600)
    (folder / "adapter_model.safetensors").write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "modelsoup_version"}, indent=2) + "\n")
    (folder / "soup_manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {folder.name}", "", f"A PEFT LoRA adapter written by modelsoup {__version__}: {record['what']}.", "",
             "Load it with `PeftModel.from_pretrained(BASE_MODEL, THIS_FOLDER)`.", "", "| input | sha256 |", "|---|---|"]
    lines += [f"| {i['path']} | {', '.join(f'{n}: {h[:12]}' for n, h in i['files'].items())} |" for i in record["inputs"]]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _inputs_record(cks: Sequence[Checkpoint], labels: Sequence[str], hash_files: bool) -> list[dict[str, Any]]:
    return [{"path": label, "files": {f.name: (cached_sha256(f) if hash_files else "") for f in ck.files}} for ck, label in zip(cks, labels)]


def _resolve_method(method: str, parameters: Mapping[str, Any] | None) -> tuple[MergeMethod, dict[str, Any]]:
    m = get_method(method)
    given = dict(parameters or {})
    unknown = [k for k in given if m.param(k) is None]
    if unknown:
        raise OptionError(f"method '{m.name}' has no parameter {', '.join(map(repr, unknown))}; it takes: {', '.join(p.name for p in m.params) or 'none'}")
    params = {p.name: p.default for p in m.params}
    params.update({m.param(k).name: v for k, v in given.items()})  # type: ignore[union-attr]
    return m, params


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

    Args:
        adapters: adapter folders, all trained on ``base``.
        output: the adapter folder to write (staged, moved into place at the end).
        base: the model the adapters change (needed to check them, and for full tensors).
        combination: ``cat``, ``svd`` or ``linear`` (peft's factor-wise combination).
        method: the merge method applied to the deltas (``svd``) or factors (``linear``); ``cat`` takes ``linear``.
        weights: one per adapter (default 1 each: with the normalised linear method, the uniform soup).
        parameters: the method's hyperparameters.
        rank: the output rank of ``svd`` (default: the largest input rank).
        seed: seed of random methods (per module name, as in merges).

    Raises:
        OptionError: a combination that cannot do what is asked; AdapterError: adapters that do not fit the
            base or each other; OutputExistsError / OutputError: see :func:`modelsoup.merge`.
    """
    t0 = time.perf_counter()
    if combination not in COMBINATIONS:
        raise OptionError(f"unknown adapter combination '{combination}'; choose one of {', '.join(COMBINATIONS)}")
    if not adapters:
        raise OptionError("give at least one adapter to combine")
    m, params = _resolve_method(method, parameters)
    if combination == "cat" and m.name != "linear":
        raise OptionError(f"cat is exact only for a weighted sum of the adapters' updates (method linear); for '{m.name}' use --as-adapter svd")
    if m.min_models > len(adapters):
        raise OptionError(f"method '{m.name}' takes at least {m.min_models} models; got {len(adapters)} adapter(s)")
    w = [1.0] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise OptionError(f"--weights: {len(w)} given for {len(adapters)} adapter(s); give one weight per adapter, in order")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if rank is not None and combination != "svd":
        raise OptionError(f"--rank is the output rank of --as-adapter svd; {combination} decides its own rank")
    out = Path(output)
    paths = input_paths([base, *adapters])
    cks: list[AdaptedCheckpoint] = []
    try:
        for a in adapters:
            cks.append(adapted(open_checkpoint(base), Path(a), str(a)))
        result = _combine(cks, out, paths, combination, m, params, w, rank, seed, overwrite, progress, hash_files, [str(a) for a in adapters], str(base))
    finally:
        for ck in cks:
            ck.close()
    result.seconds = time.perf_counter() - t0
    return result


def _combine(cks: list[AdaptedCheckpoint], out: Path, paths: list[Path], combination: str, m: MergeMethod, params: dict[str, Any],
             w: list[float], rank: int | None, seed: int, overwrite: bool, progress: bool | None, hash_files: bool,
             labels: list[str], base_label: str) -> AdapterResult:
    notes: list[str] = []
    fifo = {bool(ck.adapter.config.get("fan_in_fan_out")) for ck in cks}
    if len(fifo) > 1:
        raise AdapterError("the adapters disagree on fan_in_fan_out; they were not trained on one model")
    targets: dict[str, list[tuple[int, str]]] = {}  # base weight -> [(adapter index, module)]
    for i, ck in enumerate(cks):
        for name, module in ck.adapted.items():
            targets.setdefault(name, []).append((i, module))
    names: dict[str, str] = {}
    for name, users in targets.items():
        found = {module for _, module in users}
        if len(found) > 1:
            raise AdapterError(f"the adapters name the module of '{name}' differently ({', '.join(sorted(found))}): they were made on different "
                               "model classes; one adapter must load into one model")
        names[name] = users[0][1]
    ranks_in = {ck.adapter.modules[mod].rank for ck in cks for mod in ck.adapter.modules}
    if combination == "linear" and len(ranks_in) > 1:
        raise OptionError(f"--as-adapter linear combines the factors entry by entry and needs one rank, got ranks {sorted(ranks_in)}; use cat or svd")
    r_out = rank if rank is not None else max(ranks_in, default=1)
    coeff = _method_weights(m, params, w) if combination == "cat" else w
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, float]] = {}
    show = progress_on(progress)
    bar = tqdm(total=len(targets), desc=f"adapters ({combination})", unit="module", disable=not show, leave=False)
    done_at = time.monotonic()
    for k, (name, users) in enumerate(targets.items()):
        module = names[name]
        info = cks[users[0][0]].adapter.modules[users[0][1]]
        idx = [i for i, _ in users]
        if combination == "linear":
            b, a = _factor_wise(m, params, [cks[i] for i in idx], [w[i] for i in idx], users, seed, module)
            modules[module] = {"rank": a.shape[0]}
        else:
            facs = [cks[i].adapter.factors(mod) for i, mod in users]
            scal = [cks[i].adapter.modules[mod].scaling for i, mod in users]
            if combination == "cat":
                b, a = cat_factors(facs, [coeff[i] * s for i, s in zip(idx, scal)])
                modules[module] = {"rank": a.shape[0]}
            else:
                # deltas in the layer's own (out, in) layout: B @ A, transposed back for fan_in_fan_out / embeddings at the end
                deltas = [s * (bb @ aa) for (aa, bb), s in zip(facs, scal)]
                if len(users) < len(cks):  # adapters that leave this module alone contribute a zero delta
                    deltas, ww = _with_zeros(deltas, idx, len(cks)), w
                else:
                    ww = [w[i] for i in idx]
                dense = _combine_dense(m, deltas, ww, params, seed, module)
                b, a, err, energy = truncate(dense, r_out)
                modules[module] = {"rank": a.shape[0], "relative_error": err, "retained_energy": energy}
        if info.embedding:
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"], tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a, b
        bar.update(1)
        if not show and time.monotonic() - done_at > 30:
            log.info("adapters: %d/%d modules", k + 1, len(targets))
            done_at = time.monotonic()
    bar.close()
    full = _full_tensors(cks, m, params, w, seed, tensors)
    to_save = sorted({s for ck in cks for s in (ck.adapter.config.get("modules_to_save") or []) if any(n == s or n.startswith(s + ".") for n in full)})
    ranks = {mod: int(v["rank"]) for mod, v in modules.items()}
    config = _config(cks[0].adapter.config, ranks, to_save, fifo.pop())
    if combination == "svd":
        worst = max(modules.items(), key=lambda kv: kv[1]["relative_error"], default=None)
        if worst is not None:
            notes.append(f"svd to rank {r_out}: largest relative error {worst[1]['relative_error']:.3g} ({worst[0]})")
    what = (f"{combination} of {len(cks)} adapter(s) with {m.name}" + (f" (rank {r_out})" if combination == "svd" else "")
            + f", weights {', '.join(f'{x:g}' for x in w)}")
    record = {"modelsoup_version": __version__, "what": what, "combination": combination, "method": m.name, "parameters": _jsonable(params),
              "weights": w, "seed": seed, "base": base_label, "inputs": _inputs_record([ck.adapter.reader for ck in cks], labels, hash_files),
              "modules": modules, "full_tensors": sorted(full), "notes": notes}
    with staged_output(out, overwrite, inputs=paths) as tmp:
        _write_adapter(tmp, config, tensors, record)
    for n in notes:
        log.info(n)
    return AdapterResult(out, max(ranks.values(), default=0), modules, sorted(full), 0.0, notes)


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def _with_zeros(deltas: list[torch.Tensor], idx: list[int], n: int) -> list[torch.Tensor]:
    """The deltas of all ``n`` adapters, zeros for those that do not adapt this module."""
    by = dict(zip(idx, deltas))
    zero = torch.zeros_like(deltas[0])
    return [by.get(i, zero) for i in range(n)]


def _factor_wise(m: MergeMethod, params: Mapping[str, Any], cks: Sequence[AdaptedCheckpoint], w: Sequence[float],
                 users: Sequence[tuple[int, str]], seed: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factor-wise combination: the method over the A's with weights sign*sqrt(|w s|), over the B's with sqrt(|w s|)."""
    as_, bs, wa, wb = [], [], [], []
    for ck, wi, (_, mod) in zip(cks, w, users):
        a, b = ck.adapter.factors(mod)
        ws = wi * ck.adapter.modules[mod].scaling
        as_.append(a)
        bs.append(b)
        wa.append(math.copysign(math.sqrt(abs(ws)), ws))
        wb.append(math.sqrt(abs(ws)))
    a = _combine_dense(m, as_, wa, params, seed, module + ".lora_A")
    b = _combine_dense(m, bs, wb, params, seed, module + ".lora_B")
    return b, a


def _full_tensors(cks: Sequence[AdaptedCheckpoint], m: MergeMethod, params: Mapping[str, Any], w: Sequence[float], seed: int,
                  out: dict[str, torch.Tensor]) -> list[str]:
    """Merge the adapters' full tensors (modules_to_save) as deltas against the base's, into ``out``; their names."""
    names = list(dict.fromkeys(n for ck in cks for n in ck.replaced))
    for name in names:
        base = cks[0].base.read(name).to(torch.float32)
        deltas = [(ck.read(name).to(torch.float32) - base) if name in ck.replaced else torch.zeros_like(base) for ck in cks]
        if m.name == "linear" and m.divides_by_weight_sum(params):
            merged = _combine_dense(m, [d + base for d in deltas], w, params, seed, name)  # the weighted mean of the copies
        else:
            merged = base + _combine_dense(m, deltas, w, params, seed, name)
        first = next(ck for ck in cks if name in ck.replaced)
        dtype = first.adapter.reader.meta(first.adapter.full[first.replaced[name]])[0]
        out[PEFT_PREFIX + first.replaced[name]] = merged.to(dtype)
    return names


def recipe_adapter(recipe: Recipe, output: str | Path, *, combination: str = "cat", rank: int | None = None, overwrite: bool = False,
                   progress: bool | None = None, hash_files: bool = True) -> AdapterResult:
    """Write a linear soup of adapters (a recipe whose models are all adapters of one base, as soups build them) as one adapter.

    Each module's coefficients are that tensor's weights in the recipe (per-model or per-tensor, as a learned
    soup gives them), normalised as the linear merge normalises them; full tensors (heads) are computed by the
    merge engine itself, so they are the very tensors :func:`modelsoup.merge` would write.

    Raises:
        OptionError: not a linear soup of adapters of one base, or a combination other than cat / svd.
    """
    from .engine import MergeRun
    from .plan import plan_merge

    t0 = time.perf_counter()
    if combination not in ("cat", "svd"):
        raise OptionError(f"a soup is written as an adapter by cat (exact) or svd (truncated), not {combination!r}")
    if recipe.method != "linear":
        raise OptionError(f"only linear soups can be written as an adapter this way, not '{recipe.method}'; use soup merge --as-adapter svd")
    plain = [m.label() for m in recipe.models if m.adapter_resolved is None or m.resolved is None]
    if plain:
        raise OptionError(f"{plain[0]} is not an adapter: a soup that holds full models cannot be written as an adapter; write full models instead")
    bases = {m.resolved.resolve() for m in recipe.models if m.resolved is not None}
    if len(bases) != 1:
        raise OptionError("the adapters of the soup are applied to different base models; an adapter has one base")
    out = Path(output)
    paths = input_paths([*bases, *(m.adapter_resolved for m in recipe.models if m.adapter_resolved is not None)])
    cks: list[AdaptedCheckpoint] = []
    try:
        for m in recipe.models:
            assert m.resolved is not None and m.adapter_resolved is not None
            cks.append(adapted(open_checkpoint(m.resolved, key=m.key, strip_prefix=m.strip_prefix), m.adapter_resolved, m.adapter))
        plan = plan_merge(recipe, list(cks), None)
        run = MergeRun(plan)
        normalize = bool(get_method("linear").divides_by_weight_sum(recipe.parameters))
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, float]] = {}
        full: list[str] = []
        r_out = rank if rank is not None else max((md.rank for ck in cks for md in ck.adapter.modules.values()), default=1)
        for job in tqdm(plan.jobs, desc=f"soup as adapter ({combination})", unit="tensor", disable=not progress_on(progress), leave=False):
            users = [(k, ck) for k, ck in enumerate(cks) if job.name in ck.adapted]
            owners = [ck for ck in cks if job.name in ck.replaced]
            if job.action == "first" and not users and not owners:
                continue  # every adapter leaves it alone: the base's tensor
            if owners and not users:
                tensors[PEFT_PREFIX + owners[0].replaced[job.name]] = run.compute(job)
                full.append(job.name)
                continue
            if not users or owners or job.action != "merge":
                raise OptionError(f"'{job.name}' of the soup is not a weighted sum of the adapters' changes (action {job.action}); write full models instead")
            w = list(job.weights) if job.weights is not None else [1.0] * len(cks)
            if not normalize and abs(sum(w) - 1) > 1e-9:
                raise OptionError(f"the soup's weights of '{job.name}' sum to {sum(w):g} without normalisation, which also scales the base's "
                                  "weights: not an adapter; write full models instead")
            total = sum(w) if normalize else 1.0
            module = users[0][1].adapted[job.name]
            info = users[0][1].adapter.modules[module]
            facs = [ck.adapter.factors(ck.adapted[job.name]) for _, ck in users]
            coef = [w[k] / total * ck.adapter.modules[ck.adapted[job.name]].scaling for k, ck in users]
            if combination == "cat":
                b, a = cat_factors(facs, coef)
                modules[module] = {"rank": a.shape[0]}
            else:
                dense = sum(c * (bb @ aa) for (aa, bb), c in zip(facs, coef))
                b, a, err, energy = truncate(dense, r_out)  # type: ignore[arg-type]
                modules[module] = {"rank": a.shape[0], "relative_error": err, "retained_energy": energy}
            suffix = ("lora_embedding_A", "lora_embedding_B") if info.embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PEFT_PREFIX}{module}.{suffix[0]}"], tensors[f"{PEFT_PREFIX}{module}.{suffix[1]}"] = a, b
        to_save = sorted({s for ck in cks for s in (ck.adapter.config.get("modules_to_save") or []) if any(n == s or n.startswith(s + ".") for n in full)})
        fifo = {bool(ck.adapter.config.get("fan_in_fan_out")) for ck in cks}
        ranks = {mod: int(v["rank"]) for mod, v in modules.items()}
        config = _config(cks[0].adapter.config, ranks, to_save, bool(fifo.pop()))
        what = f"the linear soup of {len(cks)} adapter(s) ({combination}" + (f", rank {r_out})" if combination == "svd" else ")")
        record = {"modelsoup_version": __version__, "what": what, "combination": combination, "recipe": recipe.to_yaml(),
                  "inputs": _inputs_record([ck.adapter.reader for ck in cks], [str(m.adapter) for m in recipe.models], hash_files),
                  "modules": modules, "full_tensors": sorted(full), "notes": []}
        with staged_output(out, overwrite, inputs=paths) as tmp:
            _write_adapter(tmp, config, tensors, record)
    finally:
        for ck in cks:
            ck.close()
    return AdapterResult(out, max(ranks.values(), default=0), modules, sorted(full), time.perf_counter() - t0, [])


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
        kind = model_config(bs).get("model_type")
        if kind in CONV1D_MODELS:
            raise AdapterError(f"{base}: a {kind} model stores its linear weights transposed (Conv1D); extracting LoRA from it is not supported yet")
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, float]] = {}
        saved: list[str] = []
        unchanged = 0
        aliases = ft.aliases()
        show = progress_on(progress)
        names = [n for n in ft.names() if n not in aliases]
        for name in tqdm(names, desc="extracting", unit="tensor", disable=not show, leave=False):
            dtype = ft.meta(name)[0]
            if not dtype.is_floating_point:
                if not torch.equal(ft.read(name), bs.read(name)):
                    raise AdapterError(f"{finetuned}: non-floating tensor '{name}' differs from the base's; an adapter cannot carry it")
                continue
            d = ft.read(name).to(torch.float32) - bs.read(name).to(torch.float32)
            if not bool((d.abs() > min_change).any()):
                unchanged += 1
                continue
            if d.dim() == 2 and name.endswith(".weight") and "embed" not in name.split(".")[-2]:
                module = name[: -len(".weight")]
                b, a, err, energy = truncate(d, rank)
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a, b
                modules[module] = {"rank": a.shape[0], "relative_error": err, "retained_energy": energy}
            else:
                saved.append(name)
        if not modules and not saved:
            raise AdapterError(f"{finetuned}: no tensor differs from the base {base}; there is nothing to extract")
        if saved and others == "refuse":
            raise AdapterError(f"{finetuned}: {len(saved)} changed tensor(s) are not 2-D linear weights and cannot be LoRA factors: "
                               f"{', '.join(saved[:6])}{'...' if len(saved) > 6 else ''}; use --others save to keep them whole (modules_to_save)")
        to_save: list[str] = []
        bias_all = False
        for name in saved:
            module, param = name.rsplit(".", 1)
            if module in modules:  # a changed bias of an extracted layer: peft keeps it on the wrapped layer (bias: all)
                tensors[f"{PEFT_PREFIX}{module}.base_layer.{param}"] = ft.read(name).clone()
                bias_all = True
            else:
                to_save.append(module)
        for module in dict.fromkeys(to_save):  # every tensor of a module saved whole (modules_to_save)
            for n in ft.names():
                if n.rsplit(".", 1)[0] == module and n not in aliases:
                    tensors[PEFT_PREFIX + n] = ft.read(n).clone()
        ranks = {mod: int(v["rank"]) for mod, v in modules.items()}
        config = _config({}, ranks, list(dict.fromkeys(to_save)), False)
        if bias_all:
            config["bias"] = "all"
        worst = max(modules.items(), key=lambda kv: kv[1]["relative_error"], default=None)
        notes = [f"{len(modules)} weight(s) extracted at rank {rank}, {len(dict.fromkeys(to_save))} module(s) saved whole, {unchanged} unchanged tensor(s) left out"]
        if worst is not None:
            notes.append(f"largest relative error {worst[1]['relative_error']:.3g} ({worst[0]}), least retained energy "
                         f"{min(v['retained_energy'] for v in modules.values()):.4f}")
        record = {"modelsoup_version": __version__, "what": f"rank-{rank} LoRA extracted from {finetuned} against {base}", "combination": "extract",
                  "rank": rank, "base": str(base), "inputs": _inputs_record([ft, bs], [str(finetuned), str(base)], hash_files),
                  "modules": modules, "full_tensors": sorted(n for n in tensors if not ("lora_A" in n or "lora_B" in n)), "notes": notes}
        with staged_output(out, overwrite, inputs=paths) as tmp:
            _write_adapter(tmp, config, tensors, record)
    for n in notes:
        log.info(n)
    return AdapterResult(out, max(ranks.values(), default=0), modules, record["full_tensors"], time.perf_counter() - t0, notes)



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

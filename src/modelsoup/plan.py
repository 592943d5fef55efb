"""What to do with each tensor, decided from metadata alone before any tensor is read.

Aligns tensor names across models (exact / intersection / base), checks shapes and dtypes (every
mismatch reported at once), and resolves each tensor's rule (merge, take from base or first model,
copy an integer buffer) with its parameters after overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import KeyMismatchError, TensorMismatchError
from .io import Checkpoint
from .methods import MergeMethod

log = logging.getLogger("modelsoup")

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MAX_LISTED = 8


@dataclass(frozen=True)
class TensorJob:
    """One output tensor.

    Attributes:
        name: tensor name.
        action: ``merge`` (run the method), ``base``/``first`` (copy from that model), ``nonfloat`` (copy
            an integer/bool tensor after checking that every model agrees).
        dtype: output dtype.
        shape: output shape.
        params: method hyperparameters for this tensor (per-model ones already narrowed to ingredients).
        weights: per-ingredient weights or None.
        alias_of: set when this name shares storage with an earlier one in the inputs (tied weights).
    """

    name: str
    action: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def short_list(names: Sequence[str]) -> str:
    """The first few names, comma-separated, with a count of the rest."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def name_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """``missing N (a, b, ...); unexpected M (...)``, leaving out an empty side."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({short_list(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({short_list(unexpected)})")
    return "; ".join(parts)


def align_names(models: Sequence[Checkpoint], base: Checkpoint | None, keys: str, base_needed: bool) -> tuple[list[str], set[str]]:
    """Decide which tensor names the output has.

    Returns:
        (output names in reference order, names to take from the base because some model lacks them).

    Raises:
        KeyMismatchError: ``keys: exact`` and the names differ; lists missing and unexpected names per model.
    """
    everyone = list(models) + ([base] if base is not None and base_needed else [])
    ref = base if (base is not None and (base_needed or keys == "base")) else models[0]
    ref_names = ref.names()
    ref_set = set(ref_names)
    if keys == "exact":
        problems = []
        for ck in everyone:
            have = set(ck.names())
            missing = [n for n in ref_names if n not in have]
            extra = [n for n in ck.names() if n not in ref_set]
            if missing or extra:
                problems.append(f"  {ck.label}: " + name_mismatch(missing, extra))
        if problems:
            raise KeyMismatchError(
                f"tensor names do not line up across models (compared with {ref.label}):\n"
                + "\n".join(problems)
                + "\nFix: strip a wrapper prefix (strip_prefix / --strip-prefix), or set `keys: intersection` to merge "
                "only the shared tensors, or `keys: base` to take unmatched tensors from the base model."
            )
        return ref_names, set()
    shared = set.intersection(*(set(ck.names()) for ck in everyone))
    if keys == "intersection":
        dropped = sorted(set().union(*(set(ck.names()) for ck in everyone)) - shared)
        if dropped:
            log.warning("keys: intersection: leaving out %d tensor(s) not in every model: %s", len(dropped), short_list(dropped))
        return [n for n in ref_names if n in shared], set()
    assert base is not None  # keys: base without a base is refused by recipe validation
    from_base = {n for n in ref_names if n not in shared}
    dropped = sorted(set().union(*(set(ck.names()) for ck in models)) - ref_set)
    if from_base:
        log.warning("keys: base: %d tensor(s) missing from some model are taken from the base: %s", len(from_base), short_list(sorted(from_base)))
    if dropped:
        log.warning("keys: base: leaving out %d tensor(s) the base does not have: %s", len(dropped), short_list(dropped))
    return ref_names, from_base


def tied_names(names: Sequence[str], models: Sequence[Checkpoint], base: Checkpoint | None, rules: dict[str, Any]) -> dict[str, str]:
    """Names computed once and written under both (alias -> first name): tied in every input and ruled alike.

    A name tied in one model but not another, or given a different rule (an override, ``take:``), is
    computed on its own: sharing the result would give it the other name's numbers.
    """
    inputs = [*models, *([base] if base is not None else [])]
    if not inputs:
        return {}
    present = set(names)
    tied = {a: t for a, t in inputs[0].aliases().items() if a in present and t in present}
    for ck in inputs[1:]:
        theirs = ck.aliases()
        tied = {a: t for a, t in tied.items() if theirs.get(a) == t}
    return {a: t for a, t in tied.items() if rules[a] == rules[t]}


def build_jobs(
    names: Sequence[str],
    from_base: set[str],
    models: Sequence[Checkpoint],
    ingredients: Sequence[int],
    base: Checkpoint | None,
    method: MergeMethod,
    rules: dict[str, Any],
    dtype: str | None,
) -> list[TensorJob]:
    """Turn aligned names and recipe rules into jobs, checking shapes and dtypes of every tensor.

    Raises:
        TensorMismatchError: every tensor whose shape or dtype differs across models, with each model's.
    """
    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    problems: list[str] = []
    jobs: list[TensorJob] = []
    aliases = tied_names(names, models, base, rules)
    per_model = {p.name for p in method.params if p.per_model}
    for name in names:
        rule = rules[name]
        if rule.take == "skip":
            continue
        srcs = [models[i] for i in ingredients] if name not in from_base else []
        if base is not None and (method.base != "none" or rule.take == "base" or name in from_base):
            srcs = srcs + [base]
        if rule.take == "first":
            srcs = [models[0]]
        metas = [(ck, *ck.meta(name)) for ck in srcs]
        shapes = {m[2] for m in metas}
        dtypes = {m[1] for m in metas}
        floats = {d.is_floating_point for d in dtypes}
        if len(shapes) > 1:
            problems.append(f"'{name}' has different shapes: " + ", ".join(f"{ck.label}: {list(s)}" for ck, _, s in metas))
            continue
        if len(floats) > 1 or (len(dtypes) > 1 and not (floats == {True} and out_dtype is not None)):
            fix = "" if floats != {True} else " (set `dtype:` / --dtype to choose the output dtype)"
            problems.append(f"'{name}' has different dtypes: " + ", ".join(f"{ck.label}: {str(d).replace('torch.', '')}" for ck, d, _ in metas) + fix)
            continue
        (shape,) = shapes
        in_dtype = metas[0][1]
        floating = in_dtype.is_floating_point
        if name in from_base or rule.take == "base":
            action = "base"
        elif rule.take == "first":
            action = "first"
        elif not floating:
            action = "nonfloat"
        else:
            action = "merge"
        params = {k: (tuple(v[i] for i in ingredients) if k in per_model and isinstance(v, (tuple, list)) else v) for k, v in rule.params.items()}
        weights = tuple(rule.weights[i] for i in ingredients) if rule.weights is not None else None
        jobs.append(
            TensorJob(
                name=name,
                action=action,
                dtype=(out_dtype or in_dtype) if floating else in_dtype,
                shape=shape,
                params=params,
                weights=weights,
                alias_of=aliases.get(name),
            )
        )
    if problems:
        raise TensorMismatchError(f"{len(problems)} tensor(s) cannot be merged:\n  " + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
    return jobs

"""Nested checkpoint layouts (timm, Lightning, DDP, torch.compile): find the state dict and its prefix."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger("modelsoup")

# Entries that hold the weights in the layouts timm, Lightning, DDP and common training scripts write,
# in the order they are preferred when several are present.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "ema", "model_ema", "state_dict_ema", "ema_state_dict")
# Prefixes removed when every name has them: DDP wraps in `module.`, torch.compile in `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Lightning prefixes the LightningModule attribute; `model.` is only stripped for Lightning checkpoints,
# since Hugging Face names legitimately start with it.
LIGHTNING_PREFIXES = ("model.", "net.")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj: Any, key: str | None, where: str) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """Locate the flat name -> tensor mapping inside a loaded checkpoint.

    Args:
        obj: what ``torch.load`` returned.
        key: entry to use (``a.b`` or ``a/b`` for nested entries); detected when None.
        where: file name for messages.

    Returns:
        (state dict, the key that was picked or None if top level, names of non-tensor entries skipped).

    Raises:
        CheckpointError: no state dict found, or the given key is missing.
    """
    if key:
        cur = obj
        parts = [key] if isinstance(obj, dict) and key in obj else key.replace("/", ".").split(".")
        for part in parts:
            if not isinstance(cur, dict) or part not in cur:
                have = ", ".join(map(str, cur)) if isinstance(cur, dict) else type(cur).__name__
                raise CheckpointError(f"{where}: no entry '{key}' (missing '{part}'); entries here: {have}")
            cur = cur[part]
        if not _tensor_dict(cur):
            raise CheckpointError(f"{where}: entry '{key}' holds no tensors")
        picked: str | None = key
    elif isinstance(obj, dict) and not any(k in obj and _tensor_dict(obj[k]) for k in CONTAINER_KEYS) and _tensor_dict(obj):
        cur, picked = obj, None
    else:
        found = [k for k in CONTAINER_KEYS if isinstance(obj, dict) and _tensor_dict(obj.get(k))]
        if not found:
            have = ", ".join(f"{k} ({type(v).__name__})" for k, v in obj.items()) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{where}: found no state dict (entries: {have}); name the entry that holds the weights with `key:` (--key)")
        picked = found[0]
        cur = obj[picked]
        if len(found) > 1:
            log.info("%s: using '%s'; also present: %s (choose with `key:`/--key)", where, picked, ", ".join(found[1:]))
    odd = next((k for k, v in cur.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{where}: the tensor under key {odd!r} is named by a {type(odd).__name__}, not a string; re-save it with string names")
    tensors = {k: v for k, v in cur.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in cur.items() if not isinstance(v, torch.Tensor)]
    return tensors, picked, skipped


def apply_prefix(names: list[str], strip_prefix: str | None, notes: list[str], label: str, lightning: bool = False) -> dict[str, str]:
    """Map each name to its name without the wrapper prefix.

    An explicit ``strip_prefix`` must be on every name that has it removed (names without it are kept).
    Otherwise ``module.``/``_orig_mod.`` (and, for Lightning checkpoints, ``model.``/``net.``) are removed
    while every name starts with one; what was removed is added to ``notes``.

    Raises:
        CheckpointError: an explicit prefix that no name has.
    """
    if strip_prefix:
        if not any(n.startswith(strip_prefix) for n in names):
            raise CheckpointError(f"{label}: no tensor name starts with '{strip_prefix}' (e.g. '{names[0] if names else ''}'); check strip_prefix")
        notes.append(f"stripped prefix '{strip_prefix}'")
        return _unique({n: n[len(strip_prefix):] if n.startswith(strip_prefix) else n for n in names}, label, strip_prefix)
    mapping = {n: n for n in names}
    candidates = WRAPPER_PREFIXES + (LIGHTNING_PREFIXES if lightning else ())
    stripped = ""
    changed = True
    while changed and names:
        changed = False
        for p in candidates:
            if all(mapping[n].startswith(p) for n in names):
                mapping = {n: mapping[n][len(p):] for n in names}
                stripped += p
                changed = True
    if stripped:
        notes.append(f"stripped prefix '{stripped}' found on every tensor name")
    return mapping


def _unique(mapping: dict[str, str], label: str, prefix: str) -> dict[str, str]:
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise CheckpointError(f"{label}: stripping '{prefix}' makes '{seen[new]}' and '{old}' both '{new}'; give a different strip_prefix (or none)")
        seen[new] = old
    return mapping

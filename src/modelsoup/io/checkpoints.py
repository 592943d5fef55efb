"""Lazy, read-only access to the tensors of one checkpoint, whatever its format.

A :class:`Checkpoint` lists tensor names, shapes and dtypes without reading tensor data, and reads one
tensor at a time. Formats: safetensors files and Hugging Face folders (sharded or not), PyTorch
pickles (``.pt/.pth/.bin/.ckpt``, loaded with ``weights_only=True`` and memory-mapped), and in-memory
state dicts or ``nn.Module``s.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from .layout import apply_prefix, find_state_dict
from .safetensors_format import TensorInfo, read_header, read_tensor

log = logging.getLogger("modelsoup")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLES = ("model.safetensors", "pytorch_model.bin")


class Checkpoint:
    """Read-only view of one model's tensors.

    Attributes:
        label: how messages name this model (its path, or ``model[i]`` for in-memory inputs).
        kind: ``safetensors``, ``torch`` or ``memory``.
        files: the weight files read (for hashing); empty for in-memory inputs.
        folder: the Hugging Face model folder when the input is one (``config.json`` present), else None.
        notes: what was detected about the layout (picked key, stripped prefix), for the log.
        layout: how to nest and prefix a torch-format output so it loads where this one loaded.
    """

    kind = "memory"

    def __init__(self, label: str) -> None:
        self.label = label
        self.files: list[Path] = []
        self.folder: Path | None = None
        self.notes: list[str] = []
        self.layout: dict[str, Any] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._alias: dict[str, str] = {}

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._meta)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor, without reading it."""
        return self._meta[name]

    def aliases(self) -> dict[str, str]:
        """Names whose tensor shares storage with an earlier name (tied weights): alias -> first name."""
        return dict(self._alias)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor. The caller must not modify it in place."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorDictCheckpoint(Checkpoint):
    """Tensors already in memory (a state dict, a module's state, or a loaded torch pickle)."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor], kind: str = "memory") -> None:
        super().__init__(label)
        self.kind = kind
        self._tensors = dict(tensors)
        seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
        for name, t in self._tensors.items():
            self._meta[name] = (t.dtype, tuple(t.shape))
            if t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ident in seen:
                self._alias[name] = seen[ident]
            else:
                seen[ident] = name

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded folder lists them in its index)."""

    kind = "safetensors"

    def __init__(self, label: str, files: list[Path], weight_map: dict[str, str] | None = None, strip_prefix: str | None = None) -> None:
        super().__init__(label)
        self.files = files
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            infos, _ = read_header(f)
            for name, info in infos.items():
                if name in self._info:
                    raise CheckpointError(f"{label}: tensor '{name}' is stored in both {self._info[name].file.name} and {f.name}; the shards are inconsistent")
                self._info[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._info))
            if missing:
                raise CheckpointError(
                    f"{label}: the index lists {len(missing)} tensor(s) that no shard holds, e.g. '{missing[0]}'; a shard is missing or stale, re-download the model"
                )
        renamed = apply_prefix(list(self._info), strip_prefix, self.notes, label)
        self._info = {renamed[k]: v for k, v in self._info.items()}
        self._meta = {k: (v.dtype, v.shape) for k, v in self._info.items()}
        self._fds: dict[Path, int] = {}

    def read(self, name: str) -> torch.Tensor:
        info = self._info[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds.setdefault(info.file, os.open(info.file, os.O_RDONLY))
        return read_tensor(fd, info)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _torch_load(path: Path) -> Any:
    """``torch.load`` restricted to plain tensors and containers; memory-mapped where the format allows."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if not magic.startswith(b"\x80"):  # neither a zip archive nor a legacy pickle stream
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); the file is corrupt or truncated")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            log.info("%s: legacy (non-zip) torch format cannot be memory-mapped; loading it whole", path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        reason = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"{path}: refused to load: this pickle needs more than tensors and plain containers ({reason}). "
            "modelsoup never runs code stored in checkpoints. If you trust the file, re-save its state dict as "
            "safetensors in a trusted environment (safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({msg}); the file is corrupt or truncated, re-save it") from None


def _torch_checkpoint(label: str, files: list[Path], key: str | None, strip_prefix: str | None) -> TensorDictCheckpoint:
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    layout: dict[str, Any] = {}
    for f in files:
        obj = _torch_load(f)
        sd, picked, skipped = find_state_dict(obj, key, str(f))
        if picked:
            notes.append(f"picked '{picked}' from the checkpoint")
            layout["key"] = picked
        if skipped:
            notes.append(f"ignored {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} ({', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''})")
        lightning = isinstance(obj, dict) and any("lightning" in str(k) for k in obj)
        for k, v in sd.items():
            if k in tensors:
                raise CheckpointError(f"{label}: tensor '{k}' appears in two shards; the shards are inconsistent")
            tensors[k] = v
        layout["lightning"] = lightning or layout.get("lightning", False)
    names = list(tensors)
    renamed = apply_prefix(names, strip_prefix, notes, label, lightning=bool(layout.get("lightning")))
    stripped = next((n[: len(n) - len(renamed[n])] for n in names if renamed[n] != n), "")
    if stripped:
        layout["prefix"] = stripped
    ck = TensorDictCheckpoint(label, {renamed[k]: v for k, v in tensors.items()}, kind="torch")
    ck.files = files
    ck.notes = notes
    ck.layout = layout
    return ck


def _sharded(folder: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text())
        weight_map: dict[str, str] = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e}); it needs a 'weight_map' of tensor -> file") from None
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = folder / shard
        if not p.is_file():
            raise CheckpointError(f"{index}: lists shard '{shard}', which is not in {folder}; the download is incomplete")
        files.append(p)
    return files, weight_map


def open_checkpoint(source: Any, *, label: str | None = None, key: str | None = None, strip_prefix: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily.

    Args:
        source: a path (safetensors file, torch pickle, shard index, or model folder), a state dict,
            or an ``nn.Module``.
        label: name used in messages (defaults to the path).
        key: for nested torch pickles, the entry holding the weights (e.g. ``state_dict``, ``ema``);
            detected when None.
        strip_prefix: a name prefix to remove (e.g. ``module.``); ``module.``/``_orig_mod.`` are
            detected and removed when every name has them.

    Raises:
        CheckpointError: missing, unreadable, corrupt or ambiguous input.
        UnsafeCheckpointError: a pickle that would run code.
    """
    if isinstance(source, torch.nn.Module):
        return TensorDictCheckpoint(label or type(source).__name__, source.state_dict())
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label or 'state dict'}: entry '{bad[0]}' is a {type(source[bad[0]]).__name__}, not a tensor; pass a flat name -> tensor mapping")
        return TensorDictCheckpoint(label or "state dict", source)
    path = Path(source)
    label = label or str(source)
    if not path.exists():
        raise CheckpointError(f"{label}: no such file or folder (modelsoup reads local files only; download hub models first)")
    if path.is_dir():
        return _open_folder(path, label, key, strip_prefix)
    name = path.name
    if name.endswith(".index.json"):
        files, wm = _sharded(path.parent, path)
        if all(f.suffix == ".safetensors" for f in files):
            return SafetensorsCheckpoint(label, files, wm, strip_prefix)
        return _torch_checkpoint(label, files, key, strip_prefix)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(label, [path], None, strip_prefix)
    if path.suffix in TORCH_SUFFIXES or zipfile.is_zipfile(path):
        return _torch_checkpoint(label, [path], key, strip_prefix)
    raise CheckpointError(f"{label}: unknown checkpoint format (expected .safetensors, {', '.join(TORCH_SUFFIXES)}, a shard index or a model folder)")


def _open_folder(folder: Path, label: str, key: str | None, strip_prefix: str | None) -> Checkpoint:
    ck: Checkpoint
    for index in HF_INDEXES:
        if (folder / index).is_file():
            files, wm = _sharded(folder, folder / index)
            ck = SafetensorsCheckpoint(label, files, wm, strip_prefix) if index.startswith("model.safetensors") else _torch_checkpoint(label, files, key, strip_prefix)
            break
    else:
        single = next((folder / s for s in HF_SINGLES if (folder / s).is_file()), None)
        if single is None:
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES))
            if len(found) != 1:
                what = f"several candidates ({', '.join(found)})" if found else "no .safetensors or PyTorch weight file"
                raise CheckpointError(f"{label}: folder has {what}; point at the weight file itself")
            single = folder / found[0]
        ck = SafetensorsCheckpoint(label, [single], None, strip_prefix) if single.suffix == ".safetensors" else _torch_checkpoint(label, [single], key, strip_prefix)
    if (folder / "config.json").is_file():
        ck.folder = folder
    return ck

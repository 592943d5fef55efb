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
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterInputError, CheckpointError
from .formats import TORCH_SUFFIXES, is_torch_file
from .layout import apply_prefix, find_state_dict
from .pickles import load_torch
from .safetensors_format import DTYPES, TensorInfo, read_header, read_range, read_tensor

log = logging.getLogger("modelsoup")

# The weights of a Hugging Face folder, in the order transformers' from_pretrained looks for them, so
# that a folder holding several (a stale index beside model.safetensors) gives the model it loads.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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

    # Formats that read part of a tensor without reading the rest offer
    # ``read_range(name, start, stop, out) -> Tensor``: elements [start, stop) of the flattened tensor, in its
    # stored dtype, written into the flat buffer ``out`` (the engine's reused chunk buffers).

    def identity(self, name: str) -> tuple[Any, ...] | None:
        """A token that two reads give only for the same stored tensor (file and name), whatever object
        opened it; None when unknown (in-memory tensors). Lets a plan see that inputs are one tensor."""
        return None

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SUPPORTED_DTYPES = frozenset(DTYPES.values())


def unsupported_tensor(t: torch.Tensor) -> str | None:
    """Why a tensor cannot be merged (meta, sparse, quantized, nested, a subclass, an odd dtype), or None."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(t).__name__} (a tensor subclass)"
    if t.is_meta:
        return "on the meta device (it has no data)"
    if t.layout != torch.strided:
        return f"a {str(t.layout).replace('torch.', '')} tensor"
    if t.is_quantized:
        return "quantized"
    if t.is_nested:
        return "a nested tensor"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"of dtype {str(t.dtype).replace('torch.', '')}"
    return None


def file_stamp(path: Path) -> tuple[Any, ...]:
    """A file's real path with its device, inode, size and modification time: changes when the file is replaced or rewritten."""
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TensorDictCheckpoint(Checkpoint):
    """Tensors already in memory (a state dict, a module's state, or a loaded torch pickle)."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor], kind: str = "memory") -> None:
        super().__init__(label)
        self.kind = kind
        self.stored_names: dict[str, str] = {}  # name -> its name in the file, where a prefix was stripped
        self._stamps: tuple[Any, ...] | None = None  # the files the tensors were loaded from, as they were then (None: in memory)
        self._tensors = dict(tensors)
        seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
        for name, t in self._tensors.items():
            problem = unsupported_tensor(t)
            if problem:
                raise CheckpointError(f"{label}: tensor '{name}' is {problem}, which modelsoup cannot merge; give dense, materialised tensors (e.g. t.to_dense(), or load the weights first)")
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

    def identity(self, name: str) -> tuple[Any, ...] | None:
        if self._stamps is None or name not in self._meta:
            return None
        return ("torch", self._stamps, self.layout.get("key"), self.stored_names.get(name, name))


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
            moved = next((n for n, f in weight_map.items() if self._info[n].file.name != Path(f).name), None)
            if moved is not None:
                raise CheckpointError(
                    f"{label}: the index puts tensor '{moved}' in {weight_map[moved]} but it is in {self._info[moved].file.name}; "
                    "the index and the shards disagree, re-download the model"
                )
        renamed = apply_prefix(list(self._info), strip_prefix, self.notes, label)
        self._info = {renamed[k]: v for k, v in self._info.items()}
        self._meta = {k: (v.dtype, v.shape) for k, v in self._info.items()}
        self._fds: dict[Path, int] = {}
        self._open_lock = threading.Lock()
        self._stamps = {f: file_stamp(f) for f in files}  # the files as their headers were read, for identity()

    def identity(self, name: str) -> tuple[Any, ...] | None:
        info = self._info.get(name)
        return None if info is None else ("safetensors", self._stamps[info.file], info.start)

    def _fd(self, info: TensorInfo) -> int:
        fd = self._fds.get(info.file)
        if fd is None:
            with self._open_lock:  # two threads opening one file would leak a handle
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return fd

    def read(self, name: str) -> torch.Tensor:
        info = self._info[name]
        return read_tensor(self._fd(info), info)

    def read_mapped(self, name: str) -> torch.Tensor:
        """As :meth:`read`, but a large tensor is a private map of the page cache (see :func:`read_tensor`), for the merge engine."""
        info = self._info[name]
        return read_tensor(self._fd(info), info, mapped=True)

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, read into the flat buffer ``out`` (see :class:`Checkpoint`)."""
        info = self._info[name]
        return read_range(self._fd(info), info, start, stop, out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _torch_checkpoint(label: str, files: list[Path], key: str | None, strip_prefix: str | None, allow_globals: Iterable[str] = ()) -> TensorDictCheckpoint:
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    layout: dict[str, Any] = {}
    for f in files:
        obj = load_torch(f, allow_globals)
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
    ck.stored_names = {renamed[k]: k for k in tensors}
    ck.files = files
    ck._stamps = tuple(file_stamp(f) for f in files)
    ck.notes = notes
    ck.layout = layout
    return ck


def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of a model folder may really live: inside it, or, for a Hugging Face cache
    snapshot (``models--ORG--NAME/snapshots/REV/file -> ../../blobs/HASH``), in that repository's blobs."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def resolve_within(path: Path, folder: Path, fix: str) -> Path:
    """The real path of ``path``, a file or folder of the model folder ``folder``, which must stay inside it.

    Args:
        path: the entry (it may be a link).
        folder: the model folder (its Hugging Face cache blobs count as inside, see :func:`allowed_roots`).
        fix: what the user can do when it leaves the folder, for the message.

    Raises:
        CheckpointError: a broken link, a symlink loop, or a link that leaves the folder.
    """
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
        raise CheckpointError(f"{path}: cannot be resolved ({getattr(e, 'strerror', None) or e}); a broken link or a symlink loop "
                              f"in {folder}? fix or remove it") from None
    if not any(real.is_relative_to(r) for r in allowed_roots(folder)):
        raise CheckpointError(f"{path}: is a link to {real}, outside the model folder {folder}; {fix}")
    return real


def inside_folder(folder: Path, name: str, what: str) -> Path:
    """The file ``name`` of ``folder``, refused unless it (and any link it is) stays inside the folder.

    Raises:
        CheckpointError: an absolute name, a ``..`` component, a link that leaves the folder (other
            than the Hugging Face cache layout), a symlink loop, or a missing file.
    """
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{what} '{name}', which is not a file inside {folder}; a model folder may only refer to its own files")
    path = folder / name
    if not os.path.lexists(path):
        raise CheckpointError(f"{what} '{name}', which is not in {folder}; the download is incomplete")
    real = resolve_within(path, folder, "modelsoup reads only a model folder's own files (and the Hugging Face cache's blobs). "
                          "Copy the file into the folder if it belongs to the model.")
    if not real.is_file():
        raise CheckpointError(f"{path}: is not a file")
    return path


MAX_INDEX = 100 * 1024 * 1024


def _sharded(folder: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{index}: not a valid shard index ({why}); it needs a 'weight_map' object of tensor name -> shard file name")

    try:
        if index.stat().st_size > MAX_INDEX:
            raise bad(f"{index.stat().st_size} bytes, over the {MAX_INDEX >> 20} MB an index may have")
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise bad(f"'weight_map' is {type(weight_map).__name__}" if isinstance(data, dict) and "weight_map" in data else "no 'weight_map'")
    odd = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if odd is not None:
        raise bad(f"tensor '{odd}' maps to {type(weight_map[odd]).__name__} {str(weight_map[odd])[:40]!r}, not a file name")
    files = [inside_folder(folder, shard, f"{index}: lists shard") for shard in dict.fromkeys(weight_map.values())]
    return files, weight_map


# Tensor names that only adapters have: PEFT LoRA factors and DoRA magnitudes, LoHa/LoKr/IA3 vectors.
ADAPTER_NAMES = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](_[ab])?|ia3_l)(\.|$)")


def _adapter_error(label: str, why: str) -> AdapterInputError:
    return AdapterInputError(
        f"{label}: is a PEFT adapter ({why}), not a model. Averaging LoRA factors separately is not the average of the adapters' "
        "updates (the mean of products B@A is not the product of the means), so an adapter is read only together with the model it "
        "changes: give an adapter folder with its base (`soup merge --base BASE ADAPTER...`, or `path: BASE` with `adapter: ADAPTER` "
        "in a recipe), or merge it into its model first: "
        "PeftModel.from_pretrained(AutoModel...from_pretrained(BASE), ADAPTER).merge_and_unload().save_pretrained(OUT)"
    )


def refuse_adapter(ck: Checkpoint) -> None:
    """Refuse a checkpoint whose tensor names are an adapter's (``...lora_A.weight``, DoRA magnitudes).

    Raises:
        AdapterInputError: with how to merge the adapter into its model first.
    """
    hit = next((n for n in ck.names() if ADAPTER_NAMES.search(n)), None)
    if hit is not None:
        raise _adapter_error(ck.label, f"it holds adapter tensors such as '{hit}'")


def open_checkpoint(
    source: Any, *, label: str | None = None, key: str | None = None, strip_prefix: str | None = None, allow_globals: Iterable[str] = ()
) -> Checkpoint:
    """Open a checkpoint lazily.

    Args:
        source: a path (safetensors file, torch pickle, shard index, or model folder), a state dict,
            or an ``nn.Module``.
        label: name used in messages (defaults to the path).
        key: for nested torch pickles, the entry holding the weights (e.g. ``state_dict``, ``ema``);
            detected when None.
        strip_prefix: a name prefix to remove (e.g. ``module.``); ``module.``/``_orig_mod.`` are
            detected and removed when every name has them.
        allow_globals: further ``module.Class`` names a torch pickle may hold, loaded as inert data
            (see :mod:`modelsoup.io.pickles`).

    Raises:
        CheckpointError: missing, unreadable, corrupt, ambiguous or unsupported input.
        AdapterInputError: a PEFT adapter (folder, file or ``PeftModel``) where a model was expected.
        UnsafeCheckpointError: a pickle that would run code.
    """
    ck = _open(source, label, key, strip_prefix, tuple(allow_globals))
    refuse_adapter(ck)
    return ck


def _open(source: Any, label: str | None, key: str | None, strip_prefix: str | None, allow_globals: tuple[str, ...]) -> Checkpoint:
    if isinstance(source, torch.nn.Module):
        if type(source).__module__.split(".")[0] == "peft":
            raise _adapter_error(label or type(source).__name__, f"a {type(source).__name__}")
        return TensorDictCheckpoint(label or type(source).__name__, source.state_dict())
    if isinstance(source, Mapping):
        odd = next((k for k in source if not isinstance(k, str)), None)
        if odd is not None:
            raise CheckpointError(f"{label or 'state dict'}: key {odd!r} is a {type(odd).__name__}; tensor names are strings")
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label or 'state dict'}: entry '{bad[0]}' is a {type(source[bad[0]]).__name__}, not a tensor; pass a flat name -> tensor mapping")
        return TensorDictCheckpoint(label or "state dict", source)
    path = Path(source)
    label = label or str(source)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # a symlink loop, a name too long
        raise CheckpointError(f"{label}: cannot be read ({e.strerror}); check the path") from None
    if not exists:
        raise CheckpointError(f"{label}: no such file or folder (modelsoup reads local files only; download hub models first)")
    if is_dir:
        return _open_folder(path, label, key, strip_prefix, allow_globals)
    if not path.is_file():
        raise CheckpointError(f"{label}: is not a regular file or folder (a FIFO or device?); give a checkpoint file or model folder")
    if path.name.endswith(".index.json"):
        files, wm = _sharded(path.parent, path)
        if all(f.suffix == ".safetensors" for f in files):
            return SafetensorsCheckpoint(label, files, wm, strip_prefix)
        return _torch_checkpoint(label, files, key, strip_prefix, allow_globals)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(label, [path], None, strip_prefix)
    if is_torch_file(path) or zipfile.is_zipfile(path):
        return _torch_checkpoint(label, [path], key, strip_prefix, allow_globals)
    raise CheckpointError(f"{label}: unknown checkpoint format (expected .safetensors, {', '.join(TORCH_SUFFIXES)}, a shard index or a model folder)")


def _open_folder(folder: Path, label: str, key: str | None, strip_prefix: str | None, allow_globals: tuple[str, ...]) -> Checkpoint:
    if (folder / "adapter_config.json").exists():
        raise _adapter_error(label, "the folder has adapter_config.json")
    ck: Checkpoint
    present = [w for w in HF_WEIGHTS if os.path.lexists(folder / w)]
    chosen = present[0] if present else None
    if chosen is None:
        found = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" or is_torch_file(p))
        if len(found) != 1:
            what = f"several candidates ({', '.join(found)})" if found else "no .safetensors or PyTorch weight file"
            raise CheckpointError(f"{label}: folder has {what}; point at the weight file itself")
        chosen = found[0]
    if chosen.endswith(".index.json"):
        files, wm = _sharded(folder, inside_folder(folder, chosen, f"{label}: the shard index"))
        ck = (SafetensorsCheckpoint(label, files, wm, strip_prefix) if chosen.startswith("model.safetensors")
              else _torch_checkpoint(label, files, key, strip_prefix, allow_globals))
    else:
        path = inside_folder(folder, chosen, f"{label}: the weight file")
        ck = (SafetensorsCheckpoint(label, [path], None, strip_prefix) if path.suffix == ".safetensors"
              else _torch_checkpoint(label, [path], key, strip_prefix, allow_globals))
    if len(present) > 1:
        ck.notes.append(f"read {chosen}, as transformers does; ignored {', '.join(present[1:])}")
    if (folder / "config.json").is_file():
        ck.folder = folder
    return ck

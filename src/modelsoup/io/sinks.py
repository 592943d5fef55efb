"""Where merged tensors go: one protocol, a safetensors and a torch sink, chosen once from the output's form (and a null sink for benchmarks).

Both stream: every tensor is written as soon as it is computed, from any worker thread, in any order,
and nothing holds the whole model. The torch sink writes the zip format ``torch.save`` writes (storage
records, then ``data.pkl`` describing them), so the file loads with ``torch.load(weights_only=True)``
and can be memory-mapped; its pickle is built from our own placeholders and names nothing but torch's
tensor rebuild functions and storage types.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import struct
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .output import sha256_file
from .writer import SafetensorsWriter

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


class Sink(Protocol):
    """Receives each output tensor once (tied names included), then is closed or aborted.

    Attributes:
        order: names in the order the sink would like them (its file order), or None for any order.
    """

    order: Sequence[str] | None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one tensor (thread-safe)."""

    # A sink may also offer ``write_range(name, start, chunk)``: elements [start, start + numel) of the
    # flattened tensor, pieces of one tensor from one thread, ``chunk`` reused by the caller afterwards.
    # The engine streams pointwise merges to it chunk by chunk; a sink without it gets whole tensors.

    def close(self) -> dict[str, str]:
        """Finish and make durable; return {file name: sha256, or "" when not hashing}."""

    def abort(self) -> None:
        """Release everything without finishing (the caller removes the folder)."""


class SafetensorsSink:
    """Sharded safetensors (an index above ``shard_size``), laid out up front, written with positioned I/O."""

    def __init__(self, folder: Path, tensors: Sequence[TensorSpec], *, shard_size: int, metadata: dict[str, str],
                 file_name: str | None, hash_files: bool) -> None:
        self._writer = SafetensorsWriter(folder, tensors, shard_size, metadata, file_name=file_name, hash_files=hash_files)
        self._hash = hash_files
        self.order: Sequence[str] | None = self._writer.order

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(name, tensor)

    def write_range(self, name: str, start: int, chunk: torch.Tensor) -> None:
        self._writer.write_range(name, start, chunk)

    def close(self) -> dict[str, str]:
        files = self._writer.close()
        return self._writer.digests() if self._hash else {f.name: "" for f in files}

    def abort(self) -> None:
        self._writer.abort()


_LEGACY_STORAGE = torch.storage._dtype_to_storage_type_map()  # dtype -> "FloatStorage", as torch.save names them


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


class _Pickler(pickle.Pickler):
    """Pickles placeholders as ``torch.save`` pickles tensors: a rebuild call on a persistent storage id."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            if obj.dtype in _LEGACY_STORAGE:
                return ("storage", getattr(torch, _LEGACY_STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Tensor):
            args = (obj.storage, 0, torch.Size(obj.shape), _contiguous_strides(obj.shape), False, collections.OrderedDict())
            if obj.storage.dtype in _LEGACY_STORAGE:
                return (torch._utils._rebuild_tensor_v2, args)
            return (torch._utils._rebuild_tensor_v3, (*args, obj.storage.dtype))
        return NotImplemented


class TorchSink:
    """A torch pickle (``.pt``/``.bin``/``.pth.tar``), nested and prefixed like the first input so it loads where that loaded.

    The zip archive is written with Python's ``zipfile`` (records stored, each one's data aligned to 64
    bytes as torch aligns them, so ``torch.load(mmap=True)`` maps them), one record per storage as its
    tensor arrives; a write error (full disk) is the OSError it is, and an aborted sink leaves only a
    file for the caller to remove.

    Args:
        path: the file to write.
        tensors: (name, dtype, shape) of every output tensor.
        aliases: tied names (alias -> first name): stored once, as ``torch.save`` stores tied tensors.
        key: the entry the state dict sits under (``state_dict`` for timm/Lightning), or None for a flat dict.
        prefix: prepended to every name (``module.`` for DDP checkpoints).
        hash_files: compute the file's sha256 when closed.
    """

    order: Sequence[str] | None = None
    ALIGN = 64
    _PAD_ID = 0x4653  # a private extra-field id holding the alignment padding (ignored by readers)

    def __init__(self, path: Path, tensors: Sequence[TensorSpec], *, aliases: dict[str, str], key: str | None, prefix: str,
                 hash_files: bool) -> None:
        self.path = path
        self._hash = hash_files
        self._aliases = aliases
        self._key, self._prefix = key, prefix
        self._lock = threading.Lock()
        self._refs: dict[str, _Tensor] = {}
        for i, (name, dtype, shape) in enumerate(tensors):
            if name not in aliases:
                self._refs[name] = _Tensor(_Storage(str(i), dtype, math.prod(shape)), tuple(shape))
        for alias, target in aliases.items():
            self._refs[alias] = self._refs[target]
        self._names = [name for name, _, _ in tensors]
        self._archive = "archive"
        self._file = open(path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def _record(self, name: str, data: bytes | memoryview) -> None:
        """Append one stored record whose data starts at a multiple of ALIGN (call under the lock)."""
        info = zipfile.ZipInfo(f"{self._archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        size = len(data)
        zip64 = size > zipfile.ZIP64_LIMIT
        start = self._file.tell() + 30 + len(info.filename.encode("utf-8")) + (20 if zip64 else 0) + 4
        pad = -start % self.ALIGN
        info.extra = struct.pack("<HH", self._PAD_ID, pad) + bytes(pad)
        with self._zip.open(info, "w", force_zip64=zip64) as f:
            f.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._aliases:
            return  # its storage is its target's
        ref = self._refs[name]
        t = tensor.contiguous()
        if t.dtype != ref.storage.dtype or tuple(t.shape) != ref.shape:
            raise ValueError(f"tensor '{name}' is {t.dtype} {list(t.shape)}, {ref.storage.dtype} {list(ref.shape)} was planned")
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        with self._lock:
            self._record(f"data/{ref.storage.key}", data)

    def close(self) -> dict[str, str]:
        state = {self._prefix + n: self._refs[n] for n in self._names}
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump({self._key: state} if self._key else state)
        with self._lock:
            for name, data in (("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", str(self.ALIGN).encode()),
                               ("byteorder", b"little"), ("version", b"3\n")):
                self._record(name, data)
            self._zip.close()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return {self.path.name: sha256_file(self.path) if self._hash else ""}

    def abort(self) -> None:
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass
        finally:
            self._file.close()


class NullSink:
    """Takes every tensor and keeps none: counts tensors and bytes (and optionally a checksum), for benchmarks and dry runs.

    With a virtual input (:class:`~modelsoup.io.virtual.VirtualCheckpoint`) it runs the real engine at any
    model size with no disk. The checksum is the sum, modulo 2**64, of a 64-bit digest of each (name, bytes):
    it does not depend on the order tensors arrive in, so runs with any number of workers compare equal.

    Args:
        checksum: hash every tensor's bytes (blake2b; costs a pass over the data).
    """

    order: Sequence[str] | None = None

    def __init__(self, *, checksum: bool = False) -> None:
        self._checksum = checksum
        self._lock = threading.Lock()
        self.tensors = 0
        self.bytes = 0
        self.digest = 0
        self.closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        part = 0
        if self._checksum:
            h = hashlib.blake2b(name.encode() + b"\0", digest_size=8)
            t = tensor.detach().contiguous().cpu()
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            part = int.from_bytes(h.digest(), "little")
        with self._lock:
            self.tensors += 1
            self.bytes += nbytes
            self.digest = (self.digest + part) & ((1 << 64) - 1)

    def close(self) -> dict[str, str]:
        self.closed = True
        return {}

    def abort(self) -> None:
        self.closed = True

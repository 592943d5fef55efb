"""Streaming safetensors writer: the layout is planned up front, tensors are written in any order.

Every output tensor's name, dtype and shape are known before the merge starts, so shard assignment,
byte offsets and headers are fixed first and each merged tensor is written with ``os.pwrite`` at its
offset as soon as it is ready, from any thread, with no buffering of the whole model. A tensor may also
arrive in pieces (:meth:`SafetensorsWriter.write_range`, from the engine's chunked loop, whose buffers are
reused): the sha256 of a file is then taken in file order from what was written, read back from the page
cache as each tensor completes, so nothing is held for hashing.

The output must be durable when the merge returns (``close`` fsyncs every shard). So that the disk does not start
only then, a flusher thread asks the kernel to start writing each shard back (``sync_file_range``, Linux) every
:data:`FLUSH_EVERY` bytes written to it, while later tensors are still being computed; the final fsync then
waits only for the tail. Where ``sync_file_range`` is missing, the fsync does it all.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import tensor_nbytes
from .output import sha256_file
from .safetensors_format import encode_header, tensor_bytes

# Finished tensors are read back for hashing through one buffer of this size.
HASH_READ = 8 << 20

# Bytes written to a shard between two requests to start its write-back.
FLUSH_EVERY = 64 << 20


def _write_back_starter() -> Callable[[int], None] | None:
    """``start(fd)``: have the kernel start writing back a file's dirty pages without waiting for them
    (``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``); None where the call is missing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int) -> None:
        fn(fd, 0, 0, 2)  # a hint: a failure leaves it all to the fsync

    return start


@dataclass(frozen=True)
class _Slot:
    fd_index: int
    offset: int
    nbytes: int




def shard_names(n: int, stem: str = "model") -> list[str]:
    """Hugging Face shard file names."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class SafetensorsWriter:
    """Writes tensors into pre-laid-out safetensors shards.

    Args:
        folder: where the files go (a temporary folder; the caller moves it into place).
        tensors: (name, dtype, shape) of every output tensor, in the order they should be grouped.
        shard_size: start a new shard before a shard would exceed this many bytes of tensor data.
        metadata: ``__metadata__`` for every file (``format: pt`` is added, as transformers expects).
        file_name: force a single file with this name (no sharding, no index).
        hash_files: compute each file's sha256 while writing (see :meth:`digests`).

    Attributes:
        order: tensor names in file order; writing them in this order lets hashing keep up.
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        file_name: str | None = None,
        hash_files: bool = False,
    ) -> None:
        self.folder = folder
        meta = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        used = 0
        for name, dtype, shape in tensors:
            nb = tensor_nbytes(dtype, shape)
            if file_name is None and shards[-1] and used + nb > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape))
            used += nb
        names = [file_name] if file_name else shard_names(len(shards))
        self.files = [folder / n for n in names]
        self.slots: dict[str, _Slot] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._fds: list[int] = []
        self._hasher: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self._flushes: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.order: list[str] = []
        self._hashers: list[hashlib._Hash | None] = []
        self._file_order: list[list[str]] = []
        for i, (path, shard) in enumerate(zip(self.files, shards)):
            # widest dtypes first keeps every tensor aligned to its element size (the header is 8-aligned)
            ordered = sorted(shard, key=lambda e: -e[1].itemsize)
            entries, pos = [], 0
            for name, dtype, shape in ordered:
                nb = tensor_nbytes(dtype, shape)
                entries.append((name, dtype, shape, pos, pos + nb))
                pos += nb
            header = encode_header(entries, meta)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read back for hashing
                self._fds.append(fd)
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + pos)
            except OSError:
                self.abort()  # no file handle outlives a failed start (too many shards for the open-file limit, a full disk)
                raise
            for name, _, _, b, e in entries:
                self.slots[name] = _Slot(i, len(header) + b, e - b)
                self.weight_map[name] = path.name
                self.order.append(name)
            self._file_order.append([e[0] for e in entries])
            self._hashers.append(hashlib.sha256(header) if hash_files else None)
            self.total_size += pos
        self._hash_files = hash_files
        self._next = [0] * len(self.files)
        self._written = dict.fromkeys(self.slots, 0)  # bytes of each tensor written so far (one writer per tensor)
        self._complete: set[str] = set()
        # One thread hashes in file order so writers never wait on it (hashlib and os.preadv release the GIL).
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._hasher = threading.Thread(target=self._hash_loop, name="soup-hash-out", daemon=True) if hash_files else None
        if self._hasher is not None:
            self._hasher.start()
            for name, slot in self.slots.items():
                if slot.nbytes == 0:
                    self._queue.put(name)
        self._sharded = len(self.files) > 1
        self._unflushed = [0] * len(self.files)  # bytes written to each shard since its last write-back request
        self._flush_lock = threading.Lock()
        start = _write_back_starter()
        self._flusher = threading.Thread(target=self._flush_loop, args=(start,), name="soup-flush", daemon=True) if start else None
        if self._flusher is not None:
            self._flusher.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor at its reserved place (thread-safe)."""
        data = tensor_bytes(tensor)
        if len(data) != self.slots[name].nbytes:
            raise ValueError(f"tensor '{name}' has {len(data)} bytes, {self.slots[name].nbytes} were planned")
        self._put(name, 0, data, whole=True)

    def write_range(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write elements [start, start + numel) of tensor ``name`` (flattened, in its output dtype); thread-safe.

        The pieces of one tensor come from one thread; the tensor is complete (and hashed) once all its bytes are written.
        """
        data = tensor_bytes(chunk)
        self._put(name, start * chunk.element_size(), data)

    def _put(self, name: str, at: int, data: memoryview, whole: bool = False) -> None:
        slot = self.slots[name]
        if at < 0 or at + len(data) > slot.nbytes:
            raise ValueError(f"tensor '{name}': bytes {at}..{at + len(data)} fall outside its {slot.nbytes} planned bytes")
        fd, done = self._fds[slot.fd_index], 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], slot.offset + at + done)
        before = self._written[name]
        self._written[name] = slot.nbytes if whole else before + len(data)  # a whole write replaces any pieces
        if before < slot.nbytes == self._written[name] and self._hasher is not None:
            self._queue.put(name)
        if self._flusher is not None:
            with self._flush_lock:
                self._unflushed[slot.fd_index] += len(data)
                due = self._unflushed[slot.fd_index] >= FLUSH_EVERY
                if due:
                    self._unflushed[slot.fd_index] = 0
            if due:
                self._flushes.put(slot.fd_index)

    def _flush_loop(self, start: Callable[[int], None]) -> None:
        """Start the write-back of each shard it is handed (this thread may block on a busy disk; the writers never do)."""
        while (shard := self._flushes.get()) is not None:
            start(self._fds[shard])

    def _stop_flushing(self) -> None:
        if self._flusher is not None:
            self._flushes.put(None)
            self._flusher.join()
            self._flusher = None

    def _hash_loop(self) -> None:
        """Hash each shard in file order: each tensor, once complete and all before it hashed, read back from the file."""
        buf = memoryview(bytearray(HASH_READ))
        while (name := self._queue.get()) is not None:
            shard = self.slots[name].fd_index
            self._complete.add(name)
            order, h = self._file_order[shard], self._hashers[shard]
            assert h is not None
            while self._next[shard] < len(order) and order[self._next[shard]] in self._complete:
                slot = self.slots[order[self._next[shard]]]
                pos, end = slot.offset, slot.offset + slot.nbytes
                while pos < end:
                    n = os.preadv(self._fds[shard], [buf[: min(HASH_READ, end - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"{self.files[shard]}: short read while hashing what was written")
                    h.update(buf[:n])
                    pos += n
                self._complete.discard(order[self._next[shard]])
                self._next[shard] += 1

    def _stop_hashing(self) -> None:
        if self._hasher is not None:
            self._queue.put(None)
            self._hasher.join()
            self._hasher = None

    def digests(self) -> dict[str, str]:
        """sha256 of every file written (call after :meth:`close`).

        Raises:
            RuntimeError: a tensor was never written completely (the merge did not finish).
        """
        out = {}
        for i, path in enumerate(self.files):
            h = self._hashers[i]
            if h is None or self._next[i] != len(self._file_order[i]):
                raise RuntimeError(f"{path.name}: not every tensor was written, so it has no digest")
            out[path.name] = h.hexdigest()
        index = self.folder / "model.safetensors.index.json"
        if self._sharded:
            out[index.name] = sha256_file(index)
        return out

    def close(self) -> list[Path]:
        """Close the files (each fsynced) and write the shard index if sharded; return every file written."""
        self._stop_hashing()
        self._stop_flushing()
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        out = list(self.files)
        if self._sharded:
            index = self.folder / "model.safetensors.index.json"
            index.write_text(json.dumps({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2) + "\n")
            out.append(index)
        return out

    def abort(self) -> None:
        """Close file handles without finishing (the caller deletes the folder)."""
        self._stop_hashing()
        self._stop_flushing()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

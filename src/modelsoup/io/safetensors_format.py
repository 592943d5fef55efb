"""The safetensors file format, read and written with positioned I/O.

Why not ``safe_open``'s memory map of the whole file: pages of a mapping that a merge touches stay resident
(and count in the process's RSS) for as long as the file is mapped, so a merge of N x 1 GB files would hold
N GB. Each large tensor is mapped on its own instead, for as long as the tensor lives, and small ones and
parts of tensors are read with ``os.preadv``: the resident set stays at the tensors in flight, reads are
thread-safe without locks, and the header is checked strictly first (a truncated or corrupt file is named
before anything is merged). The bytes are the same ones ``safe_open`` returns; tests pin that. (A file
truncated by another program while it is mapped and merged ends the process with SIGBUS, not an error
message; the output is staged, so nothing half-written is left in its place.)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range (absolute offsets in the file)."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# A valid header nests three deep (object -> tensor entry -> shape list); anything far deeper is hostile.
MAX_HEADER_DEPTH = 8
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting_depth(raw: bytes) -> int:
    """Deepest nesting of JSON brackets outside strings (linear, no recursion)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(Exception):
    pass


class _NotJson(Exception):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text} is out of range")
    return value


# Every dimension, and the elements a shape spans, must fit torch's int64 sizes and strides.
MAX_ELEMENTS = 2**63 - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header as strictly as the format requires.

    Checked: the 8-byte length and the header fit the file and the 100 MB cap; the header is UTF-8
    JSON, an object, nested at most a few levels, with no key given twice; ``__metadata__`` maps
    strings to strings; every entry has a known dtype, a shape of non-negative integers and integer
    offsets whose span is exactly the shape's byte size; and the entries tile the data section exactly
    (in offset order each starts where the previous ended, the first at 0, the last at the end of the
    file), so no two tensors share bytes and no byte is unaccounted for.

    Returns:
        (tensors by name, the ``__metadata__`` mapping).

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid safetensors.
    """
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is corrupt or not safetensors, re-download or re-save it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise corrupt(f"header claims {n} bytes, over the {MAX_HEADER >> 20} MB limit of the format")
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}: truncated or not a safetensors file; re-download or re-save it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    if not raw.startswith(b"{"):
        raise corrupt("header does not start with a JSON object")
    try:  # C-speed and linear; its recursion is bounded by the interpreter's limit
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float)
    except _DuplicateKey as e:
        raise corrupt(f"header lists the key '{e.args[0]}' twice (which one is meant is ambiguous)") from None
    except _NotJson as e:
        raise corrupt(f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise corrupt("header nests too deep to read (a safetensors header needs 3 levels)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"header is not valid JSON ({e})") from None
    depth = _nesting_depth(raw)  # linear on valid JSON, whose every string is closed
    if depth > MAX_HEADER_DEPTH:
        raise corrupt(f"header nests {depth} levels deep (a safetensors header needs 3)")
    try:
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise corrupt(f"header holds a string that is not valid Unicode ({e.object[e.start:e.end]!r})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt(f"__metadata__ must map strings to strings, got {type(meta).__name__ if not isinstance(meta, dict) else 'non-string values'}")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise corrupt(f"header entry for tensor '{name}' is malformed ({_short(entry)})")
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {entry['dtype']}, which modelsoup cannot merge")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise corrupt(f"tensor '{name}' has shape {_short(shape)}; a shape is a list of non-negative integers")
        if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
            raise corrupt(f"tensor '{name}' has shape {_short(shape)}, larger than any tensor can be")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and x >= 0 for x in offsets):
            raise corrupt(f"tensor '{name}' has data_offsets {_short(offsets)}; they are two non-negative integers [begin, end]")
        dtype = DTYPES[entry["dtype"]]
        b, e = offsets
        numel = math.prod(shape)
        need = numel * dtype.itemsize
        if e - b != need:
            raise corrupt(f"tensor '{name}' occupies {e - b} bytes but shape {shape} of {entry['dtype']} needs {need}")
        infos[name] = TensorInfo(path, name, dtype, tuple(shape), data_start + b, data_start + e)
        spans.append((b, e, name))
    spans.sort()
    pos, prev = 0, None
    for b, e, name in spans:
        if b != pos:
            if b < pos:
                raise corrupt(f"tensors '{prev}' and '{name}' overlap (bytes {b}..{pos} belong to both)")
            raise corrupt(f"bytes {pos}..{b} of the data belong to no tensor (before '{name}')")
        pos, prev = e, name
    if data_start + pos > size:
        raise CheckpointError(
            f"{path}: file is {size} bytes but tensor '{prev}' ends at byte {data_start + pos}: the file is truncated; re-download or re-save it"
        )
    if data_start + pos < size:
        raise corrupt(f"{size - data_start - pos} byte(s) after the last tensor belong to no tensor")
    return infos, dict(meta)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Tensors at least this large are mapped rather than read (see read_tensor); smaller ones are read, so a model's
# many small tensors never add up to many mappings.
MAP_ABOVE = 1 << 20


def read_tensor(fd: int, info: TensorInfo, mapped: bool = False) -> torch.Tensor:
    """One tensor, read into memory it owns; with ``mapped``, a large one is a private, copy-on-write map of its bytes
    in the page cache instead.

    Mapping avoids both the fresh buffer (whose pages the kernel must zero) and the copy out of the page cache;
    the mapping is private, so a write to the tensor changes only this process's copy of a page, never the file.
    Its pages are released when the tensor is freed. A mapped tensor starts wherever the file puts it, not on
    the 64-byte boundary torch gives its own memory, and a reduction mixing operands of different alignments
    (``torch.dot``) can round differently: only the merge engine maps, for methods whose results do not depend on
    it (elementwise kernels, and reductions that widen into their own buffers first). Thread-safe, no lock.
    """
    if mapped and info.nbytes >= MAP_ABOVE and info.start % info.dtype.itemsize == 0:
        at = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(fd, info.end - at, access=mmap.ACCESS_COPY, offset=at)
        except (OSError, ValueError):  # a file that cannot be mapped (some network and FUSE file systems) is read
            pass
        else:
            return torch.frombuffer(region, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.start - at).view(info.shape)
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes == 0:
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    got = 0
    while got < info.nbytes:
        n = os.preadv(fd, [view[got:]], info.start + got)
        if n == 0:
            raise CheckpointError(f"{info.file}: unexpected end of file while reading tensor '{info.name}' (truncated?)")
        got += n
    return out


def read_range(fd: int, info: TensorInfo, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Read elements [start, stop) of the flattened tensor into the first ``stop - start`` elements of the flat
    ``out`` (of the tensor's dtype) with positioned I/O; return that view of ``out``."""
    view_t = out[: stop - start]
    size = info.dtype.itemsize
    view = memoryview(view_t.view(torch.uint8).numpy()) if view_t.numel() else memoryview(b"")
    got, want, at = 0, (stop - start) * size, info.start + start * size
    if not 0 <= start <= stop or at + want > info.end:
        raise ValueError(f"elements {start}..{stop} lie outside tensor '{info.name}'")
    while got < want:
        n = os.preadv(fd, [view[got:]], at + got)
        if n == 0:
            raise CheckpointError(f"{info.file}: unexpected end of file while reading tensor '{info.name}' (truncated?)")
        got += n
    return view_t


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, row-major (a view, no copy for contiguous tensors)."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str]) -> bytes:
    """Serialise a header (8-byte length + JSON padded with spaces to a multiple of 8)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, b, e in entries:
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [b, e]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw

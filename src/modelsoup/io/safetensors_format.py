"""The safetensors file format, read and written with positioned I/O.

Why not ``safe_open``'s memory map: pages of a mapping that a merge touches stay resident (and count in
the process's RSS) for as long as the file is mapped, so a merge of N x 1 GB files would hold N GB.
Reading each tensor with ``os.preadv`` into a buffer the tensor owns keeps the resident set at the
tensors in flight, is thread-safe without locks, and lets the header be checked strictly (a truncated
or corrupt file is named before anything is merged). The bytes read are the same ones ``safe_open``
returns; tests pin that.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header.

    Returns:
        (tensors by name, the ``__metadata__`` mapping).

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid safetensors.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}: truncated or not a safetensors file; re-download or re-save it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt, re-download or re-save it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            b, e = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, KeyError) and isinstance(entry, dict) and "dtype" in entry and entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has dtype {entry['dtype']}, which modelsoup cannot merge") from None
            raise CheckpointError(f"{path}: header entry for tensor '{name}' is malformed ({entry!r}); the file is corrupt") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != numel * itemsize or b < 0:
            raise CheckpointError(
                f"{path}: tensor '{name}' occupies {e - b} bytes but shape {list(shape)} of {entry['dtype']} needs {numel * itemsize}; the file is corrupt"
            )
        infos[name] = TensorInfo(path, name, dtype, shape, data_start + b, data_start + e)
        spans.append((b, e, name))
    end = max((e for _, e, _ in spans), default=0)
    if data_start + end > size:
        last = max(spans, key=lambda s: s[1])[2]
        raise CheckpointError(
            f"{path}: file is {size} bytes but tensor '{last}' ends at byte {data_start + end}: the file is truncated; re-download or re-save it"
        )
    return infos, {str(k): str(v) for k, v in meta.items()}


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with positioned I/O into memory the tensor owns (thread-safe, no lock)."""
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

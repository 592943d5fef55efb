"""PyTorch pickles (``.pt/.pth/.bin/.ckpt``), loaded without ever running code stored in them.

Three layers of defence:

- ``torch.load(weights_only=True)``: the pickle may only build tensors and plain containers.
- Real checkpoints also carry a few data-only objects (timm's ``args`` is an ``argparse.Namespace``,
  Lightning's hyper-parameters an ``AttributeDict``, metrics numpy scalars). These names, and any the
  user allows by name (``--allow-global module.Class``), are loaded as *inert stand-ins*: objects of
  ours that keep their arguments and state as plain data. The class the name refers to is never
  imported and none of its code runs; the stand-ins are never tensors, so they never reach a merge.
- ``mmap=True`` maps each storage record straight from the file, and torch then trusts the size the
  pickle claims: a record shorter than its storage would read the bytes that follow it (garbage in
  the soup). Before the real load, a dry run of the pickle on the ``meta`` device collects every
  storage's claimed size, and each is checked against its record in the zip directory.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler

from ..errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger("modelsoup")

# Data-only classes that real checkpoints carry, loaded as inert stand-ins (never imported): the
# name -> where it is found. Nothing callable in effect: a stand-in only stores what it is given.
DATA_ONLY_GLOBALS: dict[str, str] = {
    "argparse.Namespace": "timm train.py checkpoints (`args`)",
    "lightning.fabric.utilities.data.AttributeDict": "Lightning `hyper_parameters`",
    "lightning.pytorch.utilities.parsing.AttributeDict": "Lightning `hyper_parameters`",
    "pytorch_lightning.utilities.parsing.AttributeDict": "Lightning `hyper_parameters` (pytorch_lightning < 2)",
    "numpy.core.multiarray.scalar": "numpy scalar metrics (best accuracy, loss)",
    "numpy._core.multiarray.scalar": "numpy scalar metrics (numpy 2)",
    "numpy.dtype": "the dtype of a numpy scalar or array",
    "numpy.core.multiarray._reconstruct": "numpy arrays in training state",
    "numpy._core.multiarray._reconstruct": "numpy arrays in training state (numpy 2)",
    "numpy.ndarray": "numpy arrays in training state",
    **{f"numpy.dtypes.{k}DType": "numpy 2 dtype classes" for k in (
        "Float64", "Float32", "Float16", "Int64", "Int32", "Int16", "Int8", "UInt64", "UInt32", "UInt16", "UInt8", "Bool")},
}
# Dict subclasses: their stand-in is a plain dict, so the pickle can fill it with SETITEMS.
_DICT_LIKE = frozenset(k for k in DATA_ONLY_GLOBALS if k.endswith(".AttributeDict"))
_GLOBAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class Inert:
    """What an allowed named global becomes: its arguments and state kept as data, nothing run."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<{self.global_name}, kept as data>"


class _DictStandIn:
    """A dict subclass's stand-in: constructing it gives a plain dict."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict[Any, Any]:  # type: ignore[misc]
        return {}


_STAND_INS: dict[str, type] = {}
# Names allowed for the whole process by :func:`allowed_globals` (the CLI's --allow-global).
_PROCESS_ALLOWED: tuple[str, ...] = ()


@contextmanager
def allowed_globals(names: Iterable[str]) -> Iterator[None]:
    """Within the block, every torch pickle loaded may also hold these ``module.Class`` names (as inert data)."""
    global _PROCESS_ALLOWED
    before = _PROCESS_ALLOWED
    _PROCESS_ALLOWED = (*before, *check_global_names(names))
    try:
        yield
    finally:
        _PROCESS_ALLOWED = before


def _stand_in(name: str) -> type:
    if name not in _STAND_INS:
        short = name.rsplit(".", 1)[1]
        base = _DictStandIn if name in _DICT_LIKE else Inert
        _STAND_INS[name] = type(short, (base,), {"global_name": name, "__module__": __name__})
    return _STAND_INS[name]


def check_global_names(names: Iterable[str]) -> list[str]:
    """Validate ``--allow-global`` names (``module.Class``).

    Raises:
        UnsafeCheckpointError: a name that is not a dotted Python name.
    """
    out = []
    for n in names:
        if not _GLOBAL_NAME.match(n):
            raise UnsafeCheckpointError(f"--allow-global {n!r}: give a dotted name like argparse.Namespace or mypkg.config.TrainArgs")
        out.append(n)
    return out


def _safe_globals(extra: Iterable[str]) -> list[tuple[type, str]]:
    return [(_stand_in(n), n) for n in dict.fromkeys([*DATA_ONLY_GLOBALS, *extra])]


def _records(z: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    infos = {i.filename: i for i in z.infolist()}
    pkl = sorted((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
    if not pkl:
        raise CheckpointError("no data.pkl record")
    return pkl[0], infos


def _check_records(path: Path, extra_globals: Iterable[str]) -> bool:
    """Dry-run the pickle on the meta device; check every storage against its record.

    Returns:
        Whether the file may be memory-mapped (every storage record stored uncompressed).

    Raises:
        CheckpointError: a storage record is missing or shorter than the storage the pickle declares,
            or a tensor does not fit its storage.
        pickle.UnpicklingError: the pickle needs a global that is not allowed (reported by the caller).
    """
    with zipfile.ZipFile(path) as z:
        pkl, infos = _records(z)
        prefix = pkl[: -len("data.pkl")]
        data = z.read(pkl)
        # where each record's bytes may end: the next entry's local header, or the central directory
        bounds = sorted({i.header_offset for i in infos.values()} | {getattr(z, "start_dir", path.stat().st_size)})
    claimed: dict[str, tuple[int, torch.dtype]] = {}

    class DryRun(_weights_only_unpickler.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
                raise CheckpointError(f"unexpected storage reference {str(pid)[:80]}")
            _, storage_type, key, _location, numel = pid
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
            if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
                raise CheckpointError(f"storage '{key}' has an unreadable type or size")
            nbytes = numel * dtype.itemsize
            claimed[str(key)] = (nbytes, dtype)
            return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes, device="meta"), dtype=dtype, _internal=True)

    with torch.serialization.safe_globals(_safe_globals(extra_globals)):
        try:
            DryRun(io.BytesIO(data), encoding="utf-8").load()
        except RuntimeError as e:
            raise CheckpointError(f"its pickle does not rebuild ({str(e).splitlines()[0]})") from None
    mappable = True
    with open(path, "rb") as f:
        for key, (nbytes, _) in claimed.items():
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"storage '{key}' has no record '{prefix}data/{key}' in the archive")
            if info.file_size < nbytes:
                raise CheckpointError(f"storage '{key}' declares {nbytes} bytes but its record holds {info.file_size}")
            if info.compress_type != zipfile.ZIP_STORED:
                mappable = False
                continue
            # the central directory may lie about sizes: bound the mapped bytes by the layout itself
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"storage '{key}': its record has no local header where the directory says")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            limit = next((b for b in bounds if b > info.header_offset), path.stat().st_size)
            if start + nbytes > limit:
                raise CheckpointError(f"storage '{key}' declares {nbytes} bytes but its record has room for {max(0, limit - start)}")
    return mappable


def _refusal(path: Path, text: str) -> UnsafeCheckpointError:
    """Our message for torch's refusal: the global the pickle needs, and what the user can do."""
    lines = text.strip().splitlines()
    first = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0].strip() if lines else "")
    found = re.search(r"GLOBAL ([\w.]+)", first)
    blocked = "is blocked" in first
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops "builtins."
        reason = f"it refers to {name}" + (", from a module torch never loads" if blocked else "")
    else:
        name, reason = None, first
    hint = "" if (name is None or blocked) else (
        f" If {name} is a plain data class you expect in this checkpoint, allow it by name with --allow-global {name} "
        "(loaded as inert data; its code never runs).")
    return UnsafeCheckpointError(
        f"{path}: refused to load: this pickle needs more than tensors and plain containers ({reason}). "
        f"modelsoup never runs code stored in checkpoints.{hint} {'Otherwise, if' if hint else 'If'} you trust the file, re-save its state dict "
        "as safetensors in a trusted environment (safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))."
    )


def load_torch(path: Path, allow_globals: Iterable[str] = ()) -> Any:
    """``torch.load`` restricted to tensors, plain containers and inert stand-ins; memory-mapped where safe.

    Args:
        path: the checkpoint file.
        allow_globals: further ``module.Class`` names to load as inert stand-ins.

    Raises:
        UnsafeCheckpointError: the pickle needs a global that is not allowed (it would run code).
        CheckpointError: the file is not a torch checkpoint, is truncated or corrupt, or a storage
            record is shorter than the tensor data it should hold.
    """
    extra = [*check_global_names(allow_globals), *_PROCESS_ALLOWED]
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            magic = f.read(2)
        if not magic.startswith(b"\x80"):  # neither a zip archive nor a legacy pickle stream
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); the file is corrupt or truncated")
    try:
        mappable = _check_records(path, extra) if is_zip else False
        with torch.serialization.safe_globals(_safe_globals(extra)):
            if mappable:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            log.info("%s: cannot be memory-mapped (legacy format or compressed records); loading it whole", path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, str(e)) from None
    except CheckpointError as e:
        if str(e).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {e}; the file is corrupt or truncated, re-save it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError, IndexError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "resize storage" in msg:  # the mmap'd record cannot grow: a tensor reaches past its storage
            msg = "a tensor reaches past the end of its storage"
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({msg}); the file is corrupt or truncated, re-save it") from None

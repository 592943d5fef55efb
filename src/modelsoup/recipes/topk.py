"""Top-k checkpoint averaging along one training run (as timm's ``avg_checkpoints.py`` does).

Rank a run's checkpoints by a metric and average the best k uniformly. The metric comes from the
training log (a CSV/JSONL with one row per epoch, e.g. timm's ``summary.csv`` or Lightning's
``metrics.csv``), from the checkpoint file names (Lightning's ``epoch=3-val_acc=0.91.ckpt``), or from an
evaluator.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..errors import EvaluatorError
from ..eval.base import Evaluator
from .greedy import as_pantry

_EPOCH_RE = re.compile(r"epoch[=_-]?(\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"(\d+)")


@dataclass
class TopKResult:
    """The checkpoints kept and how all were ranked.

    Attributes:
        ranking: (label, metric) for every checkpoint, best first.
        members: indices of the k kept checkpoints, best first.
        labels: their labels.
        recipe: their uniform average as a ``linear`` recipe.
        metric: what was ranked on.
    """

    ranking: list[tuple[str, float]]
    members: list[int]
    labels: list[str]
    recipe: Recipe
    metric: str
    seconds: float = 0.0

    def to_markdown(self) -> str:
        kept = set(self.labels)
        lines = [f"Top-{len(self.labels)} checkpoints by {self.metric}", "", f"| rank | checkpoint | {self.metric} | averaged |", "|---:|---|---:|---|"]
        lines += [f"| {k + 1} | {name} | {v:.6g} | {'yes' if name in kept else 'no'} |" for k, (name, v) in enumerate(self.ranking)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "ranking": [{"checkpoint": n, "value": v} for n, v in self.ranking], "averaged": self.labels}


def epoch_of(path: str | Path) -> int:
    """The epoch number of a checkpoint file: ``epoch=12``/``epoch_12``, else the last number in its name.

    Raises:
        EvaluatorError: the name has no number.
    """
    name = Path(path).name
    m = _EPOCH_RE.search(name)
    if m:
        return int(m.group(1))
    nums = _INT_RE.findall(name.split(".")[0]) or _INT_RE.findall(name)
    if not nums:
        raise EvaluatorError(f"{name}: cannot tell its epoch (no number in the file name); name checkpoints like checkpoint-12.pth or epoch=12.ckpt")
    return int(nums[-1])


def metrics_from_log(checkpoints: Sequence[str | Path], log_file: str | Path, column: str, *, epoch_column: str = "epoch") -> list[float]:
    """Each checkpoint's ``column`` value in a per-epoch log (CSV or JSONL), matched by epoch number.

    Rows with an empty/NaN value are skipped (Lightning logs train and val metrics on separate rows);
    if an epoch has several rows with a value, the last one counts.

    Raises:
        EvaluatorError: unreadable log, missing column, or a checkpoint whose epoch has no value.
    """
    p = Path(log_file)
    try:
        if p.suffix in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            with open(p, newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        raise EvaluatorError(f"{p}: cannot read the training log ({e})") from None
    if not rows:
        raise EvaluatorError(f"{p}: the training log has no rows")
    for c in (column, epoch_column):
        if c not in rows[0]:
            raise EvaluatorError(f"{p}: no column '{c}' (columns: {', '.join(rows[0])})")
    by_epoch: dict[int, float] = {}
    for r in rows:
        v, e = r.get(column), r.get(epoch_column)
        try:
            value, epoch = float(v), int(float(e))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if not math.isnan(value):
            by_epoch[epoch] = value
    out = []
    for ck in checkpoints:
        e = epoch_of(ck)
        if e not in by_epoch:
            raise EvaluatorError(f"{ck}: epoch {e} has no '{column}' in {p} (epochs with a value: {sorted(by_epoch)[:10]}...)")
        out.append(by_epoch[e])
    return out


def metrics_from_names(checkpoints: Sequence[str | Path], key: str) -> list[float]:
    """``key=value`` read from each checkpoint's file name (Lightning's ``ModelCheckpoint`` naming).

    Raises:
        EvaluatorError: a name without ``key=<number>``.
    """
    rx = re.compile(re.escape(key) + r"=(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
    out = []
    for ck in checkpoints:
        m = rx.search(Path(ck).name)
        if not m:
            raise EvaluatorError(f"{ck}: the file name has no '{key}=<number>'")
        out.append(float(m.group(1)))
    return out


def topk_average(
    checkpoints: Sequence[Any],
    k: int,
    *,
    metrics: Sequence[float] | None = None,
    evaluator: Evaluator | None = None,
    lower_is_better: bool = False,
    metric_name: str = "metric",
    **pantry_options: Any,
) -> TopKResult:
    """Average the k best checkpoints of a run, ranked by ``metrics`` (one per checkpoint) or by ``evaluator``.

    Equal metrics keep the given order. Raises ``ValueError`` for a bad k or a metric count that does
    not match the checkpoints.
    """
    t0 = time.perf_counter()
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if (metrics is None) == (evaluator is None):
        raise ValueError("give exactly one of metrics= or evaluator=")
    pantry, own = as_pantry(checkpoints, **pantry_options)
    try:
        if metrics is None:
            assert evaluator is not None
            scores = [pantry.score(i, evaluator) for i in range(len(pantry))]
            values = [s.value for s in scores]
            metric_name = scores[0].metric
            lower_is_better = False
        else:
            values = [float(v) for v in metrics]
            if len(values) != len(pantry):
                raise ValueError(f"{len(values)} metric values for {len(pantry)} checkpoints")
        sign = 1.0 if lower_is_better else -1.0
        order = sorted(range(len(values)), key=lambda i: sign * values[i])
        members = order[: min(k, len(order))]
        return TopKResult([(pantry.labels[i], values[i]) for i in order], members, [pantry.labels[i] for i in members],
                          pantry.recipe(members), metric_name, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

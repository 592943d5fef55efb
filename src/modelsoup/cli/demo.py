"""``soup demo``: soups of a real pretrained transformer (MiniLM) on real reviews, or the digits demos."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SoupError


def cmd_demo(a: argparse.Namespace) -> int:
    progress = False if a.quiet else None
    if a.domains:
        from ..demo.digits import run_domains_demo

        result, corr = run_domains_demo(Path(a.out), seed=a.split_seed, progress=progress)
        print(result.to_markdown().split("### Calibration")[0])
        print("mean correlation of each model's class templates with the uniform soup's:")
        for name, values in corr.items():
            print(f"  {name:<14} {sum(values) / len(values):.3f}")
        print(f"\nsoups, tables and figures (templates.png) in {a.out}")
        return 0
    if a.digits:
        from ..demo import run_demo

        run_demo(Path(a.out), quick=a.quick, seed=a.split_seed)
        return 0
    from ..demo.text import describe_sweep, run_text_demo, sweep_config

    try:
        config = sweep_config(quick=a.quick, ingredients=a.ingredients, split_seed=a.split_seed, lora=a.lora)
    except ValueError as e:
        raise SoupError(str(e)) from None
    print(f"all-MiniLM-L6-v2 on Rotten Tomatoes: {config.train} train / {config.val} held-out / {config.test} test reviews, "
          f"{len(config.ingredients)} {'LoRA adapters (r8 on query/value, the head whole)' if a.lora else 'fine-tunes'} from one linear-probe start:", flush=True)
    for line in describe_sweep(config):
        print(f"  {line}")
    res = run_text_demo(Path(a.out), config=config, cache_dir=Path(a.cache) if a.cache else None, learned_epochs=1 if a.quick else 5,
                        progress=progress)
    print()
    print(res.table())
    print(f"\nsoups, results.md and figures (heldout_vs_test.png, reliability.png) in {a.out}; "
          f"ingredients cached in {res.sweep.start.parent} ({res.seconds / 60:.1f} min)")
    return 0


def add_parsers(sub: Any) -> None:
    """Add this module's subcommands."""
    d = sub.add_parser("demo", help="soups of a real pretrained transformer (MiniLM) on real reviews, offline: table and figure",
                       description="Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes reviews from one linear-probe start with different "
                       "hyperparameters (cached: an interrupted demo resumes), then cooks uniform, greedy and learned soups and ensembles "
                       "with modelsoup's own API and prints the paper-style table.")
    d.add_argument("--out", default="out/demo", help="output folder: soups, results.md, figures (default out/demo)")
    d.add_argument("--cache", help="where fine-tuned ingredients and evaluations are kept (default ~/.cache/modelsoup/demo)")
    d.add_argument("--ingredients", type=int, help="size of the sweep (default 8; up to 14)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out/test split")
    d.add_argument("--quick", action="store_true", help="tiny sizes (about a minute), for tests")
    d.add_argument("--lora", action="store_true", help="the same sweep as LoRA runs (peft adapters), cooked as adapter soups "
                   "(the soups written as PEFT adapters)")
    d.add_argument("--digits", action="store_true", help="the small digits demo instead: MLPs on scikit-learn's digits, every merge method")
    d.add_argument("--domains", action="store_true", help="multi-domain digits: linear classifiers fine-tuned on digits 0-4 and 5-9, souped; "
                   "per-domain table and class-template grid")
    d.set_defaults(fn=cmd_demo)

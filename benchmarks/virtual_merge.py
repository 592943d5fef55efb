"""A 4 x Llama-70B-class merge in bounded memory, with no disk: virtual checkpoints into a null sink.

Each model is a :class:`~modelsoup.io.virtual.VirtualCheckpoint` (tensors drawn on demand from (seed, name),
bfloat16, Llama-70B shapes: hidden 8192, 80 layers, MLP 28672, 64 heads, 8 KV heads, vocabulary 128256) and the
output a :class:`~modelsoup.io.sinks.NullSink`; the merge itself is the real ``plan_merge`` + ``run_jobs``.
Every run is a fresh process, so its peak RSS (``ru_maxrss``) is its own. Runs with more layers read and merge
more, and their peak RSS stays the same: memory is bounded by the engine's budget and its largest tensor,
never by the model. The full model's time is projected from the per-layer time.

    python benchmarks/virtual_merge.py                          # llama-70b, 4 models, linear, layers 1, 2, 4
    python benchmarks/virtual_merge.py --layers 2,8 --method ties --set density=0.5
    python benchmarks/virtual_merge.py --no-embeddings          # the decoder layers only
    python benchmarks/virtual_merge.py --vocab 32000            # a smaller vocabulary (embeddings fit a small machine)
    python benchmarks/virtual_merge.py --full-random            # draw every element (measures the generator too)

The embeddings of a 70B model are the largest tensors (128256 x 8192): merging 4 of them holds 4 float32 inputs,
the result and a temporary, about 25 GB (plus the bfloat16 reads), as the estimate (``soup plan``) predicts. The script
refuses to start a run whose prediction exceeds the free memory, and says which flag makes it fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CHILD_FLAG = "--child"


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _available() -> int | None:
    from modelsoup.devices import available_memory

    return available_memory(__import__("torch").device("cpu"))


def child(args: dict) -> dict:
    """One run in this process: build, plan, merge into a NullSink; return the figures."""
    import torch

    from modelsoup.engine import default_workers, run_jobs
    from modelsoup.estimate import estimate_merge
    from modelsoup.io.sinks import NullSink
    from modelsoup.io.virtual import LLAMA_PRESETS, VirtualCheckpoint, llama_shapes
    from modelsoup.plan import plan_merge
    from modelsoup.recipe import recipe_from_dict

    sizes = dict(LLAMA_PRESETS[args["preset"]], layers=args["layers"])
    if args["vocab"]:
        sizes["vocab"] = args["vocab"]
    shapes = llama_shapes(**sizes)
    if args["no_embeddings"]:
        shapes = {k: v for k, v in shapes.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    opts = {"dtype": torch.bfloat16, "block": None if args["full_random"] else 1 << 20}
    cks = [VirtualCheckpoint(shapes, seed=s, label=f"m{s}", **opts) for s in range(args["models"])]
    base = VirtualCheckpoint(shapes, seed=1000, label="base", **opts) if args["base"] else None
    data = {"method": args["method"], "models": [{"source": {}} for _ in cks], "parameters": args["params"]}
    if base is not None:
        data["base"] = {"source": {}}
    plan = plan_merge(recipe_from_dict(data), cks, base)
    workers = args["workers"] or default_workers()
    predicted = estimate_merge(plan, workers=workers, measure=False).peak_memory  # what `soup plan` would print
    avail = _available()
    baseline = _rss_now()
    if avail is not None and predicted > 0.85 * (avail + baseline):
        return {"refused": f"the estimate is {predicted / 1e9:.1f} GB of tensors at once, over the {avail / 1e9:.1f} GB free; "
                           "add --no-embeddings or a smaller --vocab (e.g. 32000)"}
    sink = NullSink()
    t0 = time.perf_counter()
    run_jobs(plan, sink.write, workers=workers, progress=False)
    dt = time.perf_counter() - t0
    read = sum(ck.parameters * 2 for ck in cks) + (base.parameters * 2 if base is not None else 0)
    return {"layers": args["layers"], "tensors": sink.tensors, "read": read, "written": sink.bytes, "seconds": dt, "workers": workers,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "baseline_rss": baseline, "predicted": predicted,
            "params_per_model": cks[0].parameters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-70b", help="llama-70b (default), llama-8b, llama-1b, llama-tiny")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--layers", default="1,2,4", help="comma-separated layer counts, one fresh process each (the preset's first K layers)")
    p.add_argument("--method", default="linear")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method parameter (numbers), e.g. density=0.5")
    p.add_argument("--base", action="store_true", help="give a base model (implied by ties, task_arithmetic, dare_*, della*)")
    p.add_argument("--workers", type=int)
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary size")
    p.add_argument("--no-embeddings", action="store_true", help="leave out embed_tokens and lm_head")
    p.add_argument("--full-random", action="store_true", help="draw every element (default: a random 1 Mi-element block per tensor, repeated)")
    p.add_argument(CHILD_FLAG, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    params = {k: float(v) for k, v in (s.split("=", 1) for s in a.set)}
    needs_base = a.base or a.method in ("ties", "task_arithmetic", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
                                        "breadcrumbs_ties", "sce")
    from modelsoup.io.virtual import LLAMA_PRESETS, VirtualCheckpoint

    full_layers = LLAMA_PRESETS[a.preset]["layers"]
    import torch

    print(f"# {a.models} x {a.preset} ({'layers only' if a.no_embeddings else 'vocab ' + str(a.vocab or LLAMA_PRESETS[a.preset]['vocab'])}), "
          f"{a.method}{' ' + str(params) if params else ''}{' with a base' if needs_base else ''}, bfloat16, "
          f"{'every element drawn' if a.full_random else '1 Mi-element random block per tensor'}; NullSink")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {(_available() or 0) / 2**30:.1f} GiB free, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"{'layers':>6} {'tensors':>8} {'read GB':>9} {'s':>8} {'tensors/s':>10} {'GB/s read':>10} {'peak RSS GiB':>13} "
          f"{'baseline GiB':>13} {'predicted GiB':>14}")
    rows = []
    for k in [int(x) for x in a.layers.split(",")]:
        args = {"preset": a.preset, "models": a.models, "layers": k, "method": a.method, "params": params, "base": needs_base,
                "workers": a.workers, "vocab": a.vocab, "no_embeddings": a.no_embeddings, "full_random": a.full_random}
        r = subprocess.run([sys.executable, __file__, CHILD_FLAG, json.dumps(args)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(f"{k:>6} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'killed (out of memory?)'}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        if "refused" in d:
            print(f"{k:>6} not run: {d['refused']}")
            continue
        rows.append(d)
        print(f"{k:>6} {d['tensors']:>8} {d['read'] / 1e9:>9.1f} {d['seconds']:>8.1f} {d['tensors'] / d['seconds']:>10.2f} "
              f"{d['read'] / 1e9 / d['seconds']:>10.2f} {d['peak_rss'] / 2**30:>13.2f} {d['baseline_rss'] / 2**30:>13.2f} "
              f"{d['predicted'] / 2**30:>14.2f}")
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        per_layer = (hi["seconds"] - lo["seconds"]) / max(1, hi["layers"] - lo["layers"])
        fixed = max(0.0, lo["seconds"] - per_layer * lo["layers"])
        full = fixed + per_layer * full_layers
        spread = max(r["peak_rss"] for r in rows) - min(r["peak_rss"] for r in rows)
        print(f"# peak RSS across {lo['layers']}..{hi['layers']} layers varies by {spread / 2**30:.2f} GiB "
              f"({'flat: bounded by the largest tensor and the budget' if spread < 0.15 * hi['peak_rss'] else 'NOT flat'})")
        print(f"# per layer {per_layer:.1f} s (+{fixed:.1f} s outside the layers): projected full {full_layers}-layer merge "
              f"{full / 60:.1f} min on this machine ({VirtualCheckpoint.llama(a.preset).parameters / 1e9:.1f} B parameters per model)")


if __name__ == "__main__":
    main()

"""Merge speed and memory against the I/O floor, measured in the same run.

Builds N checkpoints with the tensor shapes of a Llama-style transformer (default 4 x ~1 GB fp32), then
measures, each in a fresh subprocess:
  * the I/O floor: read every input file once + write one output-sized file (with fsync, as the merge does);
  * `soup merge` for linear, ties and slerp: wall time, peak RSS above the process baseline.
and prints the ratios to the floor. Inputs are read from the page cache in every measurement (they are
warmed first), so the ratios compare like with like.

    python benchmarks/merge_speed.py                   # 4 x ~1 GB
    python benchmarks/merge_speed.py --size-gb 0.25    # quicker
    python benchmarks/merge_speed.py --dir /tmp/b --reuse --cases ties   # one method, checkpoints kept
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, os, sys, time
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
import torch, modelsoup  # imports are part of the baseline
from modelsoup import merge
args = json.loads(sys.argv[1])
base_rss = rss_mb()
t0 = time.perf_counter()
if args["what"] == "floor":
    buf = bytearray(64 << 20)
    for p in args["inputs"]:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    fd = os.open(args["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = args["out_bytes"]
    while left > 0:
        left -= os.write(fd, memoryview(buf)[: min(left, len(buf))])
    os.fsync(fd); os.close(fd)
else:
    kw = {"base": args["base"]} if args.get("base") else {}
    merge(models=args["inputs"], output=args["output"], method=args["what"], parameters=args.get("params") or {},
          progress=False, hash_files=args["hash"], workers=args.get("workers"), **kw)
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would include the parent's peak.
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": dt, "peak_rss_mb": peak, "baseline_rss_mb": base_rss}))
"""


def shapes(target_bytes: float, hidden: int = 2048, ffn: int = 5632, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-style model with as many layers as fit ``target_bytes`` (fp32)."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((target_bytes / 4 - 2 * vocab * hidden) / per_layer))
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        out[p + "mlp.gate_proj.weight"] = (ffn, hidden)
        out[p + "mlp.up_proj.weight"] = (ffn, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, ffn)
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def build(folder: Path, n: int, target_bytes: float, dtype: torch.dtype) -> list[Path]:
    spec = shapes(target_bytes)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for name, shape in spec.items():
            base = torch.randn(shape, generator=torch.Generator().manual_seed(hash(name) % (2**31)))
            sd[name] = (base + 0.01 * torch.randn(shape, generator=g)).to(dtype)
        p = folder / f"ft-{i}.safetensors"
        save_file(sd, p)
        paths.append(p)
        del sd
    return paths


def run_child(args: dict) -> dict:
    env = dict(os.environ)
    if not args.get("hash_cache"):  # a fresh input-hash cache: the merge hashes every input, as a first run does
        env["MODELSOUP_CACHE_DIR"] = tempfile.mkdtemp(prefix="soup-hash-cache-")
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=2, help="take the best of this many runs per measurement")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cases", nargs="+", choices=["linear", "ties", "slerp"], default=["linear", "ties", "slerp"], help="methods to measure")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already built in --dir (same count and size)")
    a = ap.parse_args()
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="soup-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    itemsize = torch.empty((), dtype=dtype).element_size()
    target = a.size_gb * 1e9 * 4 / itemsize  # shapes() counts fp32 bytes
    built = [scratch / f"ft-{i}.safetensors" for i in range(a.models)]
    expected = sum(math.prod(s) for s in shapes(target).values()) * itemsize
    if a.reuse and all(p.exists() and expected < p.stat().st_size < expected + (1 << 20) for p in built):
        inputs = built
    else:
        inputs = build(scratch, a.models, target, dtype)
    in_bytes = sum(p.stat().st_size for p in inputs)
    out_bytes = inputs[0].stat().st_size
    print(f"{'reused' if inputs is built else 'built'} {a.models} checkpoints of {out_bytes / 1e9:.2f} GB ({a.dtype}) in {time.perf_counter() - t0:.0f} s in {scratch}")
    run_child({"what": "floor", "inputs": [str(p) for p in inputs], "output": str(scratch / "warm.bin"), "out_bytes": out_bytes})  # warm the page cache

    def best(args: dict) -> dict:
        runs = []
        for _ in range(a.repeats):
            out = scratch / "out"
            shutil.rmtree(out, ignore_errors=True)
            (scratch / "floor.bin").unlink(missing_ok=True)
            runs.append(run_child(args))
        shutil.rmtree(scratch / "out", ignore_errors=True)
        return min(runs, key=lambda r: r["seconds"]) | {"peak_over_baseline_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs)}

    common = {"inputs": [str(p) for p in inputs], "workers": a.workers}
    floors: dict[int, dict] = {}

    def floor_for(ins: list[str]) -> dict:
        """The I/O floor of a merge reading these inputs (each case is compared with its own)."""
        if len(ins) not in floors:
            floors[len(ins)] = best({"what": "floor", "output": str(scratch / "floor.bin"), "out_bytes": out_bytes, "inputs": ins})
            rows.append((f"I/O floor: read {len(ins)} inputs + write the output", floors[len(ins)], None))
        return floors[len(ins)]

    rows: list[tuple[str, dict, float | None]] = []
    cases = [
        ("linear", {}, None, True),
        ("linear (input hashes cached, as on a rerun)", {}, None, "cached"),
        ("linear (no hashing)", {}, None, False),
        ("ties density=0.5", {"density": 0.5}, str(inputs[0]), True),
        ("slerp t=0.5", {"t": 0.5}, None, True),
    ]
    for label, params, base, hashing in cases:
        method = label.split()[0]
        if method not in a.cases:
            continue
        ins = common["inputs"][1:] if base else common["inputs"]
        if method == "slerp":
            ins = common["inputs"][:2]
        floor = floor_for(ins + ([base] if base else []))  # a base is read too
        r = best({"what": method, "inputs": ins, "base": base, "params": params, "output": str(scratch / "out"), "hash": bool(hashing),
                  "hash_cache": hashing == "cached", "workers": a.workers})
        rows.append((f"soup merge {label}" + (f" ({len(ins)} models)" if method == "slerp" else ""), r, r["seconds"] / floor["seconds"]))
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
    print(f"inputs: {a.models} x {out_bytes / 1e9:.2f} GB {a.dtype} ({in_bytes / 1e9:.2f} GB read, {out_bytes / 1e9:.2f} GB written)")
    print()
    print("| measurement | wall s | ratio to floor | peak RSS above baseline (MB) |")
    print("|---|---:|---:|---:|")
    for label, r, ratio in rows:
        print(f"| {label} | {r['seconds']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} | {r['peak_over_baseline_mb']:.0f} |")
    if a.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

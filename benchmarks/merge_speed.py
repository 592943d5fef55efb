"""Merge speed and memory: against the I/O floor, and against mergekit, each measured in the same run.

Two tables, each measurement in a fresh process:

``floor``: builds N checkpoints with the tensor shapes of a Llama-style transformer (default 4 x ~1 GB fp32)
and measures
  * the I/O floor: read every input file once + write one output-sized file (with fsync, as the merge does);
  * `soup merge` for linear, ties and slerp: wall time, peak RSS above the process baseline;
and prints the ratios to the floor.

``mergekit``: builds N Hugging Face folders (config.json of a LlamaForCausalLM + model.safetensors; default
4 x ~0.25 GB fp32, at least 4 layers), writes five mergekit recipes (linear; ties density 0.5; slerp t 0.5;
della density 0.6 epsilon 0.1; a passthrough frankenmerge of layers [0, 3) of one model and [1, 4) of
another), plus a start-up row (a linear merge of 4 tiny models: what a run costs before any real work), and
runs each with both tools, interleaved (soup, mergekit, soup, mergekit, ...):
  * `soup merge RECIPE OUT --no-progress -q` (the recipe unchanged; a fresh input-hash cache every run);
  * `mergekit-yaml RECIPE OUT --no-write-model-card --no-copy-tokenizer --quiet` with HF_HUB_OFFLINE=1;
  della gets `--random-seed 0` on both sides. It reports the median whole-process wall time and peak RSS of
  each tool, the speed-up (mergekit s / modelsoup s), and whether the two outputs agree: same tensor names
  and shapes, and for the deterministic recipes a max abs difference below 1e-5 over all tensors. DELLA's
  masks are random and the tools draw them differently, so only names and shapes are compared there.
  The table is skipped, with a note, when mergekit-yaml is not found (--mergekit, then PATH, then
  /work/mkenv/bin/mergekit-yaml).

Inputs are read from the page cache in every measurement (they are warmed first), so the figures compare like
with like.

    python benchmarks/merge_speed.py                   # both tables
    python benchmarks/merge_speed.py --size-gb 0.25    # quicker (both tables at 4 x 0.25 GB)
    python benchmarks/merge_speed.py --dir /tmp/b --reuse --cases ties   # one method, checkpoints kept
    python benchmarks/merge_speed.py --tables mergekit --repeats 3 --mergekit /opt/mk/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
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

# Times one whole command: posix_spawn it, wait4 for it, write wall seconds and its ru_maxrss to argv[1].
# The wrapper is a bare interpreter (~10 MB), so the peak the kernel carries over from it into the command
# at exec is ~10 MB; the benchmark's own process (torch, the checkpoints it built) is never carried over.
TIMED = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
dt = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": dt, "peak_rss_mb": ru.ru_maxrss / 1024, "rc": os.waitstatus_to_exitcode(status)}, f)
"""

MERGEKIT_FALLBACK = "/work/mkenv/bin/mergekit-yaml"
MERGEKIT_FLAGS = ["--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
TINY = (64, 176, 256, 4)  # hidden, ffn, vocab, layers of the start-up row's models (~1 MB each)
AGREE_TOL = 1e-5  # max abs difference of any output tensor, deterministic recipes


def dims(target_bytes: float, min_layers: int = 1, hidden: int = 2048, vocab: int = 32000) -> tuple[int, int, int, int]:
    """(hidden, ffn, vocab, layers) of a Llama-style model with as many layers as fit ``target_bytes`` (fp32).

    ffn is 2.75 x hidden, as in Llama-1B-class models. Where fewer than ``min_layers`` layers fit at the given
    hidden size, the hidden size shrinks in steps of 128 until they do (down to 128).
    """
    while True:
        ffn = hidden * 11 // 4
        per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
        layers = round((target_bytes / 4 - 2 * vocab * hidden) / per_layer)
        if layers >= min_layers or hidden <= 128:
            return hidden, ffn, vocab, max(min_layers, layers, 1)
        hidden -= 128


def shapes(size: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-style model of ``size`` = (hidden, ffn, vocab, layers), as ``dims`` gives."""
    hidden, ffn, vocab, layers = size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
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


def model_tensors(spec: dict[str, tuple[int, ...]], i: int, dtype: torch.dtype, spread: float) -> dict[str, torch.Tensor]:
    """Model ``i``: a base shared by all models, N(0, 0.02) as a Llama's weights (seeded by the tensor name),
    plus ``spread`` x 0.02 x its own N(0, 1)."""
    g = torch.Generator().manual_seed(1000 + i)
    sd = {}
    for name, shape in spec.items():
        base = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        sd[name] = (0.02 * (base + spread * torch.randn(shape, generator=g))).to(dtype)
    return sd


def build(folder: Path, n: int, target_bytes: float, dtype: torch.dtype) -> list[Path]:
    spec = shapes(dims(target_bytes))
    paths = []
    for i in range(n):
        p = folder / f"ft-{i}.safetensors"
        save_file(model_tensors(spec, i, dtype, 0.01), p)
        paths.append(p)
    return paths


def llama_config(size: tuple[int, int, int, int], dtype: str) -> dict:
    """config.json of a LlamaForCausalLM with the shapes of ``shapes(size)``."""
    hidden, ffn, vocab, layers = size
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": ffn, "max_position_embeddings": 2048, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": heads,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": dtype, "use_cache": True, "vocab_size": vocab,
    }


def build_hf(folder: Path, n: int, size: tuple[int, int, int, int], dtype: torch.dtype, dtype_name: str, reuse: bool) -> list[Path]:
    """N model folders ``folder/m{i}`` that mergekit and transformers accept (config.json + model.safetensors).

    The spread is 0.05 (not 0.01): two models then sit ~0.997 apart in cosine, below mergekit's slerp
    colinearity threshold (0.9995), so slerp takes its real branch rather than falling back to lerp.
    """
    spec = shapes(size)
    config = json.dumps(llama_config(size, dtype_name), indent=2) + "\n"
    expected = sum(math.prod(s) for s in spec.values()) * torch.empty((), dtype=dtype).element_size()
    dirs = [folder / f"m{i}" for i in range(n)]
    for i, d in enumerate(dirs):
        st, cfg = d / "model.safetensors", d / "config.json"
        if reuse and st.exists() and expected < st.stat().st_size < expected + (1 << 20) and cfg.exists() and cfg.read_text() == config:
            continue
        d.mkdir(parents=True, exist_ok=True)
        save_file(model_tensors(spec, i, dtype, 0.05), st, metadata={"format": "pt"})
        cfg.write_text(config, encoding="utf-8")
    return dirs


def warm(paths: list[Path]) -> None:
    """Read every file once, so that every measurement reads its inputs from the page cache."""
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_child(args: dict) -> dict:
    env = dict(os.environ)
    if not args.get("hash_cache"):  # a fresh input-hash cache: the merge hashes every input, as a first run does
        env["MODELSOUP_CACHE_DIR"] = tempfile.mkdtemp(prefix="soup-hash-cache-")
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def floor_table(a: argparse.Namespace, scratch: Path, size_gb: float) -> None:
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    itemsize = torch.empty((), dtype=dtype).element_size()
    target = size_gb * 1e9 * 4 / itemsize  # shapes() counts fp32 bytes
    built = [scratch / f"ft-{i}.safetensors" for i in range(a.models)]
    expected = sum(math.prod(s) for s in shapes(dims(target)).values()) * itemsize
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
    print()


# ----------------------------------------------------------------------------------------------------------
# Against mergekit


def find_mergekit(given: str | None) -> str | None:
    """The mergekit-yaml to run: --mergekit, else the one on PATH, else MERGEKIT_FALLBACK; None if absent."""
    for cand in ([given] if given else [shutil.which("mergekit-yaml"), MERGEKIT_FALLBACK]):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    return None


def find_soup() -> str:
    """The `soup` script of the interpreter running this benchmark (else the one on PATH)."""
    here = Path(sys.executable).parent / "soup"
    found = str(here) if here.exists() else shutil.which("soup")
    if not found:
        raise SystemExit("no `soup` command next to this python or on PATH: install modelsoup into this environment")
    return os.path.abspath(found)


def mergekit_recipes(models: list[Path], tiny: list[Path]) -> dict[str, tuple[dict, bool]]:
    """name -> (mergekit recipe, deterministic?). m0 is the base of the task-vector methods.

    The first, a linear merge of tiny models, measures what a run costs before any real work: the
    interpreter, the imports, parsing the recipe, writing a small output.
    """
    base, fts = str(models[0]), [str(m) for m in models[1:]]

    def listing(names: list[str], **params: float) -> list[dict]:
        return [{"model": m, "parameters": dict(params)} for m in names]

    def layers(model: Path, start: int, end: int) -> dict:
        return {"sources": [{"model": str(model), "layer_range": [start, end]}]}

    return {
        f"start-up: linear of {len(tiny)} tiny models": ({"models": listing([str(m) for m in tiny], weight=1.0),
                                                          "merge_method": "linear"}, True),
        "linear": ({"models": listing([str(m) for m in models], weight=1.0), "merge_method": "linear"}, True),
        "ties density=0.5": ({"models": listing(fts, density=0.5, weight=1.0), "base_model": base, "merge_method": "ties"}, True),
        "slerp t=0.5": ({"models": [{"model": base}, {"model": fts[0]}], "base_model": base, "merge_method": "slerp",
                         "parameters": {"t": 0.5}}, True),
        "della density=0.6 epsilon=0.1": ({"models": listing(fts, density=0.6, epsilon=0.1, weight=1.0), "base_model": base,
                                           "merge_method": "della"}, False),
        "slices: layers [0,3) + [1,4)": ({"slices": [layers(models[1], 0, 3), layers(models[2], 1, 4)],
                                          "merge_method": "passthrough"}, True),
    }


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of ``cmd`` as one whole process; its output goes to ``log``."""
    result = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", TIMED, str(result), *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, check=True)
    r = json.loads(result.read_text())
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {r['rc']}:\n{log.read_text()[-3000:]}")
    return r


def load_outputs(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (shard, shape) of every tensor in a folder's *.safetensors."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                found[k] = (shard, tuple(f.get_slice(k).get_shape()))
    if not found:
        raise SystemExit(f"no safetensors output in {folder}: {sorted(p.name for p in folder.iterdir())}")
    return found


def agreement(soup_out: Path, mk_out: Path, compare_values: bool) -> str:
    """Whether the two output folders hold the same tensors (names, shapes, layer count, and values)."""
    a, b = load_outputs(soup_out), load_outputs(mk_out)
    layers = [json.loads((d / "config.json").read_text()).get("num_hidden_layers") for d in (soup_out, mk_out)]
    if a.keys() != b.keys():
        return f"DIFFERENT names: only modelsoup {sorted(a.keys() - b.keys())[:3]}, only mergekit {sorted(b.keys() - a.keys())[:3]}"
    bad = [k for k in a if a[k][1] != b[k][1]]
    if bad:
        return f"DIFFERENT shapes: {bad[0]} {a[bad[0]][1]} vs {b[bad[0]][1]}"
    if layers[0] != layers[1]:
        return f"DIFFERENT config num_hidden_layers: {layers[0]} vs {layers[1]}"
    what = f"{len(a)} tensors, {layers[0]} layers"
    if not compare_values:
        return f"same names and shapes ({what}); values random, not compared"
    worst, worst_name, scale, off, total = 0.0, "", 0.0, 0, 0
    for k in sorted(a):
        with safe_open(str(a[k][0]), framework="pt") as fa, safe_open(str(b[k][0]), framework="pt") as fb:
            x, y = fa.get_tensor(k).double(), fb.get_tensor(k).double()
        d = (x - y).abs()
        m = d.max().item()
        off += int((~(d < AGREE_TOL)).sum())  # a NaN counts as off
        total += d.numel()
        scale = max(scale, y.abs().max().item())
        if not m <= worst:
            worst, worst_name = m, k
    if off == 0:
        return f"agree: max abs diff {worst:.1e} ({what}; largest |value| {scale:.2f})"
    return f"DIFFER: max abs diff {worst:.1e} at {worst_name}; {off} of {total} values off by >= {AGREE_TOL:g} ({what})"


def mergekit_table(a: argparse.Namespace, scratch: Path, size_gb: float, mergekit: str) -> None:
    if a.models < 3:
        raise SystemExit("the mergekit table needs --models 3 or more (the slices recipe takes layers from m1 and m2)")
    dtype = getattr(torch, a.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    target = size_gb * 1e9 * 4 / itemsize
    t0 = time.perf_counter()
    folder = scratch / f"hf-{a.dtype}-{size_gb:g}gb"
    size = dims(target, min_layers=4)
    models = build_hf(folder, a.models, size, dtype, a.dtype, a.reuse)
    tiny = build_hf(scratch / f"hf-{a.dtype}-tiny", a.models, TINY, dtype, a.dtype, a.reuse)
    model_bytes = (models[0] / "model.safetensors").stat().st_size
    hidden, ffn, vocab, layers = size
    print(f"{a.models} model folders of {model_bytes / 1e9:.2f} GB ({a.dtype}; hidden {hidden}, ffn {ffn}, vocab {vocab}, "
          f"{layers} layers) ready in {time.perf_counter() - t0:.0f} s in {folder}")
    warm([m / "model.safetensors" for m in models + tiny])
    recipes_dir = scratch / "recipes"
    recipes_dir.mkdir(exist_ok=True)
    soup = find_soup()
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    print(f"modelsoup: {soup}\nmergekit:  {mergekit}\n")
    rows = []
    for name, (spec, deterministic) in mergekit_recipes(models, tiny).items():
        key = name.split()[0].rstrip(":-").replace("-", "")
        if key not in a.recipes:
            continue
        recipe = recipes_dir / f"{key}.yml"
        recipe.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        seed = [] if deterministic else ["--random-seed", "0"]
        outs = {"modelsoup": scratch / "out-modelsoup", "mergekit": scratch / "out-mergekit"}
        cmds = {
            "modelsoup": [soup, "merge", str(recipe), str(outs["modelsoup"]), "--no-progress", "-q", *seed],
            "mergekit": [mergekit, str(recipe), str(outs["mergekit"]), *MERGEKIT_FLAGS, *seed],
        }
        runs: dict[str, list[dict]] = {"modelsoup": [], "mergekit": []}
        for rep in range(a.repeats):
            for tool in ("modelsoup", "mergekit"):  # interleaved, so drift in the machine's speed hits both alike
                shutil.rmtree(outs[tool], ignore_errors=True)
                env = dict(base_env)
                if tool == "modelsoup":  # a fresh input-hash cache: every input is hashed, as on a first run
                    env["MODELSOUP_CACHE_DIR"] = tempfile.mkdtemp(prefix="soup-hash-cache-", dir=scratch)
                r = timed(cmds[tool], env, scratch / f"{tool}.log")
                if tool == "modelsoup":
                    shutil.rmtree(env["MODELSOUP_CACHE_DIR"], ignore_errors=True)
                runs[tool].append(r)
                print(f"  {name:36s} {tool:9s} run {rep + 1}: {r['seconds']:6.2f} s  {r['peak_rss_mb']:6.0f} MiB", flush=True)
        agree = agreement(outs["modelsoup"], outs["mergekit"], deterministic)
        print(f"  {name:36s} outputs: {agree}", flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        med = {t: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")} for t, rs in runs.items()}
        spread = {t: (min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)) for t, rs in runs.items()}
        rows.append((name, med, spread, agree))
    shutil.rmtree(recipes_dir, ignore_errors=True)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
    print(f"inputs: {a.models} HF folders of {model_bytes / 1e9:.2f} GB {a.dtype}; whole process each run, median of {a.repeats}"
          " (min-max); peak RSS = ru_maxrss of the process")
    print()
    print("| recipe | modelsoup wall s | mergekit wall s | speed-up (mergekit s / modelsoup s) | modelsoup peak RSS MiB | mergekit peak RSS MiB | outputs |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, med, spread, agree in rows:
        s, m = med["modelsoup"], med["mergekit"]
        cells = [f"{s['seconds']:.2f} ({spread['modelsoup'][0]:.2f}-{spread['modelsoup'][1]:.2f})",
                 f"{m['seconds']:.2f} ({spread['mergekit'][0]:.2f}-{spread['mergekit'][1]:.2f})",
                 f"{m['seconds'] / s['seconds']:.2f}x", f"{s['peak_rss_mb']:.0f}", f"{m['peak_rss_mb']:.0f}", agree]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", nargs="+", choices=["floor", "mergekit"], default=["floor", "mergekit"], help="which tables to measure")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=None,
                    help="size of each checkpoint (default: 1.0 for the floor table, 0.25 for the mergekit table)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per measurement: the floor table keeps the best, the mergekit table the median")
    ap.add_argument("--workers", type=int, default=None, help="threads of the floor table's merges")
    ap.add_argument("--cases", nargs="+", choices=["linear", "ties", "slerp"], default=["linear", "ties", "slerp"], help="methods of the floor table")
    recipes = ["startup", "linear", "ties", "slerp", "della", "slices"]
    ap.add_argument("--recipes", nargs="+", choices=recipes, default=recipes, help="recipes of the mergekit table")
    ap.add_argument("--mergekit", default=None, metavar="PATH",
                    help=f"mergekit-yaml to compare with (default: the one on PATH, else {MERGEKIT_FALLBACK}); the table is skipped if absent")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already built in --dir (same count and size)")
    a = ap.parse_args()
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="soup-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if "floor" in a.tables:
        floor_table(a, scratch, a.size_gb or 1.0)
    if "mergekit" in a.tables:
        mergekit = find_mergekit(a.mergekit)
        if mergekit is None:
            where = a.mergekit or f"PATH or {MERGEKIT_FALLBACK}"
            print(f"mergekit table skipped: no mergekit-yaml at {where} (give --mergekit /path/to/mergekit-yaml)")
        else:
            mergekit_table(a, scratch, a.size_gb or 0.25, mergekit)
    if a.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

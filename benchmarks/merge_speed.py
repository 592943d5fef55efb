"""Merge speed and memory: against the I/O floor, and against mergekit, each measured in the same run (issue 17).

Every measurement is one whole process: posix_spawn'ed by a bare-interpreter wrapper, which takes the wall time
from spawn to exit and the peak RSS from wait4's ru_maxrss. Inputs are read from the page cache in every
measurement (they are warmed first), so the figures compare like with like.

``floor``: for each dtype of --dtypes (default float32 and bfloat16) builds 4 safetensors checkpoints of
~--size-gb (default 1.0) GB each, with the tensor shapes of a Llama-style transformer (a bfloat16 checkpoint
has the same byte size, so twice the parameters). Input 0 is the base of the task-vector methods, inputs 1-3
its fine-tunes. Each merge is compared with the floors of the same number of inputs read:
  * floor A: a process that imports torch, reads every tensor of each input once through safetensors
    (``safe_open``, ``get_tensor`` of every key), then os.write's an output-sized file to the page cache
    (no fsync). What it writes is the raw bytes of the tensors of the last input it read (held from its
    read; at most one input is held), padded with zeros to the output's size (the header's share);
  * floor B: the same, and it fsyncs the file before closing it (as `soup merge` does its output);
  * `soup merge RECIPE -o OUT --no-progress -q` (the `soup` next to this python), one native recipe per
    method: linear (4 models), task_arithmetic (base + 3), ema decay=0.9 (4), WiSE-FT (linear of the base and
    one model, weights [0.5, 0.5]), ties density=0.5, dare_ties density=0.5 seed=0, breadcrumbs (defaults),
    della density=0.6 epsilon=0.1 seed=0 (each base + 3), slerp t=0.5 and nuslerp (2 models), multislerp and
    karcher (4 models).
    Hashing: these rows run with `--no-hash`, like for like with the floors, which hash nothing. Linear has two
    more rows with the default hashing (the sha256 of every input and output file, for the manifest): with a
    warm input-hash cache (a rerun: only the output is hashed) and with a fresh cache (every input hashed too).
  * with --device cuda, where torch.cuda.is_available(): linear and ties again with `--device cuda`.
Each row gives the median wall time of --repeats runs (min-max), its ratios to floor A and floor B, its peak
RSS above the baseline (the largest ru_maxrss of its runs minus the VmRSS of a process that has just run
`import torch, modelsoup.api`, measured once per table; the floors, which import only torch, get the same
subtraction), and issue 17's targets: linear family (linear, task_arithmetic, ema,
WiSE-FT) <= 1.15x floor B; ties, dare_ties, breadcrumbs, della <= 1.8x floor B; slerp and the sphere methods
<= 1.3x floor B; peak RSS <= 1.5 GiB (1536 MiB) above the baseline.
Runs are interleaved: each round runs every measurement once, in the table's order, and there are --repeats
rounds, so drift in the machine's speed hits all rows alike.

``mergekit``: builds N Hugging Face folders (config.json of a LlamaForCausalLM + model.safetensors; default
4 x ~1.3 GB bfloat16, at least 4 layers, large enough that start-up is not most of a run), writes five
mergekit recipes (linear; ties density 0.5; slerp t 0.5; della density 0.6 epsilon 0.1; a passthrough
frankenmerge of layers [0, 3) of one model and [1, 4) of another), plus a start-up row (a linear merge of 4
tiny models: what a run costs before any real work), and runs each with both tools, interleaved (soup,
mergekit, soup, mergekit, ...):
  * `soup merge RECIPE OUT --no-progress -q` (the recipe unchanged; a fresh input-hash cache every run);
  * `mergekit-yaml RECIPE OUT --no-write-model-card --no-copy-tokenizer --quiet` with HF_HUB_OFFLINE=1;
  della gets `--random-seed 0` on both sides. It reports the median whole-process wall time (min-max) and
  peak RSS of each tool, the speed-up (mergekit s / modelsoup s) against issue 17's targets (linear >= 2x,
  ties >= 8x), and whether the two outputs agree: same tensor names and shapes, and for the deterministic
  recipes a max abs difference below 1e-5 over all float32 tensors (half-precision outputs: below 1e-5 or at most one rounding
  step of the output dtype, since the tools round different float32 sums). DELLA's masks are random and the tools draw them
  differently, so only names and shapes are compared there.
  The table is skipped, with a note, when mergekit-yaml is not found (--mergekit, then PATH, then
  /work/mkenv/bin/mergekit-yaml).

    python benchmarks/merge_speed.py                   # both tables, issue 17's sizes (long: tens of minutes)
    python benchmarks/merge_speed.py --tables floor --dtypes bfloat16 --size-gb 0.25 --repeats 3   # quicker
    python benchmarks/merge_speed.py --dir /tmp/b --reuse --cases linear ties   # some rows, checkpoints kept
    python benchmarks/merge_speed.py --tables floor --device cuda   # adds GPU rows where CUDA is available
    python benchmarks/merge_speed.py --tables mergekit --repeats 3 --mergekit /opt/mk/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

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

# The I/O floor, one whole process: argv = OUT OUT_BYTES fsync|nofsync INPUT...
# It holds the tensors of one input at a time and writes those of the last one (then zeros up to OUT_BYTES).
FLOOR = r"""
import os, sys
import torch
from safetensors import safe_open
out, out_bytes, mode, *inputs = sys.argv[1:]
held = []
for p in inputs:
    held.clear()
    with safe_open(p, framework="pt") as f:
        for k in f.keys():
            held.append(f.get_tensor(k))
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = int(out_bytes)
for t in held:
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())[:left]
    while view:
        n = os.write(fd, view)
        view, left = view[n:], left - n
while left > 0:
    left -= os.write(fd, bytes(min(left, 1 << 20)))
if mode == "fsync":
    os.fsync(fd)
os.close(fd)
"""

# The RSS a merge starts from: a process that has imported torch and modelsoup, and nothing more.
BASELINE = r"""
import torch, modelsoup.api
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024)
"""

MERGEKIT_FALLBACK = "/work/mkenv/bin/mergekit-yaml"
MERGEKIT_FLAGS = ["--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
TINY = (64, 176, 256, 4)  # hidden, ffn, vocab, layers of the start-up row's models (~1 MB each)
AGREE_TOL = 1e-5  # max abs difference of any float32 output value, deterministic recipes
AGREE_ULPS = 1  # half-precision outputs: at most one rounding step of the output dtype apart (the tools round different float32 sums)
HALF_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
FLOOR_MODELS = 4  # inputs of the floor table: the base (input 0) and 3 fine-tunes
# Issue 17's targets: wall time as a multiple of floor B, by method family; peak RSS above the baseline.
FLOOR_TARGETS = {"linear": 1.15, "ties": 1.8, "sphere": 1.3}
RSS_TARGET_MIB = 1536  # 1.5 GiB
MERGEKIT_TARGETS = {"linear": 2.0, "ties": 8.0}  # speed-up over mergekit, at least


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


def fp32_bytes(size_gb: float, dtype: torch.dtype) -> float:
    """The fp32 byte count ``dims`` is given for a checkpoint of ``size_gb`` GB in ``dtype``."""
    return size_gb * 1e9 * 4 / torch.empty((), dtype=dtype).element_size()


def build(folder: Path, n: int, size: tuple[int, int, int, int], dtype: torch.dtype, reuse: bool) -> tuple[list[Path], bool]:
    """N checkpoints ``folder/ft-{i}.safetensors`` of ``shapes(size)``; with ``reuse``, ones of the right size are kept.

    Returns the paths and whether all of them were reused.
    """
    spec = shapes(size)
    expected = sum(math.prod(s) for s in spec.values()) * torch.empty((), dtype=dtype).element_size()
    paths = [folder / f"ft-{i}.safetensors" for i in range(n)]
    if reuse and all(p.exists() and expected < p.stat().st_size < expected + (1 << 20) for p in paths):
        return paths, True
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        save_file(model_tensors(spec, i, dtype, 0.01), p)
    return paths, False


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


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of ``cmd`` as one whole process; its output goes to ``log``.

    A command that exits non-zero ends the benchmark with the tail of its output.
    """
    result = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", TIMED, str(result), *cmd], stdout=out, stderr=subprocess.STDOUT, env=env, check=True)
    r = json.loads(result.read_text())
    if r["rc"] != 0:
        raise SystemExit(f"{shlex.join(cmd)} exited with {r['rc']}:\n{log.read_text()[-3000:]}")
    return r


def find_soup() -> str:
    """The `soup` script of the interpreter running this benchmark (else the one on PATH)."""
    here = Path(sys.executable).parent / "soup"
    found = str(here) if here.exists() else shutil.which("soup")
    if not found:
        raise SystemExit("no `soup` command next to this python or on PATH: install modelsoup into this environment")
    return os.path.abspath(found)


def baseline_rss_mb() -> float:
    """VmRSS (MiB) of a process that has just imported torch and modelsoup: what a merge's peak is counted from."""
    res = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"the baseline process failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def machine_line() -> str:
    """Cores, memory, torch, python and the date: what a reader needs to compare two runs of this script."""
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(next(l.split()[1] for l in f if l.startswith('MemTotal:'))) / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores{mem}, torch {torch.__version__}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def command_line() -> str:
    return "command: " + shlex.join([sys.executable, *sys.argv])


def spread(values: list[float]) -> str:
    """Median with (min-max), seconds."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


# ----------------------------------------------------------------------------------------------------------
# Against the I/O floor


@dataclass
class Measurement:
    """One row of the floor table: a floor (``recipe`` None) or a `soup merge` of ``recipe``."""

    key: str  # the --cases name (a floor: "floor")
    label: str
    reads: int  # input files read: the row's floors are those of this count
    recipe: dict | None = None
    family: str | None = None  # key of FLOOR_TARGETS
    hashing: str = "cached"  # cached (warm hash cache) | fresh (a new cache every run) | off (--no-hash)
    flags: list[str] = field(default_factory=list)
    fsync: bool = True  # floors only: floor B (True) or floor A
    recipe_path: Path | None = None  # where the recipe was written
    runs: list[dict] = field(default_factory=list)


def method_rows(inputs: list[Path]) -> list[Measurement]:
    """The `soup merge` rows of the floor table, in table order; input 0 is the base of the task-vector methods."""
    p = [str(x) for x in inputs]
    base, fts = p[0], p[1:4]

    def row(key: str, label: str, family: str, recipe: dict, hashing: str = "off", flags: tuple[str, ...] = ()) -> Measurement:
        reads = len(recipe["models"]) + ("base" in recipe)
        return Measurement(key, label, reads, recipe, family, hashing, list(flags))

    linear = {"method": "linear", "models": p}
    ties = {"method": "ties", "base": base, "models": fts, "parameters": {"density": 0.5}}
    return [
        row("linear", "linear, 4 models", "linear", linear),
        row("linear", "linear, 4 models, hashed: output sha256, input hashes cached (a rerun)", "linear", linear, hashing="cached"),
        row("linear", "linear, 4 models, hashed: fresh hash cache (every input hashed, as a first run)", "linear", linear, hashing="fresh"),
        row("task_arithmetic", "task_arithmetic, base + 3", "linear", {"method": "task_arithmetic", "base": base, "models": fts}),
        row("ema", "ema decay=0.9, 4 models", "linear", {"method": "ema", "models": p, "parameters": {"decay": 0.9}}),
        row("wise_ft", "WiSE-FT: linear of base + 1 model, weights [0.5, 0.5]", "linear",
            {"method": "linear", "models": [{"path": base, "weight": 0.5}, {"path": fts[0], "weight": 0.5}]}),
        row("ties", "ties density=0.5, base + 3", "ties", ties),
        row("dare_ties", "dare_ties density=0.5 seed=0, base + 3", "ties",
            {"method": "dare_ties", "base": base, "models": fts, "parameters": {"density": 0.5}, "seed": 0}),
        row("breadcrumbs", "breadcrumbs (defaults), base + 3", "ties", {"method": "breadcrumbs", "base": base, "models": fts}),
        row("della", "della density=0.6 epsilon=0.1 seed=0, base + 3", "ties",
            {"method": "della", "base": base, "models": fts, "parameters": {"density": 0.6, "epsilon": 0.1}, "seed": 0}),
        row("slerp", "slerp t=0.5, 2 models", "sphere", {"method": "slerp", "models": p[:2], "parameters": {"t": 0.5}}),
        row("nuslerp", "nuslerp, 2 models (equal weights: t=0.5)", "sphere", {"method": "nuslerp", "models": p[:2]}),
        row("multislerp", "multislerp, 4 models", "sphere", {"method": "multislerp", "models": p}),
        row("karcher", "karcher, 4 models", "sphere", {"method": "karcher", "models": p}),
        row("linear", "linear, 4 models, `--device cuda`", "linear", linear, flags=("--device", "cuda")),
        row("ties", "ties density=0.5, base + 3, `--device cuda`", "ties", ties, flags=("--device", "cuda")),
    ]


CASES = ["linear", "task_arithmetic", "ema", "wise_ft", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "nuslerp",
         "multislerp", "karcher"]


def target_cell(m: Measurement, ratio_b: float, over_mb: float) -> str:
    """Issue 17's targets for a row, and whether this run met them."""
    if m.family is None:
        return ""
    limit = FLOOR_TARGETS[m.family]
    return (f"<= {limit:g}x B: {'met' if ratio_b <= limit else 'MISSED'}; "
            f"<= {RSS_TARGET_MIB} MiB: {'met' if over_mb <= RSS_TARGET_MIB else 'MISSED'}")


def floor_table(a: argparse.Namespace, scratch: Path, size_gb: float, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    folder = scratch / f"floor-{dtype_name}-{size_gb:g}gb"
    size = dims(fp32_bytes(size_gb, dtype))
    inputs, reused = build(folder, FLOOR_MODELS, size, dtype, a.reuse)
    out_bytes = inputs[0].stat().st_size
    hidden, ffn, vocab, layers = size
    print(f"{'reused' if reused else 'built'} {FLOOR_MODELS} checkpoints of {out_bytes / 1e9:.2f} GB ({dtype_name}; hidden {hidden}, "
          f"ffn {ffn}, vocab {vocab}, {layers} layers) in {time.perf_counter() - t0:.0f} s in {folder}", flush=True)

    from modelsoup.methods import available_methods

    known = {m.name for m in available_methods()}
    rows = []
    for m in method_rows(inputs):
        if m.key not in a.cases:
            continue
        if m.recipe["method"] not in known:
            print(f"  {m.label}: skipped, this modelsoup has no method {m.recipe['method']!r}")
            continue
        rows.append(m)
    gpu_note = None
    if a.device == "cuda" and not torch.cuda.is_available():
        gpu_note = "GPU rows skipped: torch.cuda.is_available() is False here (no CUDA)"
    if a.device != "cuda" or gpu_note:
        rows = [m for m in rows if "--device" not in m.flags]
    reads = sorted({m.reads for m in rows}, reverse=True)
    floors = [Measurement("floor", f"floor {ab}: read {n} inputs + write the output{', fsync' if sync else ''}", n, fsync=sync)
              for n in reads for ab, sync in (("A", False), ("B", True))]
    order = floors + rows

    soup = find_soup()
    recipes = scratch / f"recipes-{dtype_name}"
    recipes.mkdir(exist_ok=True)
    # The warm hash cache of the "cached" rows: every input hashed once, untimed, by a linear merge of all 4.
    warm_up = Measurement("linear", "hash warm-up", FLOOR_MODELS, {"method": "linear", "models": [str(p) for p in inputs]})
    for i, m in enumerate([warm_up, *rows]):
        m.recipe_path = recipes / f"{i:02d}-{m.recipe['method']}.yml"
        m.recipe_path.write_text(yaml.safe_dump(m.recipe, sort_keys=False), encoding="utf-8")
    out = scratch / "out"
    floor_out = scratch / "floor.bin"
    hash_cache = scratch / f"hash-cache-{dtype_name}"
    shutil.rmtree(hash_cache, ignore_errors=True)
    workers = ["--workers", str(a.workers)] if a.workers else []

    def command(m: Measurement) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, MODELSOUP_CACHE_DIR=str(hash_cache))
        if m.recipe is None:
            return [sys.executable, "-c", FLOOR, str(floor_out), str(out_bytes), "fsync" if m.fsync else "nofsync",
                    *map(str, inputs[: m.reads])], env
        if m.hashing == "fresh":
            env["MODELSOUP_CACHE_DIR"] = tempfile.mkdtemp(prefix="soup-hash-cache-", dir=scratch)
        flags = ["--no-hash"] if m.hashing == "off" else []
        return [soup, "merge", str(m.recipe_path), "-o", str(out), "--no-progress", "-q", *flags, *workers, *m.flags], env

    def run(m: Measurement) -> dict:
        cmd, env = command(m)
        shutil.rmtree(out, ignore_errors=True)
        floor_out.unlink(missing_ok=True)
        try:
            return timed(cmd, env, scratch / "run.log")
        finally:
            # Removed at once: floor A's dirty pages are dropped rather than written back during the next row.
            shutil.rmtree(out, ignore_errors=True)
            floor_out.unlink(missing_ok=True)
            if env["MODELSOUP_CACHE_DIR"] != str(hash_cache):
                shutil.rmtree(env["MODELSOUP_CACHE_DIR"], ignore_errors=True)

    warm(inputs)
    baseline = baseline_rss_mb()
    run(warm_up)
    for rep in range(a.repeats):
        for m in order:  # round-robin: every measurement once per round, so drift hits all alike
            r = run(m)
            m.runs.append(r)
            print(f"  {dtype_name} round {rep + 1}/{a.repeats}  {m.label:72.72s} {r['seconds']:6.2f} s  {r['peak_rss_mb']:6.0f} MiB", flush=True)
    shutil.rmtree(recipes, ignore_errors=True)
    shutil.rmtree(hash_cache, ignore_errors=True)

    median = {id(m): statistics.median(r["seconds"] for r in m.runs) for m in order}
    floor_of = {(m.reads, m.fsync): median[id(m)] for m in floors}
    print()
    print(machine_line())
    print(command_line())
    print(f"floor table, {dtype_name}: {FLOOR_MODELS} inputs of {out_bytes / 1e9:.2f} GB; whole process each run, spawn to exit; "
          f"median of {a.repeats} interleaved rounds (min-max)")
    print("floor A: import torch, get_tensor every tensor of each input (safetensors), os.write an output-sized file (the last "
          "input's tensor bytes), no fsync; floor B: the same + fsync. Each row's floors read the same number of inputs.")
    print("merge rows: `soup merge RECIPE -o OUT --no-progress -q --no-hash` (like the floors, which hash nothing), except the "
          "two linear rows that say how they hash")
    print(f"peak RSS above baseline: wait4's ru_maxrss (the largest of the runs) minus {baseline:.0f} MiB, the VmRSS of a "
          f"process after `import torch, modelsoup.api` (the floors import only torch)")
    if gpu_note:
        print(gpu_note)
    print()
    print("| measurement | inputs read | wall s, median (min-max) | / floor A | / floor B | peak RSS above baseline (MiB) | issue 17 target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for m in order:
        over = max(r["peak_rss_mb"] for r in m.runs) - baseline
        cells = [m.label, str(m.reads), spread([r["seconds"] for r in m.runs])]
        if m.recipe is None:
            cells += ["", "", f"{over:.0f}", ""]
        else:
            ratio_a, ratio_b = median[id(m)] / floor_of[m.reads, False], median[id(m)] / floor_of[m.reads, True]
            cells += [f"{ratio_a:.2f}x", f"{ratio_b:.2f}x", f"{over:.0f}", target_cell(m, ratio_b, over)]
        print("| " + " | ".join(cells) + " |")
    print()


# ----------------------------------------------------------------------------------------------------------
# Against mergekit


def find_mergekit(given: str | None) -> str | None:
    """The mergekit-yaml to run: --mergekit, else the one on PATH, else MERGEKIT_FALLBACK; None if absent."""
    for cand in ([given] if given else [shutil.which("mergekit-yaml"), MERGEKIT_FALLBACK]):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    return None


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
    worst, worst_name, scale, off, total, worst_ulps = 0.0, "", 0.0, 0, 0, 0.0
    for k in sorted(a):
        with safe_open(str(a[k][0]), framework="pt") as fa, safe_open(str(b[k][0]), framework="pt") as fb:
            xs, ys = fa.get_tensor(k), fb.get_tensor(k)
        x, y = xs.double(), ys.double()
        d = (x - y).abs()
        m = d.max().item()
        if ys.dtype in HALF_MANTISSA:
            # half precision: one rounding step of the output (at the larger of the two values) is the unit, since 1e-5 is
            # below a bf16 step of values near 1; a difference below 1e-5 still agrees, since where the terms of a sum
            # cancel to near zero the tools' float32 sums differ by the terms' rounding, many steps of the tiny result
            big = torch.maximum(torch.maximum(x.abs(), y.abs()), torch.full_like(y, 2.0 ** -126))
            ulps = d / torch.exp2(torch.floor(torch.log2(big)) - HALF_MANTISSA[ys.dtype])
            beyond = ~(d < AGREE_TOL)
            if bool(beyond.any()):
                worst_ulps = max(worst_ulps, float(ulps[beyond].max()))
            off += int((beyond & ~(ulps <= AGREE_ULPS)).sum())
        else:
            off += int((~(d < AGREE_TOL)).sum())  # a NaN counts as off
        total += d.numel()
        scale = max(scale, y.abs().max().item())
        if not m <= worst:
            worst, worst_name = m, k
    ulp_note = f", at most {worst_ulps:.0f} output rounding step(s)" if worst_ulps else ""
    if off == 0:
        return f"agree: max abs diff {worst:.1e}{ulp_note} ({what}; largest |value| {scale:.2f})"
    limit = f">= {AGREE_TOL:g} (float32), or >= {AGREE_TOL:g} and > {AGREE_ULPS} rounding step (half precision)"
    return f"DIFFER: max abs diff {worst:.1e} at {worst_name}{ulp_note}; {off} of {total} values off by {limit} ({what})"


def mergekit_table(a: argparse.Namespace, scratch: Path, size_gb: float, dtype_name: str, mergekit: str) -> None:
    if a.models < 3:
        raise SystemExit("the mergekit table needs --models 3 or more (the slices recipe takes layers from m1 and m2)")
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    folder = scratch / f"hf-{dtype_name}-{size_gb:g}gb"
    size = dims(fp32_bytes(size_gb, dtype), min_layers=4)
    models = build_hf(folder, a.models, size, dtype, dtype_name, a.reuse)
    tiny = build_hf(scratch / f"hf-{dtype_name}-tiny", a.models, TINY, dtype, dtype_name, a.reuse)
    model_bytes = (models[0] / "model.safetensors").stat().st_size
    hidden, ffn, vocab, layers = size
    print(f"{a.models} model folders of {model_bytes / 1e9:.2f} GB ({dtype_name}; hidden {hidden}, ffn {ffn}, vocab {vocab}, "
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
        rows.append((key, name, runs, agree))
    shutil.rmtree(recipes_dir, ignore_errors=True)
    print()
    print(machine_line())
    print(command_line())
    print(f"mergekit table, {dtype_name}: {a.models} HF folders of {model_bytes / 1e9:.2f} GB; whole process each run, "
          f"median of {a.repeats} (min-max); peak RSS = ru_maxrss of the process; modelsoup with a fresh input-hash cache")
    print()
    print("| recipe | modelsoup wall s | mergekit wall s | speed-up (mergekit s / modelsoup s) | issue 17 target | "
          "modelsoup peak RSS MiB | mergekit peak RSS MiB | outputs |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for key, name, runs, agree in rows:
        med = {t: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")} for t, rs in runs.items()}
        speedup = med["mergekit"]["seconds"] / med["modelsoup"]["seconds"]
        goal = MERGEKIT_TARGETS.get(key)
        target = "" if goal is None else f">= {goal:g}x: {'met' if speedup >= goal else 'MISSED'}"
        cells = [spread([r["seconds"] for r in runs["modelsoup"]]), spread([r["seconds"] for r in runs["mergekit"]]),
                 f"{speedup:.2f}x", target, f"{med['modelsoup']['peak_rss_mb']:.0f}", f"{med['mergekit']['peak_rss_mb']:.0f}", agree]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", nargs="+", choices=["floor", "mergekit"], default=["floor", "mergekit"], help="which tables to measure")
    ap.add_argument("--size-gb", type=float, default=None,
                    help="size of each checkpoint (default: 1.0 for the floor table, 1.3 for the mergekit table)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                    help="one table per dtype (default: float32 and bfloat16 for the floor table, bfloat16 for the mergekit table)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement, interleaved; the tables give the median (min-max)")
    ap.add_argument("--workers", type=int, default=None, help="--workers of the floor table's merges (default: soup's)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=CASES, help="methods of the floor table")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: add floor-table rows of linear and ties with `soup merge --device cuda` (where CUDA is available)")
    ap.add_argument("--models", type=int, default=4, help="model folders of the mergekit table (the floor table always has 4)")
    recipes = ["startup", "linear", "ties", "slerp", "della", "slices"]
    ap.add_argument("--recipes", nargs="+", choices=recipes, default=recipes, help="recipes of the mergekit table")
    ap.add_argument("--mergekit", default=None, metavar="PATH",
                    help=f"mergekit-yaml to compare with (default: the one on PATH, else {MERGEKIT_FALLBACK}); the table is skipped if absent")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already built in --dir (same count and size)")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {a.repeats}")
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="soup-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(command_line(), flush=True)
    if "floor" in a.tables:
        for dtype_name in a.dtypes or ["float32", "bfloat16"]:
            floor_table(a, scratch, a.size_gb or 1.0, dtype_name)
    if "mergekit" in a.tables:
        mergekit = find_mergekit(a.mergekit)
        if mergekit is None:
            where = a.mergekit or f"PATH or {MERGEKIT_FALLBACK}"
            print(f"mergekit table skipped: no mergekit-yaml at {where} (give --mergekit /path/to/mergekit-yaml)")
        else:
            for dtype_name in a.dtypes or ["bfloat16"]:
                mergekit_table(a, scratch, a.size_gb or 1.3, dtype_name, mergekit)
    if a.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

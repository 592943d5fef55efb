"""How the data-driven soups scale: learned soup memory, greedy soup reads, cook on Ray, a 4 x 70B virtual merge.

Four parts, all measured in one run on this machine, every measurement in a fresh Python process:

1. **Learned soup, peak RSS against N** (2, 4, 8 ingredients), ``memory="resident"`` against ``"streaming"``. The
   evaluator's module is an MLP of ~24 M float32 parameters (``--width 1536 --depth 10``: many moderate layers, so
   that the "one tensor per ingredient" the streaming mode holds is small next to the model). The ingredients are
   seeded perturbations of one random (He) init, saved once as safetensors files in a scratch folder; the held-out
   data are random inputs labelled by the init (4 batches of 128). ``epochs=1, start="uniform"`` and the same
   ``accumulate`` for both modes. The child resets its high-water mark (``/proc/self/clear_refs``) just before
   ``learned_soup`` and reports its RSS then (the baseline: torch, the module, the data) and its ``VmHWM`` after
   (ru_maxrss is not used: Linux carries the spawning process's peak over into the child at exec). The learned
   soup's own peak is the difference. Expected: resident ~ (N + 2) x model above the baseline (the module is in the
   baseline), streaming flat in N but for one tensor of each ingredient.
2. **Greedy soup wall time against N** (4, 8, 16), ``running_sum="memory"`` against ``"off"`` (each candidate
   rebuilt from every member), on a smaller MLP (~2 M parameters). The ingredients are noisy copies of the init that
   labels the data, so averaging helps and the greedy soup keeps nearly all of them (``allow_equal=True``): the
   case where rebuilding costs O(N^2) reads. Interleaved, median of ``--repeats``. Each child counts
   ``SafetensorsCheckpoint.read`` calls, printed as reads per tensor per checkpoint.
3. **cook, serial against** ``RayExecutor("local", workers=2)``, on 8 of the small ingredients (recipes uniform,
   greedy, ensemble; 16 batches of 256 held-out examples, so that evaluations, not reads, are the work).
   Interleaved, median of ``--repeats``. The Ray child times the cluster's start-up (``ray.init``, the two actors
   ready), the cook, and the shutdown separately. The tables (every row's held-out score and loss, and a hash of
   its logits) must be the same in every run.
4. **A 4 x Llama-70B-class virtual merge**: ``benchmarks/virtual_merge.py`` run as it is (``--vm-args``), its
   output printed.

    python benchmarks/scale.py                                  # ~11 min on a busy 2-core machine
    python benchmarks/scale.py --parts learned --learned-n 2,4,8,16 --width 2048
    python benchmarks/scale.py --parts greedy --greedy-n 4,8,16,32 --repeats 5
    python benchmarks/scale.py --vm-args "--layers 1,2,4 --vocab 32000"
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_FLAG = "--child"
IN_DIM = 256
CLASSES = 10


# -- helpers (both sides) ----------------------------------------------------------------------------------------
def vm(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts at the current RSS


def mib(n: float) -> float:
    return n / 2**20


def build(width: int, depth: int):
    from torch import nn

    layers: list[nn.Module] = [nn.Linear(IN_DIM, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def make_set(folder: Path, *, width: int, depth: int, n: int, sigma: float, examples: int, seed: int) -> dict:
    """An init (He, zero biases), ``n`` ingredients ``init + sigma * He-scale * noise`` and data labelled by the init."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = build(width, depth)
    g = torch.Generator().manual_seed(seed)
    base = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[1] if p.dim() == 2 else model.state_dict()[name.replace("bias", "weight")].shape[1]
            base[name] = torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5 if p.dim() == 2 else torch.zeros(p.shape)
            p.copy_(base[name])
        x = torch.randn(examples, IN_DIM, generator=g)
        y = model(x).argmax(1)
    save_file({"x": x, "y": y}, str(folder / "data.safetensors"))
    paths = []
    for i in range(n):
        gi = torch.Generator().manual_seed(seed * 1000 + i + 1)
        state = {}
        for name, t in base.items():
            fan_in = base[name.replace("bias", "weight")].shape[1]
            state[name] = (t + sigma * (2.0 / fan_in) ** 0.5 * torch.randn(t.shape, generator=gi)).contiguous()
        path = folder / f"m{i:02d}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    params = sum(t.numel() for t in base.values())
    largest = max(t.numel() for t in base.values())
    return {"paths": paths, "data": str(folder / "data.safetensors"), "width": width, "depth": depth, "params": params,
            "largest": largest, "tensors": len(base), "classes": int(torch.bincount(y, minlength=CLASSES).gt(0).sum())}


# -- the child ---------------------------------------------------------------------------------------------------
def _count_reads() -> dict[str, int]:
    """Count SafetensorsCheckpoint.read calls per file (the engine's threads included)."""
    import threading

    from modelsoup.io.checkpoints import SafetensorsCheckpoint

    counts: dict[str, int] = {}
    lock = threading.Lock()
    original = SafetensorsCheckpoint.read

    def read(self, name):
        with lock:
            counts[self.label] = counts.get(self.label, 0) + 1
        return original(self, name)

    SafetensorsCheckpoint.read = read  # type: ignore[method-assign]
    return counts


def _evaluator(a: dict, batch: int):
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, TensorDataset

    from modelsoup.eval.module import ClassificationEvaluator

    d = load_file(a["data"])
    return ClassificationEvaluator(build(a["width"], a["depth"]), DataLoader(TensorDataset(d["x"], d["y"]), batch_size=batch),
                                   name=f"scale-{a['width']}x{a['depth']}", progress=False)


def child(a: dict) -> dict:
    import gc

    import torch

    from modelsoup.eval.cache import EvalCache

    counts = _count_reads()
    paths = a["paths"]
    if a["kind"] == "learned":
        from modelsoup.recipes.learned import learned_soup

        ev = _evaluator(a, a["batch"])
        gc.collect()
        reset_peak()
        baseline = vm("VmRSS:")
        t0 = time.perf_counter()
        r = learned_soup(paths, ev, epochs=1, start="uniform", memory=a["mode"], accumulate=a["accumulate"], progress=False,
                         cache=EvalCache(enabled=False))
        dt = time.perf_counter() - t0
        return {"seconds": dt, "baseline": baseline, "peak": vm("VmHWM:"), "memory": r.memory, "accumulate": r.accumulate,
                "score": r.score.value, "weights": r.weights, "reads": sum(counts.values()), "epoch": r.epoch,
                "learn_loss": r.history[-1]["loss"], "epoch_score": r.history[-1]["score"]}
    if a["kind"] == "greedy":
        from modelsoup.recipes.greedy import greedy_soup

        ev = _evaluator(a, a["batch"])
        t0 = time.perf_counter()
        r = greedy_soup(paths, ev, running_sum=a["mode"], allow_equal=True, progress=False, cache=EvalCache(enabled=False))
        dt = time.perf_counter() - t0
        return {"seconds": dt, "members": len(r.members), "score": r.score.value, "reads": sum(counts.values()),
                "ingredient_score": max(s.ingredient_score for s in r.history)}
    if a["kind"] == "cook":
        from modelsoup.recipes.kitchen import cook
        from modelsoup.recipes.pantry import Pantry

        ev = _evaluator(a, a["batch"])
        t0 = time.perf_counter()
        ex = None
        if a["mode"] == "ray":
            import ray

            from modelsoup.recipes.executor import RayExecutor

            ex = RayExecutor("local", workers=2)
            ray.get([actor.__ray_ready__.remote() for actor in ex._actors])  # the workers started and imported torch
        t1 = time.perf_counter()
        pantry = Pantry(paths, cache=EvalCache(enabled=False), executor=ex)
        res = cook(pantry, ev, recipes=["uniform", "greedy", "ensemble"], progress=False)
        t2 = time.perf_counter()
        pantry.close()
        if ex is not None:
            ex.close()
        t3 = time.perf_counter()
        rows = []
        for row in res.rows:
            p = row.heldout_predictions
            digest = hashlib.sha256(p.logits.contiguous().numpy().tobytes()).hexdigest()[:12] if p is not None else None
            rows.append([row.name, row.heldout.value if row.heldout else None, row.heldout.metrics.get("loss") if row.heldout else None, digest])
        steps = {row.name: row.seconds for row in res.rows if row.kind in ("soup", "ensemble")}
        return {"steps": steps, "startup": t1 - t0, "seconds": t2 - t1, "close": t3 - t2, "rows": rows, "reads": sum(counts.values()),
                "greedy_members": len(res.greedy.members) if res.greedy else None, "threads": torch.get_num_threads()}
    raise ValueError(a["kind"])


# -- the parent --------------------------------------------------------------------------------------------------
def run_child(args: dict, env: dict) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, CHILD_FLAG, json.dumps(args)], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-3:] if r.stderr.strip() else ["killed (out of memory?)"]
        return {"failed": f"exit {r.returncode}: " + " | ".join(tail)}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["process_wall"] = wall
    return d


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}..{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f}"


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import ray

        rv = f", ray {ray.__version__}"
    except ImportError:
        rv = ""
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){rv}, Python {platform.python_version()}, {datetime.datetime.now():%Y-%m-%d %H:%M}")


def part_learned(a: argparse.Namespace, big: dict, env: dict) -> None:
    model = big["params"] * 4
    ns = [int(x) for x in a.learned_n.split(",")]
    print(f"\n## 1. learned soup, peak RSS against N: MLP {big['width']} x {big['depth']} layers, {big['params'] / 1e6:.1f} M params "
          f"= {mib(model):.0f} MiB float32 (largest tensor {mib(big['largest'] * 4):.0f} MiB), {a.learned_batches} x 128 examples, "
          f"epochs 1, start uniform, accumulate {a.accumulate}, one fresh process per row")
    rows = []
    for n in ns:
        for mode in ("resident", "streaming") if len(rows) % 4 == 0 else ("streaming", "resident"):
            d = run_child({"kind": "learned", "mode": mode, "accumulate": a.accumulate, "batch": 128, "paths": big["paths"][:n],
                           "data": big["data"], "width": big["width"], "depth": big["depth"]}, env)
            rows.append((n, mode, d))
            print(f"  ran N={n} {mode}: " + (d["failed"] if "failed" in d else f"{d['seconds']:.1f} s"), flush=True)
    print(f"{'N':>3} {'memory':>10} {'baseline MiB':>13} {'peak MiB':>9} {'peak-base MiB':>14} {'/ model':>8} {'doc MiB':>8} "
          f"{'learned s':>10} {'process s':>10} {'reads/tensor/ckpt':>18} {'epoch-1 loss':>13} {'kept epoch':>11} {'held-out acc':>13}")
    for n, mode, d in rows:
        if "failed" in d:
            print(f"{n:>3} {mode:>10} failed: {d['failed']}")
            continue
        own = d["peak"] - d["baseline"]
        doc = (n + 2) * model if mode == "resident" else 2 * model + n * big["largest"] * 4
        print(f"{n:>3} {mode:>10} {mib(d['baseline']):>13.0f} {mib(d['peak']):>9.0f} {mib(own):>14.0f} {own / model:>8.2f} {mib(doc):>8.0f} "
              f"{d['seconds']:>10.1f} {d['process_wall']:>10.1f} {d['reads'] / (n * big['tensors']):>18.1f} {d['learn_loss']:>13.6f} "
              f"{d['epoch']:>11} {d['score']:>13.4f}")
    print("# doc MiB: what the learned soup's docstring says it holds above the module: resident (N + 2) x model "
          "(N ingredients, the merged weights, their gradient); streaming 2 x model + N x the largest tensor (gradient, module copy, one tensor per ingredient)")
    for n in ns:
        got = {mode: d for m, mode, d in rows if m == n and "failed" not in d}
        if len(got) == 2:
            wr, ws = got["resident"]["weights"], got["streaming"]["weights"]
            print(f"# N={n}: kept coefficients resident vs streaming differ by at most {max(abs(x - y) for x, y in zip(wr, ws)):.1e}; "
                  f"epoch-1 learning loss by {abs(got['resident']['learn_loss'] - got['streaming']['learn_loss']):.1e}, "
                  f"epoch-1 held-out acc {got['resident']['epoch_score']:.4f} vs {got['streaming']['epoch_score']:.4f}")
    ok = [(n, d["peak"] - d["baseline"]) for n, mode, d in rows if mode == "streaming" and "failed" not in d]
    if len(ok) >= 2:
        (n0, p0), (n1, p1) = ok[0], ok[-1]
        print(f"# streaming: peak above baseline {mib(p0):.0f} MiB at N={n0}, {mib(p1):.0f} MiB at N={n1}: "
              f"{mib((p1 - p0) / (n1 - n0)):.0f} MiB per extra ingredient (one model is {mib(model):.0f} MiB)")
    ok = [(n, d["peak"] - d["baseline"]) for n, mode, d in rows if mode == "resident" and "failed" not in d]
    if len(ok) >= 2:
        (n0, p0), (n1, p1) = ok[0], ok[-1]
        print(f"# resident: {mib((p1 - p0) / (n1 - n0)):.0f} MiB per extra ingredient ({(p1 - p0) / (n1 - n0) / model:.2f} x the model)")


def part_greedy(a: argparse.Namespace, small: dict, env: dict) -> None:
    ns = [int(x) for x in a.greedy_n.split(",")]
    model = small["params"] * 4
    print(f"\n## 2. greedy soup wall time against N: MLP {small['width']} x {small['depth']}, {small['params'] / 1e6:.1f} M params "
          f"= {mib(model):.1f} MiB float32, {small['tensors']} tensors, {a.greedy_batches} x 128 examples, allow_equal, "
          f"running_sum memory vs off, interleaved, {a.repeats} fresh processes each, median (min..max)")
    res: dict[tuple[int, str], list[dict]] = {(n, m): [] for n in ns for m in ("memory", "off")}
    for rep in range(a.repeats):
        order = [(n, m) for n in ns for m in (("memory", "off") if rep % 2 == 0 else ("off", "memory"))]
        for n, mode in order:
            d = run_child({"kind": "greedy", "mode": mode, "batch": 128, "paths": small["paths"][:n], "data": small["greedy_data"],
                           "width": small["width"], "depth": small["depth"]}, env)
            res[(n, mode)].append(d)
            print(f"  run {rep + 1}/{a.repeats} N={n:>2} {mode:>6}: " + (d["failed"] if "failed" in d else f"{d['seconds']:.2f} s"), flush=True)
    print(f"{'N':>3} {'running sum s':>20} {'rebuild s':>20} {'off/memory':>10} {'reads/tensor/ckpt (sum, off)':>29} {'members':>8} "
          f"{'best ingredient':>16} {'soup acc':>9}")
    firsts: dict[str, float] = {}
    for n in ns:
        mem = [d for d in res[(n, "memory")] if "failed" not in d]
        off = [d for d in res[(n, "off")] if "failed" not in d]
        if not mem or not off:
            print(f"{n:>3} failed: {[d.get('failed') for d in res[(n, 'memory')] + res[(n, 'off')] if 'failed' in d][:1]}")
            continue
        tm, to = [d["seconds"] for d in mem], [d["seconds"] for d in off]
        per = n * small["tensors"]
        same = len({(d["members"], d["score"]) for d in mem + off}) == 1
        firsts.setdefault("memory", statistics.median(tm) / n)
        firsts.setdefault("off", statistics.median(to) / n)
        print(f"{n:>3} {med(tm):>20} {med(to):>20} {statistics.median(to) / statistics.median(tm):>10.2f} "
              f"{mem[0]['reads'] / per:>14.2f}, {off[0]['reads'] / per:>12.2f} {mem[0]['members']:>8} {mem[0]['ingredient_score']:>16.4f} "
              f"{mem[0]['score']:>9.4f}{'' if same else '  (members/score differ between runs!)'}")
    print("# seconds per ingredient (median / N): " + "; ".join(
        f"N={n}: sum {statistics.median([d['seconds'] for d in res[(n, 'memory')] if 'failed' not in d]) / n:.3f}, "
        f"off {statistics.median([d['seconds'] for d in res[(n, 'off')] if 'failed' not in d]) / n:.3f}"
        for n in ns if all("failed" not in d for d in res[(n, 'memory')] + res[(n, 'off')])))


def part_cook(a: argparse.Namespace, small: dict, env: dict) -> None:
    n = a.cook_n
    print(f"\n## 3. cook (uniform, greedy, ensemble) serial vs RayExecutor('local', workers=2): {n} ingredients of the MLP above, "
          f"{a.cook_batches} x 256 examples, interleaved, {a.repeats} fresh processes each, median (min..max)")
    res: dict[str, list[dict]] = {"serial": [], "ray": []}
    for rep in range(a.repeats):
        for mode in ("serial", "ray") if rep % 2 == 0 else ("ray", "serial"):
            d = run_child({"kind": "cook", "mode": mode, "batch": 256, "paths": small["paths"][:n], "data": small["cook_data"],
                           "width": small["width"], "depth": small["depth"]}, env)
            res[mode].append(d)
            print(f"  run {rep + 1}/{a.repeats} {mode:>6}: " + (d["failed"] if "failed" in d else
                  f"start-up {d['startup']:.2f} s, cook {d['seconds']:.2f} s, close {d['close']:.2f} s"), flush=True)
    ok = {m: [d for d in ds if "failed" not in d] for m, ds in res.items()}
    if not ok["serial"] or not ok["ray"]:
        print("# failed: " + "; ".join(d["failed"] for ds in res.values() for d in ds if "failed" in d))
        return
    print(f"{'':>26} {'serial':>20} {'ray, 2 workers':>20} {'ray / serial':>12}")
    for key, what in (("startup", "Ray start-up s"), ("seconds", "cook s"), ("close", "shutdown s"), ("process_wall", "whole process s")):
        s, r = [d[key] for d in ok["serial"]], [d[key] for d in ok["ray"]]
        ratio = f"{statistics.median(r) / statistics.median(s):>12.2f}" if statistics.median(s) > 0.05 else f"{'':>12}"
        print(f"{what:>26} {med(s):>20} {med(r):>20} {ratio}")
    for name in ok["serial"][0]["steps"]:
        s, r = [d["steps"][name] for d in ok["serial"]], [d["steps"][name] for d in ok["ray"]]
        print(f"{'  of which ' + name + ' s':>26} {med(s):>20} {med(r):>20} {statistics.median(r) / max(statistics.median(s), 1e-9):>12.2f}")
    s = [d["seconds"] - sum(d["steps"].values()) for d in ok["serial"]]
    r = [d["seconds"] - sum(d["steps"].values()) for d in ok["ray"]]
    print(f"{'  of which ingredients s':>26} {med(s):>20} {med(r):>20} {statistics.median(r) / statistics.median(s):>12.2f}")
    s, r = statistics.median(d["seconds"] for d in ok["serial"]), statistics.median(d["seconds"] for d in ok["ray"])
    print(f"# speed-up of the cook itself (serial s / ray s): {s / r:.2f}x; with Ray's start-up and shutdown: "
          f"{statistics.median(d['startup'] + d['seconds'] + d['close'] for d in ok['serial']) / statistics.median(d['startup'] + d['seconds'] + d['close'] for d in ok['ray']):.2f}x")
    print(f"# reads in the driver: serial {ok['serial'][0]['reads']}, ray {ok['ray'][0]['reads']} (the workers read on their own); "
          f"torch threads per process {ok['serial'][0]['threads']}; greedy members {ok['serial'][0]['greedy_members']}")
    tables = {json.dumps(d["rows"]) for d in ok["serial"] + ok["ray"]}
    print(f"# tables (held-out score, loss and logits hash of every row) identical in all {len(ok['serial']) + len(ok['ray'])} runs: "
          f"{'yes' if len(tables) == 1 else 'NO'}")
    if len(tables) != 1:
        ref = ok["serial"][0]["rows"]
        for d in ok["ray"] + ok["serial"][1:]:
            for x, y in zip(ref, d["rows"]):
                if x != y:
                    print(f"#   differs: {x} vs {y}")
    for row in ok["serial"][0]["rows"]:
        print(f"    {row[0]:<28} held-out acc {row[1]:.4f}  loss {row[2]:.4f}" if row[2] is not None else f"    {row[0]:<28} held-out acc {row[1]:.4f}")


def part_virtual(a: argparse.Namespace, env: dict) -> None:
    cmd = [sys.executable, str(Path(__file__).with_name("virtual_merge.py")), *shlex.split(a.vm_args)]
    print(f"\n## 4. virtual merge: python benchmarks/virtual_merge.py {a.vm_args}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in r.stdout.strip().splitlines():
        print("  " + line)
    if r.returncode != 0:
        print(f"# failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    print(f"# {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="learned,greedy,cook,virtual", help="comma-separated: learned, greedy, cook, virtual")
    p.add_argument("--dir", help="scratch folder (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration in parts 2 and 3")
    p.add_argument("--width", type=int, default=1536, help="learned soup MLP width")
    p.add_argument("--depth", type=int, default=10, help="learned soup MLP hidden layers")
    p.add_argument("--learned-n", default="2,4,8")
    p.add_argument("--learned-batches", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=2, help="batches per update, both modes")
    p.add_argument("--small-width", type=int, default=1024)
    p.add_argument("--small-depth", type=int, default=6)
    p.add_argument("--sigma", type=float, default=0.3, help="noise of the small ingredients, relative to the init's scale")
    p.add_argument("--greedy-n", default="4,8,16")
    p.add_argument("--greedy-batches", type=int, default=1)
    p.add_argument("--cook-n", type=int, default=8)
    p.add_argument("--cook-batches", type=int, default=6)
    p.add_argument("--vm-args", default="--layers 1,2 --vocab 32000", help="arguments of benchmarks/virtual_merge.py")
    p.add_argument(CHILD_FLAG, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    parts = a.parts.split(",")
    scratch = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="soup-scale-"))
    env = dict(os.environ, MODELSOUP_CACHE_DIR=str(scratch / "cache"), RAY_DEDUP_LOGS="0")
    print(f"# benchmarks/scale.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}")
    print(f"# machine: {machine()}")
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        big = small = None
        if "learned" in parts:
            big = make_set(scratch / "big", width=a.width, depth=a.depth, n=max(int(x) for x in a.learned_n.split(",")), sigma=0.05,
                           examples=a.learned_batches * 128, seed=1)
        if "greedy" in parts or "cook" in parts:
            n = max([int(x) for x in a.greedy_n.split(",")] + [a.cook_n])
            small = make_set(scratch / "small", width=a.small_width, depth=a.small_depth, n=n, sigma=a.sigma,
                             examples=max(a.greedy_batches * 128, a.cook_batches * 256), seed=2)
            _split_data(small, a)
        print(f"# setup (ingredients written once, reused): {time.perf_counter() - t0:.1f} s in {scratch}", flush=True)
        todo = [(big is not None, part_learned, (a, big, env)), (small is not None and "greedy" in parts, part_greedy, (a, small, env)),
                (small is not None and "cook" in parts, part_cook, (a, small, env)), ("virtual" in parts, part_virtual, (a, env))]
        for wanted, fn, fargs in todo:
            if wanted:
                t0, before = time.perf_counter(), os.getloadavg()[0]
                fn(*fargs)
                print(f"# part took {time.perf_counter() - t0:.0f} s; 1-min load average {before:.1f} before, {os.getloadavg()[0]:.1f} after "
                      f"(this machine has {os.cpu_count()} cores: above that, other processes were competing)", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n# total {(time.perf_counter() - t_all) / 60:.1f} min")


def _split_data(small: dict, a: argparse.Namespace) -> None:
    """The greedy part's held-out set (the first examples) and the cook's (all of them), as two files."""
    from safetensors.torch import load_file, save_file

    d = load_file(small["data"])
    folder = Path(small["data"]).parent
    k = a.greedy_batches * 128
    save_file({"x": d["x"][:k].contiguous(), "y": d["y"][:k].contiguous()}, str(folder / "greedy-data.safetensors"))
    save_file({"x": d["x"][: a.cook_batches * 256].contiguous(), "y": d["y"][: a.cook_batches * 256].contiguous()},
              str(folder / "cook-data.safetensors"))
    small["greedy_data"] = str(folder / "greedy-data.safetensors")
    small["cook_data"] = str(folder / "cook-data.safetensors")


if __name__ == "__main__":
    main()

"""Peak memory of `soup inspect` (modelsoup.analysis.similarity) against the size of the models it reads.

Writes a base and N fine-tunes as safetensors files (T tensors of E float32 elements each), then, in a
fresh process, runs the streaming similarity pass and reports the process's peak resident memory
(Linux VmHWM, reset just before the pass) above its resident size then (torch imported, files not opened). The claim under test: memory is
about one tensor per model plus a few float64 chunks, whatever the number of tensors.

    python benchmarks/inspect_memory.py                 # 3 fine-tunes + base, 6 x 64 MB tensors each
    python benchmarks/inspect_memory.py --tensors 12    # twice the model size: the peak should not move
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from modelsoup.analysis.similarity import similarity

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

torch.set_num_threads(1)
paths = sys.argv[1:]
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current resident size
before = status("VmRSS:")
t0 = time.perf_counter()
sim = similarity(paths[1:], base=paths[0], progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"baseline_mb": before, "peak_mb": status("VmHWM:"), "seconds": seconds, "numel": sim.total.numel}))
"""


def write_models(folder: Path, models: int, tensors: int, elements: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(elements, generator=g) for i in range(tensors)}
    paths = [folder / "base.safetensors"]
    save_file(base, paths[0])
    for m in range(models):
        sd = {k: v + 0.01 * torch.randn(elements, generator=g) for k, v in base.items()}
        paths.append(folder / f"ft-{m}.safetensors")
        save_file(sd, paths[-1])
        del sd
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=3, help="fine-tunes besides the base (default 3)")
    ap.add_argument("--tensors", type=int, default=6, help="tensors per model (default 6)")
    ap.add_argument("--elements", type=int, default=16 * 2**20, help="float32 elements per tensor (default 16M = 64 MB)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(Path(tmp), a.models, a.tensors, a.elements)
        out = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    tensor_mb = a.elements * 4 / 2**20
    n = a.models + 1
    print(f"{n} models (base + {a.models}) x {a.tensors} tensors x {tensor_mb:.0f} MB = {n * a.tensors * tensor_mb:.0f} MB of weights")
    print(f"one tensor per model: {n * tensor_mb:.0f} MB")
    print(f"peak resident memory above baseline ({r['baseline_mb']:.0f} MB): {r['peak_mb'] - r['baseline_mb']:.0f} MB "
          f"({r['seconds']:.1f} s, {r['numel']:,} elements per model)")


if __name__ == "__main__":
    main()

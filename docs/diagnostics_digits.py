"""Regenerate the digits example of docs/diagnostics.md: every command, its output folder, the report and the figures.

    python docs/diagnostics_digits.py [OUT]        # default out/diagnostics; copies the PNGs to docs/figures/

Ingredients: `soup demo --digits`'s pre-trained start and six fine-tunes of it; the counter-example: two MLPs of the same
architecture trained on the same data from different random starts (seeds 101 and 102), for as long as a fine-tune.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelsoup.cli import main
from modelsoup.demo import run_demo
from modelsoup.demo.digits import Hyper, load_splits, make_net, train

DOCS = Path(__file__).resolve().parent
EVAL = ["--eval", f"{DOCS / 'digits_eval.py'}:heldout", "--heldout", "val", "--no-progress"]


def soup(*argv: str) -> None:
    print("$ soup " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(["-q", *argv]) != 0:
        raise SystemExit(f"soup {argv[0]} failed")


def scratch_nets(folder: Path) -> list[str]:
    """Two nets from different random starts, trained like the demo's fine-tunes (AdamW, lr 3e-3, 6 epochs)."""
    data = load_splits(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in (1, 2):
        torch.manual_seed(100 + s)
        net = make_net()
        train(net, data["train"], Hyper(3e-3, 6, s))
        paths.append(str(folder / f"scratch-{s}.safetensors"))
        save_file(net.state_dict(), paths[-1])
    return paths


def run(out: Path) -> None:
    ing = out / "demo" / "ingredients"
    if not (ing / "ft-5.safetensors").is_file():
        run_demo(out / "demo")
    ft = [str(ing / f"ft-{i}.safetensors") for i in range(6)]
    base = str(ing / "base.safetensors")
    scratch = scratch_nets(out / "scratch")
    d = out / "results"
    soup("inspect", *ft, "--base", base, "-o", str(d / "inspect-finetunes"), "--overwrite", "--no-progress")
    soup("inspect", *scratch, "-o", str(d / "inspect-scratch"), "--overwrite", "--no-progress")
    soup("curve", ft[0], ft[1], "-o", str(d / "curve-finetunes"), "--overwrite", *EVAL)
    soup("curve", *scratch, "-o", str(d / "curve-scratch"), "--overwrite", *EVAL)
    soup("curve", ft[0], ft[1], scratch[1], "--steps", "8", "-o", str(d / "triangle"), "--overwrite", *EVAL)
    soup("compare", *ft, "--order", "best", "-o", str(d / "compare"), "--overwrite", *EVAL)
    soup("compare", ft[0], ft[1], scratch[0], "-o", str(d / "compare-mixed"), "--overwrite", *EVAL)
    soup("scale", *ft[:3], "-o", str(d / "scale"), "--overwrite", *EVAL)
    soup("report", str(d), "-o", str(out / "report.html"), "--overwrite")
    figures = DOCS / "figures"
    figures.mkdir(exist_ok=True)
    for png in sorted(d.rglob("*.png")):
        shutil.copyfile(png, figures / f"{png.parent.name}-{png.name}")


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/diagnostics"))

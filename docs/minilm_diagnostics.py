"""Run the diagnostics of docs/minilm.md on the text demo's MiniLM fine-tunes and copy the figures to docs/figures/.

    soup demo                                   # first: the fine-tunes (cached) and the cooked table
    python docs/minilm_diagnostics.py [OUT]     # default out/minilm-diagnostics

Uses the demo's default sweep (split seed 0): its linear-probe start, its eight fine-tunes, its held-out
(500) and test (1,000) CSV files, from the demo cache (``$MODELSOUP_CACHE_DIR/demo`` or
``~/.cache/modelsoup/demo``). Every step is a ``soup`` command, printed before it runs.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from modelsoup.cli import main
from modelsoup.demo.text import sweep_config
from modelsoup.io.output import cache_root

DOCS = Path(__file__).resolve().parent


def soup(*argv: str) -> None:
    print("$ soup " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(["-q", *argv]) != 0:
        raise SystemExit(f"soup {argv[0]} failed")


def run(out: Path) -> None:
    work = cache_root() / "demo" / "split0-train2000-val500-test1000"
    # The demo's default sweep is the first n fine-tunes (ft-00 ...); the quality benchmark may have added more.
    n = len(sweep_config().ingredients)
    ft = sorted(str(p) for p in (work / "ingredients").glob("ft-*"))[:n]
    if len(ft) != n:
        raise SystemExit(f"run `soup demo` first: expected {n} fine-tunes in {work / 'ingredients'}, found {len(ft)}")
    start = str(work / "linear-probe")
    data = ["--heldout", str(work / "data" / "val.csv"), "--test", str(work / "data" / "test.csv"), "--no-progress"]
    d = out / "results"
    soup("inspect", *ft, "--base", start, "-o", str(d / "inspect"), "--overwrite", "--no-progress")
    soup("curve", ft[1], ft[7], "-o", str(d / "curve"), "--overwrite", *data)
    soup("curve", start, ft[7], "-o", str(d / "curve-start"), "--overwrite", *data)
    soup("compare", *ft, "--order", "best", "-o", str(d / "compare"), "--overwrite", *data)
    soup("scale", ft[1], ft[7], "-o", str(d / "scale"), "--overwrite", *data)
    soup("report", str(d), "-o", str(out / "report.html"), "--overwrite")
    figures = DOCS / "figures"
    figures.mkdir(exist_ok=True)
    for png in sorted(d.rglob("*.png")):
        shutil.copyfile(png, figures / f"minilm-{png.parent.name}-{png.name}")


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/minilm-diagnostics"))

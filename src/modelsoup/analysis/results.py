"""The output folder of a diagnostic: ``<name>.json``, ``<name>.md`` and PNG figures, written atomically.

The JSON file is what ``soup report`` reads::

    {"modelsoup_version": ..., "analysis": "inspect" | "curve" | "compare" | "scale", "created": ISO time,
     "title": ..., "inputs": [{"role", "label", "path", "format", "files": {name: sha256}}],
     "figures": ["similarity.png", ...], "markdown": "inspect.md", "tables": the result as Markdown,
     "verdict": {...} | null, "result": {...}}
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..io import Checkpoint
from ..io.output import cached_sha256, staged_output
from .verdict import Verdict

log = logging.getLogger("modelsoup")

TITLES = {"inspect": "Weight similarity", "curve": "Interpolation and barrier", "compare": "Soup vs ensemble", "scale": "Weight-magnitude stability"}


def input_record(role: str, label: str, ck: Checkpoint, path: Any = None) -> dict[str, Any]:
    """One input as the manifests of merges record it, with the sha256 of each weight file (cached by path, size and mtime)."""
    return {"role": role, "label": label, "path": str(path) if path is not None else "(in memory)", "format": ck.kind,
            "files": {f.name: cached_sha256(f) for f in ck.files}}


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_analysis(
    output: Path,
    name: str,
    result: dict[str, Any],
    markdown: str,
    *,
    inputs: Sequence[dict[str, Any]],
    figures: dict[str, Callable[[Path], Path]] | None = None,
    verdict: Verdict | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a diagnostic's folder; returns the files written (in ``output``).

    Args:
        output: the folder (created; replaced only with ``overwrite``).
        name: the diagnostic (``inspect``, ``curve``, ``compare``, ``scale``); names the JSON and Markdown files.
        result: the result's JSON.
        markdown: the result's tables.
        inputs: records from :func:`input_record`.
        figures: PNG file name -> function drawing it at the path it is given.
        verdict: the verdict, when the diagnostic gives one.
        overwrite: replace an existing folder.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
    """
    figures = figures or {}
    title = TITLES.get(name, name)
    paths = [r["path"] for r in inputs if r.get("path") not in (None, "(in memory)")]
    with staged_output(output, overwrite, inputs=paths) as tmp:
        for fname, draw in figures.items():
            draw(tmp / fname)
        md = [f"# {title}", ""]
        if verdict is not None:
            md += [verdict.to_markdown(), ""]
        md += [markdown.rstrip(), ""] + [f"![{Path(f).stem}]({f})" for f in figures]
        (tmp / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
        data = {"modelsoup_version": __version__, "analysis": name, "title": title,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "inputs": list(inputs),
                "figures": list(figures), "markdown": f"{name}.md", "tables": markdown, "verdict": verdict.to_json() if verdict else None, "result": result}
        (tmp / f"{name}.json").write_text(json.dumps(finite(data), indent=1, allow_nan=False) + "\n")
    return [output / f"{name}.json", output / f"{name}.md", *(output / f for f in figures)]

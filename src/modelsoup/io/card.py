"""The model card (README.md with Hugging Face metadata) and the manifest written next to a merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def model_card(*, name: str, method: str, summary: str, paper: str, base_model: str | None, inputs: list[dict[str, Any]], outputs: dict[str, str], recipe_yaml: str, version: str, hf: bool) -> str:
    """Markdown model card whose front matter the Hugging Face hub reads (``base_model``, ``tags``)."""
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    if hf:
        meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "model-soup", "modelsoup"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"This model was merged with [modelsoup](https://pypi.org/project/modelsoup/) {version} using the `{method}` method: {summary}.",
        "",
        f"Method reference: {paper}.",
        "",
        "## Inputs",
        "",
        "| role | model | weight file | sha256 |",
        "|---|---|---|---|",
    ]
    for inp in inputs:
        files = inp.get("files") or {"(in memory)": ""}
        for fname, digest in files.items():
            lines.append(f"| {inp['role']} | `{inp['path']}` | {fname} | `{digest}` |")
    lines += ["", "## Output files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {f} | `{d}` |" for f, d in outputs.items()]
    lines += ["", "## Recipe", "", "Re-run with `soup merge recipe.yaml -o OUT`.", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n")

"""The records written next to a merge: ``recipe.yaml``, the model card (``README.md`` with Hugging Face
metadata) and ``soup_manifest.json`` (library version, sha256 of every input and output file); and the
copied ``config.json`` made to say the dtype written."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..errors import OutputError

# ORG/NAME as the Hub spells a repository id (no leading dot or slash, one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_-]$")


def hub_id(folder: Path | None) -> str | None:
    """The Hub repository id a model folder is known by, or None when nothing says.

    From the Hugging Face cache layout (``models--ORG--NAME/snapshots/REV``), else the ``_name_or_path``
    of its ``config.json`` when that is an ``ORG/NAME`` id rather than a local path.
    """
    if folder is None:
        return None
    real = folder.resolve()
    repo = real.parent.parent.name if real.parent.name == "snapshots" else ""
    if repo.startswith("models--") and len(repo) > len("models--"):
        return repo[len("models--"):].replace("--", "/")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and _HUB_ID.match(name) and not (folder / name).exists() and not Path(name).exists():
        return name
    return None


def hub_ids(folders: Iterable[Path | None]) -> list[str]:
    """The distinct Hub ids of the inputs' folders, in input order (unknown ones left out)."""
    return list(dict.fromkeys(i for i in (hub_id(f) for f in folders) if i is not None))


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def set_config_dtype(config: Path, dtype: str) -> None:
    """Make a copied ``config.json`` say the dtype the weights were written in.

    ``from_pretrained`` reads ``dtype`` (transformers 5) or ``torch_dtype`` (4.x); each one present,
    at the top and in nested sub-configs, is updated, and both are added when neither is there.
    """
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return

    def update(d: dict[str, Any]) -> bool:
        hit = False
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str) and d[key] in (*FLOAT_DTYPES, "auto"):
                d[key] = dtype
                hit = True
        return hit

    found = update(data)
    for v in data.values():
        if isinstance(v, dict):
            update(v)
    if not found:
        data["dtype"] = data["torch_dtype"] = dtype
    config.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# config.json keys that give the number of layers of a layer stack (Llama/Mistral/Qwen/Gemma/BERT, GPT-2, T5/others).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Lists with one entry per layer: rebuilt from the configs of the models each output layer came from.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def _layer_index_problem(d: dict[str, Any]) -> str | None:
    """A setting that names layers by number (so stacking would move it onto other layers), if one is in effect."""
    if d.get("mlp_only_layers"):
        return "mlp_only_layers"
    if d.get("use_sliding_window") and isinstance(d.get("max_window_layers"), int):
        return "max_window_layers (with use_sliding_window)"
    if isinstance(d.get("first_k_dense_replace"), int) and d["first_k_dense_replace"] > 0:
        return "first_k_dense_replace"
    return None


def set_config_layers(config: Path, layer_sources: list[tuple[Path | None, int]], label: str) -> None:
    """Make a copied ``config.json`` describe a stack of ``len(layer_sources)`` layers (a ``slices:`` merge).

    Each layer count key equal to the copied model's count is set, at the top and in sub-configs (``text_config``);
    per-layer lists (:data:`PER_LAYER_KEYS`) are rebuilt from the configs of the models each layer came from
    (``layer_sources``: (that model's config.json or None, its layer)). ``label`` names the copied config in messages.

    Raises:
        OutputError: no layer count key, another list with one entry per layer, a setting that names layers by
            number, or per-layer entries that cannot be read: a model that loads with a wrong layer layout would
            silently drop, invent or mis-configure layers.
    """
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    keys = [k for k in LAYER_COUNT_KEYS if isinstance(data.get(k), int)] if isinstance(data, dict) else []
    if not isinstance(data, dict) or not keys:
        nested = [f"{k}.{c}" for k, v in (data.items() if isinstance(data, dict) else ()) if isinstance(v, dict) for c in LAYER_COUNT_KEYS if c in v]
        raise OutputError(f"{label}: no top-level layer count ({' / '.join(LAYER_COUNT_KEYS)}) to set to {len(layer_sources)}"
                          + (f" (found only {', '.join(nested)}: a composite model; stack the layers of its text model instead)" if nested else "")
                          + "; a `slices:` merge writes a different number of layers, so its config must say so (output.copy_files: false writes weights only)")
    old = data[keys[0]]
    cache: dict[Path, Any] = {}

    def source_value(src: Path | None, path: tuple[str, ...]) -> Any:
        if src is None:
            return None
        if src not in cache:
            try:
                cache[src] = json.loads(src.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cache[src] = None
        v = cache[src]
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    def update(d: dict[str, Any], path: tuple[str, ...]) -> None:
        where = ".".join(path) + "." if path else ""
        problem = _layer_index_problem(d)
        if problem:
            raise OutputError(f"{label}: `{where}{problem}` names layers by number, which stacking layers would move; a `slices:` merge of this model is not supported")
        for k in LAYER_COUNT_KEYS:
            if d.get(k) == old:
                d[k] = len(layer_sources)
        for k, v in list(d.items()):
            if isinstance(v, list) and len(v) == old and old > 1:
                if k not in PER_LAYER_KEYS:
                    raise OutputError(f"{label}: `{where}{k}` has one entry per layer ({old}) and is not known to modelsoup, so it cannot be rebuilt "
                                      f"for the {len(layer_sources)} stacked layers")
                rebuilt = []
                for src, layer in layer_sources:
                    theirs = source_value(src, (*path, k))
                    if not isinstance(theirs, list) or layer >= len(theirs):
                        raise OutputError(f"{label}: `{where}{k}` lists each of the {old} layers, but entry {layer} of "
                                          f"{src or 'a model without a config.json'} cannot be read to rebuild it for the stacked layers")
                    rebuilt.append(theirs[layer])
                d[k] = rebuilt
            elif isinstance(v, dict) and not path:
                update(v, (k,))

    update(data, ())
    config.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def model_card(*, name: str, method: str, summary: str, paper: str, base_models: list[str], inputs: list[dict[str, Any]], outputs: dict[str, str], recipe_yaml: str, version: str, hf: bool,
               stages: bool = False) -> str:
    """Markdown model card whose front matter the Hugging Face hub reads (``base_model``, ``tags``).

    ``base_models``: the Hub ids of the merged models where known; one is written as ``base_model``,
    several as a list with ``base_model_relation: merge`` (the Hub's convention for merges), none is
    left out rather than guessed. Every input is listed in the body either way.
    """
    meta: dict[str, Any] = {}
    if len(base_models) == 1:
        meta["base_model"] = base_models[0]
    elif base_models:
        meta["base_model"] = list(base_models)
        meta["base_model_relation"] = "merge"
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
    rerun = ("The last stage of a multi-stage recipe; its earlier stages were temporary. Re-run all of them with "
             "`soup merge recipe.stages.yaml OUT` from the folder the original was run in (its paths are as written there).") if stages else \
        "Re-run with `soup merge recipe.yaml -o OUT` (model paths in it are relative to this folder)."
    lines += ["", "## Recipe", "", rerun, "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def input_record(role: str, path: str, kind: str, files: Iterable[Path], hashes: dict[Path, str], notes: list[str]) -> dict[str, Any]:
    """One input as manifests and cards list it."""
    return {"role": role, "path": path, "format": kind, "files": {f.name: hashes.get(f, "") for f in files}, "notes": list(notes)}


def write_records(folder: Path, *, name: str, recipe_yaml: str, method: Any, inputs: list[dict[str, Any]], outputs: dict[str, str],
                  copied: list[str], notes: list[str], hf: bool, base_models: list[str], card: bool, version: str,
                  stages_yaml: str | None = None) -> None:
    """Write ``recipe.yaml``, ``README.md`` (if ``card``) and ``soup_manifest.json`` into ``folder``.

    ``method`` is the registered merge method (its name, summary and paper go on the card). ``stages_yaml``: the
    whole multi-stage recipe this output is the last stage of, written as ``recipe.stages.yaml`` (its earlier
    stages were temporary, so ``recipe.yaml`` alone does not re-run).
    """
    (folder / "recipe.yaml").write_text(recipe_yaml)
    if stages_yaml is not None:
        (folder / "recipe.stages.yaml").write_text(stages_yaml)
    if card:
        (folder / "README.md").write_text(model_card(name=name, method=method.name, summary=method.summary, paper=method.paper,
                                                     base_models=base_models, inputs=inputs, outputs=outputs, recipe_yaml=recipe_yaml,
                                                     version=version, hf=hf, stages=stages_yaml is not None))
    write_manifest(folder / "soup_manifest.json", {"modelsoup_version": version, "method": method.name, "recipe": "recipe.yaml",
                                                   **({"stages": "recipe.stages.yaml"} if stages_yaml is not None else {}),
                                                   "inputs": inputs, "outputs": outputs, "copied_files": copied, "notes": notes})

"""Regenerate tests/golden/mergekit/ from mergekit itself.

Run with the interpreter of a virtualenv that has mergekit installed (never imported by the test suite):

    /work/mkenv/bin/python tests/golden/make_mergekit_golden.py

It builds the fixtures of ``mergekit_fixtures.py`` in a temporary folder, runs ``mergekit-yaml`` (or
``mergekit-multi`` for a multi-document recipe) on CPU on every ``mergekit/recipes/*.yml`` with that folder as
the working directory (recipes name models as ``models/base`` etc.), and writes

* ``mergekit/outputs/<name>.safetensors``: every output tensor, float32, in one file;
* ``mergekit/outputs/<name>.config.json``: mergekit's config.json, for the ``slices:`` recipes;
* ``mergekit/manifest.json``: versions, date, fixture hashes, and per recipe the command and output hash.

Random methods get ``--random-seed``; each of them is run twice and must give identical bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mergekit_fixtures import build_fixtures  # noqa: E402

GOLDEN = HERE / "mergekit"
RECIPES = GOLDEN / "recipes"
OUTPUTS = GOLDEN / "outputs"
SEED = 20240601
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
# No hub look-ups (the model card generator asks the hub about relative paths), no tokenizer (there is none).
COMMON_FLAGS = ["--no-write-model-card", "--no-copy-tokenizer", "--quiet"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{path} not found: run this script with the python of the mergekit virtualenv")
    return str(path)


def collect(out_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"mergekit wrote no safetensors file in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in tensors:
                raise RuntimeError(f"{k} appears in two output shards of {out_dir}")
            tensors[k] = v.to(torch.float32).contiguous()
    return tensors


def run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def merge_once(recipe: Path, docs: list[dict], work: Path, out: Path, seed: int | None) -> tuple[Path, list[str]]:
    """Run mergekit on one recipe; return the folder holding the final model and the command (as recorded)."""
    seed_flags = ["--random-seed", str(seed)] if seed is not None else []
    recipe_arg = f"recipes/{recipe.name}"
    if len(docs) > 1:
        final = docs[-1].get("name")
        cmd = ["mergekit-multi", recipe_arg, "--intermediate-dir", "OUT", *COMMON_FLAGS, *seed_flags]
        real = [tool("mergekit-multi"), str(recipe), "--intermediate-dir", str(out), *COMMON_FLAGS, *seed_flags]
        if final is None:
            cmd += ["--out-path", "OUT/final"]
            real += ["--out-path", str(out / "final")]
            final = "final"
        run(real, work)
        return out / final, cmd
    cmd = ["mergekit-yaml", recipe_arg, "OUT", *COMMON_FLAGS, *seed_flags]
    run([tool("mergekit-yaml"), str(recipe), str(out), *COMMON_FLAGS, *seed_flags], work)
    return out, cmd


def main() -> None:
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    for old in OUTPUTS.iterdir():
        old.unlink()
    manifest: dict = {
        "mergekit": importlib.metadata.version("mergekit"),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "safetensors": importlib.metadata.version("safetensors"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cwd": "the fixture root: build_fixtures(root) writes root/models/; recipes/ is copied to root/recipes/",
        "random_seed": (
            "--random-seed S calls transformers' set_seed(S) once (global torch RNG); mergekit then draws one mask per "
            "non-base model, in recipe order, per tensor, tensors in sorted-name order (checked for these recipes)"
        ),
        "fixtures": {},
        "recipes": {},
    }
    with tempfile.TemporaryDirectory(prefix="mk-golden-") as tmp:
        work = Path(tmp) / "root"
        manifest["fixtures"] = build_fixtures(work)
        shutil.copytree(RECIPES, work / "recipes")
        for recipe in sorted((work / "recipes").glob("*.yml")):
            name = recipe.stem
            docs = [d for d in yaml.safe_load_all(recipe.read_text(encoding="utf-8")) if d]
            methods = sorted({d["merge_method"] for d in docs})
            seed = SEED if RANDOM_METHODS.intersection(methods) else None
            final, cmd = merge_once(recipe, docs, work, Path(tmp) / "out" / name, seed)
            tensors = collect(final)
            entry: dict = {
                "recipe": f"recipes/{recipe.name}",
                "sha256_recipe": sha256(recipe),
                "merge_method": methods[0] if len(methods) == 1 else methods,
                "command": " ".join(cmd),
                "random_seed": seed,
                "mergekit_files": sorted(p.name for p in final.iterdir()),
            }
            if seed is not None:
                again, _ = merge_once(recipe, docs, work, Path(tmp) / "again" / name, seed)
                entry["rerun_identical"] = all(torch.equal(tensors[k], v) for k, v in collect(again).items())
            out_file = OUTPUTS / f"{name}.safetensors"
            # One metadata key only: safetensors writes a metadata map of several keys in a random order.
            save_file(dict(sorted(tensors.items())), str(out_file), metadata={"format": "pt"})
            entry["output"] = f"outputs/{out_file.name}"
            entry["sha256"] = sha256(out_file)
            entry["tensors"] = len(tensors)
            if any("slices" in d for d in docs):
                cfg_file = OUTPUTS / f"{name}.config.json"
                shutil.copyfile(final / "config.json", cfg_file)
                entry["config"] = f"outputs/{cfg_file.name}"
                entry["sha256_config"] = sha256(cfg_file)
                entry["num_hidden_layers"] = json.loads(cfg_file.read_text())["num_hidden_layers"]
            manifest["recipes"][name] = entry
            print(f"{name:26s} {entry['tensors']:3d} tensors  {entry['sha256'][:12]}", flush=True)
    (GOLDEN / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

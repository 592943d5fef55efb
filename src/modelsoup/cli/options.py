"""What several subcommands share: parsing of flag values, the evaluation options and what they build, output flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RecipeError, SoupError


def parse_set(items: list[str]) -> dict[str, Any]:
    from ..recipe import load_yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SoupError(f"--set {item!r}: expected NAME=VALUE, e.g. --set density=0.5")
        k, v = item.split("=", 1)
        try:
            out[k.strip()], _ = load_yaml(v, None)
        except RecipeError as e:
            raise SoupError(f"--set {item[:60]!r}: cannot read the value ({e.problems[0]}); e.g. --set density=0.5 or --set 'density=[0.2, 0.8]'") from None
    return out


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SoupError(f"--weights {text!r}: give one number per model, comma-separated, e.g. --weights 0.7,0.3") from None


def add_eval_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("evaluation (held-out data chooses; test data is only reported)")
    g.add_argument("--eval", default="text-classification",
                   help="text-classification (default), perplexity, or your own package.module:function / file.py:function")
    g.add_argument("--heldout", required=required, action="append", metavar="[NAME=]FILE",
                   help="held-out data: CSV/JSONL (text classification), text file (perplexity), or passed to your function; "
                   "repeat as NAME=FILE for several domains (scored by their mean)")
    g.add_argument("--test", action="append", metavar="[NAME=]FILE", help="test data, reported only (NAME=FILE per domain)")
    g.add_argument("--domain-weights", metavar="NAME=W,...", help="weights of the domains in the mean score (default equal)")
    g.add_argument("--model", metavar="FOLDER", help="Hugging Face folder giving architecture, config and tokenizer (default: the first input folder)")
    g.add_argument("--text-column", help="text column (default text)")
    g.add_argument("--label-column", help="label column (default label)")
    g.add_argument("--text-pair-column", help="second text column, for sentence-pair tasks")
    g.add_argument("--max-length", type=int, help="tokens per example/block (default 128 / 512)")
    g.add_argument("--batch-size", type=int, help="examples per forward pass")
    g.add_argument("--limit", type=int, help="use only the first N rows (tokens, for perplexity)")
    g.add_argument("--device", help="where evaluation (and the learned soup's gradient) runs: cuda when a GPU is present, else cpu (default); or cpu, cuda:1 ...")
    g.add_argument("--cache-dir", help="evaluation cache (default ~/.cache/modelsoup/evals)")
    g.add_argument("--no-cache", action="store_true", help="re-evaluate everything, store nothing")
    g.add_argument("--base", help="the model PEFT adapter folders among the inputs were trained on: each adapter is scored as that model "
                   "with the adapter applied, and the evaluator swaps only the adapted tensors between soups")
    g.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    g.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="evaluate on a Ray cluster: `local` (the default when ADDRESS is left out) starts one on this machine, `auto` or "
                        "host:port joins one; checkpoints must be on storage every worker sees (pip install 'modelsoup[ray]')")
    g.add_argument("--ray-workers", type=int, metavar="N", help="Ray workers (default: the cluster's CPUs, or one per GPU)")


def evaluators(a: argparse.Namespace, model_folder: str | None) -> tuple[Any, Any]:
    from ..eval.factory import make_domain_evaluators, make_evaluators, parse_domains

    opts = dict(model=a.model or (a.base if getattr(a, "base", None) else model_folder), text_column=a.text_column, label_column=a.label_column, text_pair_column=a.text_pair_column,
                max_length=a.max_length, batch_size=a.batch_size, limit=a.limit, device=a.device, progress=progress(a))
    held_domains, test_domains = parse_domains(a.heldout, "--heldout"), parse_domains(a.test, "--test")
    if held_domains is None:
        if test_domains is not None or a.domain_weights:
            raise SoupError("--test NAME=FILE and --domain-weights need named held-out domains too (--heldout NAME=FILE, once per domain)")
        return make_evaluators(a.eval, heldout=a.heldout[0], test=a.test[0] if a.test else None, **opts)
    if a.test and test_domains is None:
        raise SoupError("with named held-out domains, name the test files too: --test NAME=FILE, once per domain")
    weights = None
    if a.domain_weights:
        try:
            weights = {k: float(v) for k, v in (item.split("=", 1) for item in a.domain_weights.split(","))}
        except ValueError:
            raise SoupError(f"--domain-weights {a.domain_weights!r}: give NAME=WEIGHT pairs, e.g. news=2,law=1") from None
    return make_domain_evaluators(a.eval, heldout=held_domains, test=test_domains, weights=weights, **opts)


def first_folder(paths: list[str]) -> str | None:
    return next((p for p in paths if (Path(p) / "config.json").is_file()), None)


def default_model(a: argparse.Namespace, paths: list[str]) -> str | None:
    """The evaluator's default model folder (the first input folder), after refusing adapters given without --base.

    Raises:
        SoupError: a PEFT adapter folder among ``paths`` and no --base (said first: the evaluator's own complaint
            about a missing model folder would point the wrong way).
    """
    from ..io.adapters import is_adapter

    bare = [p for p in paths if is_adapter(p)]
    if bare and not getattr(a, "base", None):
        raise SoupError(f"{bare[0]}: is a PEFT adapter; give the model it was trained on (--base BASE)")
    return first_folder(paths)


def open_pantry(a: argparse.Namespace, paths: list[str]) -> Any:
    from ..eval.cache import EvalCache
    from ..recipes import Pantry

    pantry = Pantry(paths, key=a.key, strip_prefix=a.strip_prefix, cache=EvalCache(a.cache_dir, enabled=not a.no_cache), base=getattr(a, "base", None))
    if getattr(a, "ray", None) is not None:  # after the pantry: a bad input is refused before a cluster starts
        from ..recipes.executor import RayExecutor

        if a.ray_workers is not None and a.ray_workers < 1:
            raise SoupError(f"--ray-workers {a.ray_workers}: give 1 or more")
        pantry.use_executor(RayExecutor(a.ray, workers=a.ray_workers), close=True)
    return pantry


def parse_floats(text: str, what: str) -> list[float]:
    from ..recipes.interpolation import parse_alphas

    try:
        return parse_alphas(text)
    except ValueError as e:
        raise SoupError(f"--{what}: {e}") from None


def progress(a: argparse.Namespace) -> bool | None:
    return False if a.no_progress else None


def add_output_options(p: argparse.ArgumentParser, *, output_help: str) -> None:
    p.add_argument("-o", "--output", help=output_help)
    p.add_argument("--no-plots", action="store_true", help="write the tables only (figures need matplotlib: pip install 'modelsoup[plot]')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def prepare(a: argparse.Namespace) -> None:
    """Refuse an existing output and a missing matplotlib before any work is done."""
    from ..io.output import check_output


    if a.output:
        given = [*(getattr(a, "inputs", None) or []), *(getattr(a, k, None) for k in ("a", "b", "c", "base"))]
        check_output(Path(a.output), a.overwrite, inputs=[p for p in given if p])
    if not a.no_plots:
        from ..analysis.plots import require_matplotlib

        require_matplotlib()

"""The `soup` command: parse -> recipe -> library call. Thin on purpose."""

from __future__ import annotations

import argparse
import json
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RecipeError, SoupError

log = logging.getLogger("modelsoup")


def _parse_set(items: list[str]) -> dict[str, Any]:
    from .config import load_yaml

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


def _parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SoupError(f"--weights {text!r}: give one number per model, comma-separated, e.g. --weights 0.7,0.3") from None


def _cmd_merge(a: argparse.Namespace) -> int:
    from .api import merge
    from .config import load_recipe, recipe_from_dict

    recipe_file = len(a.inputs) == 1 and a.method is None and Path(a.inputs[0]).suffix in (".yaml", ".yml")
    if recipe_file:
        flags = [f for f in ("base", "weights", "set", "dtype", "keys", "seed", "shard_size", "format", "key", "strip_prefix") if getattr(a, f)]
        if flags:
            raise SoupError(f"--{flags[0].replace('_', '-')} cannot be combined with a recipe file; put it in {a.inputs[0]}")
        recipe = load_recipe(a.inputs[0])
        if a.allow_nonfinite:
            recipe = dataclasses.replace(recipe, allow_nonfinite=True)
    else:
        if not a.inputs:
            raise SoupError("give a recipe file (soup merge recipe.yaml -o OUT) or models (soup merge --method linear A B -o OUT)")
        weights = _parse_weights(a.weights) if a.weights else None
        if weights is not None and len(weights) != len(a.inputs):
            raise SoupError(f"--weights has {len(weights)} values for {len(a.inputs)} models")

        def ref(p: str, i: int | None) -> dict[str, Any]:
            r: dict[str, Any] = {"path": p}
            if i is not None and weights is not None:
                r["weight"] = weights[i]
            if a.key:
                r["key"] = a.key
            if a.strip_prefix:
                r["strip_prefix"] = a.strip_prefix
            return r

        data: dict[str, Any] = {"method": a.method or "linear", "models": [ref(p, i) for i, p in enumerate(a.inputs)], "parameters": _parse_set(a.set)}
        for k in ("dtype", "keys", "seed"):
            if getattr(a, k) is not None:
                data[k] = getattr(a, k)
        if a.base:
            data["base"] = ref(a.base, None)
        if a.allow_nonfinite:
            data["allow_nonfinite"] = True
        output: dict[str, Any] = {}
        if a.shard_size:
            output["shard_size"] = a.shard_size
        if a.format:
            output["format"] = a.format
        if output:
            data["output"] = output
        recipe = recipe_from_dict(data, source="command line")
    result = merge(recipe, a.output, overwrite=a.overwrite, workers=a.workers, progress=False if a.no_progress else None, hash_files=not a.no_hash)
    print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from .config import describe, load_recipe

    recipe = load_recipe(a.recipe)
    print(f"{a.recipe}: valid")
    print(describe(recipe))
    return 0


def _cmd_methods(a: argparse.Namespace) -> int:
    from .methods import available_methods, get_method

    methods = [get_method(a.name)] if a.name else available_methods()
    for m in methods:
        need = {"required": "needs a base", "optional": "base optional", "none": "no base"}[m.base]
        count = f"{m.min_models}" + ("+" if m.max_models is None else ("" if m.max_models == m.min_models else f"-{m.max_models}"))
        print(f"{m.name}  ({need}; {count} models{'; random, seeded per tensor' if m.random else ''})")
        print(f"    {m.summary}")
        print(f"    paper: {m.paper}")
        for p in m.params:
            alias = f" (alias: {', '.join(p.aliases)})" if p.aliases else ""
            per = " [per model]" if p.per_model else ""
            print(f"    - {p.name} = {p.default!r}{per}  {p.describe_range()}{alias}: {p.help}")
        print()
    return 0


def _evaluators(a: argparse.Namespace, default_model: str | None) -> tuple[Any, Any]:
    from .eval.factory import make_domain_evaluators, make_evaluators, parse_domains

    opts = dict(model=a.model or default_model, text_column=a.text_column, label_column=a.label_column, text_pair_column=a.text_pair_column,
                max_length=a.max_length, batch_size=a.batch_size, limit=a.limit, device=a.device, progress=False if a.no_progress else None)
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


def _first_folder(paths: list[str]) -> str | None:
    return next((p for p in paths if (Path(p) / "config.json").is_file()), None)


def _pantry(a: argparse.Namespace, paths: list[str]) -> Any:
    from .eval.cache import EvalCache
    from .recipes import Pantry

    return Pantry(paths, key=a.key, strip_prefix=a.strip_prefix, cache=EvalCache(a.cache_dir, enabled=not a.no_cache))


def _cmd_cook(a: argparse.Namespace) -> int:
    from .config import parse_size
    from .recipes import cook

    from .recipes.cook import RECIPES

    recipes = a.recipes if a.recipes is not None else [r.strip().replace("-", "_") for r in a.soups.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SoupError(f"--soups: unknown {', '.join(unknown)}; choose from {', '.join(r.replace('_', '-') for r in RECIPES)}")
    save = None if a.save in (None, "all") else ([] if a.save == "none" else [s.strip() for s in a.save.split(",") if s.strip()])
    learned = {"by": a.learn_by, "lr": a.lr, "epochs": a.epochs, "temperature": a.temperature, "optimizer": a.optimizer}
    if a.max_memory:
        size = parse_size(a.max_memory)
        if size is None:
            raise SoupError(f"--max-memory {a.max_memory!r}: give a size like 8GB")
        learned["max_memory"] = size
    heldout, test = _evaluators(a, _first_folder(a.inputs))
    with _pantry(a, a.inputs) as pantry:
        result = cook(pantry, heldout, test=test, recipes=recipes, output=a.output, save=save, overwrite=a.overwrite, allow_equal=a.allow_equal,
                      learned_options=learned, calibrate=a.calibrate, progress=False if a.no_progress else None)
    print(result.to_markdown())
    if a.output:
        print(f"results and soups in {a.output} ({result.seconds:.0f} s)")
    return 0


def _cmd_interpolate(a: argparse.Namespace) -> int:
    from .io.output import check_output
    from .recipes import interpolate
    from .recipes.cook import json_files, write_results
    from .recipes.interpolate import parse_alphas

    try:
        alphas = parse_alphas(a.alphas)
    except ValueError as e:
        raise SoupError(str(e)) from None
    check_output(Path(a.output), a.overwrite, inputs=[a.a, a.b])
    heldout, test = _evaluators(a, _first_folder([a.a, a.b]))
    progress = False if a.no_progress else None
    with _pantry(a, [a.a, a.b]) as pantry:
        res = interpolate(pantry, None, heldout, alphas=alphas, test=test, progress=progress)
        write_results(Path(a.output), {"interpolated": res.recipe}, json_files(res.to_markdown, res.to_json), inputs=pantry,
                      overwrite=a.overwrite, progress=progress)
    print(res.to_markdown())
    print(f"alpha {res.best_alpha:g} chosen on held-out data; written to {Path(a.output) / 'interpolated'}")
    return 0


def _cmd_topk(a: argparse.Namespace) -> int:
    from .io.output import check_output
    from .recipes import metrics_from_log, metrics_from_names, topk_average
    from .recipes.cook import json_files, write_results

    check_output(Path(a.output), a.overwrite, inputs=a.inputs)
    sources = sum(bool(x) for x in (a.log, a.from_names, a.heldout))
    if sources != 1:
        raise SoupError("rank the checkpoints by exactly one of: --log FILE --metric COLUMN, --from-names KEY, or an evaluator (--heldout FILE)")
    with _pantry(a, a.inputs) as pantry:
        if a.log:
            if not a.metric:
                raise SoupError("--log needs --metric COLUMN (e.g. --metric eval_top1)")
            res = topk_average(pantry, a.k, metrics=metrics_from_log(a.inputs, a.log, a.metric, epoch_column=a.epoch_column),
                               lower_is_better=a.lower_is_better, metric_name=a.metric)
        elif a.from_names:
            res = topk_average(pantry, a.k, metrics=metrics_from_names(a.inputs, a.from_names), lower_is_better=a.lower_is_better, metric_name=a.from_names)
        else:
            heldout, _ = _evaluators(a, _first_folder(a.inputs))
            res = topk_average(pantry, a.k, evaluator=heldout)
        write_results(Path(a.output), {"topk": res.recipe}, json_files(res.to_markdown, res.to_json), inputs=pantry, overwrite=a.overwrite,
                      progress=False if a.no_progress else None)
    print(res.to_markdown())
    print(f"average of {len(res.members)} written to {Path(a.output) / 'topk'}")
    return 0


def _add_eval_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
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
    g.add_argument("--device", help="cpu (default), cuda, cuda:1 ...")
    g.add_argument("--cache-dir", help="evaluation cache (default ~/.cache/modelsoup/evals)")
    g.add_argument("--no-cache", action="store_true", help="re-evaluate everything, store nothing")
    g.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    g.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_cook_parser(sub: Any, name: str, help: str, recipes: list[str] | None, output_required: bool = True) -> argparse.ArgumentParser:
    from .recipes.cook import RECIPES

    c = sub.add_parser(name, help=help, description=help)
    c.add_argument("inputs", nargs="+", help="the ingredients: checkpoint files or model folders")
    c.add_argument("-o", "--output", required=output_required, help="folder for results.md, results.json and one subfolder per soup")
    if recipes is None:
        c.add_argument("--soups", default=",".join(r.replace("_", "-") for r in RECIPES),
                       help="what to cook, comma-separated: " + ", ".join(r.replace("_", "-") for r in RECIPES)
                       + " (ensemble = logit averaging, prob-ensemble = probability averaging, vote = majority vote)")
        c.add_argument("--save", help="soups to write: all (default), none, or a list like greedy,learned")
    c.add_argument("--allow-equal", action="store_true", help="greedy: keep a candidate when the held-out score ties (>=), not only when it improves")
    if recipes is None or "learned" in recipes:
        c.add_argument("--learn-by", choices=["model", "tensor"], default="model", help="learned soup: one coefficient per model, or per model and tensor")
        c.add_argument("--lr", type=float, default=0.05, help="learned soup learning rate (default 0.05)")
        c.add_argument("--epochs", type=int, default=5, help="learned soup epochs over the held-out data (default 5)")
        c.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the coefficients")
        c.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
        c.add_argument("--max-memory", help="memory the learned soup may use, e.g. 20GB (default: what is free)")
    c.add_argument("--no-temperature-scaling", dest="calibrate", action="store_false",
                   help="report calibration as is only (default: also after a temperature fitted on held-out predictions, with --test)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_eval_options(c)
    c.set_defaults(fn=_cmd_cook, recipes=recipes, save=None, learn_by="model", lr=0.05, epochs=5, temperature=1.0, optimizer="adamw", max_memory=None)
    return c


def _cmd_templates(a: argparse.Namespace) -> int:
    from .analysis import templates as tp
    from .io import open_checkpoint
    from .io.output import check_output, staged_output
    from .recipes.pantry import short_labels

    out = Path(a.output)
    sources = [*a.inputs, a.soup]
    check_output(out, a.overwrite, inputs=sources)
    labels = short_labels(sources)
    labels[-1] = f"{labels[-1]} (soup)"
    states = {}
    for label, src in zip(labels, sources):
        with open_checkpoint(src, key=a.key, strip_prefix=a.strip_prefix) as ck:
            states[label] = {n: ck.read(n) for n in ck.names() if len(ck.meta(n)[1]) == 2}
    if a.vocabulary:
        temps = {k: tp.vocabulary_templates(v) for k, v in states.items()}
    else:
        chain = a.chain.split(",") if a.chain else None
        temps = {k: tp.class_templates(v, weight=a.weight, chain=chain) for k, v in states.items()}
    corr = tp.template_correlations(temps, labels[-1])
    lines = [f"| model | mean r with {labels[-1]} | per class |", "|---|---:|---|"]
    lines += [f"| {k} | {sum(v) / len(v):.3f} | {', '.join(f'{x:.2f}' for x in v)} |" for k, v in corr.items()]
    with staged_output(out, a.overwrite, inputs=sources) as tmp:
        if a.vocabulary:
            from .eval.text import require_transformers

            tok = require_transformers().AutoTokenizer.from_pretrained(a.tokenizer or a.soup, local_files_only=True)
            lines += ["", f"Top {a.top} tokens per class:", ""]
            for k, t in temps.items():
                lines += [f"- {k}: " + " | ".join(f"class {c}: {' '.join(toks)}" for c, toks in enumerate(tp.top_tokens(t, tok, a.top)))]
        else:
            try:
                rows, cols = (int(x) for x in a.shape.lower().split("x"))
            except ValueError:
                raise SoupError(f"--shape {a.shape!r}: give HEIGHTxWIDTH, e.g. 8x8 (or 3x32x32 flattened inputs are not images: use --vocabulary for text)") from None
            tp.template_grid(temps, (rows, cols), tmp / "templates.png", correlations=corr, reference=labels[-1])
        (tmp / "templates.md").write_text("\n".join(lines) + "\n")
        (tmp / "templates.json").write_text(json.dumps({"reference": labels[-1], "correlations": corr}, indent=1))
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    progress = False if a.quiet else None
    if a.domains:
        from .demo.digits import run_domains_demo

        result, corr = run_domains_demo(Path(a.out), seed=a.split_seed, progress=progress)
        print(result.to_markdown().split("### Calibration")[0])
        print("mean correlation of each model's class templates with the uniform soup's:")
        for name, values in corr.items():
            print(f"  {name:<14} {sum(values) / len(values):.3f}")
        print(f"\nsoups, tables and figures (templates.png) in {a.out}")
        return 0
    if a.digits:
        from .demo import run_demo

        run_demo(Path(a.out), quick=a.quick, seed=a.split_seed)
        return 0
    from .demo.text import describe_sweep, run_text_demo, sweep_config

    try:
        config = sweep_config(quick=a.quick, ingredients=a.ingredients, split_seed=a.split_seed)
    except ValueError as e:
        raise SoupError(str(e)) from None
    print(f"all-MiniLM-L6-v2 on Rotten Tomatoes: {config.train} train / {config.val} held-out / {config.test} test reviews, "
          f"{len(config.ingredients)} fine-tunes from one linear-probe start:", flush=True)
    for line in describe_sweep(config):
        print(f"  {line}")
    res = run_text_demo(Path(a.out), config=config, cache_dir=Path(a.cache) if a.cache else None, learned_epochs=1 if a.quick else 5,
                        progress=progress)
    print()
    print(res.table())
    print(f"\nsoups, results.md and figures (heldout_vs_test.png, reliability.png) in {a.out}; "
          f"ingredients cached in {res.sweep.start.parent} ({res.seconds / 60:.1f} min)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soup", description="Model soups and weight-space merging of fine-tuned checkpoints.")
    p.add_argument("--version", action="version", version=f"modelsoup {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints (a recipe file, or models and flags)",
                       description="soup merge RECIPE.yaml -o OUT   |   soup merge --method ties --base B A1 A2 -o OUT --set density=0.5")
    m.add_argument("inputs", nargs="*", help="a recipe file (native or mergekit YAML), or the models to merge")
    m.add_argument("-o", "--output", required=True, help="output folder (HF layout) or file (.safetensors / .pt)")
    m.add_argument("--method", help="merge method (see `soup methods`); default linear")
    m.add_argument("--base", help="base / pre-trained model")
    m.add_argument("--weights", help="comma-separated weight per model")
    m.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method parameter, repeatable")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the inputs')")
    m.add_argument("--keys", choices=["exact", "intersection", "base"], help="tensor names not in every model: refuse (exact, default), leave out, or take from base")
    m.add_argument("--seed", type=int, help="seed of random methods (dare)")
    m.add_argument("--shard-size", help="largest output shard, e.g. 5GB")
    m.add_argument("--format", choices=["safetensors", "torch"], help="output format of a folder output")
    m.add_argument("--key", help="entry of nested torch checkpoints holding the weights (state_dict, ema, ...)")
    m.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge inputs holding NaN/Inf instead of refusing")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.add_argument("--workers", type=int, help="threads (default: cores + 1, 2..8)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--no-hash", action="store_true", help="skip sha256 of inputs and outputs")
    m.set_defaults(fn=_cmd_merge)

    v = sub.add_parser("validate", help="check a recipe without merging")
    v.add_argument("recipe")
    v.set_defaults(fn=_cmd_validate)

    ms = sub.add_parser("methods", help="list merge methods with their parameters, defaults and papers")
    ms.add_argument("name", nargs="?")
    ms.set_defaults(fn=_cmd_methods)

    _add_cook_parser(sub, "cook", "score ingredients and cook uniform, greedy and learned soups and ensembles on held-out data; table and soups", None)
    _add_cook_parser(sub, "greedy", "greedy soup: add ingredients best first while the held-out score improves", ["greedy"])
    _add_cook_parser(sub, "learn", "learned soup: mixing coefficients optimised on held-out data", ["learned"])
    _add_cook_parser(sub, "ensemble", "prediction ensembles of the ingredients: logit and probability averaging, majority vote, greedy, "
                     "stacking (N forward passes; no model is written)", ["ensemble", "prob_ensemble", "vote", "greedy_ensemble", "stacking"],
                     output_required=False)

    ip = sub.add_parser("interpolate", help="score the line between two models and keep the best mixing value (WiSE-FT)",
                        description="theta(alpha) = (1 - alpha) A + alpha B on a grid; the best alpha on held-out data is written")
    ip.add_argument("a", help="model at alpha 0 (for WiSE-FT: the zero-shot / pre-trained model)")
    ip.add_argument("b", help="model at alpha 1 (for WiSE-FT: the fine-tuned model)")
    ip.add_argument("-o", "--output", required=True, help="folder for results and the chosen model (subfolder interpolated/)")
    ip.add_argument("--alphas", default="0:1:0.1", help="mixing values: 0,0.5,1 or start:stop:step (default 0:1:0.1)")
    ip.add_argument("--overwrite", action="store_true")
    _add_eval_options(ip)
    ip.set_defaults(fn=_cmd_interpolate)

    tk = sub.add_parser("topk", help="average the k best checkpoints of one training run (by a logged metric or an evaluator)")
    tk.add_argument("inputs", nargs="+", help="checkpoints of one run")
    tk.add_argument("-k", "--k", type=int, required=True, help="how many to average")
    tk.add_argument("-o", "--output", required=True, help="folder for results and the average (subfolder topk/)")
    tk.add_argument("--log", help="training log (CSV/JSONL, one row per epoch: timm summary.csv, Lightning metrics.csv)")
    tk.add_argument("--metric", help="the log column to rank by (e.g. eval_top1, val_acc)")
    tk.add_argument("--epoch-column", default="epoch", help="the log column with the epoch number (default epoch)")
    tk.add_argument("--from-names", metavar="KEY", help="read KEY=value from checkpoint file names (Lightning), e.g. val_acc")
    direction = tk.add_mutually_exclusive_group()
    direction.add_argument("--lower-is-better", dest="lower_is_better", action="store_const", const=True,
                           help="rank ascending (losses, errors); default: inferred from the metric's name")
    direction.add_argument("--higher-is-better", dest="lower_is_better", action="store_const", const=False,
                           help="rank descending (accuracies); default: inferred from the metric's name")
    tk.add_argument("--overwrite", action="store_true")
    _add_eval_options(tk, required=False)
    tk.set_defaults(fn=_cmd_topk)

    from .analysis.commands import add_commands

    add_commands(sub)  # inspect, curve, compare, scale, report

    tm = sub.add_parser("templates", help="per-class weight templates of ingredients and a soup, with their correlations",
                        description="Class weights as images (a linear/first layer on image inputs) or projected on the vocabulary "
                        "(BERT sequence classifiers), per model, and each model's correlation with the soup's (Wang et al. 2024).")
    tm.add_argument("inputs", nargs="+", help="ingredients")
    tm.add_argument("--soup", required=True, help="the soup (the reference for correlations)")
    tm.add_argument("-o", "--output", required=True, help="folder for templates.png / templates.md / templates.json")
    tm.add_argument("--shape", default="8x8", help="image shape of the inputs, HEIGHTxWIDTH (default 8x8: scikit-learn digits)")
    tm.add_argument("--weight", help="the (classes x inputs) weight to draw (default: the product of the model's linear layers)")
    tm.add_argument("--chain", help="comma-separated weights from input to output whose product gives the templates")
    tm.add_argument("--vocabulary", action="store_true", help="text classifier: class weights projected on the word embeddings")
    tm.add_argument("--tokenizer", help="folder of the tokenizer for --vocabulary (default: the soup)")
    tm.add_argument("--top", type=int, default=10, help="tokens listed per class with --vocabulary")
    tm.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    tm.add_argument("--strip-prefix", help="tensor name prefix to remove")
    tm.add_argument("--overwrite", action="store_true")
    tm.set_defaults(fn=_cmd_templates)

    d = sub.add_parser("demo", help="soups of a real pretrained transformer (MiniLM) on real reviews, offline: table and figure",
                       description="Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes reviews from one linear-probe start with different "
                       "hyperparameters (cached: an interrupted demo resumes), then cooks uniform, greedy and learned soups and ensembles "
                       "with modelsoup's own API and prints the paper-style table.")
    d.add_argument("--out", default="out/demo", help="output folder: soups, results.md, figures (default out/demo)")
    d.add_argument("--cache", help="where fine-tuned ingredients and evaluations are kept (default ~/.cache/modelsoup/demo)")
    d.add_argument("--ingredients", type=int, help="size of the sweep (default 8; up to 14)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out/test split")
    d.add_argument("--quick", action="store_true", help="tiny sizes (about 2 minutes), for tests")
    d.add_argument("--digits", action="store_true", help="the small digits demo instead: MLPs on scikit-learn's digits, every merge method")
    d.add_argument("--domains", action="store_true", help="multi-domain digits: linear classifiers fine-tuned on digits 0-4 and 5-9, souped; "
                   "per-domain table and class-template grid")
    d.set_defaults(fn=_cmd_demo)
    for name in _READERS:
        sub.choices[name].add_argument(
            "--allow-global", action="append", metavar="MODULE.CLASS",
            help="a class a torch checkpoint may hold beyond tensors (repeatable); loaded as inert data, its code never runs. "
            "argparse.Namespace (timm), Lightning's AttributeDict and numpy scalars are allowed already")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that the same clean-up as Ctrl-C runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _with_signals() -> None:
    """Treat SIGTERM and SIGHUP like Ctrl-C: the temporary output is removed, nothing is left behind."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _terminate)


# Subcommands that read checkpoints, and so take --allow-global.
_READERS = ("merge", "cook", "greedy", "learn", "ensemble", "interpolate", "topk", "templates", "inspect", "curve", "compare", "scale")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="soup: %(message)s", stream=sys.stderr)
    _with_signals()
    try:
        from .io.pickles import allowed_globals

        with allowed_globals(getattr(args, "allow_global", None) or ()):
            return int(args.fn(args))
    except SoupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"terminated ({signal.Signals(e.signum).name}); no output was left half-written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except OSError as e:  # the last net: a file-system error no check above named
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

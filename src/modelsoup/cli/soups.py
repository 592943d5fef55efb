"""Soups that look at data: ``soup cook``, ``greedy``, ``learn``, ``ensemble``, ``interpolate``, ``topk``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SoupError
from .options import add_eval_options, default_model, evaluators, open_pantry, progress


def cmd_cook(a: argparse.Namespace) -> int:
    from ..recipe import parse_size
    from ..recipes import cook

    from ..recipes.names import RECIPES

    recipes = a.recipes if a.recipes is not None else [r.strip().replace("-", "_") for r in a.soups.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SoupError(f"--soups: unknown {', '.join(unknown)}; choose from {', '.join(r.replace('_', '-') for r in RECIPES)}")
    save = None if a.save in (None, "all") else ([] if a.save == "none" else [s.strip() for s in a.save.split(",") if s.strip()])
    learned = {"by": a.learn_by, "lr": a.lr, "epochs": a.epochs, "temperature": a.temperature, "optimizer": a.optimizer,
               "start": a.learn_start, "memory": a.learn_memory, "accumulate": a.learn_accumulate}
    if a.max_memory:
        size = parse_size(a.max_memory)
        if size is None:
            raise SoupError(f"--max-memory {a.max_memory!r}: give a size like 8GB")
        learned["max_memory"] = size
    heldout, test = evaluators(a, default_model(a, a.inputs))
    if a.dry_run:
        return _dry_run(a, recipes, save, learned, heldout, test)
    with open_pantry(a, a.inputs) as pantry:
        result = cook(pantry, heldout, test=test, recipes=recipes, output=a.output, save=save, overwrite=a.overwrite, allow_equal=a.allow_equal,
                      learned_options=learned, calibrate=a.calibrate, progress=progress(a),
                      as_adapter=getattr(a, "as_adapter", None), rank=getattr(a, "rank", None))
    print(result.to_markdown())
    if a.output:
        print(f"results and soups in {a.output} ({result.seconds:.0f} s)")
    return 0


def _dry_run(a: argparse.Namespace, recipes: list[str], save: list[str] | None, learned: dict[str, Any], heldout: Any, test: Any) -> int:
    """Print what the run would cost (evaluations, reads, memory, disk) and evaluate nothing."""
    import json

    from ..recipes.costs import soup_costs
    from ..recipes.names import ENSEMBLES

    soups = [r for r in recipes if r not in ENSEMBLES]
    saved = 0 if not a.output else len([r for r in soups if save is None or r in save])
    a.ray = None  # nothing is evaluated: no cluster
    with open_pantry(a, a.inputs) as pantry:
        cost = soup_costs(pantry, heldout, recipes, test=test is not None, epochs=learned.get("epochs", 5), start=learned.get("start", "best"),
                          learn_memory=learned.get("memory", "auto"), accumulate=learned.get("accumulate"), max_memory=learned.get("max_memory"),
                          saved=saved, output=a.output)
    print(json.dumps(cost.to_dict(), indent=2) if a.json else cost.describe())
    print("dry run: nothing was evaluated or written")
    return 0


def cmd_interpolate(a: argparse.Namespace) -> int:
    from ..io.output import check_output
    from ..recipes import interpolate
    from ..recipes.kitchen import json_files, write_results
    from ..recipes.interpolation import parse_alphas

    try:
        alphas = parse_alphas(a.alphas)
    except ValueError as e:
        raise SoupError(str(e)) from None
    check_output(Path(a.output), a.overwrite, inputs=[a.a, a.b])
    heldout, test = evaluators(a, default_model(a, [a.a, a.b]))
    show = progress(a)
    with open_pantry(a, [a.a, a.b]) as pantry:
        res = interpolate(pantry, None, heldout, alphas=alphas, test=test, progress=show)
        write_results(Path(a.output), {"interpolated": res.recipe}, json_files(res.to_markdown, res.to_json), inputs=pantry,
                      overwrite=a.overwrite, progress=show)
    print(res.to_markdown())
    print(f"alpha {res.best_alpha:g} chosen on held-out data; written to {Path(a.output) / 'interpolated'}")
    return 0


def cmd_topk(a: argparse.Namespace) -> int:
    from ..io.output import check_output
    from ..recipes import metrics_from_log, metrics_from_names, topk_average
    from ..recipes.kitchen import json_files, write_results

    check_output(Path(a.output), a.overwrite, inputs=a.inputs)
    sources = sum(bool(x) for x in (a.log, a.from_names, a.heldout))
    if sources != 1:
        raise SoupError("rank the checkpoints by exactly one of: --log FILE --metric COLUMN, --from-names KEY, or an evaluator (--heldout FILE)")
    with open_pantry(a, a.inputs) as pantry:
        if a.log:
            if not a.metric:
                raise SoupError("--log needs --metric COLUMN (e.g. --metric eval_top1)")
            res = topk_average(pantry, a.k, metrics=metrics_from_log(a.inputs, a.log, a.metric, epoch_column=a.epoch_column),
                               lower_is_better=a.lower_is_better, metric_name=a.metric)
        elif a.from_names:
            res = topk_average(pantry, a.k, metrics=metrics_from_names(a.inputs, a.from_names), lower_is_better=a.lower_is_better, metric_name=a.from_names)
        else:
            heldout, _ = evaluators(a, default_model(a, a.inputs))
            res = topk_average(pantry, a.k, evaluator=heldout)
        write_results(Path(a.output), {"topk": res.recipe}, json_files(res.to_markdown, res.to_json), inputs=pantry, overwrite=a.overwrite,
                      progress=progress(a))
    print(res.to_markdown())
    print(f"average of {len(res.members)} written to {Path(a.output) / 'topk'}")
    return 0


def cmd_adamerge(a: argparse.Namespace) -> int:
    from ..io.output import check_output
    from ..recipes import adamerging
    from ..recipes.kitchen import json_files, write_results

    if a.pretrained in a.inputs:
        raise SoupError(f"{a.pretrained} is the base; list only the fine-tunes after it")
    check_output(Path(a.output), a.overwrite, inputs=[a.pretrained, *a.inputs])
    heldout, _ = evaluators(a, default_model(a, [a.pretrained, *a.inputs]))
    with open_pantry(a, [a.pretrained, *a.inputs]) as pantry:
        res = adamerging(pantry, None, heldout, by=a.by, init=a.init, lr=a.lr, epochs=a.epochs, memory=a.learn_memory, accumulate=a.learn_accumulate,
                         progress=progress(a))
        write_results(Path(a.output), {"adamerging": res.recipe}, json_files(res.to_markdown, res.to_json), inputs=pantry, overwrite=a.overwrite,
                      progress=progress(a))
    print(res.to_markdown())
    print(f"mean entropy {res.start_entropy:.4f} -> {res.entropy:.4f}; the merge is in {Path(a.output) / 'adamerging'}")
    return 0


def add_cook_parser(sub: Any, name: str, help: str, recipes: list[str] | None, output_required: bool = True) -> argparse.ArgumentParser:
    from ..recipes.names import RECIPES

    c = sub.add_parser(name, help=help, description=help)
    c.add_argument("inputs", nargs="+", help="the ingredients: checkpoint files, model folders, or PEFT adapter folders (with --base)")
    c.add_argument("-o", "--output", required=output_required, help="folder for results.md, results.json and one subfolder per soup")
    if recipes is None:
        c.add_argument("--soups", default=",".join(r.replace("_", "-") for r in RECIPES),
                       help="what to cook, comma-separated: " + ", ".join(r.replace("_", "-") for r in RECIPES)
                       + " (ensemble = logit averaging, prob-ensemble = probability averaging, vote = majority vote)")
        c.add_argument("--save", help="soups to write: all (default), none, or a list like greedy,learned")
    c.add_argument("--allow-equal", action="store_true", help="greedy: keep a candidate when the held-out score ties (>=), not only when it improves")
    if recipes is None or "learned" in recipes:
        c.add_argument("--learn-by", choices=["model", "layer", "tensor"], default="model",
                      help="learned soup: one coefficient per model, per model and layer (of the layer stack), or per model and tensor")
        c.add_argument("--lr", type=float, default=0.05, help="learned soup learning rate (default 0.05)")
        c.add_argument("--epochs", type=int, default=5, help="learned soup epochs over the held-out data (default 5)")
        c.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the coefficients")
        c.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
        c.add_argument("--learn-start", choices=["best", "uniform", "greedy"], default="best",
                       help="learned soup start: the better of the uniform and greedy soups on held-out data (default), or one of them")
        c.add_argument("--learn-memory", choices=["auto", "resident", "streaming"], default="auto",
                       help="learned soup gradient: every ingredient resident in float32 ((N+4) x the model), or streamed one tensor at a time "
                            "(3 x the model, whatever N is; two reads of every ingredient per update); auto: resident when it fits")
        c.add_argument("--learn-accumulate", type=int, metavar="BATCHES",
                       help="learned soup: batches per update (default 1 resident; streaming: at most 8 updates per epoch)")
        c.add_argument("--max-memory", help="memory the learned soup may use, e.g. 20GB (default: what is free)")
    c.add_argument("--no-temperature-scaling", dest="calibrate", action="store_false",
                   help="report calibration as is only (default: also after a temperature fitted on held-out predictions, with --test)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--dry-run", action="store_true", help="print what the run would cost (evaluations, checkpoint reads, memory, disk) and stop")
    c.add_argument("--json", action="store_true", help="with --dry-run: the figures as JSON")
    if output_required:
        c.add_argument("--as-adapter", choices=["cat", "svd"],
                       help="with adapter ingredients (--base): write each soup as a PEFT adapter, cat (exact) or svd (truncated to --rank)")
        c.add_argument("--rank", type=int, help="output rank of --as-adapter svd (default: the largest input rank)")
    add_eval_options(c)
    c.set_defaults(fn=cmd_cook, recipes=recipes, save=None, learn_by="model", lr=0.05, epochs=5, temperature=1.0, optimizer="adamw", max_memory=None,
                   learn_start="best", learn_memory="auto", learn_accumulate=None)
    return c


def add_parsers(sub: Any) -> None:
    """Add this module's subcommands."""
    add_cook_parser(sub, "cook", "score ingredients and cook uniform, greedy and learned soups and ensembles on held-out data; table and soups", None)
    add_cook_parser(sub, "greedy", "greedy soup: add ingredients best first while the held-out score improves", ["greedy"])
    add_cook_parser(sub, "learn", "learned soup: mixing coefficients optimised on held-out data", ["learned"])
    add_cook_parser(sub, "ensemble", "prediction ensembles of the ingredients: logit and probability averaging, majority vote, greedy, "
                     "stacking (N forward passes; no model is written)", ["ensemble", "prob_ensemble", "vote", "greedy_ensemble", "stacking"],
                     output_required=False)
    ip = sub.add_parser("interpolate", help="score the line between two models and keep the best mixing value (WiSE-FT)",
                        description="theta(alpha) = (1 - alpha) A + alpha B on a grid; the best alpha on held-out data is written")
    ip.add_argument("a", help="model at alpha 0 (for WiSE-FT: the zero-shot / pre-trained model)")
    ip.add_argument("b", help="model at alpha 1 (for WiSE-FT: the fine-tuned model)")
    ip.add_argument("-o", "--output", required=True, help="folder for results and the chosen model (subfolder interpolated/)")
    ip.add_argument("--alphas", default="0:1:0.1", help="mixing values: 0,0.5,1 or start:stop:step (default 0:1:0.1)")
    ip.add_argument("--overwrite", action="store_true")
    add_eval_options(ip)
    ip.set_defaults(fn=cmd_interpolate)
    am = sub.add_parser("adamerge", help="AdaMerging: task-arithmetic coefficients learned by minimising prediction entropy on unlabeled data",
                        description="theta = BASE + sum_i lambda_i (FT_i - BASE), the lambdas (per model, layer or tensor) fitted by Adam to lower the "
                                    "entropy of the merged model's predictions on --heldout (its labels are only used to report the score)")
    am.add_argument("pretrained", metavar="BASE", help="the pre-trained model the fine-tunes share")
    am.add_argument("inputs", nargs="+", help="the fine-tunes (task models)")
    am.add_argument("-o", "--output", required=True, help="folder for results.md, results.json and the merge (subfolder adamerging/)")
    am.add_argument("--by", choices=["model", "layer", "tensor"], default="layer", help="one lambda per task, per task and layer (default), or per task and tensor")
    am.add_argument("--init", type=float, default=0.3, help="every lambda's start (default 0.3)")
    am.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    am.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    am.add_argument("--learn-memory", choices=["auto", "resident", "streaming"], default="auto",
                    help="every model resident in float32, or streamed one tensor at a time (as soup learn); auto: resident when it fits")
    am.add_argument("--learn-accumulate", type=int, metavar="BATCHES", help="batches per update")
    am.add_argument("--overwrite", action="store_true")
    add_eval_options(am)
    am.set_defaults(fn=cmd_adamerge)
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
    add_eval_options(tk, required=False)
    tk.set_defaults(fn=cmd_topk)

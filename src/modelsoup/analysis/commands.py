"""The diagnostics' subcommands of ``soup``: inspect, curve, compare, scale, report. Parse -> library call -> files."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SoupError


def _parse_floats(text: str, what: str) -> list[float]:
    from ..recipes.interpolate import parse_alphas

    try:
        return parse_alphas(text)
    except ValueError as e:
        raise SoupError(f"--{what}: {e}") from None


def _prepare(a: argparse.Namespace) -> None:
    """Refuse an existing output and a missing matplotlib before any work is done."""
    from ..io.output import check_output


    if a.output:
        given = [*(getattr(a, "inputs", None) or []), *(getattr(a, k, None) for k in ("a", "b", "c", "base"))]
        check_output(Path(a.output), a.overwrite, inputs=[p for p in given if p])
    if not a.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()


def _progress(a: argparse.Namespace) -> bool | None:
    return False if a.no_progress else None


def _pantry_inputs(pantry: Any) -> list[dict[str, Any]]:
    from .results import input_record

    return [input_record("model", lab, pantry.checkpoint(i), it.path) for i, (lab, it) in enumerate(zip(pantry.labels, pantry.items))]


def _finish(a: argparse.Namespace, name: str, result: Any, *, inputs: list[dict[str, Any]], figures: dict[str, Callable[[Path], Path]],
            verdict: Any = None, markdown: str | None = None) -> None:
    from .results import write_analysis

    text = markdown if markdown is not None else result.to_markdown()
    files = write_analysis(Path(a.output), name, result.to_json(), text, inputs=inputs, figures=figures, verdict=verdict, overwrite=a.overwrite) if a.output else []
    if verdict is not None:
        print(verdict.to_markdown())
    print(text)
    if files:
        print(f"wrote {', '.join(f.name for f in files)} in {a.output}")


def _cmd_inspect(a: argparse.Namespace) -> int:
    from ..io import open_checkpoint
    from . import plots
    from .results import input_record
    from .similarity import default_labels, similarity
    from .verdict import similarity_reasons, verdict

    _prepare(a)
    sources = a.inputs + ([a.base] if a.base else [])
    labels = default_labels(sources)
    cks = [open_checkpoint(s, key=a.key, strip_prefix=a.strip_prefix) for s in sources]
    try:
        sim = similarity(cks[: len(a.inputs)], base=cks[-1] if a.base else None, labels=labels, progress=_progress(a))
        inputs = [input_record("base" if a.base and i == len(sources) - 1 else "model", lab, ck, src)
                  for i, (lab, ck, src) in enumerate(zip(labels, cks, sources))] if a.output else []
    finally:
        for ck in cks:
            ck.close()
    figures = {} if a.no_plots else {"similarity.png": lambda p: plots.similarity_heatmaps(sim, p), "layers.png": lambda p: plots.layer_profile(sim, p)}
    _finish(a, "inspect", sim, inputs=inputs, figures=figures, verdict=verdict(similarity_reasons(sim)))
    return 0


def _cmd_curve(a: argparse.Namespace) -> int:
    from ..cli import _evaluators, _first_folder, _pantry
    from . import plots
    from .curves import line_curve, triangle_curve
    from .verdict import barrier_reasons, verdict

    models = [a.a, a.b] + ([a.c] if a.c else [])
    alphas = _parse_floats(a.alphas, "alphas")
    _prepare(a)
    heldout, test = _evaluators(a, _first_folder(models))
    with _pantry(a, models) as pantry:
        if a.c:
            curve = triangle_curve(pantry, heldout, steps=a.steps, test=test, progress=_progress(a))
        else:
            curve = line_curve(pantry, None, heldout, alphas=alphas, test=test, progress=_progress(a))
        inputs = _pantry_inputs(pantry) if a.output else []
    figures = {} if a.no_plots else {("triangle.png" if a.c else "curve.png"): lambda p: plots.curve_plot(curve, p)}
    _finish(a, "curve", curve, inputs=inputs, figures=figures, verdict=verdict(barrier_reasons(curve)))
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from ..cli import _evaluators, _first_folder, _pantry
    from . import plots
    from .ensembling import soup_vs_ensemble
    from .verdict import ensemble_reasons, verdict

    _prepare(a)
    heldout, test = _evaluators(a, _first_folder(a.inputs))
    with _pantry(a, a.inputs) as pantry:
        splits = {"heldout": soup_vs_ensemble(pantry, heldout, order=a.order, combine=a.combine, progress=_progress(a))}
        if test is not None:
            order = [pantry.labels.index(lab) for lab in splits["heldout"].labels]  # the same order on test data
            splits["test"] = soup_vs_ensemble(pantry, test, order=order, combine=a.combine, progress=_progress(a))
            splits["test"].order = f"{a.order}, as on held-out data"
        inputs = _pantry_inputs(pantry) if a.output else []
    result = _Splits(splits)
    figures = {} if a.no_plots else {f"ensemble_{s}.png": (lambda c: lambda p: plots.ensemble_plot(c, p))(c) for s, c in splits.items()}
    _finish(a, "compare", result, inputs=inputs, figures=figures, verdict=verdict(ensemble_reasons(splits["heldout"])))
    return 0


class _Splits:
    """Results on held-out and test data, written as one."""

    def __init__(self, splits: dict[str, Any]) -> None:
        self.splits = splits

    def to_json(self) -> dict[str, Any]:
        return {s: r.to_json() for s, r in self.splits.items()}

    def to_markdown(self) -> str:
        return "\n".join(f"### {'Held-out' if s == 'heldout' else 'Test'} data\n\n{r.to_markdown()}" for s, r in self.splits.items())


def _cmd_scale(a: argparse.Namespace) -> int:
    from ..cli import _evaluators, _first_folder, _pantry
    from . import plots
    from .scaling import magnitude_stability

    factors = _parse_floats(a.factors, "factors")
    _prepare(a)
    heldout, _ = _evaluators(a, _first_folder(a.inputs))
    with _pantry(a, a.inputs) as pantry:
        res = magnitude_stability(pantry, heldout, factors=factors, scope=a.scope, soup=not a.no_soup, progress=_progress(a))
        inputs = _pantry_inputs(pantry) if a.output else []
    figures = {} if a.no_plots else {"scaling.png": lambda p: plots.scaling_plot(res, p)}
    _finish(a, "scale", res, inputs=inputs, figures=figures)
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    page, summary = write_report(a.folders, a.output, title=a.title, overwrite=a.overwrite)
    print(f"wrote {page} and {summary}")
    return 0


def _common(p: argparse.ArgumentParser, *, output_help: str) -> None:
    p.add_argument("-o", "--output", help=output_help)
    p.add_argument("--no-plots", action="store_true", help="write the tables only (figures need matplotlib: pip install 'modelsoup[plot]')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_commands(sub: Any) -> None:
    """Add ``inspect``, ``curve``, ``compare``, ``scale`` and ``report`` to the ``soup`` subcommands."""
    from ..cli import _add_eval_options

    p = sub.add_parser("inspect", help="will these models soup? weight and task-vector similarity per pair and per layer, with a verdict",
                       description="Weights only, streaming (memory: one tensor per model): cosine and L2 distance of weights and of task vectors "
                                   "(difference from --base), sign conflicts, norms, per layer; a verdict with reasons; heat-map and per-layer PNGs.")
    p.add_argument("inputs", nargs="+", help="checkpoint files or model folders")
    p.add_argument("--base", help="the pre-trained model they were fine-tuned from (enables task vectors and sign conflicts)")
    p.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    p.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p, output_help="folder for inspect.json, inspect.md, similarity.png and layers.png (default: print only)")
    p.set_defaults(fn=_cmd_inspect)

    c = sub.add_parser("curve", help="score the line between two models (or the triangle of three) and report the barrier",
                       description="Held-out score and loss at a grid of soups of A and B (alpha) or of A, B and C (--steps); the barrier is the "
                                   "worst drop below the straight line between the end points' scores. Unlike `interpolate`, no model is written.")
    c.add_argument("a", help="first model (alpha 0)")
    c.add_argument("b", help="second model (alpha 1)")
    c.add_argument("c", nargs="?", help="third model: score the triangle of soups of the three")
    c.add_argument("--alphas", default="0:1:0.1", help="line: weights of B, 0,0.5,1 or start:stop:step (default 0:1:0.1; 0 and 1 always added)")
    c.add_argument("--steps", type=int, default=6, help="triangle: grid step 1/STEPS ((STEPS+1)(STEPS+2)/2 points; default 6)")
    _common(c, output_help="folder for curve.json, curve.md and curve.png / triangle.png (default: print only)")
    _add_eval_options(c)
    c.set_defaults(fn=_cmd_curve)

    cp = sub.add_parser("compare", help="weight vs logit averaging: uniform soup vs ensemble of the first k ingredients, k = 1..N",
                        description="Accuracy, loss, confidence, entropy and soup-ensemble agreement for growing numbers of ingredients, "
                                    "on held-out (and --test) data.")
    cp.add_argument("inputs", nargs="+", help="the ingredients")
    cp.add_argument("--order", choices=["input", "best"], default="input", help="order of adding: as given (default) or best held-out score first")
    cp.add_argument("--combine", choices=["logits", "probs", "vote"], default="logits", help="the ensemble: mean of logits (default, the paper's), of probabilities, or majority vote")
    _common(cp, output_help="folder for compare.json, compare.md and ensemble_*.png (default: print only)")
    _add_eval_options(cp)
    cp.set_defaults(fn=_cmd_compare)

    s = sub.add_parser("scale", help="weight-magnitude stability: scale each ingredient and the uniform soup and compare predictions",
                       description="Each model's weights times each factor: agreement with its unscaled predictions, score, confidence "
                                   "(held-out data; --test is not used).")
    s.add_argument("inputs", nargs="+", help="the ingredients")
    s.add_argument("--factors", default="0.5,0.75,0.9,1,1.1,1.25,1.5,2", help="scale factors (default 0.5,0.75,0.9,1,1.1,1.25,1.5,2)")
    s.add_argument("--scope", choices=["matrices", "all"], default="matrices",
                   help="what to scale: tensors with 2+ dimensions (default; biases and norm gains stay) or every floating tensor")
    s.add_argument("--no-soup", action="store_true", help="only the ingredients, not their uniform soup")
    _common(s, output_help="folder for scale.json, scale.md and scaling.png (default: print only)")
    _add_eval_options(s)
    s.set_defaults(fn=_cmd_scale)

    r = sub.add_parser("report", help="gather the results in some folders into one self-contained HTML file and a Markdown summary",
                       description="Finds inspect/curve/compare/scale results, cook/greedy/interpolate results.json and merge manifests "
                                   "(recursively); figures are embedded, no server or network is needed to open it.")
    r.add_argument("folders", nargs="+", help="output folders of the diagnostics, cook, merges")
    r.add_argument("-o", "--output", required=True, help="the HTML file (the Markdown summary is written beside it, .md)")
    r.add_argument("--title", default="modelsoup report", help="the report's title")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report")
    r.set_defaults(fn=_cmd_report)

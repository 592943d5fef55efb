"""Will it soup? ``soup inspect``, ``curve``, ``compare``, ``scale``, ``templates``, ``report``: parse, call the analysis, print and write."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SoupError
from collections.abc import Callable

from .options import add_eval_options, add_output_options, default_model, evaluators, open_pantry, parse_floats, prepare, progress


def pantry_inputs(pantry: Any) -> list[dict[str, Any]]:
    from ..analysis.results import input_record

    return [input_record("model", lab, pantry.checkpoint(i), it.path) for i, (lab, it) in enumerate(zip(pantry.labels, pantry.items))]


def finish(a: argparse.Namespace, name: str, result: Any, *, inputs: list[dict[str, Any]], figures: dict[str, Callable[[Path], Path]],
            verdict: Any = None, markdown: str | None = None) -> None:
    from ..analysis.results import write_analysis

    text = markdown if markdown is not None else result.to_markdown()
    files = write_analysis(Path(a.output), name, result.to_json(), text, inputs=inputs, figures=figures, verdict=verdict, overwrite=a.overwrite) if a.output else []
    if verdict is not None:
        print(verdict.to_markdown())
    print(text)
    if files:
        print(f"wrote {', '.join(f.name for f in files)} in {a.output}")


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..io import open_checkpoint
    from ..io.adapters import adapted, is_adapter
    from ..analysis import plots
    from ..analysis.results import input_record
    from ..analysis.similarity import default_labels, similarity
    from ..analysis.verdict import similarity_reasons, verdict

    prepare(a)
    sources = a.inputs + ([a.base] if a.base else [])
    labels = default_labels(sources)
    cks = []
    try:
        for s in sources:  # an adapter folder is its base with the adapter applied: its task vector is the adapter's delta
            if is_adapter(s):
                if not a.base:
                    raise SoupError(f"{s}: is a PEFT adapter; give the model it was trained on (--base BASE)")
                if s == sources[-1] and len(cks) == len(a.inputs):
                    raise SoupError(f"--base {s}: is a PEFT adapter; the base must be the full model the adapters were trained on")
                cks.append(adapted(open_checkpoint(a.base, key=a.key, strip_prefix=a.strip_prefix), Path(s), s))
            else:
                cks.append(open_checkpoint(s, key=a.key, strip_prefix=a.strip_prefix))
        sim = similarity(cks[: len(a.inputs)], base=cks[-1] if a.base else None, labels=labels, progress=progress(a))
        inputs = [input_record("base" if a.base and i == len(sources) - 1 else "model", lab, ck, src)
                  for i, (lab, ck, src) in enumerate(zip(labels, cks, sources))] if a.output else []
    finally:
        for ck in cks:
            ck.close()
    figures = {} if a.no_plots else {"similarity.png": lambda p: plots.similarity_heatmaps(sim, p), "layers.png": lambda p: plots.layer_profile(sim, p)}
    finish(a, "inspect", sim, inputs=inputs, figures=figures, verdict=verdict(similarity_reasons(sim)))
    return 0


def cmd_curve(a: argparse.Namespace) -> int:
    from ..analysis import plots
    from ..analysis.curves import line_curve, triangle_curve
    from ..analysis.verdict import barrier_reasons, verdict

    models = [a.a, a.b] + ([a.c] if a.c else [])
    alphas = parse_floats(a.alphas, "alphas")
    if a.repair and not a.align:
        raise SoupError("--repair renormalises the soups of aligned models; add --align")
    prepare(a)
    heldout, test = evaluators(a, default_model(a, models))
    if a.align:
        return _aligned_curve(a, models, alphas, heldout, test)
    with open_pantry(a, models) as pantry:
        if a.c:
            curve = triangle_curve(pantry, heldout, steps=a.steps, test=test, progress=progress(a))
        else:
            curve = line_curve(pantry, None, heldout, alphas=alphas, test=test, progress=progress(a))
        inputs = pantry_inputs(pantry) if a.output else []
    figures = {} if a.no_plots else {("triangle.png" if a.c else "curve.png"): lambda p: plots.curve_plot(curve, p)}
    finish(a, "curve", curve, inputs=inputs, figures=figures, verdict=verdict(barrier_reasons(curve)))
    return 0


def _aligned_curve(a: argparse.Namespace, models: list[str], alphas: list[float], heldout: Any, test: Any) -> int:
    from ..analysis import plots
    from ..analysis.curves import aligned_curves
    from ..analysis.verdict import alignment_reasons, verdict
    from .align import align_kwargs

    with open_pantry(a, models) as pantry:
        curves = aligned_curves(pantry, heldout, alphas=alphas, steps=a.steps, test=test, repair=a.repair, progress=progress(a), **align_kwargs(a))
        inputs = pantry_inputs(pantry) if a.output else []
    name = "triangle" if a.c else "curve"
    figures = {} if a.no_plots else {f"{name}.png": lambda p: plots.curve_plot(curves.curves["before"], p),
                                     f"{name}-aligned.png": lambda p: plots.aligned_curve_plot(curves, p)}
    finish(a, "curve", curves, inputs=inputs, figures=figures, verdict=verdict(alignment_reasons(curves)))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from ..analysis import plots
    from ..analysis.ensembling import soup_vs_ensemble
    from ..analysis.verdict import ensemble_reasons, verdict

    prepare(a)
    heldout, test = evaluators(a, default_model(a, a.inputs))
    with open_pantry(a, a.inputs) as pantry:
        splits = {"heldout": soup_vs_ensemble(pantry, heldout, order=a.order, combine=a.combine, progress=progress(a))}
        if test is not None:
            order = [pantry.labels.index(lab) for lab in splits["heldout"].labels]  # the same order on test data
            splits["test"] = soup_vs_ensemble(pantry, test, order=order, combine=a.combine, progress=progress(a))
            splits["test"].order = f"{a.order}, as on held-out data"
        inputs = pantry_inputs(pantry) if a.output else []
    result = _Splits(splits)
    figures = {} if a.no_plots else {f"ensemble_{s}.png": (lambda c: lambda p: plots.ensemble_plot(c, p))(c) for s, c in splits.items()}
    finish(a, "compare", result, inputs=inputs, figures=figures, verdict=verdict(ensemble_reasons(splits["heldout"])))
    return 0


class _Splits:
    """Results on held-out and test data, written as one."""

    def __init__(self, splits: dict[str, Any]) -> None:
        self.splits = splits

    def to_json(self) -> dict[str, Any]:
        return {s: r.to_json() for s, r in self.splits.items()}

    def to_markdown(self) -> str:
        return "\n".join(f"### {'Held-out' if s == 'heldout' else 'Test'} data\n\n{r.to_markdown()}" for s, r in self.splits.items())


def cmd_scale(a: argparse.Namespace) -> int:
    from ..analysis import plots
    from ..analysis.scaling import magnitude_stability

    factors = parse_floats(a.factors, "factors")
    prepare(a)
    heldout, _ = evaluators(a, default_model(a, a.inputs))
    with open_pantry(a, a.inputs) as pantry:
        res = magnitude_stability(pantry, heldout, factors=factors, scope=a.scope, soup=not a.no_soup, progress=progress(a))
        inputs = pantry_inputs(pantry) if a.output else []
    figures = {} if a.no_plots else {"scaling.png": lambda p: plots.scaling_plot(res, p)}
    finish(a, "scale", res, inputs=inputs, figures=figures)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from ..analysis.report import write_report

    page, summary = write_report(a.folders, a.output, title=a.title, overwrite=a.overwrite)
    print(f"wrote {page} and {summary}")
    return 0


def cmd_templates(a: argparse.Namespace) -> int:
    from ..analysis.templates import write_templates

    try:
        rows, cols = (int(x) for x in a.shape.lower().split("x"))
    except ValueError:
        raise SoupError(f"--shape {a.shape!r}: give HEIGHTxWIDTH, e.g. 8x8 (or 3x32x32 flattened inputs are not images: use --vocabulary for text)") from None
    text = write_templates(a.inputs, a.soup, a.output, overwrite=a.overwrite, key=a.key, strip_prefix=a.strip_prefix, vocabulary=a.vocabulary,
                           tokenizer=a.tokenizer, top=a.top, shape=(rows, cols), weight=a.weight, chain=a.chain.split(",") if a.chain else None)
    print(text)
    print(f"written to {a.output}")
    return 0


def add_parsers(sub: Any) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("inspect", help="will these models soup? weight and task-vector similarity per pair and per layer, with a verdict",
                       description="Weights only, streaming (memory: one tensor per model): cosine and L2 distance of weights and of task vectors "
                                   "(difference from --base), sign conflicts, norms, per layer; a verdict with reasons; heat-map and per-layer PNGs.")
    p.add_argument("inputs", nargs="+", help="checkpoint files or model folders")
    p.add_argument("--base", help="the pre-trained model they were fine-tuned from (enables task vectors and sign conflicts)")
    p.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    p.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_options(p, output_help="folder for inspect.json, inspect.md, similarity.png and layers.png (default: print only)")
    p.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("curve", help="score the line between two models (or the triangle of three) and report the barrier",
                       description="Held-out score and loss at a grid of soups of A and B (alpha) or of A, B and C (--steps); the barrier is the "
                                   "worst drop below the straight line between the end points' scores. Unlike `interpolate`, no model is written.")
    c.add_argument("a", help="first model (alpha 0)")
    c.add_argument("b", help="second model (alpha 1)")
    c.add_argument("c", nargs="?", help="third model: score the triangle of soups of the three")
    c.add_argument("--alphas", default="0:1:0.1", help="line: weights of B, 0,0.5,1 or start:stop:step (default 0:1:0.1; 0 and 1 always added)")
    c.add_argument("--steps", type=int, default=6, help="triangle: grid step 1/STEPS ((STEPS+1)(STEPS+2)/2 points; default 6)")
    add_output_options(c, output_help="folder for curve.json, curve.md and curve.png / triangle.png (default: print only)")
    add_eval_options(c)
    from .align import add_align_options

    g = add_align_options(c, prefix="align-")
    g.add_argument("--align", action="store_true", help="also align B (and C) to A in memory (permute their hidden units, Git Re-Basin) and "
                   "score the line again: the output shows the barrier before and after (curve-aligned.png)")
    g.add_argument("--repair", action="store_true", help="with --align, a line: also REPAIR each soup (rescale every hidden channel to the "
                   "endpoints' interpolated activation statistics, measured on --align-data)")
    c.set_defaults(fn=cmd_curve)

    cp = sub.add_parser("compare", help="weight vs logit averaging: uniform soup vs ensemble of the first k ingredients, k = 1..N",
                        description="Accuracy, loss, confidence, entropy and soup-ensemble agreement for growing numbers of ingredients, "
                                    "on held-out (and --test) data.")
    cp.add_argument("inputs", nargs="+", help="the ingredients")
    cp.add_argument("--order", choices=["input", "best"], default="input", help="order of adding: as given (default) or best held-out score first")
    cp.add_argument("--combine", choices=["logits", "probs", "vote"], default="logits", help="the ensemble: mean of logits (default, the paper's), of probabilities, or majority vote")
    add_output_options(cp, output_help="folder for compare.json, compare.md and ensemble_*.png (default: print only)")
    add_eval_options(cp)
    cp.set_defaults(fn=cmd_compare)

    s = sub.add_parser("scale", help="weight-magnitude stability: scale each ingredient and the uniform soup and compare predictions",
                       description="Each model's weights times each factor: agreement with its unscaled predictions, score, confidence "
                                   "(held-out data; --test is not used).")
    s.add_argument("inputs", nargs="+", help="the ingredients")
    s.add_argument("--factors", default="0.5,0.75,0.9,1,1.1,1.25,1.5,2", help="scale factors (default 0.5,0.75,0.9,1,1.1,1.25,1.5,2)")
    s.add_argument("--scope", choices=["matrices", "all"], default="matrices",
                   help="what to scale: tensors with 2+ dimensions (default; biases and norm gains stay) or every floating tensor")
    s.add_argument("--no-soup", action="store_true", help="only the ingredients, not their uniform soup")
    add_output_options(s, output_help="folder for scale.json, scale.md and scaling.png (default: print only)")
    add_eval_options(s)
    s.set_defaults(fn=cmd_scale)

    r = sub.add_parser("report", help="gather the results in some folders into one self-contained HTML file and a Markdown summary",
                       description="Finds inspect/curve/compare/scale results, cook/greedy/interpolate results.json and merge manifests "
                                   "(recursively); figures are embedded, no server or network is needed to open it.")
    r.add_argument("folders", nargs="+", help="output folders of the diagnostics, cook, merges")
    r.add_argument("-o", "--output", required=True, help="the HTML file (the Markdown summary is written beside it, .md)")
    r.add_argument("--title", default="modelsoup report", help="the report's title")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report")
    r.set_defaults(fn=cmd_report)
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
    tm.set_defaults(fn=cmd_templates)

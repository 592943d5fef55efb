"""Cook every soup and baseline on one evaluator and tabulate them, as the model-soups paper does.

:func:`cook` scores every ingredient on held-out (and optional test) data, then builds the uniform,
greedy and learned soups and the prediction ensembles (logit and probability averaging, majority vote,
greedy ensemble, stacking), scores each the same way, and returns a :class:`CookResult` whose table
lists every ingredient, the best individual model (chosen on held-out data), each soup and ensemble
with its ingredients, inference cost and wall time, and, for evaluators that give predictions, the
calibration of each (ECE, NLL, Brier, entropy) before and after temperature scaling fitted on held-out
data. With an output folder it writes the soups (one subfolder each), ``results.md``,
``results.json`` and figures (held-out vs test, reliability diagram).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..recipe import Recipe
from ..errors import EvaluatorError, InsufficientMemoryError, OptionError
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, Score
from ..eval.calibration import calibration_metrics, fit_temperature, reliability
from ..io.output import check_output, staged_output
from .ensemble import combine_predictions, greedy_ensemble
from .greedy import GreedyResult, greedy_soup, rank
from .pantry import as_pantry
from .learned import LearnedResult, learned_soup
from .names import ENSEMBLES, RECIPES, SOUPS
from .pantry import Pantry
from .stacking import stack

log = logging.getLogger("modelsoup")


# what learned_options may set; cook sets the rest of learned_soup's arguments itself
LEARNED_OPTIONS = ("by", "temperature", "optimizer", "lr", "epochs", "weight_decay", "max_memory", "start", "memory", "accumulate")
ROW_NAMES = {"uniform": "uniform soup", "greedy": "greedy soup", "learned": "learned soup", "ensemble": "logit ensemble",
             "prob_ensemble": "probability ensemble", "vote": "majority vote", "greedy_ensemble": "greedy ensemble", "stacking": "stacking"}
COMBINE_OF = {"ensemble": "logits", "prob_ensemble": "probs", "vote": "vote"}
# models compared in the reliability diagram, when present
RELIABILITY_ROWS = ("best individual", "greedy soup", "logit ensemble")
CALIBRATION_KEYS = ("ece", "ece_mass", "nll", "brier", "entropy", "confidence")


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        name: what the row is (an ingredient's label, ``uniform soup``...).
        kind: ``baseline`` (scored for comparison only), ``ingredient``, ``best individual``, ``soup`` or ``ensemble``.
        members: labels of the ingredients it uses.
        heldout, test: scores (test None without test data).
        cost: forward passes per input at inference (1 for a model or a soup, N for an ensemble).
        seconds: wall time of the step (building and scoring).
        note: why a step was skipped, or what was chosen.
        heldout_predictions, test_predictions: per-example predictions, when the evaluator gives them.
        temperature: the temperature fitted on the held-out predictions (with ``calibrate``).
        calibrated: test metrics after dividing the logits by ``temperature``.
    """

    name: str
    kind: str
    members: list[str]
    heldout: Score | None
    test: Score | None
    cost: int
    seconds: float
    note: str = ""
    heldout_predictions: Predictions | None = field(default=None, repr=False)
    test_predictions: Predictions | None = field(default=None, repr=False)
    temperature: float | None = None
    calibrated: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "members": self.members, "heldout": self.heldout.to_dict() if self.heldout else None,
               "test": self.test.to_dict() if self.test else None, "inference_cost": self.cost, "seconds": round(self.seconds, 3), "note": self.note}
        if self.temperature is not None:
            out["temperature"] = self.temperature
            out["test_after_temperature"] = self.calibrated
        return out


@dataclass
class CookResult:
    """Everything :func:`cook` made.

    Attributes:
        rows: the results table.
        metric: the held-out metric.
        recipes: soup name -> recipe (``uniform``, ``greedy``, ``learned``).
        written: soup name -> folder written.
        figures: figure name -> PNG written.
        greedy, learned, greedy_ensemble: the detailed results (history, coefficients), when cooked.
    """

    rows: list[Row]
    metric: str
    recipes: dict[str, Recipe] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    greedy: GreedyResult | None = None
    learned: LearnedResult | None = None
    greedy_ensemble: GreedyResult | None = None
    seconds: float = 0.0

    def row(self, name: str) -> Row:
        """The row called ``name``. Raises KeyError if absent."""
        for r in self.rows:
            if r.name == name or (r.kind == "best individual" and name == "best individual"):
                return r
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "seconds": round(self.seconds, 3), "rows": [r.to_dict() for r in self.rows],
                               "figures": {k: v.name for k, v in self.figures.items()}, "written": {k: str(v) for k, v in self.written.items()}}
        if self.greedy is not None:
            out["greedy_history"] = [vars(s) for s in self.greedy.history]
        if self.greedy_ensemble is not None:
            out["greedy_ensemble_history"] = [vars(s) for s in self.greedy_ensemble.history]
        if self.learned is not None:
            out["learned"] = {"epoch": self.learned.epoch, "history": self.learned.history, "weights": self.learned.weights, "start": self.learned.start,
                              "memory": self.learned.memory, "accumulate": self.learned.accumulate}
        return out

    def to_markdown(self) -> str:
        """The table, the calibration table and the greedy and learned histories, as Markdown."""
        parts = [self._main_table()]
        for extra in (self._domain_table(), self._calibration_table()):
            if extra:
                parts.append(extra)
        for title, g in (("Greedy soup", self.greedy), ("Greedy ensemble", self.greedy_ensemble)):
            if g is None:
                continue
            hist = [f"### {title}: candidates best first", "", f"| step | candidate | its held-out {self.metric} | with it | kept |", "|---:|---|---:|---:|---|"]
            hist += [f"| {k + 1} | {s.ingredient} | {s.ingredient_score:.4f} | {s.score:.4f} | {'yes' if s.kept else 'no'} |" for k, s in enumerate(g.history)]
            parts.append("\n".join(hist))
        if self.learned is not None:
            lr = self.learned
            hist = ["### Learned soup: held-out score by epoch", "", f"Started from the {lr.start} soup" + (
                f" (held-out {self.metric}: uniform {lr.uniform_score.value:.4f}, greedy {lr.greedy_score.value:.4f})"
                if lr.uniform_score is not None and lr.greedy_score is not None else "") + f"; {lr.memory} gradient, {lr.accumulate} batch(es) per update.", "",
                f"| epoch | held-out loss (training objective) | held-out {self.metric} |", "|---:|---:|---:|"]
            hist += [f"| {int(h['epoch'])} | {h['loss']:.4f} | {h['score']:.4f} |" for h in lr.history]
            hist += ["", f"Kept epoch {lr.epoch}" + (f" (the {lr.start} start: no epoch improved on it)" if lr.epoch == 0 else "") + "."]
            if isinstance(lr.weights, list):
                hist += ["", "Coefficients: " + ", ".join(f"{w:.3f}" for w in lr.weights)]
            parts.append("\n".join(hist))
        parts += [f"![{name}]({path.name})" for name, path in self.figures.items()]
        return "\n\n".join(parts) + "\n"

    def _main_table(self) -> str:
        has_test = any(r.test is not None for r in self.rows)
        has_loss = any(r.heldout is not None and "loss" in r.heldout.metrics for r in self.rows)
        head = ["model", "kind", f"held-out {self.metric}"] + (["held-out loss"] if has_loss else [])
        if has_test:
            head += [f"test {self.metric}"] + (["test loss"] if has_loss else [])
        head += ["ingredients", "inference cost", "time (s)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]

        def cells(s: Score | None) -> list[str]:
            if s is None:
                return ["–"] + (["–"] if has_loss else [])
            return [f"{s.value:.4f}"] + ([f"{s.metrics['loss']:.4f}" if "loss" in s.metrics else "–"] if has_loss else [])

        for r in self.rows:
            row = [r.name + (f" ({r.note})" if r.note else ""), r.kind, *cells(r.heldout)]
            if has_test:
                row += cells(r.test)
            row += [str(len(r.members)), f"{r.cost}x", f"{r.seconds:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def _domain_table(self) -> str:
        """Per-domain scores (multi-domain evaluators): what the merge costs each domain."""
        from ..eval.domains import domain_scores

        first = next((r.heldout for r in self.rows if r.heldout is not None), None)
        domains = list(domain_scores(first)) if first is not None else []
        if not domains:
            return ""
        has_test = any(r.test is not None for r in self.rows)
        splits = [("held-out", "heldout")] + ([("test", "test")] if has_test else [])
        head = ["model"] + [f"{d} ({split})" for split, _ in splits for d in domains] + [f"mean ({split})" for split, _ in splits]
        lines = [f"### Per-domain {self.metric}", "", "| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]
        for r in self.rows:
            cells = [r.name]
            means = []
            for _, attr in splits:
                s = getattr(r, attr)
                per = domain_scores(s) if s is not None else {}
                cells += [f"{per[d]:.4f}" if d in per else "–" for d in domains]
                means.append(f"{s.value:.4f}" if s is not None else "–")
            lines.append("| " + " | ".join(cells + means) + " |")
        return "\n".join(lines)

    def _calibration_table(self) -> str:
        rows = [r for r in self.rows if (r.test or r.heldout) is not None and "ece" in (r.test or r.heldout).metrics]  # type: ignore[union-attr]
        if not rows:
            return ""
        split = "test" if any(r.test is not None for r in rows) else "held-out"
        after = any(r.calibrated for r in rows)
        head = ["model", "ECE", "ECE (equal-mass)", "NLL", "Brier", "entropy"] + (["T", "ECE after T", "NLL after T"] if after else [])
        lines = [f"### Calibration on {split} data (15 bins)" + (" and temperature scaling fitted on held-out data" if after else ""), "",
                 "| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]
        for r in rows:
            m = (r.test or r.heldout).metrics  # type: ignore[union-attr]
            cells = [r.name, *(f"{m[k]:.4f}" for k in ("ece", "ece_mass", "nll", "brier", "entropy"))]
            if after:
                c = r.calibrated
                cells += [f"{r.temperature:.3f}", f"{c['ece']:.4f}", f"{c['nll']:.4f}"] if c and r.temperature is not None else ["–"] * 3
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        """``results.md``, ``results.json`` and the figures, into ``folder``."""
        self.figures = _figures(self, folder)
        (folder / "results.md").write_text(self.to_markdown())
        (folder / "results.json").write_text(json.dumps({"modelsoup_version": __version__, **self.to_json()}, indent=2) + "\n")


def _figures(result: CookResult, folder: Path) -> dict[str, Path]:
    try:
        from ..analysis.figures import heldout_vs_test, pyplot, reliability_diagram

        pyplot()
    except Exception as e:  # noqa: BLE001 - figures are optional: no matplotlib means tables only
        log.info("no figures: %s", e)
        return {}
    out: dict[str, Path] = {}
    if any(r.test is not None and r.heldout is not None for r in result.rows):
        out["held-out vs test"] = heldout_vs_test(result.rows, folder / "heldout_vs_test.png", metric=result.metric)
    curves, eces = {}, {}
    for name in RELIABILITY_ROWS:
        try:
            r = result.row(name)
        except KeyError:
            continue
        preds = r.test_predictions or r.heldout_predictions
        if preds is not None:
            probs = preds.logits.double().softmax(1)
            curves[r.name] = reliability(probs, preds.labels)
            eces[r.name] = calibration_metrics(probs, preds.labels)["ece"]
    if curves:
        split = "test" if any(result.row(n).test_predictions is not None for n in curves) else "held-out"
        out["reliability"] = reliability_diagram(curves, folder / "reliability.png", ece=eces, title=f"Reliability on {split} data")
    return out


def pantry_paths(ingredients: Any) -> list[Path]:
    """The checkpoint paths of a pantry or of a list of ingredients (in-memory ones left out)."""
    if isinstance(ingredients, Pantry):
        return [*(it.path for it in ingredients.items if it.path is not None), *(Path(it.base) for it in ingredients.items if it.base is not None)]
    return [Path(s) for s in ingredients if isinstance(s, (str, Path))]


def write_results(output: Path, soups: dict[str, Recipe], files: Callable[[Path], None], *, inputs: Sequence[Any],
                  overwrite: bool = False, progress: bool | None = None, as_adapter: str | None = None, rank: int | None = None) -> dict[str, Path]:
    """Write soups (one subfolder each, by :func:`modelsoup.merge`), then ``files(folder)``, atomically.

    ``inputs``: the ingredients' paths; the output folder must keep clear of them. ``as_adapter``: write each
    soup of adapters as one PEFT adapter (``cat`` or ``svd`` at ``rank``, see :func:`modelsoup.adapters.recipe_adapter`).

    Returns:
        soup name -> its folder.
    """
    from ..api import merge

    written: dict[str, Path] = {}
    with staged_output(output, overwrite, inputs=pantry_paths(inputs)) as tmp:
        for name, recipe in soups.items():
            if as_adapter is not None:
                from ..adapters import recipe_adapter

                recipe_adapter(recipe, tmp / name, combination=as_adapter, rank=rank, progress=progress)
            else:
                merge(recipe, tmp / name, progress=progress)
            written[name] = output / name
        files(tmp)
    return written


def json_files(markdown: Callable[[], str], data: Callable[[], dict[str, Any]]) -> Callable[[Path], None]:
    """A ``files`` callback for :func:`write_results` writing ``results.md`` and ``results.json``."""

    def write(folder: Path) -> None:
        (folder / "results.md").write_text(markdown())
        (folder / "results.json").write_text(json.dumps({"modelsoup_version": __version__, **data()}, indent=2) + "\n")

    return write


def cook(
    ingredients: Pantry | Sequence[Any],
    heldout: Evaluator,
    *,
    test: Evaluator | None = None,
    recipes: Sequence[str] = RECIPES,
    output: str | Path | None = None,
    save: Sequence[str] | None = None,
    overwrite: bool = False,
    allow_equal: bool = False,
    calibrate: bool = True,
    learned_options: dict[str, Any] | None = None,
    baselines: dict[str, Any] | None = None,
    progress: bool | None = None,
    as_adapter: str | None = None,
    rank: int | None = None,
    **pantry_options: Any,
) -> CookResult:
    """Score ingredients, cook soups and ensembles, and tabulate them on held-out and test data.

    Args:
        ingredients: a :class:`Pantry`, or checkpoint paths / in-memory models.
        heldout: the evaluator that chooses (greedy order and acceptance, learned coefficients, best
            individual, stacking's meta-classifier, temperatures).
        test: an evaluator on separate test data, only reported (never used to choose or fit).
        recipes: which of ``uniform``, ``greedy``, ``learned``, ``ensemble`` (logits), ``prob_ensemble``,
            ``vote``, ``greedy_ensemble``, ``stacking`` to cook. Ensembles need a prediction evaluator
            and the learned soup a module evaluator; when the evaluator cannot do one, or the learned
            soup would not fit in memory, that row says why.
        output: a folder for the soups (one subfolder each), ``results.md``, ``results.json`` and
            figures; written atomically.
        save: which soups to write into ``output`` (default: every soup cooked).
        overwrite: replace an existing ``output``.
        allow_equal: greedy soup and greedy ensemble keep a candidate on a tie.
        calibrate: fit a temperature on each row's held-out predictions and report test calibration after it.
        learned_options: keyword arguments of :func:`learned_soup` (by, lr, epochs, temperature...).
        baselines: name -> model (path or in-memory) scored for comparison only, never an ingredient
            (e.g. the pre-trained or zero-shot start).
        progress: progress bars; None = only on a terminal.
        as_adapter: with adapter ingredients (``base=``), write each soup as one PEFT adapter: ``cat`` (exact) or
            ``svd`` (truncated to ``rank``, default the largest input rank); None writes full models.

    Raises:
        OptionError: an unknown recipe name; a ``save`` name that is not a soup or not cooked; an unknown
            ``learned_options`` key (all checked before any work).
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked before any work).
    """
    t_start = time.perf_counter()
    recipes = [recipes] if isinstance(recipes, str) else list(recipes)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise OptionError(f"unknown recipe(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RECIPES)}")
    if save is not None:
        save = [save] if isinstance(save, str) else list(save)
        not_soups = [s for s in save if s not in SOUPS]
        if not_soups:
            raise OptionError(f"save: {', '.join(map(repr, not_soups))} is not a soup that can be written; choose from {', '.join(SOUPS)} "
                              "(ensembles and stacking write no model)")
        not_cooked = [s for s in save if s not in recipes]
        if not_cooked:
            raise OptionError(f"save: {', '.join(map(repr, not_cooked))} is not cooked (recipes: {', '.join(recipes)}); "
                              "add it to the recipes or leave it out of save")
    bad_options = [k for k in (learned_options or {}) if k not in LEARNED_OPTIONS]
    if bad_options:
        raise OptionError(f"learned_options: unknown {', '.join(map(repr, bad_options))}; choose from {', '.join(LEARNED_OPTIONS)}")
    if as_adapter not in (None, "cat", "svd"):
        raise OptionError(f"as_adapter must be cat or svd, got {as_adapter!r}")
    if rank is not None and as_adapter != "svd":
        raise OptionError("rank is the output rank of soups written as svd adapters (as_adapter='svd')")
    out = Path(output) if output is not None else None
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        if out is not None:
            check_output(out, overwrite, inputs=pantry_paths(pantry))
        full = [it.label for it in pantry.items if it.base is None]
        if as_adapter is not None and full:
            raise OptionError(f"soups can be written as adapters only when every ingredient is an adapter; {full[0]} is a full model")
        result = _Kitchen(pantry, heldout, test, allow_equal, progress).cook(recipes, learned_options or {}, baselines or {})
        if calibrate:
            _temperature_scale(result.rows)
        result.seconds = time.perf_counter() - t_start
        if out is not None:
            to_write = {s: result.recipes[s] for s in (save if save is not None else SOUPS) if s in result.recipes}
            result.written = {name: out / name for name in to_write}
            write_results(out, to_write, result.write_files, inputs=pantry, overwrite=overwrite, progress=progress, as_adapter=as_adapter, rank=rank)
            result.figures = {k: out / v.name for k, v in result.figures.items()}
        return result
    finally:
        if own:
            pantry.close()


def _temperature_scale(rows: Sequence[Row]) -> None:
    for r in rows:
        if r.heldout_predictions is None or r.test_predictions is None:
            continue
        t = fit_temperature(r.heldout_predictions.logits, r.heldout_predictions.labels)
        r.temperature = t.value
        r.calibrated = calibration_metrics(t.probs(r.test_predictions.logits), r.test_predictions.labels)


class _Kitchen:
    """One cook() run: scores every row on held-out and test data, keeping predictions when there are any."""

    def __init__(self, pantry: Pantry, heldout: Evaluator, test: Evaluator | None, allow_equal: bool, progress: bool | None) -> None:
        self.pantry, self.heldout, self.test = pantry, heldout, test
        self.allow_equal, self.progress = allow_equal, progress
        self.predicts = isinstance(heldout, PredictionEvaluator)

    def _ingredient_preds(self, ev: Evaluator | None) -> list[Predictions] | None:
        if ev is None or not isinstance(ev, PredictionEvaluator):
            return None
        self.pantry.prefetch(range(len(self.pantry)), ev, predictions=True)
        return [self.pantry.predictions(i, ev) for i in range(len(self.pantry))]

    def _soup_row(self, name: str, members: list[str], recipe: Recipe, t0: float, held: tuple[Score, Predictions | None] | None = None,
                  note: str = "") -> Row:
        h_score, h_preds = held if held is not None else self.pantry.evaluate(recipe, self.heldout, name)
        t_score, t_preds = self.pantry.evaluate(recipe, self.test, name) if self.test is not None else (None, None)
        return Row(name, "soup", members, h_score, t_score, 1, time.perf_counter() - t0, note, h_preds, t_preds)

    def _ensemble_row(self, name: str, members: list[int], how: str, t0: float) -> Row:
        labels = [self.pantry.labels[i] for i in members]
        held = combine_predictions([self.held_preds[i] for i in members], how)  # type: ignore[index]
        test = combine_predictions([self.test_preds[i] for i in members], how) if self.test_preds is not None else None
        return Row(name, "ensemble", labels, self._score(self.heldout, held), self._score(self.test, test), len(members),
                   time.perf_counter() - t0, "", held, test)

    @staticmethod
    def _score(ev: Evaluator | None, preds: Predictions | None) -> Score | None:
        if ev is None or preds is None:
            return None
        assert isinstance(ev, PredictionEvaluator)
        return ev.score(preds)

    def _baseline_rows(self, baselines: dict[str, Any]) -> list[Row]:
        rows = []
        for name, source in baselines.items():
            t0 = time.perf_counter()
            with Pantry([source], labels=[name], cache=self.pantry.cache, keys=self.pantry.keys) as one:
                h = (one.score(0, self.heldout), one.predictions(0, self.heldout) if self.predicts else None)
                t = (one.score(0, self.test), one.predictions(0, self.test) if isinstance(self.test, PredictionEvaluator) else None) if self.test else (None, None)
            rows.append(Row(name, "baseline", [], h[0], t[0], 1, time.perf_counter() - t0, "not an ingredient", h[1], t[1]))
        return rows

    def cook(self, recipes: list[str], learned_options: dict[str, Any], baselines: dict[str, Any]) -> CookResult:
        pantry, labels, n = self.pantry, self.pantry.labels, len(self.pantry)
        rows: list[Row] = self._baseline_rows(baselines)
        held: list[Score] = []
        self.held_preds = self._ingredient_preds(self.heldout)
        self.test_preds = self._ingredient_preds(self.test)
        pantry.prefetch(range(n), self.heldout)
        if self.test is not None:
            pantry.prefetch(range(n), self.test)
        for i in range(n):
            s = pantry.score(i, self.heldout)
            t = pantry.score(i, self.test) if self.test is not None else None
            secs = pantry.seconds.get((i, id(self.heldout)), 0.0) + (pantry.seconds.get((i, id(self.test)), 0.0) if self.test is not None else 0.0)
            held.append(s)
            rows.append(Row(labels[i], "ingredient", [labels[i]], s, t, 1, secs, "",
                            self.held_preds[i] if self.held_preds else None, self.test_preds[i] if self.test_preds else None))
        best = rank(held)[0]
        b = rows[len(rows) - n + best]
        rows.append(Row(f"best individual: {labels[best]}", "best individual", [labels[best]], b.heldout, b.test, 1, 0.0, "chosen on held-out",
                        b.heldout_predictions, b.test_predictions))
        result = CookResult(rows, held[best].metric)  # the scores name their metric (a function's, once it has run, on whichever worker)

        uniform: tuple[Score, Predictions | None] | None = None
        if "uniform" in recipes:
            t0 = time.perf_counter()
            rec = pantry.recipe(list(range(n)))
            rows.append(self._soup_row(ROW_NAMES["uniform"], labels, rec, t0))
            uniform = (rows[-1].heldout, rows[-1].heldout_predictions)  # type: ignore[assignment]
            result.recipes["uniform"] = rec
        if "greedy" in recipes:
            t0 = time.perf_counter()
            g = greedy_soup(pantry, self.heldout, allow_equal=self.allow_equal, progress=self.progress)
            assert g.recipe is not None
            rows.append(self._soup_row(ROW_NAMES["greedy"], g.labels, g.recipe, t0, (g.score, g.predictions)))
            result.greedy, result.recipes["greedy"] = g, g.recipe
        if "learned" in recipes:
            t0 = time.perf_counter()
            try:
                lr = learned_soup(pantry, self.heldout, start_score=uniform[0] if uniform else None, start_predictions=uniform[1] if uniform else None,
                                  greedy=result.greedy, progress=self.progress, **learned_options)
            except (InsufficientMemoryError, EvaluatorError) as e:
                log.warning("learned soup skipped: %s", e)
                rows.append(Row(ROW_NAMES["learned"], "soup", labels, None, None, 1, time.perf_counter() - t0, f"skipped: {e}"))
            else:
                note = f"by {learned_options.get('by', 'model')}, epoch {lr.epoch}" + (f" = {lr.start} start" if lr.epoch == 0 else f" from {lr.start}")
                rows.append(self._soup_row(ROW_NAMES["learned"], [labels[i] for i in lr.members], lr.recipe, t0, (lr.score, lr.predictions), note))
                result.learned, result.recipes["learned"] = lr, lr.recipe

        wanted = [r for r in ENSEMBLES if r in recipes]
        if wanted and self.held_preds is None:
            why = f"skipped: {type(self.heldout).__name__} gives no per-example predictions"
            rows += [Row(ROW_NAMES[r], "ensemble", labels, None, None, n, 0.0, why) for r in wanted]
            return result
        for r in wanted:
            t0 = time.perf_counter()
            if r in COMBINE_OF:
                rows.append(self._ensemble_row(ROW_NAMES[r], list(range(n)), COMBINE_OF[r], t0))
            elif r == "greedy_ensemble":
                ge = greedy_ensemble(pantry, self.heldout, allow_equal=self.allow_equal, progress=self.progress)
                rows.append(self._ensemble_row(ROW_NAMES[r], ge.members, "logits", t0))
                result.greedy_ensemble = ge
            else:
                st = stack(self.held_preds, self.test_preds)  # type: ignore[arg-type]
                rows.append(Row(ROW_NAMES[r], "ensemble", labels, self._score(self.heldout, st.heldout), self._score(self.test, st.test), n,
                                time.perf_counter() - t0, "held-out scores out-of-fold", st.heldout, st.test))
        return result

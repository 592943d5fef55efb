"""Cook every soup and baseline on one evaluator and tabulate them, as the model-soups paper does.

:func:`cook` scores every ingredient on held-out (and optional test) data, then builds the uniform,
greedy and learned soups and the logit and greedy ensembles, scores each the same way, optionally
writes the soups as checkpoints, and returns a :class:`CookResult` whose table lists every ingredient,
the best individual model (chosen on held-out data), each soup and ensemble with its ingredients,
inference cost and wall time. ``results.md`` and ``results.json`` are written next to the soups.
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
from ..config import Recipe
from ..errors import EvaluatorError, InsufficientMemoryError
from ..eval.base import Evaluator, PredictionEvaluator, Score
from ..io.output import staged_output
from .ensemble import ensemble_score, greedy_ensemble
from .greedy import GreedyResult, as_pantry, greedy_soup, rank
from .learned import LearnedResult, learned_soup
from .pantry import Pantry

log = logging.getLogger("modelsoup")

SOUPS = ("uniform", "greedy", "learned")
ENSEMBLES = ("ensemble", "greedy_ensemble")
RECIPES = SOUPS + ENSEMBLES
ENSEMBLE_NAMES = {"ensemble": "logit ensemble", "greedy_ensemble": "greedy ensemble"}


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        name: what the row is (an ingredient's label, ``uniform soup``...).
        kind: ``ingredient``, ``best individual``, ``soup`` or ``ensemble``.
        members: labels of the ingredients it uses.
        heldout, test: scores (test None without test data).
        cost: forward passes per input at inference (1 for a model or a soup, N for an ensemble).
        seconds: wall time of the step (building and scoring).
        note: why a step was skipped, or what was chosen.
    """

    name: str
    kind: str
    members: list[str]
    heldout: Score | None
    test: Score | None
    cost: int
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "members": self.members, "heldout": self.heldout.to_dict() if self.heldout else None,
                "test": self.test.to_dict() if self.test else None, "inference_cost": self.cost, "seconds": round(self.seconds, 3), "note": self.note}


@dataclass
class CookResult:
    """Everything :func:`cook` made.

    Attributes:
        rows: the results table.
        metric: the held-out metric.
        recipes: soup name -> recipe (``uniform``, ``greedy``, ``learned``).
        written: soup name -> folder written.
        greedy, learned, greedy_ensemble: the detailed results (history, coefficients), when cooked.
    """

    rows: list[Row]
    metric: str
    recipes: dict[str, Recipe] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)
    greedy: GreedyResult | None = None
    learned: LearnedResult | None = None
    greedy_ensemble: GreedyResult | None = None
    seconds: float = 0.0

    def row(self, name: str) -> Row:
        """The row called ``name``. Raises KeyError if absent."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "seconds": round(self.seconds, 3), "rows": [r.to_dict() for r in self.rows]}
        if self.greedy is not None:
            out["greedy_history"] = [vars(s) for s in self.greedy.history]
        if self.greedy_ensemble is not None:
            out["greedy_ensemble_history"] = [vars(s) for s in self.greedy_ensemble.history]
        if self.learned is not None:
            out["learned"] = {"epoch": self.learned.epoch, "history": self.learned.history,
                              "weights": self.learned.weights}
        return out

    def to_markdown(self) -> str:
        """The table (and the greedy history) as Markdown."""
        has_test = any(r.test is not None for r in self.rows)
        has_loss = any(r.heldout is not None and "loss" in r.heldout.metrics for r in self.rows)
        head = ["model", "kind", f"held-out {self.metric}"] + (["held-out loss"] if has_loss else [])
        if has_test:
            head += [f"test {self.metric}"] + (["test loss"] if has_loss else [])
        head += ["ingredients", "inference cost", "time (s)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 4) + ["---:", "---:"]) + "|"]

        def cells(s: Score | None) -> list[str]:
            if s is None:
                return ["–"] + (["–"] if has_loss else [])
            return [f"{s.value:.4f}"] + ([f"{s.metrics['loss']:.4f}" if "loss" in s.metrics else "–"] if has_loss else [])

        for r in self.rows:
            members = str(len(r.members)) if r.kind != "ingredient" else "1"
            row = [r.name + (f" ({r.note})" if r.note else ""), r.kind, *cells(r.heldout)]
            if has_test:
                row += cells(r.test)
            row += [members, f"{r.cost}x", f"{r.seconds:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
        parts = ["\n".join(lines)]
        for title, g in (("Greedy soup", self.greedy), ("Greedy ensemble", self.greedy_ensemble)):
            if g is None:
                continue
            hist = [f"### {title}: candidates best first", "", f"| step | candidate | its held-out {self.metric} | with it | kept |", "|---:|---|---:|---:|---|"]
            hist += [f"| {k + 1} | {s.ingredient} | {s.ingredient_score:.4f} | {s.score:.4f} | {'yes' if s.kept else 'no'} |" for k, s in enumerate(g.history)]
            parts.append("\n".join(hist))
        if self.learned is not None:
            lr = self.learned
            hist = ["### Learned soup: held-out score by epoch", "", f"| epoch | held-out loss (training objective) | held-out {self.metric} |", "|---:|---:|---:|"]
            hist += [f"| {int(h['epoch'])} | {h['loss']:.4f} | {h['score']:.4f} |" for h in lr.history]
            hist += ["", f"Kept epoch {lr.epoch}" + (" (the uniform start: no epoch improved on it)" if lr.epoch == 0 else "") + "."]
            if isinstance(lr.weights, list):
                hist += ["", "Coefficients: " + ", ".join(f"{w:.3f}" for w in lr.weights)]
            parts.append("\n".join(hist))
        return "\n\n".join(parts) + "\n"


def write_results(output: Path, soups: dict[str, Recipe], markdown: Callable[[], str], data: Callable[[], dict[str, Any]], *,
                  overwrite: bool = False, progress: bool | None = None) -> dict[str, Path]:
    """Write soups (one subfolder each, by :func:`modelsoup.merge`) and ``results.md``/``results.json``, atomically.

    ``markdown`` and ``data`` are called after the soups are written, so they can list them.

    Returns:
        soup name -> its folder.
    """
    from ..api import merge

    written: dict[str, Path] = {}
    with staged_output(output, overwrite) as tmp:
        for name, recipe in soups.items():
            merge(recipe, tmp / name, progress=progress)
            written[name] = output / name
        (tmp / "results.md").write_text(markdown())
        (tmp / "results.json").write_text(json.dumps({"modelsoup_version": __version__, **data(), "written": {k: str(v) for k, v in written.items()}}, indent=2) + "\n")
    return written


def _scores(evaluator: Evaluator | None, state: Any, label: str) -> Score | None:
    return evaluator.evaluate(state, label=label) if evaluator is not None else None


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
    learned_options: dict[str, Any] | None = None,
    progress: bool | None = None,
    **pantry_options: Any,
) -> CookResult:
    """Score ingredients, cook soups and ensembles, and tabulate them on held-out and test data.

    Args:
        ingredients: a :class:`Pantry`, or checkpoint paths / in-memory models.
        heldout: the evaluator that chooses (greedy order and acceptance, learned coefficients, best individual).
        test: an evaluator on separate test data, only reported (never used to choose).
        recipes: which of ``uniform``, ``greedy``, ``learned``, ``ensemble``, ``greedy_ensemble`` to cook.
            Ensembles need a prediction evaluator and the learned soup a module evaluator; when the
            evaluator cannot do one, or the learned soup would not fit in memory, that row says why.
        output: a folder for ``results.md``, ``results.json`` and the soups (one subfolder each);
            written atomically.
        save: which soups to write into ``output`` (default: every soup cooked).
        overwrite: replace an existing ``output``.
        allow_equal: greedy keeps a candidate on a tie.
        learned_options: keyword arguments of :func:`learned_soup` (by, lr, epochs, temperature...).
        progress: progress bars; None = only on a terminal.

    Raises:
        ValueError: an unknown recipe name.
        OutputExistsError: ``output`` exists and ``overwrite`` is false (checked before any work).
    """
    t_start = time.perf_counter()
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    out = Path(output) if output is not None else None
    if out is not None:
        from ..io.output import check_output

        check_output(out, overwrite)
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        result = _cook(pantry, heldout, test, list(recipes), allow_equal, learned_options or {}, progress)
        result.seconds = time.perf_counter() - t_start
        if out is not None:
            to_write = {s: result.recipes[s] for s in (save if save is not None else SOUPS) if s in result.recipes}
            result.written = write_results(out, to_write, result.to_markdown, result.to_json, overwrite=overwrite, progress=progress)
        return result
    finally:
        if own:
            pantry.close()


def _cook(pantry: Pantry, heldout: Evaluator, test: Evaluator | None, recipes: list[str], allow_equal: bool,
          learned_options: dict[str, Any], progress: bool | None) -> CookResult:
    labels = pantry.labels
    n = len(pantry)
    rows: list[Row] = []
    held: list[Score] = []
    for i in range(n):
        s = pantry.score(i, heldout)
        t = pantry.score(i, test) if test is not None else None
        secs = pantry.seconds.get((i, id(heldout)), 0.0) + (pantry.seconds.get((i, id(test)), 0.0) if test is not None else 0.0)
        held.append(s)
        rows.append(Row(labels[i], "ingredient", [labels[i]], s, t, 1, secs))
    best = rank(held)[0]
    rows.append(Row(f"best individual: {labels[best]}", "best individual", [labels[best]], held[best], rows[best].test, 1, 0.0, "chosen on held-out"))
    result = CookResult(rows, heldout.metric)

    if "uniform" in recipes:
        t0 = time.perf_counter()
        rec, state = pantry.soup(list(range(n)))
        s = heldout.evaluate(state, label="uniform soup")
        rows.append(Row("uniform soup", "soup", labels, s, _scores(test, state, "uniform soup"), 1, time.perf_counter() - t0))
        result.recipes["uniform"] = rec
    uniform_score = rows[-1].heldout if "uniform" in recipes else None

    if "greedy" in recipes:
        t0 = time.perf_counter()
        g = greedy_soup(pantry, heldout, allow_equal=allow_equal, progress=progress)
        state = pantry.state(g.recipe) if g.recipe is not None else None
        rows.append(Row("greedy soup", "soup", g.labels, g.score, _scores(test, state, "greedy soup"), 1, time.perf_counter() - t0))
        result.greedy = g
        assert g.recipe is not None
        result.recipes["greedy"] = g.recipe

    if "learned" in recipes:
        t0 = time.perf_counter()
        try:
            lr = learned_soup(pantry, heldout, start_score=uniform_score, progress=progress, **learned_options)
        except (InsufficientMemoryError, EvaluatorError) as e:
            log.warning("learned soup skipped: %s", e)
            rows.append(Row("learned soup", "soup", labels, None, None, 1, time.perf_counter() - t0, f"skipped: {e}"))
        else:
            by = learned_options.get("by", "model")
            note = f"by {by}, epoch {lr.epoch}" + (" = uniform start" if lr.epoch == 0 else "")
            rows.append(Row("learned soup", "soup", labels, lr.score, _scores(test, pantry.state(lr.recipe), "learned soup"), 1, time.perf_counter() - t0, note))
            result.learned = lr
            result.recipes["learned"] = lr.recipe

    wants_ensembles = [r for r in ENSEMBLES if r in recipes]
    if wants_ensembles and not isinstance(heldout, PredictionEvaluator):
        for r in wants_ensembles:
            rows.append(Row(ENSEMBLE_NAMES[r], "ensemble", labels, None, None, n, 0.0, f"skipped: {type(heldout).__name__} gives no per-example predictions"))
        wants_ensembles = []
    if "ensemble" in wants_ensembles:
        t0 = time.perf_counter()
        members = list(range(n))
        rows.append(Row(ENSEMBLE_NAMES["ensemble"], "ensemble", labels, ensemble_score(pantry, heldout, members),
                        ensemble_score(pantry, test, members) if test is not None else None, n, time.perf_counter() - t0))
    if "greedy_ensemble" in wants_ensembles:
        t0 = time.perf_counter()
        ge = greedy_ensemble(pantry, heldout, allow_equal=allow_equal, progress=progress)
        rows.append(Row(ENSEMBLE_NAMES["greedy_ensemble"], "ensemble", ge.labels, ge.score, ensemble_score(pantry, test, ge.members) if test is not None else None,
                        len(ge.members), time.perf_counter() - t0))
        result.greedy_ensemble = ge
    return result

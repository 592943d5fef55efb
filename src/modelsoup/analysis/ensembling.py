"""Weight averaging vs feature (logit) averaging for growing numbers of ingredients, on one evaluator.

For ``k = 1..N`` the first ``k`` ingredients in a stated order are combined two ways: the uniform soup
(one model, the mean of the weights) and the ensemble (``k`` forward passes; by default the mean of the
logits), the comparison of Wortsman et al. 2022 and of Wang et al. 2024 ("Rethinking weight-averaged model-merging"). Each is
reported with the evaluator's metrics (accuracy and loss for classifiers), mean confidence and entropy
(see :mod:`modelsoup.analysis.predictions`), and their agreement: the fraction of examples on which the
soup and the ensemble predict the same class. At ``k = 1`` both are the first ingredient.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


from ..errors import AnalysisError
from ..eval.base import Evaluator
from ..recipes.ensemble import COMBINE, ensemble_predictions
from ..recipes.greedy import rank
from ..recipes.pantry import as_pantry
from .predictions import agreement, need_predictions, prediction_stats

ORDERS = ("input", "best")
SHOWN = ("accuracy", "loss", "confidence", "entropy")


@dataclass
class SoupVsEnsemble:
    """The comparison, one row per number of ingredients.

    Attributes:
        labels: the ingredients in the order they are added.
        order: how that order was chosen (``input``, ``best`` on the evaluator, or ``given``).
        combine: how the ensemble combines outputs (``logits``, ``probs`` or ``vote``; see
            :func:`modelsoup.recipes.ensemble.combine_predictions`).
        metric: the evaluator's score.
        rows: per ``k``: ``{"k", "members", "soup": stats, "ensemble": stats, "agreement"}``.
        seconds: wall time.
    """

    labels: list[str]
    order: str
    combine: str
    metric: str
    rows: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "order": self.order, "combine": self.combine, "metric": self.metric, "rows": self.rows, "seconds": round(self.seconds, 3)}

    def to_markdown(self) -> str:
        keys = [m for m in ([self.metric] + [x for x in SHOWN if x != self.metric]) if m in self.rows[0]["soup"]]
        head = ["k", "added"] + [f"soup {m}" for m in keys] + [f"ensemble {m}" for m in keys] + ["agreement"]
        lines = [f"Uniform soup vs ensemble ({self.combine}) of the first k ingredients (order: {self.order})", "",
                 "| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
        for r in self.rows:
            cells = [f"{r['soup'][m]:.4f}" for m in keys] + [f"{r['ensemble'][m]:.4f}" for m in keys]
            lines.append("| " + " | ".join([str(r["k"]), r["members"][-1], *cells, f"{r['agreement']:.4f}"]) + " |")
        return "\n".join(lines) + "\n"


def soup_vs_ensemble(ingredients: Any, evaluator: Evaluator, *, order: str | Sequence[int] = "input", combine: str = "logits",
                     progress: bool | None = None, **pantry_options: Any) -> SoupVsEnsemble:
    """Uniform soup vs ensemble of the first ``k`` ingredients, for ``k = 1..N``.

    Args:
        ingredients: a :class:`~modelsoup.recipes.Pantry`, or checkpoint paths / in-memory models.
        evaluator: a prediction evaluator (classification); both combinations are scored on its data.
        order: ``input`` (as given), ``best`` (best score on ``evaluator`` first, as the greedy soup
            adds them), or a list of ingredient indices.
        progress: progress bar; None = only on a terminal.

    Raises:
        AnalysisError: the evaluator gives no predictions, an unknown order or way to combine.
    """
    t0 = time.perf_counter()
    ev = need_predictions(evaluator, "the soup-vs-ensemble comparison")
    if combine not in COMBINE:
        raise AnalysisError(f"combine {combine!r}: choose one of {', '.join(COMBINE)}")
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        n = len(pantry)
        if isinstance(order, str):
            if order not in ORDERS:
                raise AnalysisError(f"order {order!r}: choose one of {', '.join(ORDERS)} or give ingredient indices")
            pantry.prefetch(range(n), ev, predictions=True)
            seq = list(range(n)) if order == "input" else rank([pantry.score(i, ev) for i in range(n)])
            how = order
        else:
            seq, how = [int(i) for i in order], "given"
            if sorted(seq) != sorted(set(seq)) or not all(0 <= i < n for i in seq):
                raise AnalysisError(f"order {seq}: give distinct ingredient indices between 0 and {n - 1}")
        rows = []
        pantry.prefetch(seq, ev, predictions=True)
        soups = [p for _, p in pantry.evaluate_many([(f"soup of {k}", pantry.recipe(seq[:k])) for k in range(2, len(seq) + 1)], ev,
                                                    progress=progress, desc="soup vs ensemble")]
        for k in range(1, len(seq) + 1):
            members = seq[:k]
            soup = pantry.predictions(members[0], ev) if k == 1 else soups[k - 2]
            assert soup is not None
            ens = ensemble_predictions(pantry, ev, members, combine)
            rows.append({"k": k, "members": [pantry.labels[i] for i in members], "soup": prediction_stats(ev, soup),
                         "ensemble": prediction_stats(ev, ens), "agreement": agreement(soup, ens)})
        return SoupVsEnsemble([pantry.labels[i] for i in seq], how, combine, ev.metric, rows, time.perf_counter() - t0)
    finally:
        if own:
            pantry.close()

"""Figures of a cooked table: held-out vs test accuracy (the model-soups paper's Figure 1) and reliability diagrams.

matplotlib is an optional extra (``pip install 'modelsoup[plot]'``); figures are PNGs drawn with the
Agg backend, so they need no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SoupError

KIND_STYLE = {
    "baseline": {"marker": "s", "color": "#000000", "s": 50},
    "ingredient": {"marker": "o", "color": "#7f7f7f", "s": 36},
    "best individual": {"marker": "o", "color": "#1f77b4", "s": 70},
    "soup": {"marker": "*", "color": "#d62728", "s": 220},
    "ensemble": {"marker": "D", "color": "#2ca02c", "s": 60},
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise SoupError("figures need matplotlib: pip install 'modelsoup[plot]'") from None
    return plt


def heldout_vs_test(rows: Sequence[Any], path: Path, *, metric: str = "accuracy", title: str | None = None) -> Path:
    """Scatter of held-out vs test score for every row that has both: ingredients, soups, ensembles.

    Args:
        rows: :class:`modelsoup.recipes.kitchen.Row` objects.
        path: PNG to write.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 5.2), dpi=120)
    pts = [r for r in rows if r.heldout is not None and r.test is not None and r.kind != "best individual"]
    ing = [r for r in pts if r.kind == "ingredient"]
    if ing:
        ax.scatter([r.heldout.value for r in ing], [r.test.value for r in ing], label="fine-tuned ingredients (1x)", zorder=3,
                   edgecolors="black", linewidths=0.5, **KIND_STYLE["ingredient"])
    # every other model gets its own legend entry: labels written next to close points would overlap
    palette = plt.get_cmap("tab10").colors
    for k, r in enumerate(r for r in pts if r.kind != "ingredient"):
        style = dict(KIND_STYLE.get(r.kind, KIND_STYLE["ingredient"]))
        if r.kind != "baseline":
            style["color"] = palette[k % len(palette)]
        cost = "" if r.kind == "baseline" else f" ({r.cost}x)"
        ax.scatter(r.heldout.value, r.test.value, label=r.name + cost, zorder=4, edgecolors="black", linewidths=0.5, **style)
    best = next((r for r in rows if r.kind == "best individual" and r.test is not None), None)
    if best is not None:
        ax.axhline(best.test.value, color=KIND_STYLE["best individual"]["color"], ls="--", lw=1, label="best individual (chosen on held-out)")
    ax.set_xlabel(f"held-out {metric}")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), title="inference cost in ( )", title_fontsize=7.5)
    ax.set_title(title or "Ingredients, soups (stars) and ensembles (diamonds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def reliability_diagram(curves: dict[str, list[tuple[float, float, float, int]]], path: Path, *, ece: dict[str, float] | None = None,
                        title: str = "Reliability") -> Path:
    """Accuracy against mean confidence per confidence bin, one line per model, with the diagonal.

    Args:
        curves: model name -> :func:`modelsoup.eval.calibration.reliability` output.
        path: PNG to write.
        ece: model name -> ECE, shown in the legend.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="perfect calibration")
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for k, (name, pts) in enumerate(curves.items()):
        conf = [p[2] for p in pts]
        acc = [p[1] for p in pts]
        label = name + (f" (ECE {ece[name]:.3f})" if ece and name in ece else "")
        marker, ls = styles[k % len(styles)]
        ax.plot(conf, acc, marker=marker, ms=5, lw=1.5, ls=ls, label=label, alpha=0.85)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

"""Figures of the diagnostics as PNG files (matplotlib, Agg backend: no display needed).

matplotlib is the optional extra ``plot``; without it :func:`require_matplotlib` says how to install it.
Each function draws one figure from a result object and writes it to ``path``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .curves import AlignedCurves, Curve
from .ensembling import SoupVsEnsemble
from .figures import pyplot
from .scaling import Scaling
from .similarity import Similarity, layer_row

DPI = 100


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the Agg backend; a clear error naming ``pip install 'modelsoup[plot]'`` if it is missing."""
    return pyplot()


def _save(fig: Any, path: Path) -> Path:
    plt = require_matplotlib()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _matrix(ax: Any, m: Any, labels: list[str], title: str, cmap: str, vmin: float | None = None, vmax: float | None = None) -> None:
    data = m.tolist() if hasattr(m, "tolist") else m
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(labels) <= 8:
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.6, "lw": 0})
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def similarity_heatmaps(sim: Similarity, path: Path) -> Path:
    """Pairwise matrices: weight cosine, relative distance and, with a base, task cosine and sign conflicts."""
    plt = require_matplotlib()
    t = sim.total
    rel = t.relative_distance()
    # a fixed scale: unrelated weights of equal norm sit at sqrt(2) ~ 1.41
    panels = [(t.cosine(), "weight cosine", "viridis", -1.0, 1.0), (rel, "relative L2 distance", "magma_r", 0.0, max(1.5, float(rel.nan_to_num(0).max())))]
    if sim.base is not None:
        panels += [(t.task_cosine(), "task-vector cosine", "viridis", -1.0, 1.0), (t.sign_conflicts(), "sign conflicts (fraction)", "magma_r", 0.0, 0.5)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    size = 2.2 + 0.45 * len(sim.labels)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1, rows * size), squeeze=False)
    for ax, (m, title, cmap, lo, hi) in zip(axes.flat, panels):
        _matrix(ax, m, sim.labels, title, cmap, lo, hi)
    fig.suptitle("Pairwise similarity" + (f" (base: {sim.base})" if sim.base else ""), fontsize=11)
    return _save(fig, path)


def layer_profile(sim: Similarity, path: Path) -> Path:
    """Per layer: mean and range over pairs of the (task) cosine, and the task norm / base norm (or the relative distance)."""
    plt = require_matplotlib()
    groups = list(sim.groups)
    n = len(sim.labels)
    rows = [layer_row(s, n) for s in sim.groups.values()]
    x = list(range(len(groups)))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(groups) + 3), 6), sharex=True)
    what = "task-vector cosine" if sim.base else "weight cosine"
    if n > 1:
        mean = [r[0] if r[0] is not None else math.nan for r in rows]
        low = [r[1] if r[1] is not None else math.nan for r in rows]
        axes[0].plot(x, mean, marker="o", ms=3, label="mean over pairs")
        axes[0].plot(x, low, marker="v", ms=3, ls="--", label="lowest pair")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel(what)
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].axhline(0, color="grey", lw=0.5)
    third = [r[2] if r[2] is not None else math.nan for r in rows]
    axes[1].plot(x, third, marker="o", ms=3, color="tab:red")
    axes[1].set_ylabel("task norm / base norm" if sim.base else "relative distance", color="tab:red")
    axes[1].set_ylim(bottom=0)
    if sim.base and n > 1:
        ax2 = axes[1].twinx()
        ax2.plot(x, [r[3] if r[3] is not None else math.nan for r in rows], marker="s", ms=3, color="tab:purple", ls=":")
        ax2.axhline(0.5, color="tab:purple", lw=0.5, ls="--")
        ax2.set_ylim(0, 0.55)
        ax2.set_ylabel("sign conflicts (0.5: unrelated)", color="tab:purple")
    step = max(1, len(groups) // 40)
    axes[1].set_xticks(x[::step], groups[::step], rotation=60, ha="right", fontsize=7)
    fig.suptitle("Per layer", fontsize=11)
    return _save(fig, path)


def curve_plot(curve: Curve, path: Path) -> Path:
    """The score and the loss along a line (with the straight line between the end points), or over a triangle."""
    if len(curve.labels) == 3:
        return _triangle_plot(curve, path)
    plt = require_matplotlib()
    has_loss = all("loss" in s.metrics for s in curve.scores)
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(10 if has_loss else 5.5, 4), squeeze=False)
    xs = curve.alphas
    series = [(curve.metric, lambda s: s.value)] + ([("loss", lambda s: s.metrics["loss"])] if has_loss else [])
    for ax, (name, get) in zip(axes.flat, series):
        for split, scores, style in (("held-out", curve.scores, "-o"), ("test", curve.test_scores, "-s")):
            if not scores:
                continue
            ys = [get(s) for s in scores]
            line = ax.plot(xs, ys, style, ms=3, label=split)[0]
            y0, y1 = ys[xs.index(0.0)], ys[xs.index(1.0)]
            ax.plot([0, 1], [y0, y1], ":", color=line.get_color(), lw=1)
        ax.set_xlabel(f"alpha (0: {curve.labels[0]}, 1: {curve.labels[1]})")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    b = curve.barriers("heldout")
    fig.suptitle("Interpolation; held-out barrier: " + ", ".join(f"{curve.metric if k == 'score' else k} {v.value:+.4f}" for k, v in b.items() if v is not None), fontsize=10)
    return _save(fig, path)


def aligned_curve_plot(ac: AlignedCurves, path: Path) -> Path:
    """The held-out score and loss along the line before alignment, after it, and after REPAIR, each with the straight
    line between its end points (a triangle: the triangle after alignment; the one before is drawn by :func:`curve_plot`)."""
    if len(ac.labels) == 3:
        return _triangle_plot(ac.curves["aligned"], path)
    plt = require_matplotlib()
    first = ac.curves["before"]
    has_loss = all("loss" in s.metrics for c in ac.curves.values() for s in c.scores)
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(10 if has_loss else 5.5, 4), squeeze=False)
    series = [(first.metric, lambda s: s.value)] + ([("loss", lambda s: s.metrics["loss"])] if has_loss else [])
    for ax, (name, get) in zip(axes.flat, series):
        for key, c in ac.curves.items():
            xs, ys = c.alphas, [get(s) for s in c.scores]
            line = ax.plot(xs, ys, "-o", ms=3, label=AlignedCurves.NAMES[key])[0]
            ax.plot([0, 1], [ys[xs.index(0.0)], ys[xs.index(1.0)]], ":", color=line.get_color(), lw=1)
        ax.set_xlabel(f"alpha (0: {first.labels[0]}, 1: {first.labels[1]})")
        ax.set_ylabel(f"held-out {name}")
        ax.legend(fontsize=8)
    parts = []
    for key, c in ac.curves.items():
        b = c.barriers("heldout")["score"]
        if b is not None:
            parts.append(f"{AlignedCurves.NAMES[key]} {b.value:+.3f}")
    fig.suptitle(f"{first.metric} barrier: " + ", ".join(parts), fontsize=10)
    return _save(fig, path)


def _triangle_plot(curve: Curve, path: Path) -> Path:
    plt = require_matplotlib()
    import matplotlib.tri as mtri

    corners = [(0.0, 0.0), (1.0, 0.0), (0.5, math.sqrt(3) / 2)]
    xs = [sum(w * c[0] for w, c in zip(p, corners)) for p in curve.points]
    ys = [sum(w * c[1] for w, c in zip(p, corners)) for p in curve.points]
    has_loss = all("loss" in s.metrics for s in curve.scores)
    series = [(curve.metric, [s.value for s in curve.scores], "viridis")]
    if has_loss:
        series.append(("loss", [s.metrics["loss"] for s in curve.scores], "magma_r"))
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.8), squeeze=False)
    tri = mtri.Triangulation(xs, ys)
    for ax, (name, vals, cmap) in zip(axes.flat, series):
        im = ax.tripcolor(tri, vals, shading="gouraud", cmap=cmap)
        ax.plot(xs, ys, "k.", ms=2)
        for (cx, cy), lab in zip(corners, curve.labels):
            ax.annotate(lab, (cx, cy), textcoords="offset points", xytext=(0, -12 if cy == 0 else 6), ha="center", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Soups of three (vertices: the models)", fontsize=11)
    return _save(fig, path)


def ensemble_plot(cmp: SoupVsEnsemble, path: Path) -> Path:
    """Soup vs ensemble against the number of ingredients: score, loss, confidence and agreement."""
    plt = require_matplotlib()
    ks = [r["k"] for r in cmp.rows]
    keys = [k for k in (cmp.metric, "loss", "confidence", "entropy") if k in cmp.rows[0]["soup"]]
    keys = list(dict.fromkeys(keys))
    cols = 3
    rows = math.ceil((len(keys) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot(ks, [r["soup"][key] for r in cmp.rows], "-o", ms=3, label="soup (weights)")
        ax.plot(ks, [r["ensemble"][key] for r in cmp.rows], "-s", ms=3, label=f"ensemble ({cmp.combine})")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("ingredients")
        ax.set_xticks(ks)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[len(keys)]
    ax.plot(ks, [r["agreement"] for r in cmp.rows], "-o", ms=3, color="tab:green")
    ax.set_title("soup-ensemble agreement", fontsize=10)
    ax.set_xlabel("ingredients")
    ax.set_xticks(ks)
    ax.set_ylim(min(0.5, min(r["agreement"] for r in cmp.rows)) - 0.02, 1.02)
    for extra in list(axes.flat)[len(keys) + 1:]:
        extra.axis("off")
    fig.suptitle(f"Weight vs output averaging (order: {cmp.order})", fontsize=11)
    return _save(fig, path)


def scaling_plot(sc: Scaling, path: Path) -> Path:
    """Agreement with the unscaled predictions, score and confidence against the scale factor, per model."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for m in sc.models:
        style = dict(lw=2.2, color="black", marker="s") if m["kind"] == "soup" else dict(lw=1, alpha=0.75, marker="o")
        for ax, key in zip(axes, ("agreement", sc.metric, "confidence")):
            ax.plot(sc.factors, [r[key] for r in m["rows"]], ms=3, label=m["label"], **style)
    for ax, title in zip(axes, ("agreement with unscaled", sc.metric, "mean confidence")):
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sc.factors, [f"{f:g}" for f in sc.factors], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(f"scale factor ({sc.scope})")
    axes[0].legend(fontsize=7)
    fig.suptitle("Weight-magnitude stability: ingredients vs soup", fontsize=11)
    return _save(fig, path)

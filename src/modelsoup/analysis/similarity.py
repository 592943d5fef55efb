"""Pairwise similarity of checkpoints' weights and task vectors, streamed: every tensor of every model is read once.

For the floating tensors that every model (and the base) holds with the same shape, flattened and
concatenated into one vector per model (``w_i``; ``b`` the base; ``t_i = w_i - b`` the task vector):

* cosine ``<w_i, w_j> / (|w_i| |w_j|)``, L2 distance ``|w_i - w_j|`` and relative distance
  ``|w_i - w_j| / ((|w_i| + |w_j|) / 2)`` (about sqrt(2) = 1.41 for unrelated vectors of equal norm);
* with a base, the task cosine ``<t_i, t_j> / (|t_i| |t_j|)``, each model's ``|t_i|``, ``|t_i| / |b|`` and
  ``cos(w_i, b)``;
* with a base, the sign conflicts of task vectors, as TIES (Yadav et al. 2023) resolves them. A zero entry
  has no sign and casts no vote, as in TIES' sign election. Per pair: the fraction of coordinates where
  ``t_i`` and ``t_j`` have opposite signs, among those where both are non-zero. Across all models: the
  fraction of coordinates holding both a positive and a negative entry, among those where at least two
  models are non-zero (for two models the two definitions agree).

Everything is also broken down per layer (see :func:`group_of`). Sums are accumulated in float64 over
chunks of each tensor, so memory is one tensor per model plus a few float64 chunks, whatever the model
size. Distances are computed from differences to a reference (the base, else the first model), not from
``|w_i|^2 + |w_j|^2 - 2<w_i, w_j>``, so close models keep their digits.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..plan import layer_index
from ..errors import AnalysisError
from ..io import Checkpoint, open_checkpoint
from ..methods.ops import all_finite
from ..errors import short_list
from ..progress import progress_on

log = logging.getLogger("modelsoup")

# Elements per chunk: float32 matrix products count signs exactly below 2**24 per entry.
DEFAULT_CHUNK = 1 << 20


def group_of(name: str) -> str:
    """The per-layer group of a tensor: its layer in a stack (``encoder.layer.3``), else its module (``classifier``)."""
    hit = layer_index(name)
    if hit is not None:
        return f"{hit[0]}{hit[1]}"
    module, _, _ = name.rpartition(".")
    return module or name


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``layer.2`` before ``layer.10``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


@dataclass
class PairSums:
    """Float64 sums over some tensors, from which every statistic follows.

    Attributes:
        numel: elements summed over.
        tensors: how many tensors.
        gram: ``<x_i, x_j>`` for the models and, in the last row, the base when there is one.
        delta: ``<w_i - r, w_j - r>`` with ``r`` the base (then these are the task vectors), else the first model.
        conflicts, both_nonzero: per pair, coordinates with opposite signs / with two non-zero task-vector entries.
        any_conflict, multi_nonzero: coordinates with both signs present / with at least two non-zero entries.
    """

    n: int
    has_base: bool
    numel: int = 0
    tensors: int = 0
    gram: torch.Tensor = field(init=False)
    delta: torch.Tensor = field(init=False)
    conflicts: torch.Tensor = field(init=False)
    both_nonzero: torch.Tensor = field(init=False)
    any_conflict: float = 0.0
    multi_nonzero: float = 0.0

    def __post_init__(self) -> None:
        m = self.n + (1 if self.has_base else 0)
        z = lambda k: torch.zeros(k, k, dtype=torch.float64)  # noqa: E731
        self.gram, self.delta, self.conflicts, self.both_nonzero = z(m), z(self.n), z(self.n), z(self.n)

    def add(self, other: PairSums) -> None:
        self.numel += other.numel
        self.tensors += other.tensors
        self.gram += other.gram
        self.delta += other.delta
        self.conflicts += other.conflicts
        self.both_nonzero += other.both_nonzero
        self.any_conflict += other.any_conflict
        self.multi_nonzero += other.multi_nonzero

    def accumulate(self, x: torch.Tensor, ws: Workspace) -> None:
        """Add one chunk: rows are the models (then the base), float64, one column per element.

        ``ws`` holds the temporaries, reused from chunk to chunk (at least as wide as ``x``).
        """
        n, w = self.n, x.shape[1]
        self.numel += w
        self.gram += x @ x.T
        ref = n if self.has_base else 0
        d = torch.sub(x[:n], x[ref : ref + 1], out=ws.d[:n, :w])
        self.delta += d @ d.T
        if self.has_base:
            pos, neg, nz, mask = ws.pos[:n, :w], ws.neg[:n, :w], ws.nz[:n, :w], ws.mask[:n, :w]
            pos.copy_(torch.gt(d, 0, out=mask))
            neg.copy_(torch.lt(d, 0, out=mask))
            torch.add(pos, neg, out=nz)
            self.conflicts += (pos @ neg.T + neg @ pos.T).double()
            self.both_nonzero += (nz @ nz.T).double()
            a, b = torch.amax(pos, 0, out=ws.row_a[:w]), torch.amax(neg, 0, out=ws.row_b[:w])
            self.any_conflict += float(torch.dot(a, b))
            self.multi_nonzero += float(torch.ge(torch.sum(nz, 0, out=ws.row_a[:w]), 2, out=ws.row_mask[:w]).sum())

    # -- derived statistics ---------------------------------------------------------------------
    def norms(self) -> torch.Tensor:
        """|w_i| per model."""
        return self.gram.diagonal()[: self.n].clamp_min(0).sqrt()

    def cosine(self) -> torch.Tensor:
        """(n, n) cosine of the weights; NaN where a norm is zero."""
        return _cosine(self.gram[: self.n, : self.n])

    def distance(self) -> torch.Tensor:
        """(n, n) L2 distance of the weights."""
        d = self.delta.diagonal()
        return (d[:, None] + d[None, :] - 2 * self.delta).clamp_min(0).sqrt().fill_diagonal_(0)

    def relative_distance(self) -> torch.Tensor:
        """(n, n) distance over the mean of the two norms."""
        w = self.norms()
        return _ratio(self.distance(), (w[:, None] + w[None, :]) / 2)

    def task_cosine(self) -> torch.Tensor | None:
        """(n, n) cosine of the task vectors (None without a base)."""
        return _cosine(self.delta) if self.has_base else None

    def task_norms(self) -> torch.Tensor | None:
        """|t_i| per model (None without a base)."""
        return self.delta.diagonal().clamp_min(0).sqrt() if self.has_base else None

    def base_norm(self) -> float | None:
        return float(self.gram[self.n, self.n].clamp_min(0).sqrt()) if self.has_base else None

    def cosine_to_base(self) -> torch.Tensor | None:
        """cos(w_i, b) per model (None without a base)."""
        if not self.has_base:
            return None
        return _cosine(self.gram)[self.n, : self.n]

    def sign_conflicts(self) -> torch.Tensor | None:
        """(n, n) fraction of opposite signs among coordinates where both task vectors are non-zero."""
        return _ratio(self.conflicts, self.both_nonzero) if self.has_base else None

    def sign_conflict_all(self) -> float | None:
        """Fraction of coordinates with both signs among those where at least two task vectors are non-zero."""
        if not self.has_base:
            return None
        return self.any_conflict / self.multi_nonzero if self.multi_nonzero else float("nan")

    def summary(self) -> dict[str, Any]:
        """Every statistic as plain lists (NaN as None), for JSON."""
        out: dict[str, Any] = {"numel": self.numel, "tensors": self.tensors, "norm": _plain(self.norms()), "cosine": _plain(self.cosine()),
                               "distance": _plain(self.distance()), "relative_distance": _plain(self.relative_distance())}
        if self.has_base:
            tn = self.task_norms()
            assert tn is not None
            bn = self.base_norm() or 0.0
            out.update({"base_norm": bn, "task_norm": _plain(tn), "relative_task_norm": _plain(tn / bn) if bn else None,
                        "cosine_to_base": _plain(self.cosine_to_base()), "task_cosine": _plain(self.task_cosine()),
                        "sign_conflicts": _plain(self.sign_conflicts()), "sign_conflict_all": _plain(self.sign_conflict_all())})
        return out


def _cosine(g: torch.Tensor) -> torch.Tensor:
    d = g.diagonal().clamp_min(0).sqrt()
    return _ratio(g, d[:, None] * d[None, :])


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, 1.0), torch.full_like(a, float("nan")))


def _plain(x: Any) -> Any:
    """Tensor or float -> nested lists of floats, NaN -> None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return _plain(x.tolist())
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return None if x != x else float(x)


@dataclass
class Similarity:
    """What :func:`similarity` measured.

    Attributes:
        labels: the models' names.
        base: the base's name, or None.
        total: sums over every compared tensor.
        groups: per-layer sums, in natural order of the group names.
        skipped: why tensors were left out: ``nonfloat`` (integer/bool buffers), ``missing`` (not in
            every model), ``shape`` (shapes differ), ``nonfinite`` (NaN/Inf in some model), ``tied``
            (a second name of a shared tensor, counted once).
        seconds: wall time.
    """

    labels: list[str]
    base: str | None
    total: PairSums
    groups: dict[str, PairSums]
    skipped: dict[str, list[str]]
    seconds: float

    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.labels)
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "base": self.base, "total": self.total.summary(),
                "groups": {g: s.summary() for g, s in self.groups.items()},
                "skipped": {k: v for k, v in self.skipped.items() if v}, "seconds": round(self.seconds, 3)}

    def to_markdown(self) -> str:
        """Norms per model, statistics per pair, and a per-layer table."""
        t = self.total
        lines = [f"Compared {t.tensors} floating tensors ({t.numel:,} elements) of {len(self.labels)} models"
                 + (f" against the base {self.base}." if self.base else " (no base: task vectors and sign conflicts need --base).")]
        skipped = {k: v for k, v in self.skipped.items() if v}
        if skipped:
            lines.append("Left out: " + "; ".join(f"{len(v)} {k} ({short_list(v)})" for k, v in skipped.items()) + ".")
        head = ["model", "norm"] + (["task-vector norm", "task norm / base norm", "cosine to base"] if self.base else [])
        lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        norms = t.norms()
        for i, lab in enumerate(self.labels):
            row = [lab, _fmt(norms[i])]
            if self.base:
                tn, cb, bn = t.task_norms(), t.cosine_to_base(), t.base_norm()
                assert tn is not None and cb is not None
                row += [_fmt(tn[i]), _fmt(tn[i] / bn if bn else None), _fmt(cb[i])]
            lines.append("| " + " | ".join(row) + " |")
        if len(self.labels) > 1:
            head = ["pair", "cosine", "L2 distance", "relative distance"] + (["task cosine", "sign conflicts"] if self.base else [])
            lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            cos, dist, rel, tc, sc = t.cosine(), t.distance(), t.relative_distance(), t.task_cosine(), t.sign_conflicts()
            for i, j in self.pairs():
                row = [f"{self.labels[i]} / {self.labels[j]}", _fmt(cos[i, j]), _fmt(dist[i, j]), _fmt(rel[i, j])]
                if tc is not None and sc is not None:
                    row += [_fmt(tc[i, j]), _fmt(sc[i, j])]
                lines.append("| " + " | ".join(row) + " |")
            if self.base and len(self.labels) > 2:
                lines += ["", f"Sign conflicts across all {len(self.labels)} task vectors: {_fmt(t.sign_conflict_all())}."]
        lines += ["", self.layer_markdown()]
        return "\n".join(lines) + "\n"

    def layer_markdown(self) -> str:
        """Per layer: mean (min) over pairs of the (task) cosine, mean relative task norm, mean sign conflicts."""
        what = "task cosine" if self.base else "cosine"
        head = ["layer", "elements", f"{what}, mean over pairs", f"{what}, min"] + (["task norm / base norm", "sign conflicts"] if self.base else ["relative distance"])
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for g, s in self.groups.items():
            lines.append("| " + " | ".join([g, f"{s.numel:,}", *(_fmt(v) for v in layer_row(s, len(self.labels)))]) + " |")
        return "\n".join(lines)


def layer_row(s: PairSums, n: int) -> list[float | None]:
    """Per-layer summary: mean and min over pairs of the (task) cosine, then the mean relative task norm
    and mean sign conflicts (with a base) or the mean relative distance (without)."""
    iu = torch.triu_indices(n, n, 1)

    def over_pairs(m: torch.Tensor | None) -> torch.Tensor:
        return m[iu[0], iu[1]] if m is not None and n > 1 else torch.tensor([], dtype=torch.float64)

    cos = over_pairs(s.task_cosine() if s.has_base else s.cosine())
    mean = float(cos.nanmean()) if cos.numel() else None
    low = float(cos.min()) if cos.numel() else None
    if s.has_base:
        tn, bn = s.task_norms(), s.base_norm()
        assert tn is not None
        rel = float((tn / bn).mean()) if bn else None
        sc = over_pairs(s.sign_conflicts())
        return [mean, low, rel, float(sc.nanmean()) if sc.numel() else None]
    rd = over_pairs(s.relative_distance())
    return [mean, low, float(rd.nanmean()) if rd.numel() else None]


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    v = float(x)
    if v != v:
        return "–"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def default_labels(sources: Sequence[Any]) -> list[str]:
    """The names tables give these models: as :class:`~modelsoup.recipes.Pantry` names its ingredients (file names)."""
    from ..recipes.pantry import short_labels

    return short_labels(list(sources))


def _open(sources: Sequence[Any], labels: Sequence[str], key: str | None, strip_prefix: str | None) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """(all checkpoints, those opened here and to be closed here); on a failure, those opened are closed."""
    cks: list[Checkpoint] = []
    own: list[Checkpoint] = []
    try:
        for s, lab in zip(sources, labels):
            if isinstance(s, Checkpoint):
                cks.append(s)
            else:
                cks.append(open_checkpoint(s, label=None if isinstance(s, (str, Path)) else lab, key=key, strip_prefix=strip_prefix))
                own.append(cks[-1])
    except BaseException:
        for ck in own:
            ck.close()
        raise
    return cks, own


def _plan(cks: Sequence[Checkpoint]) -> tuple[list[str], dict[str, list[str]]]:
    """Names to compare (first model's order) and the names left out, by reason."""
    skipped: dict[str, list[str]] = {"nonfloat": [], "missing": [], "shape": [], "nonfinite": [], "tied": []}
    have = [set(ck.names()) for ck in cks]
    shared = set.intersection(*have)
    skipped["missing"] = sorted(set.union(*have) - shared, key=natural_key)
    aliases = cks[0].aliases()
    names = []
    for name in cks[0].names():
        if name not in shared:
            continue
        if name in aliases:
            skipped["tied"].append(name)
            continue
        metas = [ck.meta(name) for ck in cks]
        if not all(dt.is_floating_point for dt, _ in metas):
            skipped["nonfloat"].append(name)
        elif len({shape for _, shape in metas}) > 1:
            skipped["shape"].append(name)
        else:
            names.append(name)
    return names, skipped


class Workspace:
    """Buffers for :meth:`PairSums.accumulate`, allocated once per pass and reused for every chunk.

    Allocating them per chunk left the allocator's heap fragmented: the peak grew with the number of
    tensors (372 MB for 1.5 GB of models, 888 MB for 12 GB) instead of staying at one tensor per model.
    """

    def __init__(self, rows: int, width: int) -> None:
        self.x = torch.empty(rows, width, dtype=torch.float64)
        self.d = torch.empty(rows, width, dtype=torch.float64)
        self.pos, self.neg, self.nz = (torch.empty(rows, width, dtype=torch.float32) for _ in range(3))
        self.mask = torch.empty(rows, width, dtype=torch.bool)
        self.row_a, self.row_b = torch.empty(width, dtype=torch.float32), torch.empty(width, dtype=torch.float32)
        self.row_mask = torch.empty(width, dtype=torch.bool)


def _tensor_sums(cks: Sequence[Checkpoint], name: str, n: int, has_base: bool, chunk: int, ws: Workspace) -> PairSums | None:
    """Sums of one tensor over every model, or None when some model holds NaN/Inf in it.

    Each model's tensor is read once and dropped when this returns: one tensor per model is alive.
    """
    flat = [ck.read(name).reshape(-1) for ck in cks]
    sums = PairSums(n, has_base, tensors=1)
    for start in range(0, flat[0].numel(), chunk):
        w = min(chunk, flat[0].numel() - start)
        x = ws.x[: len(flat), :w]
        for row, f in zip(x, flat):
            row.copy_(f[start : start + w])
        if not all_finite(x):
            return None
        sums.accumulate(x, ws)
    return sums


def similarity(
    models: Sequence[Any],
    *,
    base: Any = None,
    labels: Sequence[str] | None = None,
    key: str | None = None,
    strip_prefix: str | None = None,
    chunk_elements: int = DEFAULT_CHUNK,
    progress: bool | None = None,
) -> Similarity:
    """Pairwise weight and task-vector statistics of ``models``, globally and per layer, in one streaming pass.

    Args:
        models: checkpoint paths, state dicts, modules or open :class:`~modelsoup.io.Checkpoint` objects.
        base: the common pre-trained model; enables task vectors and sign conflicts.
        labels: names for tables, one per model, then optionally one for the base (default: file names).
        key, strip_prefix: how to open torch pickles (see :func:`modelsoup.io.open_checkpoint`).
        chunk_elements: elements per float64 chunk (memory: about 2 x models x chunk x 8 bytes on top of
            one tensor per model).
        progress: a progress bar; None = only on a terminal.

    Raises:
        AnalysisError: fewer than two models without a base, or no tensor that every model holds with one shape.
        CheckpointError: an input cannot be read.
    """
    t0 = time.perf_counter()
    if len(models) < (1 if base is not None else 2):
        raise AnalysisError(f"similarity needs at least two models, or one model and a base (--base); got {len(models)} model(s) and {'a' if base is not None else 'no'} base")
    sources = list(models) + ([base] if base is not None else [])
    names_all = default_labels(sources)
    if labels is not None:
        if len(labels) not in (len(models), len(sources)):
            raise AnalysisError(f"got {len(labels)} labels for {len(models)} models; give one label per model (and optionally one for the base)")
        names_all[: len(labels)] = list(labels)
    cks, own = _open(sources, names_all, key, strip_prefix)
    try:
        n, has_base = len(models), base is not None
        names, skipped = _plan(cks)
        if not names:
            raise AnalysisError(
                f"no floating tensor is held by every model with the same shape ({', '.join(ck.label for ck in cks)}); "
                "these are different architectures and cannot be souped" + (f"; missing from some model: {short_list(skipped['missing'])}" if skipped["missing"] else "")
            )
        groups: dict[str, PairSums] = {}
        show = progress_on(progress)
        widest = max(math.prod(cks[0].meta(name)[1]) for name in names)
        ws = Workspace(len(cks), max(1, min(chunk_elements, widest)))
        for name in tqdm(names, desc="inspect", unit="tensor", disable=not show, leave=False):
            sums = _tensor_sums(cks, name, n, has_base, chunk_elements, ws)
            if sums is None:
                skipped["nonfinite"].append(name)
                continue
            groups.setdefault(group_of(name), PairSums(n, has_base)).add(sums)
        if not groups:
            raise AnalysisError(f"every shared floating tensor holds NaN or Inf in some model ({short_list(skipped['nonfinite'])}); nothing to compare")
        total = PairSums(n, has_base)
        ordered = {g: groups[g] for g in sorted(groups, key=natural_key)}
        for s in ordered.values():
            total.add(s)
        for k, v in skipped.items():
            if v:
                log.info("inspect: left out %d %s tensor(s): %s", len(v), k, short_list(v))
        return Similarity(names_all[:n], names_all[n] if has_base else None, total, ordered, skipped, time.perf_counter() - t0)
    finally:
        for ck in own:
            ck.close()

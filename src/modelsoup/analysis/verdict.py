"""Will it soup? A verdict with reasons, from weight similarity and interpolation barriers.

Each rule looks at one measurement and gives a :class:`Reason` at one of three levels: ``ok``,
``caution`` or ``stop``. The verdict is the worst level, with advice on which recipe to use.

The thresholds (:data:`THRESHOLDS`) separate two constructed cases measured on the digits example
(docs/diagnostics.md; the test suite pins them): MLPs fine-tuned from one pre-trained start vs MLPs
trained from different random starts. Fine-tunes: weight cosine 0.96-0.99, cosine to the base 0.89-0.95,
task-vector cosine 0.79-0.95, sign conflicts 8-17% per pair, no accuracy barrier (-0.003 to +0.001),
soup within 0.3% of the ensemble. Different starts: weight cosine 0.02 (relative distance 1.40, sqrt(2)
for unrelated vectors), task cosine -0.05, sign conflicts 52% (50% for unrelated vectors), an accuracy
barrier of +0.21 (23% of the end points' accuracy) and a loss barrier of +0.76 (350%); the soup of two
fine-tunes and one such net falls 12.5% short of their ensemble. The cut-offs sit in the wide gap between,
where the literature puts them when it does: an error barrier within 2% counts as linearly connected
(Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis"); task vectors of
different tasks are nearly orthogonal (Ilharco et al. 2023, "Editing models with task arithmetic"), so
a low task cosine alone is a caution, not a stop. Sign conflicts are judged per pair (their fraction
among all N models grows with N even for good fine-tunes: 26% for the six demo fine-tunes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import short_list
from .curves import AlignedCurves, Barrier, Curve
from .ensembling import SoupVsEnsemble
from .similarity import Similarity

LEVELS = ("ok", "caution", "stop")

# Stop reasons that models trained from different random starts give, which permutation alignment may remove.
ALIGNABLE = ("weight_cosine", "score_barrier", "loss_barrier")

# (ok at or beyond the first value, stop beyond the second); in between: caution.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "weight_cosine": (0.8, 0.3),        # lowest pairwise cosine of the weights; ok >= 0.8, stop < 0.3
    "cosine_to_base": (0.8, 0.3),       # lowest cosine of a model to the base; same cut-offs
    "task_cosine": (0.1, 0.1),          # mean pairwise task-vector cosine; caution below 0.1
    "sign_conflicts": (0.35, 0.35),     # mean over pairs of the opposite-sign fraction; caution above 0.35 (unrelated: 0.5)
    "score_barrier": (0.02, 0.10),      # barrier / mean end-point score; ok <= 2%, stop > 10%
    "loss_barrier": (0.10, 0.50),       # barrier / mean end-point loss; ok <= 10%, stop > 50%
    "ensemble_gap": (0.02, 0.10),       # (ensemble - soup score) / ensemble score with every ingredient; as the score barrier
}


@dataclass(frozen=True)
class Reason:
    """One finding.

    Attributes:
        level: ``ok``, ``caution`` or ``stop``.
        code: a stable name of the rule (``weight_cosine``, ``score_barrier``...).
        message: what was found and what it means.
        value: the measured number, when there is one.
        short: a few words for a headline (default: the message up to its first colon).
    """

    level: str
    code: str
    message: str
    value: float | None = None
    short: str = ""

    @property
    def headline(self) -> str:
        return self.short or self.message.split(":")[0]

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "code": self.code, "message": self.message, "value": self.value, "short": self.headline}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reason:
        return cls(str(data["level"]), str(data["code"]), str(data["message"]), data.get("value"), str(data.get("short", "")))


@dataclass
class Verdict:
    """The worst level among the reasons, a headline and advice."""

    level: str
    headline: str
    reasons: list[Reason]
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "headline": self.headline, "reasons": [r.to_json() for r in self.reasons], "advice": self.advice}

    def to_markdown(self) -> str:
        lines = [f"**Verdict: {self.headline}**", ""] + [f"- [{r.level}] {r.message}" for r in self.reasons]
        if self.advice:
            lines += [""] + [f"- {a}" for a in self.advice]
        return "\n".join(lines) + "\n"


def _level(value: float, code: str, *, higher_is_better: bool) -> str:
    ok, stop = THRESHOLDS[code]
    if higher_is_better:
        return "ok" if value >= ok else ("stop" if value < stop else "caution")
    return "ok" if value <= ok else ("stop" if value > stop else "caution")


def _graded(code: str, value: float, messages: dict[str, str], *, higher_is_better: bool, short: str = "") -> Reason:
    """The reason whose message ``messages`` gives for the level of ``value`` against ``THRESHOLDS[code]``."""
    lvl = _level(value, code, higher_is_better=higher_is_better)
    return Reason(lvl, code, messages[lvl], value, short)


def similarity_reasons(sim: Similarity) -> list[Reason]:
    """Findings from :func:`~modelsoup.analysis.similarity.similarity`: architecture, shared start, base, task vectors."""
    out: list[Reason] = []
    sk = sim.skipped
    if sk.get("shape"):
        out.append(Reason("stop", "architecture", f"{len(sk['shape'])} tensor(s) differ in shape across the models ({short_list(sk['shape'])}): "
                          "different architectures cannot be averaged"))
    if sk.get("missing"):
        out.append(Reason("caution", "architecture", f"{len(sk['missing'])} tensor(s) are not in every model ({short_list(sk['missing'])}): a soup "
                          "needs `keys: intersection` (leaves them out) or `keys: base` (takes them from the base)"))
    if sk.get("nonfinite"):
        out.append(Reason("stop", "nonfinite", f"{len(sk['nonfinite'])} tensor(s) hold NaN or Inf in some model ({short_list(sk['nonfinite'])}): "
                          "a soup would carry them; find the broken checkpoint"))
    t, labels, n = sim.total, sim.labels, len(sim.labels)
    if n > 1:
        cos = t.cosine()
        i, j = min(sim.pairs(), key=lambda p: float(cos[p]))
        c = float(cos[i, j])
        pair = f"{labels[i]} and {labels[j]}"
        out.append(_graded("weight_cosine", c, {
            "ok": f"the weights are close: every pair has cosine >= 0.8 (lowest {c:.3f}, {pair}), as fine-tunes of one pre-trained model do",
            "caution": f"{pair} have weight cosine {c:.3f} (between 0.3 and 0.8): they moved far apart or started from different models; "
                       "measure the interpolation barrier (soup curve) before souping",
            "stop": f"models do not share a base: the weights of {pair} have cosine {c:.3f} (unrelated weights give about 0, fine-tunes of one start "
                    "above 0.8): averaging will likely fail",
        }, higher_is_better=True))
    if sim.base is None:
        return out
    cb = t.cosine_to_base()
    assert cb is not None
    k = int(torch.nan_to_num(cb, nan=2.0).argmin())
    c = float(cb[k])
    out.append(_graded("cosine_to_base", c, {
        "ok": f"every model is close to the base {sim.base} (lowest cosine {c:.3f}, {labels[k]}): their task vectors are fine-tuning updates",
        "caution": f"{labels[k]} moved far from the base {sim.base} (cosine {c:.3f}): a long fine-tune, or another starting point",
        "stop": f"{labels[k]} does not derive from the base {sim.base} (cosine {c:.3f}): its task vector is not a fine-tuning update, "
                "so task arithmetic, TIES and DARE are meaningless for it",
    }, higher_is_better=True))
    if n < 2:
        return out
    tc = t.task_cosine()
    assert tc is not None
    iu = torch.triu_indices(n, n, 1)
    mean_tc = float(tc[iu[0], iu[1]].nanmean())
    if _level(mean_tc, "task_cosine", higher_is_better=True) == "ok":
        out.append(Reason("ok", "task_cosine", f"the task vectors point the same way (mean pairwise cosine {mean_tc:.3f})", mean_tc))
    else:
        out.append(Reason("caution", "task_cosine", f"the task vectors are nearly orthogonal (mean pairwise cosine {mean_tc:.3f}): the models learned "
                          "different things; a uniform soup keeps only 1/N of each update, task arithmetic or TIES keep more", mean_tc))
    pair_sc = t.sign_conflicts()
    assert pair_sc is not None
    sc = float(pair_sc[iu[0], iu[1]].nanmean())
    if sc == sc:
        found = f"task vectors disagree in sign on {sc:.1%} of the coordinates where both move, on average over pairs (unrelated vectors: 50%)"
        if n > 2:
            found += f"; {t.sign_conflict_all():.1%} of the coordinates where two or more move see both signs among all {n}"
        if _level(sc, "sign_conflicts", higher_is_better=False) == "ok":
            out.append(Reason("ok", "sign_conflicts", found, sc))
        else:
            out.append(Reason("caution", "sign_conflicts", f"{found}: a uniform average cancels these updates; TIES (soup merge --method ties) "
                              "resolves the signs", sc))
    return out


def _barrier_reason(b: Barrier | None, code: str, what: str, between: str) -> Reason | None:
    if b is None:
        return None
    rel = b.relative if b.relative is not None else b.value
    where = ", ".join(f"{w:g}" for w in b.at)
    if b.value <= 0:
        return Reason("ok", code, f"no {what} barrier {between}: every soup on the grid is at least as good as the interpolation of the end points "
                      f"(worst {b.value:+.4f})", rel)
    ok_at, stop_at = THRESHOLDS[code]
    size = f"{what} barrier {b.value:+.4f} {between} ({rel:.1%} of the end points' mean, at weights {where})"
    return _graded(code, rel, {
        "ok": f"linearly connected: {size}, within {ok_at:.0%}",
        "caution": f"{size}, above {ok_at:.0%}: a uniform soup loses some of its ingredients' quality; the greedy soup keeps only what helps",
        "stop": f"{size}, above {stop_at:.0%}: the models sit in different basins; averaging them will likely fail",
    }, higher_is_better=False, short=f"{what} barrier {b.value:+.4f} {between}")


def barrier_reasons(curve: Curve) -> list[Reason]:
    """Findings from an interpolation line or triangle: its score and loss barriers on held-out data."""
    between = ("between " + " and ".join(curve.labels)) if len(curve.labels) == 2 else ("across the triangle of " + ", ".join(curve.labels))
    b = curve.barriers("heldout")
    found = [_barrier_reason(b.get("score"), "score_barrier", curve.metric, between), _barrier_reason(b.get("loss"), "loss_barrier", "loss", between)]
    return [r for r in found if r is not None]


def alignment_reasons(ac: AlignedCurves) -> list[Reason]:
    """Findings from ``soup curve --align``: the barriers after alignment, and how much alignment (and REPAIR) closed them."""
    aligned = ac.curves["aligned"]
    out = barrier_reasons(aligned)
    b0, b1 = ac.curves["before"].barriers("heldout")["score"], aligned.barriers("heldout")["score"]
    if b0 is None or b1 is None:
        return out
    who = f"{', '.join(ac.labels[1:])} to {ac.labels[0]}"
    msg = f"aligning {who} ({ac.alignment.method} matching) takes the {aligned.metric} barrier from {b0.value:+.4f} to {b1.value:+.4f}"
    rep = ac.curves.get("repaired")
    b2 = rep.barriers("heldout")["score"] if rep is not None else None
    if b2 is not None:
        msg += f", and {b2.value:+.4f} with REPAIR (each soup's activation statistics renormalised on data; modelsoup.align.repair)"
    out.append(Reason("ok" if b1.value < b0.value else "caution", "alignment",
                      msg + ("" if b1.value < b0.value else ": alignment did not lower it"), b1.value, f"aligned barrier {b1.value:+.4f}"))
    return out


def ensemble_reasons(cmp: SoupVsEnsemble) -> list[Reason]:
    """Findings from the soup-vs-ensemble comparison: how far the soup of every ingredient falls short of their ensemble."""
    last = cmp.rows[-1]
    if last["k"] < 2:
        return []
    soup, ens = last["soup"]["score"], last["ensemble"]["score"]
    gap = (ens - soup) / abs(ens) if ens else ens - soup
    side = f"{abs(gap):.1%} {'below' if gap > 0 else 'above'}" if gap else "level with"
    what = f"the uniform soup of {last['k']} scores {cmp.metric} {soup:.4f} against {ens:.4f} for their ensemble ({cmp.combine}), {side} it"
    return [_graded("ensemble_gap", gap, {
        "ok": f"{what}: weight averaging keeps what output averaging gives, at 1/{last['k']} of the inference cost",
        "caution": f"{what}: the soup loses part of the ensemble's quality; a greedy soup may close the gap",
        "stop": f"{what}: weight averaging fails where output averaging works; the models are not in one basin",
    }, higher_is_better=False, short=f"soup {soup:.4f} vs ensemble {ens:.4f}")]


def verdict(reasons: Iterable[Reason]) -> Verdict:
    """Combine findings: the worst level decides; advice names a recipe."""
    rs = list(reasons)
    if not rs:
        return Verdict("caution", "nothing measured", [], ["run soup inspect (weights) and soup curve (held-out scores along the line)"])
    level = max((r.level for r in rs), key=LEVELS.index)
    codes = {r.code for r in rs}
    advice: list[str] = []
    aligned = "alignment" in codes
    if aligned and level != "stop":
        advice.append("these barriers are those of the aligned models: write them with soup align A B -o aligned, then soup A with aligned/B")
    if level == "stop":
        first = next(r for r in rs if r.level == "stop")
        headline = f"do not soup these models ({first.headline})"
        advice.append("average only models fine-tuned from one pre-trained start; to combine unrelated models use their logit ensemble (soup ensemble)")
        if not aligned and any(r.level == "stop" and r.code in ALIGNABLE for r in rs):
            advice.append("models of one architecture trained from different random starts often differ mostly by the order of their hidden "
                          "units: permute them to match (soup align A B -o aligned), check the barrier after alignment "
                          "(soup curve A B --align --heldout DATA), then soup the aligned models")
    elif level == "caution":
        headline = "soup with care"
        advice.append("prefer the greedy soup (soup greedy): it adds an ingredient only when the held-out score improves")
    else:
        headline = "these models should soup well"
        advice.append("a uniform soup is likely to match or beat the average ingredient; the greedy soup (soup greedy) is the safe default")
    if any(r.code == "sign_conflicts" and r.level != "ok" for r in rs) and level != "stop":
        advice.append("with a base, try TIES (soup merge --method ties --base BASE ...), which resolves sign conflicts")
    if "score_barrier" not in codes and level != "stop":
        advice.append("confirm with the interpolation barrier: soup curve A B --heldout DATA")
    return Verdict(level, headline, rs, advice)

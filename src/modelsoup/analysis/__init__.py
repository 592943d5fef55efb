"""Will it soup? Diagnostics: weight similarity, interpolation barriers, soup vs ensemble, weight scaling, reports.

One job per module: :mod:`.similarity` (streaming pairwise statistics of weights and task vectors),
:mod:`.curves` (scores along a line or triangle of soups, barriers), :mod:`.ensembling` (weight vs logit
averaging), :mod:`.scaling` (weight-magnitude stability), :mod:`.verdict` (rules with reasons),
:mod:`.plots` (PNG figures, optional matplotlib), :mod:`.results` (a diagnostic's output folder),
:mod:`.report` (the HTML report and Markdown summary), :mod:`.commands` (the ``soup`` subcommands).
"""

from .curves import Barrier, Curve, barrier, line_curve, triangle_curve
from .ensembling import SoupVsEnsemble, soup_vs_ensemble
from .report import write_report
from .scaling import ScaledState, Scaling, magnitude_stability
from .similarity import Similarity, similarity
from .verdict import Reason, Verdict, barrier_reasons, ensemble_reasons, similarity_reasons, verdict

__all__ = [
    "Barrier", "Curve", "Reason", "ScaledState", "Scaling", "Similarity", "SoupVsEnsemble", "Verdict", "barrier", "barrier_reasons",
    "ensemble_reasons", "line_curve", "magnitude_stability", "similarity", "similarity_reasons", "soup_vs_ensemble", "triangle_curve",
    "verdict", "write_report",
]

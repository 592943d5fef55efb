"""Hyperparameters shared by several merge methods, declared once as ``Annotated`` aliases.

A method writes ``density: Density = 0.2``; the default stays on the method, since it differs between
them. Where one method means something more specific by a shared name it adds a second ``Param`` with
its own help: ``density: Annotated[Density, Param(help="probability of KEEPING each entry")] = 0.5``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from .registry import Param, PerModel

Density = Annotated[PerModel[float], Param(gt=0, le=1, help="fraction of each task vector kept")]

Scale = Annotated[float, Param(aliases=("lambda",), help="lambda: multiplies the merged task vector before adding it to the base")]

_SIGN_HELP = "sign election: sum of deltas (sum) or of their signs (count)"
SignMethod = Annotated[Literal["sum", "count"], Param(help=_SIGN_HELP)]
# breadcrumbs elects signs only when asked to (mergekit's breadcrumbs_ties)
SignMethodOrNone = Annotated[Literal["none", "sum", "count"], Param(help=_SIGN_HELP + "; none = no election")]

SignFrom = Annotated[
    Literal["weighted", "unweighted"], Param(help="elect signs on weighted deltas (mergekit) or unweighted ones (peft)")
]

DivideBy = Annotated[
    Literal["weight_sum", "count"],
    Param(help="with normalize: divide by the agreeing models' weights (mergekit) or their count (peft)"),
]

Normalize = Annotated[bool, Param(help="divide by the sum of the weights (of agreeing models, with sign election)")]

Rescale = Annotated[
    Literal["density", "l1", "none"],
    Param(help="survivors divided by density (DARE paper, peft), scaled to the delta's L1 norm (mergekit), or none"),
]

DellaDensity = Annotated[Density, Param(help="mean probability of KEEPING an entry (the median-magnitude one)")]
DellaEpsilon = Annotated[
    PerModel[float], Param(ge=0, lt=0.5, help="keep probabilities run from density - epsilon (smallest) to density + epsilon (largest magnitude)")
]

TieBreak = Annotated[
    Literal["index", "torch_sort"],
    Param(help="entries of equal magnitude at the trim cut: the first in index order, or as torch's sort orders them (mergekit)"),
]

RescaleL1 = Annotated[Literal["l1", "none"], Param(help="after trimming, scale each task vector back to its L1 norm (mergekit's rescale: true), or none")]

Gamma = Annotated[PerModel[float], Param(ge=0, lt=1, help="fraction of largest magnitudes removed as outliers")]

"""Soups that look at data: uniform, greedy and learned soups, ensembles, interpolation, top-k averaging.

Each recipe takes an evaluator (see :mod:`modelsoup.eval`) and returns the soup as a ``linear``
:class:`~modelsoup.config.Recipe` that :func:`modelsoup.merge` writes, together with what it measured.
"""

from .cook import CookResult, Row, cook
from .ensemble import ensemble_predictions, ensemble_score, greedy_ensemble
from .greedy import GreedyResult, GreedyStep, greedy_soup
from .interpolate import InterpolationResult, interpolate
from .learned import LearnedResult, learned_soup
from .pantry import Pantry, SoupState
from .topk import TopKResult, metrics_from_log, metrics_from_names, topk_average

__all__ = [
    "CookResult", "GreedyResult", "GreedyStep", "InterpolationResult", "LearnedResult", "Pantry", "Row", "SoupState", "TopKResult", "cook",
    "ensemble_predictions", "ensemble_score", "greedy_ensemble", "greedy_soup", "interpolate", "learned_soup", "metrics_from_log",
    "metrics_from_names", "topk_average",
]

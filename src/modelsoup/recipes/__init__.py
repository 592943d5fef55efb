"""Soups that look at data: uniform, greedy and learned soups, ensembles, interpolation, top-k averaging.

Each recipe takes an evaluator (see :mod:`modelsoup.eval`) and returns the soup as a ``linear``
:class:`~modelsoup.recipe.Recipe` that :func:`modelsoup.merge` writes, together with what it measured.
"""

from .names import ENSEMBLES, RECIPES, SOUPS

# Imported on first use: the command line reads the names above without importing torch.
from .._lazy import lazy_exports  # noqa: E402

_EXPORTS = {
    "AdaMergingResult": "adaptive", "adamerging": "adaptive",
    "CookResult": "kitchen", "Row": "kitchen", "cook": "kitchen",
    "ensemble_predictions": "ensemble", "ensemble_score": "ensemble", "greedy_ensemble": "ensemble",
    "GreedyResult": "greedy", "GreedyStep": "greedy", "greedy_soup": "greedy",
    "InterpolationResult": "interpolation", "interpolate": "interpolation",
    "LearnedResult": "learned", "learned_soup": "learned",
    "Pantry": "pantry", "SoupState": "pantry",
    "fisher_statistics": "statistics", "gram_statistics": "statistics", "model_statistics": "statistics", "recipe_statistics": "statistics",
    "TopKResult": "topk", "metrics_from_log": "topk", "metrics_from_names": "topk", "topk_average": "topk",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = ["ENSEMBLES", "RECIPES", "SOUPS", *_EXPORTS]

"""Evaluators (things that score weights on held-out data) and data plumbing; batch-norm recalibration."""

from .base import Evaluator, FunctionEvaluator, PredictionEvaluator, Predictions, Score, function_evaluator
from .batchnorm import batchnorm_layers, recalibrate_bn
from .cache import EvalCache
from .module import ClassificationEvaluator, ModuleEvaluator, load_weights

__all__ = [
    "ClassificationEvaluator", "EvalCache", "Evaluator", "FunctionEvaluator", "ModuleEvaluator", "PredictionEvaluator", "Predictions",
    "Score", "batchnorm_layers", "function_evaluator", "load_weights", "recalibrate_bn",
]

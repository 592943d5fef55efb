"""Merge methods: one module each, registered by :func:`register`. Importing this package registers them all."""

from . import breadcrumbs, dare_linear, dare_ties, ema, linear, model_stock, slerp, task_arithmetic, ties  # noqa: F401  (registers)
from .registry import MergeMethod, Param, PerModel, available_methods, get_method, register

__all__ = ["MergeMethod", "Param", "PerModel", "available_methods", "get_method", "register"]

"""Merge methods: one module each, registered by :func:`register`. Importing this package registers them all."""

from . import (  # noqa: F401  (registers)
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    ema,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from .registry import MergeMethod, Param, PerModel, available_methods, get_method, register

__all__ = ["MergeMethod", "Param", "PerModel", "available_methods", "get_method", "register"]

"""`soup demo`: the library used end to end on real data, as a user would use it."""

from .digits import run_demo

__all__ = ["run_demo"]

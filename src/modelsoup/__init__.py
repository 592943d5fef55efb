"""modelsoup: model soups and weight-space merging of fine-tuned checkpoints, streamed tensor by tensor."""

__version__ = "0.1.0"

from .api import MergeResult, merge, merge_modules, merge_state_dicts  # noqa: E402
from .methods import available_methods, get_method  # noqa: E402

__all__ = ["MergeResult", "__version__", "available_methods", "get_method", "merge", "merge_modules", "merge_state_dicts"]

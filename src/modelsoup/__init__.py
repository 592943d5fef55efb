"""modelsoup: model soups and weight-space merging of fine-tuned checkpoints, streamed tensor by tensor."""

__version__ = "0.1.0"

import os as _os

# Large CPU tensors on transparent huge pages (PyTorch's own switch, read at the first allocation of
# 2 MB or more). A merge allocates a fresh buffer per tensor per model; on 4 KiB pages the kernel spent
# most of a 4 x 1 GB linear merge faulting them in (1.1 M page faults; see benchmarks/RESULTS.md).
# Set THP_MEM_ALLOC_ENABLE=0 to opt out. No effect where THP is unavailable (macOS, THP "never").
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# The public API is imported on first use, so that `soup --help` (and `import modelsoup`) do not import torch.
from ._lazy import lazy_exports  # noqa: E402

_EXPORTS = {
    "MergeResult": "api", "merge": "api", "merge_modules": "api", "merge_state_dicts": "api",
    "available_methods": "methods", "get_method": "methods",
    "model_statistics": "recipes.statistics",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["MergeResult", "__version__", "available_methods", "get_method", "merge", "merge_modules", "merge_state_dicts", "model_statistics"]

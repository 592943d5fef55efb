"""When to show progress: the one rule every long-running step follows."""

from __future__ import annotations

import sys


def progress_on(progress: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, or (None) only when standard error is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)

"""The ``soup`` command: each subcommand parses, builds options and calls the library.

Heavy modules (torch, transformers, the library itself) are imported inside the commands, so
``soup --help``, ``soup CMD --help`` and ``soup --version`` start at once. Every error modelsoup names
is printed as ``error: ...`` with exit code 2; SIGTERM and SIGHUP are handled like Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from typing import Any

from .. import __version__
from ..errors import SoupError
from . import align, demo, diagnose, merge, soups

log = logging.getLogger("modelsoup")

# Subcommands that read checkpoints, and so take --allow-global.
_READERS = ("merge", "plan", "cook", "greedy", "learn", "ensemble", "interpolate", "topk", "templates", "inspect", "curve", "compare", "scale", "align", "statistics", "adamerge")


def _verbosity(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-q/-v, accepted before and after the subcommand (a subcommand's copy leaves the value alone unless given)."""
    default: Any = False if top else argparse.SUPPRESS
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="also debugging detail")


def build_parser() -> argparse.ArgumentParser:
    """The ``soup`` argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="soup", description="Model soups and weight-space merging of fine-tuned checkpoints.")
    p.add_argument("--version", action="version", version=f"modelsoup {__version__}")
    _verbosity(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)
    for module in (merge, soups, diagnose, align, demo):
        module.add_parsers(sub)
    for name, sp in sub.choices.items():
        _verbosity(sp, top=False)
        if name in _READERS:
            sp.add_argument(
                "--allow-global", action="append", metavar="MODULE.CLASS",
                help="a class a torch checkpoint may hold beyond tensors (repeatable); loaded as inert data, its code never runs. "
                "argparse.Namespace (timm), Lightning's AttributeDict and numpy scalars are allowed already")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that the same clean-up as Ctrl-C runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _with_signals() -> None:
    """Treat SIGTERM and SIGHUP like Ctrl-C: the temporary output is removed, nothing is left behind."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _terminate)


def _import_torch() -> None:
    """Import torch, which every command computes with, with the garbage collector paused, then freeze what it made.

    The import makes hundreds of thousands of objects that live as long as the process and no garbage; collections
    during it, and later ones scanning all of it again, took 0.5 s of a 3.3 s linear merge (2.72 s against 3.32 s
    with them, whole-process medians of 10 pairs). Where torch is already imported (``main`` called in a process that
    uses it) nothing is done, so nothing of the caller's is frozen.
    """
    if "torch" in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()  # what the import made lives as long as the process: later collections need not scan it again
        if collecting:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    """Run ``soup`` with ``argv`` (default: the command line); return the exit code."""
    args = build_parser().parse_args(argv)  # --help and --version exit here, before torch is imported
    _import_torch()
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="soup: %(message)s", stream=sys.stderr)
    logging.getLogger("modelsoup").setLevel(level)
    _with_signals()
    try:
        from ..io.pickles import allowed_globals

        with allowed_globals(getattr(args, "allow_global", None) or ()):
            return int(args.fn(args))
    except SoupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"terminated ({signal.Signals(e.signum).name}); no output was left half-written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except OSError as e:  # the last net: a file-system error no check above named
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free space", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]

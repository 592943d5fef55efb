"""``soup align``: permute models' hidden units to match a reference and write them (parse, call the library, print)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_align_options(p: argparse.ArgumentParser, *, prefix: str = "") -> Any:
    """The options alignment shares between ``soup align`` and ``soup curve --align`` (``prefix`` names the method and data flags);
    returns their argument group."""
    g = p.add_argument_group("alignment (Git Re-Basin)")
    g.add_argument(f"--{prefix}method", dest="align_method", choices=["weight", "activation"], default="weight",
                   help="weight: weight matching, no data (default); activation: match units whose activations correlate on the data")
    g.add_argument("--arch", metavar="FILE.py:FN | MODULE:FN",
                   help="a function returning the model's nn.Module (its structure gives the permutations; default: a Hugging Face folder's config"
                        + (", or the evaluator's module" if prefix else "") + ")")
    g.add_argument("--spec", metavar="FILE", help="declared permutation groups (JSON or YAML, see docs/align.md) instead of tracing the module")
    g.add_argument(f"--{prefix}data", dest="align_data", metavar="FILE.py:NAME | MODULE:NAME",
                   help="batches of inputs: an iterable, a function returning one, or an evaluator (its batches); used by activation matching"
                        + (", REPAIR" if prefix else "") + " and the function check"
                        + (" (default: the held-out evaluator's batches)" if prefix else " (default: seeded random inputs)"))
    g.add_argument("--input-shape", metavar="SHAPE", help="one input example's shape without the batch, e.g. 3x8x8 (when it cannot be inferred and no data is given)")
    g.add_argument("--seed", type=int, default=0, help="weight matching's random group order and the check's random inputs (default 0)")
    return g


def align_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The library's keyword arguments from the shared options."""
    from ..align.models import data_object, parse_shape

    return {"method": a.align_method, "arch": a.arch, "spec": a.spec, "data": data_object(a.align_data) if a.align_data else None,
            "input_shape": parse_shape(a.input_shape) if a.input_shape else None, "seed": a.seed}


def cmd_align(a: argparse.Namespace) -> int:
    from ..align import align, save_aligned
    from ..io.output import check_output

    check_output(Path(a.output), a.overwrite, inputs=[a.reference, *a.models])
    result = align(a.reference, a.models, max_iter=a.max_iter, rtol=a.tolerance, key=a.key, strip_prefix=a.strip_prefix, **align_kwargs(a))
    files = save_aligned(result, a.output, sources=a.models, reference=a.reference, overwrite=a.overwrite)
    print(result.to_markdown())
    print(f"wrote {', '.join(f.name for f in files)} in {a.output}")
    return 0


def add_parsers(sub: Any) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("align", help="permute models' hidden units to match a reference (Git Re-Basin), so their weights line up before souping",
                       description="Each MODEL's hidden units (neurons, channels, attention heads) are reordered to match REFERENCE's, by weight "
                                   "matching (no data) or activation matching (--method activation --data); each aligned model is checked to "
                                   "compute the same function as the original (max logit difference) before anything is written. Writes one "
                                   "aligned safetensors per model (a folder per Hugging Face input) and align.json into DIR.")
    p.add_argument("reference", help="the model the others are aligned to (never changed)")
    p.add_argument("models", nargs="+", help="models to align: safetensors or torch files, Hugging Face folders (one architecture)")
    p.add_argument("-o", "--output", required=True, help="folder for the aligned models, align.json and align.md")
    add_align_options(p)
    p.add_argument("--max-iter", type=int, default=100, help="weight matching: coordinate-descent sweeps at most (default 100)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="function check: largest output difference allowed, relative to the largest |output| (default 1e-4)")
    p.add_argument("--key", help="entry of nested torch checkpoints holding the weights")
    p.add_argument("--strip-prefix", help="tensor name prefix to remove (e.g. module.)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier soup align output")
    p.set_defaults(fn=cmd_align)

"""Evaluators by name, as the command line asks for them: a built-in, or a user's ``module:function``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..devices import default_device, resolve_device
from ..errors import EvaluatorError
from .base import Evaluator, function_evaluator

BUILTINS = ("text-classification", "perplexity")


def make_evaluators(spec: str, *, heldout: str, test: str | None = None, model: str | Path | None = None,
                    **options: Any) -> tuple[Evaluator, Evaluator | None]:
    """The held-out evaluator and, if ``test`` is given, the same evaluator on the test data.

    Args:
        spec: ``text-classification`` (Hugging Face sequence classification of a CSV/JSONL file),
            ``perplexity`` (causal LM on a text file), or ``package.module:name`` / ``file.py:name``
            (a user's scoring function or Evaluator; it receives the data path as second argument).
        heldout, test: data files.
        model: for built-ins, the Hugging Face folder giving the architecture, config and tokenizer.
        options: built-in options (text_column, label_column, text_pair_column, max_length, batch_size,
            limit, device, progress); None values are left at their defaults (the device: CUDA when present, else the CPU).

    Raises:
        EvaluatorError: unknown evaluator, or a built-in without a model folder.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    if spec in BUILTINS:
        opts["device"] = resolve_device(opts["device"]) if "device" in opts else default_device()  # a GPU when there is one
        if model is None or not (Path(model) / "config.json").is_file():
            raise EvaluatorError(
                f"the built-in '{spec}' evaluator needs a Hugging Face model folder (config.json and tokenizer) for the architecture; "
                f"give --model FOLDER{'' if model is None else f' ({model} has no config.json)'}"
            )
        held: Any
        if spec == "text-classification":
            from .text import TextClassificationEvaluator

            held = TextClassificationEvaluator(model, heldout, **opts)
        else:
            from .lm import PerplexityEvaluator

            opts.pop("label_column", None)
            opts.pop("text_pair_column", None)
            if "limit" in opts:
                opts["max_tokens"] = opts.pop("limit")
            held = PerplexityEvaluator(model, heldout, **opts)
        return held, (held.with_data(test) if test is not None else None)
    if ":" not in spec:
        raise EvaluatorError(f"unknown evaluator '{spec}'; built-ins: {', '.join(BUILTINS)}, or name your own as package.module:function")
    return function_evaluator(spec, data=heldout), (function_evaluator(spec, data=test) if test is not None else None)


def parse_domains(values: list[str] | None, what: str) -> dict[str, str] | None:
    """``["FILE"]`` -> None (one domain); ``["news=a.csv", "law=b.csv"]`` -> {"news": "a.csv", "law": "b.csv"}.

    Raises:
        EvaluatorError: a mix of named and unnamed files, several unnamed files, or a name given twice.
    """
    if not values:
        return None
    named = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or Path(v).exists() or not name or "/" in name:
            if len(values) > 1:
                raise EvaluatorError(f"{what}: with several data files, name each domain as NAME=FILE (got {v!r})")
            return None
        if name in named:
            raise EvaluatorError(f"{what}: domain '{name}' is given twice")
        named[name] = path
    return named


def make_domain_evaluators(spec: str, *, heldout: dict[str, str], test: dict[str, str] | None = None, weights: dict[str, float] | None = None,
                           model: str | Path | None = None, **options: Any) -> tuple[Evaluator, Evaluator | None]:
    """Multi-domain held-out (and test) evaluators: one per domain, sharing one model, scored as their weighted mean.

    Raises:
        EvaluatorError: test domains that differ from the held-out ones, or a bad evaluator.
    """
    from .domains import multi_domain

    if test is not None and set(test) != set(heldout):
        raise EvaluatorError(f"the test domains ({', '.join(test)}) must be the held-out domains ({', '.join(heldout)})")
    names = list(heldout)
    first, _ = make_evaluators(spec, heldout=heldout[names[0]], model=model, **options)

    def build(path: str) -> Evaluator:
        if hasattr(first, "with_data"):
            return first.with_data(path)  # type: ignore[no-any-return]
        return make_evaluators(spec, heldout=path, model=model, **options)[0]

    held = {n: (first if k == 0 else build(heldout[n])) for k, n in enumerate(names)}
    tests = {n: build(test[n]) for n in names} if test is not None else None
    return multi_domain(held, weights), (multi_domain(tests, weights) if tests is not None else None)

"""Evaluators by name, as the command line asks for them: a built-in, or a user's ``module:function``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
            limit, device, progress); None values are left at their defaults.

    Raises:
        EvaluatorError: unknown evaluator, or a built-in without a model folder.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    if spec in BUILTINS:
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

"""Exception classes, and the helpers their messages share. Every message names the file/tensor/key, what was found, what was expected and the fix."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 8


def short_list(names: Sequence[str]) -> str:
    """The first few names, comma-separated, with a count of the rest (for messages)."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def name_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """``missing N (a, b, ...); unexpected M (...)``, leaving out an empty side (for messages)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({short_list(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({short_list(unexpected)})")
    return "; ".join(parts)


class SoupError(Exception):
    """Base class for every error modelsoup raises on bad input."""


class CheckpointError(SoupError):
    """A checkpoint file or folder cannot be read (missing, truncated, corrupt, unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would need to run code to load; refused without running it."""


class KeyMismatchError(SoupError):
    """The models do not hold the same tensor names."""


class TensorMismatchError(SoupError):
    """A tensor has different shapes or dtypes across models."""


class NonFiniteError(SoupError):
    """An input tensor holds NaN or Inf."""


class MethodError(SoupError):
    """A merge method was asked for something it cannot do (unknown name, bad parameter, wrong model count)."""


class RecipeError(SoupError):
    """A recipe has one or more problems; all of them are listed at once.

    Attributes:
        problems: one line per problem, each starting with its place in the file.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"recipe {source} has" if source else "recipe has"
        n = len(self.problems)
        lines = [f"{head} {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class OutputExistsError(SoupError):
    """The output path exists and overwriting was not asked for."""


class EvaluatorError(SoupError):
    """An evaluator cannot be built or returned something unusable (bad data file, unknown label, bad return value)."""


class InsufficientMemoryError(SoupError):
    """A computation that needs every ingredient resident (the learned soup) would not fit in memory."""


class AnalysisError(SoupError):
    """A diagnostic cannot be computed from what it was given (too few models, nothing shared, no predictions)."""


class OptionError(SoupError, ValueError):
    """An option of a soup, evaluator or diagnostic is out of range or inconsistent (also a ValueError, as before)."""


class AdapterInputError(CheckpointError):
    """An adapter (PEFT LoRA) was given where a full model was expected."""


class AdapterError(CheckpointError):
    """A PEFT adapter that cannot be read, or cannot be applied to the given base exactly (an unsupported
    LoRA variant such as DoRA, factors that do not fit the base, a config that disagrees with its tensors)."""


class OutputError(SoupError):
    """The output cannot be written where asked (it is or holds an input, its parent is unusable, the disk is full)."""


class EmptyMergeError(SoupError):
    """A merge would write a model with no tensors."""


class TokenizerError(SoupError):
    """The models' tokenizers cannot give the output the vocabulary the recipe asks for (a merge would mix token rows)."""

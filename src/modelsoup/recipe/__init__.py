"""Merge recipes: the resolved schema, YAML read with line numbers, validation as a whole, mergekit's form.

The entry points: :func:`load_recipe` (a file), :func:`recipe_from_yaml_text` and :func:`recipe_from_dict`
(the Python API's form; models may be in-memory objects). A mapping with a top-level ``merge_method``
is a mergekit recipe and is translated by :mod:`modelsoup.recipe.mergekit` into the same :class:`Recipe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .loader import MAX_RECIPE_BYTES, PathKey, Problems, load_yaml, load_yaml_documents
from .schema import DTYPES, KEY_MODES, OUTPUT_FORMATS, TAKE_CHOICES, ModelRef, OutputOptions, Override, Recipe, describe, parse_size
from .validate import build_recipe, check_setting



def _from_data(data: Any, source: str | None, lines: Mapping[PathKey, int], yaml_input: bool, root: Path | None = None) -> Recipe:
    if isinstance(data, Mapping) and "merge_method" in data:
        from .mergekit import recipe_from_mergekit

        # mergekit takes relative paths from the working directory; the same recipe means the same models here
        return recipe_from_mergekit(data, source=source, lines=lines)
    return build_recipe(data, source=source, lines=lines, yaml_input=yaml_input, root=root)


def recipe_from_yaml_text(text: str, source: str | None = None, root: Path | None = None) -> Recipe:
    """Parse and validate a recipe from YAML text (native or mergekit form).

    Args:
        text: the YAML.
        source: the file name shown in messages.
        root: the folder relative model paths of a native recipe are taken from (None = working directory).

    Raises:
        RecipeError: every problem, each with its line.
    """
    data, lines = load_yaml(text, source)
    return _from_data(data, source, lines, yaml_input=True, root=root)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; a top-level ``merge_method`` key marks the mergekit form.

    Relative model paths of a native recipe are taken from the recipe file's folder (so the
    ``recipe.yaml`` written next to an output re-runs from anywhere); a mergekit recipe's from the
    working directory, as mergekit takes them.

    Raises:
        RecipeError: the file cannot be read, is not UTF-8 text, or every problem of its content.
    """
    p = Path(path)
    return recipe_from_yaml_text(read_recipe_text(p), str(path), root=p.expanduser().absolute().parent)


def read_recipe(path: str | Path) -> tuple[Recipe | None, str]:
    """Read a recipe file once: (its validated recipe, its text), or (None, its text) when it holds several
    documents (a multi-stage recipe, for :func:`modelsoup.recipe.stages.load_stages`).

    Raises:
        RecipeError: as :func:`load_recipe`, for a one-document file.
    """
    p = Path(path)
    text = read_recipe_text(p)
    docs = load_yaml_documents(text, str(path))
    if len(docs) > 1:
        return None, text
    data, lines = (docs[0][0], docs[0][1]) if docs else (None, {})
    return _from_data(data, str(path), lines, yaml_input=True, root=p.expanduser().absolute().parent), text


def read_recipe_text(path: str | Path) -> str:
    """The text of a recipe file.

    Raises:
        RecipeError: not a regular file, too large, unreadable, or not UTF-8.
    """
    p = Path(path)
    try:
        if p.exists() and not p.is_file():
            raise RecipeError([f"{path}: is not a regular file (a FIFO or device?); give a recipe file"], str(path))
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: the recipe file is {p.stat().st_size} bytes; a recipe over {MAX_RECIPE_BYTES >> 20} MB is refused"], str(path))
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecipeError([f"{path}: cannot read the recipe file: {e.strerror or e}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise RecipeError([f"{path}: is not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8"], str(path)) from None
    return text


def recipe_from_dict(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe given as a dict (same schema as the YAML; models may be ``{"source": obj}``).

    Raises:
        RecipeError: every problem found.
    """
    return _from_data(data, source, {}, yaml_input=False)


__all__ = [
    "DTYPES", "KEY_MODES", "OUTPUT_FORMATS", "TAKE_CHOICES", "ModelRef", "OutputOptions", "Override", "Problems", "Recipe",
    "build_recipe", "check_setting", "describe", "load_recipe", "load_yaml", "parse_size", "read_recipe", "read_recipe_text", "recipe_from_dict", "recipe_from_yaml_text",
]

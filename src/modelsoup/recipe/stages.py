"""Multi-stage recipes (``mergekit-multi``): several YAML documents, each a recipe with a ``name:``; a later one
uses an earlier one's output by giving its name as a model path.

Every stage is read and validated before anything is merged (a stage's output counts as an existing model for
the stages after it). Stages run in dependency order; the output is the stage without a name, else the one stage
no other stage uses. The other stages are written under an intermediate folder, as ``FOLDER/<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .loader import load_yaml_documents
from .schema import Recipe
from .validate import PENDING_OUTPUTS

# Where a stage names its models: mergekit's model references, and native paths.
_MODEL_KEYS = ("model", "base_model", "path", "base", "tokenizer_source", "source")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe.

    Attributes:
        name: its ``name:``; None for the final (unnamed) stage.
        recipe: the validated recipe, stage names replaced by the folders their outputs go to.
        uses: the names of the stages whose outputs it reads.
    """

    name: str | None
    recipe: Recipe
    uses: frozenset[str]


def _replace_names(value: Any, names: Mapping[str, Path], used: set[str], key: Any = None) -> Any:
    """``value`` with every model reference that is a stage name replaced by that stage's output folder."""
    if isinstance(value, Mapping):
        return {k: _replace_names(v, names, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_names(v, names, used, key if key == "models" else None) for v in value]
    if isinstance(value, str) and key in (*_MODEL_KEYS, "models") and value in names:
        used.add(value)
        return str(names[value])
    return value


def load_stages(text: str, source: str, intermediate: Path) -> list[Stage]:
    """Read and validate every stage of a multi-stage recipe, in the order they must run (the output last).

    Args:
        text: the YAML (several ``---`` separated documents).
        source: the file name, for messages.
        intermediate: the folder the named stages' outputs go to (``intermediate/<name>``).

    Raises:
        RecipeError: every problem of every stage (each at its line), a name given twice or not a plain name,
            more than one unnamed stage, a cycle, or no single final stage.
    """
    from . import _from_data

    docs = load_yaml_documents(text, source)
    problems: list[str] = []
    named: dict[str, int] = {}
    unnamed: list[int] = []
    for i, (data, lines, first) in enumerate(docs):
        where = f"{source}:{lines.get(('name',), first)}"
        if not isinstance(data, Mapping):
            problems.append(f"{where}: document {i + 1} must be a recipe mapping, got {type(data).__name__}")
            continue
        name = data.get("name")
        if name is None:
            unnamed.append(i)
        elif not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            problems.append(f"{where}: name must be a plain name (it names the stage's folder), got {name!r}")
        elif name in named:
            problems.append(f"{where}: stage name '{name}' is given twice (documents {named[name] + 1} and {i + 1}); names must be unique")
        else:
            named[name] = i
    if len(unnamed) > 1:
        problems.append(f"{source}: documents {', '.join(str(i + 1) for i in unnamed)} have no `name:`; only the final stage may be unnamed")
    if problems:
        raise RecipeError(problems, source)
    outputs = {n: (intermediate / n).absolute() for n in named}
    stages: dict[int, Stage] = {}
    token = PENDING_OUTPUTS.set(frozenset(outputs.values()))
    try:
        for i, (data, lines, _) in enumerate(docs):
            used: set[str] = set()
            body = _replace_names({k: v for k, v in data.items() if k != "name"}, outputs, used)
            try:
                recipe = _from_data(body, source, lines, yaml_input=True, root=Path(source).expanduser().absolute().parent)
            except RecipeError as e:
                problems += e.problems
                continue
            stages[i] = Stage(data.get("name"), recipe, frozenset(used))
    finally:
        PENDING_OUTPUTS.reset(token)
    if problems:
        raise RecipeError(problems, source)
    return _in_order(stages, named, source)


def _in_order(stages: dict[int, Stage], named: Mapping[str, int], source: str) -> list[Stage]:
    """The stages in dependency order, the final stage last."""
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, chain: tuple[str, ...]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "visiting":
            raise RecipeError([f"{source}: stages use each other in a cycle: {' -> '.join((*chain[chain.index(str(stages[i].name)):], str(stages[i].name)))}"], source)
        state[i] = "visiting"
        for u in sorted(stages[i].uses):
            visit(named[u], (*chain, str(stages[i].name)))
        state[i] = "done"
        order.append(i)

    for i in sorted(stages):
        visit(i, ())
    used_by_others = {u for s in stages.values() for u in s.uses}
    finals = [i for i, s in stages.items() if s.name is None] or [i for i, s in stages.items() if s.name not in used_by_others]
    if len(finals) != 1:
        names = ", ".join(str(stages[i].name) for i in finals)
        raise RecipeError([f"{source}: no single final stage: {names} are used by no other stage; leave the final stage unnamed "
                           "or make it use the others"], source)
    order.remove(finals[0])
    return [stages[i] for i in order] + [stages[finals[0]]]


__all__ = ["Stage", "load_stages"]

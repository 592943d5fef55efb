"""Recipe YAML read safely, with the line of every key and item, and problems collected to be raised at once.

Line numbers: the YAML is composed into nodes and each mapping key and sequence item records its
line, keyed by its path (``("models", 1, "weight")``); a problem found at a path (a type check's
place or a check of ours) is reported at the line of its longest recorded prefix.
Nesting, alias expansion, size and number lengths are bounded before anything is built (alias bombs,
recursive aliases and deep nesting are refused with their line).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ..errors import RecipeError

PathKey = tuple[Any, ...]



class Problems:
    """Collects problems, each placed at a path of the source file; raises them all at once.

    Args:
        source: file name shown in front of line numbers.
        lines: path -> 1-based line, from :func:`load_yaml`.
        remap: turns a path of the native schema into the path it came from (mergekit translation).
    """

    def __init__(
        self,
        source: str | None = None,
        lines: Mapping[PathKey, int] | None = None,
        remap: Callable[[PathKey], PathKey] | None = None,
    ) -> None:
        self.source = source
        # not copied: load_yaml records lines into the same dict while it reports duplicate keys
        self.lines: Mapping[PathKey, int] = lines if lines is not None else {}
        self.remap = remap
        self.items: list[tuple[int, int, str]] = []

    def line(self, path: PathKey) -> int | None:
        for k in range(len(path), -1, -1):
            if path[:k] in self.lines:
                return self.lines[path[:k]]
        return None

    def add(self, path: PathKey, message: str, *, native: bool = True) -> None:
        """Record a problem at ``path`` (a native-schema path unless ``native`` is false)."""
        if native and self.remap is not None:
            path = self.remap(path)
        line = self.line(path)
        where = f"{self.source}:{line}" if (self.source and line) else (f"line {line}" if line else self.source)
        dotted = dotted_path(path)
        head = ": ".join(x for x in (where, dotted) if x)
        self.items.append((line or 0, len(self.items), f"{head}: {message}" if head else message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError([m for _, _, m in sorted(self.items)], self.source)


def dotted_path(path: PathKey) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# Bounds on what a recipe's YAML may expand to: a recipe is a few dozen lines, so these only stop
# hostile files (alias bombs, which expand exponentially; deep or recursive nesting).
MAX_RECIPE_BYTES = 10 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000

_OPEN_TOKENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_CLOSE_TOKENS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, plus YAML 1.2's floats without a dot (``1e-3``, which 1.1 reads as text).

    mergekit reads such a value as text and its schema turns it into a float, so the same recipe gives
    the same number here.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_error(source: str | None, line: int | None, message: str) -> RecipeError:
    where = f"{source}:{line}" if (source and line) else (f"line {line}" if line else source)
    return RecipeError([f"{where}: {message}" if where else message], source)


def _check_nesting(text: str, source: str | None) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH from the token stream (the scanner does not recurse)."""
    depth = 0
    for tok in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(tok, _OPEN_TOKENS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _yaml_error(source, tok.start_mark.line + 1, f"nesting is deeper than {MAX_YAML_DEPTH} levels; a recipe needs a few")
        elif isinstance(tok, _CLOSE_TOKENS):
            depth -= 1


MAX_NUMBER_CHARS = 400
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _check_expansion(root: yaml.Node, source: str | None) -> None:
    """Refuse a node graph that aliases make recursive, deeper than MAX_YAML_DEPTH or larger than MAX_YAML_NODES,
    or that holds a number written with more than MAX_NUMBER_CHARS characters (no setting needs one).

    Aliases share nodes, so the graph is small even when its expansion is huge (a "billion laughs"
    file); every node is visited once, iteratively (no recursion to exhaust).
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(n: yaml.Node) -> list[yaml.Node]:
        if isinstance(n, yaml.MappingNode):
            return [x for kv in n.value for x in kv]
        if isinstance(n, yaml.SequenceNode):
            return list(n.value)
        return []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            on_path.discard(key)
            if size[key] > MAX_YAML_NODES:
                raise _yaml_error(source, node.start_mark.line + 1, f"expands to more than {MAX_YAML_NODES} values through aliases (an alias bomb?); write the recipe out")
            if depth[key] > MAX_YAML_DEPTH:
                raise _yaml_error(source, node.start_mark.line + 1, f"nests deeper than {MAX_YAML_DEPTH} levels through aliases")
            continue
        if key in size:
            continue
        if isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise _yaml_error(source, node.start_mark.line + 1, f"a number of {len(node.value)} characters; no setting needs more than {MAX_NUMBER_CHARS}")
        on_path.add(key)
        stack.append((node, True))
        for c in children(node):
            if id(c) in on_path:
                raise _yaml_error(source, c.start_mark.line + 1, "an alias refers to a value that contains it (a recursive alias); write the value out")
            if id(c) not in size:
                stack.append((c, False))


def load_yaml(text: str, source: str | None = None) -> tuple[Any, dict[PathKey, int]]:
    """Parse one YAML document, recording the line of every mapping key and sequence item.

    Nesting, alias expansion and size are bounded before anything is built (see MAX_YAML_*).

    Raises:
        RecipeError: a syntax error, a duplicated key, several documents, or a file past the bounds, with its line.
    """
    docs = load_yaml_documents(text, source)
    if len(docs) > 1:
        raise _yaml_error(source, docs[1][2], f"holds {len(docs)} YAML documents (separated by ---); a multi-stage recipe (mergekit-multi) "
                          "is run from a file: soup merge STAGES.yml OUT")
    return (docs[0][0], docs[0][1]) if docs else (None, {})


def load_yaml_documents(text: str, source: str | None = None) -> list[tuple[Any, dict[PathKey, int], int]]:
    """Parse every document of a YAML text (``---`` separated): (data, path -> line, the document's first line) each.

    Lines count from the start of the text. Bounds and refusals are those of :func:`load_yaml`, per document.

    Raises:
        RecipeError: as :func:`load_yaml`.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise _yaml_error(source, None, f"the recipe is {len(text)} characters; a recipe over {MAX_RECIPE_BYTES >> 20} MB is refused")
    loader = None
    built: list[tuple[Any, yaml.Node]] = []
    try:
        loader = _RecipeLoader(text)
        _check_nesting(text, source)
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_expansion(node, source)
            try:
                built.append((loader.construct_document(node), node))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:  # PyYAML's own conversions
                raise _yaml_error(source, None, f"a value cannot be read ({type(e).__name__}: {str(e)[:100]}); check dates, numbers and !!tags") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise _yaml_error(source, mark.line + 1 if mark else None, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError([f"{source or 'recipe'}: YAML error: {e}"], source) from None
    except RecursionError:
        raise _yaml_error(source, None, "nesting is too deep to read") from None
    finally:
        if loader is not None:
            loader.dispose()
    return [(data, _lines(node, source), node.start_mark.line + 1) for data, node in built]


def _lines(node: yaml.Node, source: str | None) -> dict[PathKey, int]:
    """path -> line of every mapping key and sequence item under ``node``; a key given twice is refused."""
    lines: dict[PathKey, int] = {}
    problems = Problems(source, lines)

    def walk(n: yaml.Node, path: PathKey) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else id(k)
                here = (*path, key)
                lines[here] = k.start_mark.line + 1
                if key in seen:
                    problems.add(here, "key given twice (the later one would silently win); keep one")
                seen.add(key)
                walk(v, here)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(node, ())
    problems.raise_if_any()
    return lines

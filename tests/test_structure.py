"""The package's structure: no import cycles between modelsoup modules, and no heavy imports for help and version."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelsoup"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """modelsoup modules this file imports at module level or inside functions (``from . import x`` resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("modelsoup")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("modelsoup"):
                continue
            out.add(target)
            for a in node.names:  # `from . import api` imports the module api
                out.add(f"{target}.{a.name}")
    return out


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = {m: {t for t in imports_of(p) if t in mods and t != m} for m, p in mods.items()}
    # importing a package's submodule runs the package's __init__, which is not a cycle of the submodule's own
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modelsoup_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom modelsoup.cli import main\n"
            "for argv in (['--help'], ['merge', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors', 'yaml', 'pydantic') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-500:]


def test_lazy_exports_do_not_share_a_name_with_a_submodule():
    """Importing a submodule binds its name on the package, which would hide an export of that name."""
    import importlib

    for package in ("modelsoup", "modelsoup.recipes"):
        mod = importlib.import_module(package)
        folder = PACKAGE if package == "modelsoup" else PACKAGE / package.split(".")[1]
        submodules = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
        clash = sorted(set(mod._EXPORTS) & submodules)
        assert not clash, f"{package}: exports named like submodules: {clash}"


def test_python_dash_m_and_verbosity_flags_after_the_subcommand():
    r = subprocess.run([sys.executable, "-m", "modelsoup", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("modelsoup "), r.stderr
    from modelsoup.cli import build_parser

    p = build_parser()
    assert p.parse_args(["merge", "a", "-o", "x", "-q"]).quiet is True
    assert p.parse_args(["-q", "merge", "a", "-o", "x"]).quiet is True
    assert p.parse_args(["merge", "a", "-o", "x", "-v"]).verbose is True
    args = p.parse_args(["merge", "a", "-o", "x"])
    assert args.quiet is False and args.verbose is False

"""``soup report``: every result found in some folders, gathered into one self-contained HTML file and a Markdown summary.

What is gathered (searched recursively):

* the diagnostics' ``inspect.json``, ``curve.json``, ``compare.json``, ``scale.json`` (see
  :mod:`modelsoup.analysis.results`): verdict, tables, figures, input hashes;
* ``results.json`` of ``soup cook/greedy/learn/interpolate/topk``: the ``results.md`` table beside it, and
  the ``recipe.yaml`` and ``soup_manifest.json`` of every soup written under it;
* ``soup_manifest.json`` of a ``soup merge`` output elsewhere: its recipe and input/output hashes;
* ``templates.json`` of ``soup templates``: its ``templates.md`` and ``templates.png``.

The HTML needs no server and no network: figures are embedded as base64 ``data:`` URIs, the style is
inline, and there is no script. The Markdown summary links the figures by relative path.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AnalysisError, OutputError
from ..io.output import check_output
from .results import TITLES
from .verdict import Reason, verdict

log = logging.getLogger("modelsoup")

ANALYSIS_FILES = {f"{k}.json" for k in TITLES}
# results of other commands that write <name>.json, <name>.md and <name>.png into a folder
OTHER_RESULTS = {"templates.json": "Weight templates"}
SKIP_DIRS = re.compile(r"\.soup-(tmp|old)-|^\.git$|^__pycache__$")


@dataclass
class Entry:
    """One result found.

    Attributes:
        kind: ``analysis``, ``results`` (a cooked table), ``merge`` (a merged model) or ``other`` (e.g. templates).
        source: the JSON file.
        title: the section heading.
        tables: Markdown (tables, lists, paragraphs) shown as the section's body.
        figures: PNG files.
        verdict: the verdict's JSON, when there is one.
        inputs: input records (role, label, path, format, files with sha256).
        recipes: (name, recipe YAML) of the soups and merges.
        outputs: output file -> sha256 (merges).
    """

    kind: str
    source: Path
    title: str
    tables: str = ""
    figures: list[Path] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    recipes: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("report: skipping %s (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def _candidates(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not SKIP_DIRS.search(d))
        found += [Path(root) / f for f in sorted(files) if f in ANALYSIS_FILES or f in OTHER_RESULTS or f in ("results.json", "soup_manifest.json")]
    return found


def _manifest(path: Path) -> tuple[list[dict[str, Any]], dict[str, str], str | None]:
    data = _load(path) or {}
    recipe = path.parent / str(data.get("recipe", "recipe.yaml"))
    return list(data.get("inputs", [])), dict(data.get("outputs", {})), recipe.read_text() if recipe.is_file() else None


def _figure_files(source: Path, data: dict[str, Any]) -> list[Path]:
    """The PNGs a result names (a list of file names, or a mapping of title -> file name), those present."""
    named = data.get("figures") or []
    names = list(named.values()) if isinstance(named, dict) else list(named)
    figs = [source.parent / str(f) for f in names]
    missing = [f.name for f in figs if not f.is_file()]
    if missing:
        log.warning("report: %s names figures that are not there: %s", source, ", ".join(missing))
    return [f for f in figs if f.is_file()]


def collect(folders: Sequence[str | Path]) -> list[Entry]:
    """Every result under ``folders`` (files or folders), in the order found (folders as given, then by path).

    Raises:
        AnalysisError: a folder does not exist.
    """
    entries: list[Entry] = []
    consumed: set[Path] = set()
    paths: list[Path] = []
    for f in folders:
        p = Path(f)
        if not p.exists():
            raise AnalysisError(f"{p}: no such file or folder; give the output folders of soup inspect/curve/compare/scale/cook")
        paths += [c for c in _candidates(p) if c not in paths]
    for p in paths:
        if p.name == "results.json":
            data = _load(p)
            if data is None or "modelsoup_version" not in data:
                continue
            md = p.parent / "results.md"
            e = Entry("results", p, f"Soups and baselines: {p.parent.name}", md.read_text() if md.is_file() else "", _figure_files(p, data))
            for sub in sorted(x for x in p.parent.iterdir() if x.is_dir()):
                man = sub / "soup_manifest.json"
                if man.is_file():
                    consumed.add(man.resolve())
                    inputs, outputs, recipe = _manifest(man)
                    e.inputs += [r for r in inputs if r not in e.inputs]
                    e.outputs.update({f"{sub.name}/{k}": v for k, v in outputs.items()})
                    if recipe:
                        e.recipes.append((sub.name, recipe))
            entries.append(e)
    for p in paths:
        if p.name in ANALYSIS_FILES:
            data = _load(p)
            if data is None or "analysis" not in data:
                continue
            entries.append(Entry("analysis", p, f"{data.get('title', data['analysis'])}: {p.parent.name}", str(data.get("tables", "")),
                                 _figure_files(p, data), data.get("verdict"), list(data.get("inputs", []))))
        elif p.name in OTHER_RESULTS and _load(p) is not None:
            md, png = p.with_suffix(".md"), p.with_suffix(".png")
            entries.append(Entry("other", p, f"{OTHER_RESULTS[p.name]}: {p.parent.name}", md.read_text() if md.is_file() else "",
                                 [png] if png.is_file() else []))
        elif p.name == "soup_manifest.json" and p.resolve() not in consumed:
            inputs, outputs, recipe = _manifest(p)
            entries.append(Entry("merge", p, f"Merged model: {p.parent.name}", "", [], None, inputs, [(p.parent.name, recipe)] if recipe else [], outputs))
    return entries


# -- a small Markdown subset to HTML: headings, pipe tables, lists, paragraphs, **bold**, `code` ------------

def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """HTML of the Markdown the diagnostics and ``cook`` write (images are left out: figures are embedded separately)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s or s.startswith("!["):
            i += 1
        elif s.startswith("#"):
            level = min(6, len(s) - len(s.lstrip("#")) + 2)
            out.append(f"<h{level}>{_inline(s.lstrip('#').strip())}</h{level}>")
            i += 1
        elif s.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            head = _cells(block[0])
            aligns = ["right" if c.endswith(":") else "left" for c in _cells(block[1])] if len(block) > 1 and set(block[1]) <= set("|-: ") else []
            rows = block[2:] if aligns else block[1:]
            aligns = aligns or ["left"] * len(head)
            parts = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>", "<tbody>"]
            for r in rows:
                parts.append("<tr>" + "".join(f'<td style="text-align:{aligns[k] if k < len(aligns) else "left"}">{_inline(c)}</td>' for k, c in enumerate(_cells(r))) + "</tr>")
            out.append("\n".join(parts + ["</tbody></table>"]))
        elif s.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("|", "#", "- ", "![")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


# -- the report -----------------------------------------------------------------------------------

# Written into every report (HTML generator tag, Markdown comment): --overwrite replaces only files that carry it.
REPORT_MARK = "modelsoup report"

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em}pre{background:#f7f7f7;padding:.8em;overflow-x:auto}
img{max-width:100%;height:auto;display:block;margin:.8em 0}.hash{font-family:ui-monospace,monospace;font-size:.75em;word-break:break-all}
.level{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.8em;font-weight:600;color:#fff}
.ok{background:#2e7d32}.caution{background:#ef6c00}.stop{background:#c62828}.verdict{border-left:4px solid #999;padding:.3em 1em;background:#fafafa}
""".strip()


def _png_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise AnalysisError(f"{path}: not a PNG file; re-run the diagnostic that wrote it")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _badge(level: str) -> str:
    return f'<span class="level {html.escape(level)}">{html.escape(level)}</span>'


def _verdict_html(v: dict[str, Any]) -> str:
    items = "".join(f"<li>{_badge(str(r['level']))} {_inline(str(r['message']))}</li>" for r in v.get("reasons", []))
    advice = "".join(f"<li>{_inline(str(a))}</li>" for a in v.get("advice", []))
    return (f'<div class="verdict"><p>{_badge(str(v["level"]))} <strong>{html.escape(str(v["headline"]))}</strong></p>'
            f"<ul>{items}</ul>" + (f"<p>Advice:</p><ul>{advice}</ul>" if advice else "") + "</div>")


def _inputs_rows(e: Entry) -> list[list[str]]:
    rows = []
    for r in e.inputs:
        files = r.get("files") or {"": ""}
        for fname, digest in files.items():
            rows.append([str(r.get("role", "")), str(r.get("label", "")), str(r.get("path", "")), fname, digest or "(not hashed)"])
    return rows


def _overall(entries: Sequence[Entry]) -> Any:
    reasons = [Reason.from_json(r) for e in entries if e.verdict for r in e.verdict.get("reasons", [])]
    return verdict(reasons) if reasons else None


def render_html(entries: Sequence[Entry], title: str) -> str:
    """The report as one HTML document with everything embedded."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>modelsoup {html.escape(__version__)}, {now}; {len(entries)} result(s).</p>"]
    judged = [e for e in entries if e.verdict]
    if judged:
        body.append("<h2>Will it soup?</h2>")
        body.append("<table><thead><tr><th>result</th><th>verdict</th></tr></thead><tbody>" + "".join(
            f"<tr><td>{html.escape(e.title)}</td><td>{_badge(str(e.verdict['level']))} {html.escape(str(e.verdict['headline']))}</td></tr>"
            for e in judged if e.verdict) + "</tbody></table>")
        overall = _overall(judged)
        if overall is not None and len(judged) > 1:
            body.append(f"<p>All findings together: {_badge(overall.level)} <strong>{html.escape(overall.headline)}</strong></p>")
    for e in entries:
        body.append(f"<h2>{html.escape(e.title)}</h2>")
        body.append(f'<p class="hash">{html.escape(str(e.source))}</p>')
        if e.verdict:
            body.append(_verdict_html(e.verdict))
        if e.tables:
            body.append(markdown_to_html(e.tables))
        for f in e.figures:
            body.append(f'<figure><img alt="{html.escape(f.stem)}" src="{_png_uri(f)}"><figcaption>{html.escape(f.name)}</figcaption></figure>')
        for name, recipe in e.recipes:
            body.append(f"<h3>Recipe: {html.escape(name)}</h3><pre>{html.escape(recipe)}</pre>")
        rows = _inputs_rows(e)
        if rows:
            body.append("<h3>Inputs</h3><table><thead><tr><th>role</th><th>label</th><th>path</th><th>file</th><th>sha256</th></tr></thead><tbody>" + "".join(
                "<tr>" + "".join(f'<td class="hash">{html.escape(c)}</td>' if k == 4 else f"<td>{html.escape(c)}</td>" for k, c in enumerate(r)) + "</tr>"
                for r in rows) + "</tbody></table>")
        if e.outputs:
            body.append("<h3>Outputs</h3><table><thead><tr><th>file</th><th>sha256</th></tr></thead><tbody>" + "".join(
                f'<tr><td>{html.escape(k)}</td><td class="hash">{html.escape(v)}</td></tr>' for k, v in e.outputs.items()) + "</tbody></table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + f"<meta name=\"generator\" content=\"{REPORT_MARK}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_markdown(entries: Sequence[Entry], title: str, where: Path) -> str:
    """A Markdown summary: verdicts and tables of every result, figures linked relative to ``where`` (the summary's folder)."""
    out = [f"<!-- {REPORT_MARK} -->", f"# {title}", ""]
    judged = [e for e in entries if e.verdict]
    if judged:
        out += ["| result | verdict |", "|---|---|"] + [f"| {e.title} | {e.verdict['level']}: {e.verdict['headline']} |" for e in judged if e.verdict] + [""]
    for e in entries:
        out += [f"## {e.title}", ""]
        if e.verdict:
            out += [f"**Verdict ({e.verdict['level']}): {e.verdict['headline']}**", ""] + [f"- [{r['level']}] {r['message']}" for r in e.verdict.get("reasons", [])] + [""]
        if e.tables:  # its own image links are relative to its folder: the figures are linked below instead
            out += ["\n".join(x for x in e.tables.rstrip().splitlines() if not x.lstrip().startswith("![")), ""]
        out += [f"![{f.stem}]({Path(os.path.relpath(f.resolve(), where)).as_posix()})" for f in e.figures]
        if e.figures:
            out.append("")
        if e.inputs:
            out += ["Inputs: " + "; ".join(f"{r.get('label', r.get('path'))} ({', '.join(f'{k} sha256 {v[:12]}' for k, v in (r.get('files') or {}).items()) or 'in memory'})"
                                            for r in e.inputs), ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(folders: Sequence[str | Path], output: str | Path, *, title: str = "modelsoup report", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``output`` (HTML) and the Markdown summary beside it (same name, ``.md``).

    Raises:
        AnalysisError: nothing was found, or a folder is missing.
        OutputExistsError: the report exists and ``overwrite`` is false.
    """
    out = Path(output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise AnalysisError(f"{out}: the report is an HTML file; name it like report.html")
    md = out.with_suffix(".md")
    for path in (out, md):
        check_output(path, overwrite, inputs=(), as_file=True)
        if path.is_file() and REPORT_MARK.encode() not in path.read_bytes()[:4096]:
            raise OutputError(f"{path}: exists and is not an earlier modelsoup report (the report writes {out.name} and {md.name}); "
                              "--overwrite replaces only earlier reports. Choose another report name")
    entries = collect(folders)
    if not entries:
        raise AnalysisError(f"found no results under {', '.join(map(str, folders))}; run soup inspect/curve/compare/scale/cook with -o there first")
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(entries, title)
    summary = render_markdown(entries, title, out.parent.resolve())
    for path, text in ((out, page), (md, summary)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return out, md


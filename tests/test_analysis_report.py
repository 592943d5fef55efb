"""The diagnostics from the command line, their output folders, and the report: self-contained HTML that renders
(in headless chromium where the machine has it; always checked with an HTML parser) and a Markdown summary."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from modelsoup.analysis.report import markdown_to_html, write_report
from modelsoup.cli import main
from modelsoup.errors import AnalysisError, SoupError

PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
EVAL_MODULE = '''
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from modelsoup.demo.digits import make_net
from modelsoup.eval import ClassificationEvaluator

def _split(path, name):
    d = load_file(path)
    return ClassificationEvaluator(make_net(), DataLoader(TensorDataset(d["x"], d["y"]), batch_size=256), name=name, progress=False)

heldout = _split({val!r}, "digits-val")
'''


class Page(HTMLParser):
    """Collects tables, images and every external reference of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tables += tag == "table"
        self.scripts += tag == "script"
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            if key in a and not str(a[key]).startswith("data:"):
                self.external.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def results(digits_run, tmp_path_factory) -> Path:
    """Every diagnostic run from the command line on the digits fine-tunes, a cooked table and a merge, in one folder."""
    from modelsoup import merge
    from modelsoup.recipes import cook

    out = tmp_path_factory.mktemp("diagnostics")
    mod = out / "digits_eval.py"
    mod.write_text(EVAL_MODULE.format(val=str(digits_run.folder / "val.safetensors")))
    ev = ["--eval", f"{mod}:heldout", "--heldout", "val", "--no-cache", "--no-progress"]
    ft = [str(p) for p in digits_run.paths[:3]]
    runs = [
        ["inspect", *ft, "--base", str(digits_run.base), "-o", str(out / "inspect"), "--no-progress"],
        ["curve", *ft[:2], "--alphas", "0:1:0.25", "-o", str(out / "curve"), *ev],
        ["curve", *ft, "--steps", "2", "-o", str(out / "triangle"), *ev],
        ["compare", *ft, "-o", str(out / "compare"), *ev],
        ["scale", *ft[:2], "--factors", "0.5,2", "-o", str(out / "scale"), *ev],
    ]
    for argv in runs:
        assert main(["-q", *argv]) == 0, argv
    cook(digits_run.paths[:2], digits_run.evaluator("val"), test=digits_run.evaluator("test"), recipes=["uniform"], output=out / "cooked",
         progress=False)
    merge(models=digits_run.paths[:2], output=out / "merged", progress=False)
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_each_command_writes_json_markdown_and_figures(results, digits_run):
    expect = {"inspect": ["similarity.png", "layers.png"], "curve": ["curve.png"], "triangle": ["triangle.png"],
              "compare": ["ensemble_heldout.png"], "scale": ["scaling.png"]}
    for folder, figures in expect.items():
        name = "curve" if folder == "triangle" else folder
        data = _json(results / folder / f"{name}.json")
        assert data["analysis"] == name and data["figures"] == figures
        for f in figures:
            assert (results / folder / f).read_bytes().startswith(PNG)
        md = (results / folder / f"{name}.md").read_text()
        assert all(f"]({f})" in md for f in figures)
    inspect = _json(results / "inspect" / "inspect.json")
    assert inspect["verdict"]["level"] == "ok"
    base = next(r for r in inspect["inputs"] if r["role"] == "base")
    assert base["files"]["base.safetensors"] == hashlib.sha256(digits_run.base.read_bytes()).hexdigest()
    assert inspect["result"]["total"]["sign_conflicts"][0][1] == pytest.approx(inspect["result"]["total"]["sign_conflicts"][1][0])
    curve = _json(results / "curve" / "curve.json")
    assert [p[1] for p in curve["result"]["points"]] == [0, 0.25, 0.5, 0.75, 1]
    assert curve["verdict"]["reasons"][0]["code"] == "score_barrier"
    assert len(_json(results / "triangle" / "curve.json")["result"]["points"]) == 6


def test_report_is_one_self_contained_html_with_every_figure_and_table(results, digits_run):
    page_path, md_path = write_report([results], results / "report.html")
    html = page_path.read_text()
    page = Page()
    page.feed(html)
    figures = sum(len(_json(p)["figures"]) for p in results.rglob("*.json") if p.name != "results.json" and "analysis" in _json(p))
    cook_figures = len(_json(results / "cooked" / "results.json")["figures"])
    assert len(page.images) == figures + cook_figures and figures == 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    # tables: inspect 3 + its inputs; curve 1 + inputs, triangle 1 + inputs; compare 1 + inputs; scale 3 + inputs;
    # cooked: its results table(s) + inputs + outputs; the merge: inputs + outputs; and the verdict summary
    assert page.tables >= 20
    assert page.external == [] and page.scripts == 0
    text = " ".join(page.text)
    assert "these models should soup well" in text and "Will it soup?" in text
    assert "method: linear" in text                                               # the cooked soup's and the merge's recipe
    assert hashlib.sha256(digits_run.paths[0].read_bytes()).hexdigest() in text    # input hashes
    assert "Merged model: merged" in text and "Soups and baselines: cooked" in text
    summary = md_path.read_text()
    assert "| result | verdict |" in summary
    for link in [line.split("](", 1)[1][:-1] for line in summary.splitlines() if line.startswith("![")]:
        assert (page_path.parent / link).read_bytes().startswith(PNG)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium on this machine (the HTML parser check still runs)")
def test_report_renders_in_headless_chromium(results, tmp_path):
    page_path, _ = write_report([results], tmp_path / "report.html")
    # a copy with a probe that lists, after loading, each image's decoded width and the number of tables
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", "<script>window.onload = () => { document.title = 'PROBE ' + "
                                                   "[...document.images].map(i => i.naturalWidth).join(',') + ' TABLES ' + "
                                                   "document.querySelectorAll('table').length; };</script></body>"))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title.startswith("PROBE "), title
    widths, tables = title[len("PROBE "):].split(" TABLES ")
    parsed = Page()
    parsed.feed(page_path.read_text())
    assert [int(w) > 0 for w in widths.split(",")] == [True] * len(parsed.images)  # every embedded PNG decoded
    assert int(tables) == parsed.tables


def test_markdown_to_html_tables_lists_and_escaping():
    out = markdown_to_html("# Title\n\n| a | <b> |\n|---|---:|\n| x | **1** |\n\n- one `two`\n- three\n\nsome <script> text\n![f](f.png)")
    assert "<h3>Title</h3>" in out
    assert "<th>&lt;b&gt;</th>" in out and '<td style="text-align:right"><strong>1</strong></td>' in out
    assert "<li>one <code>two</code></li>" in out and "&lt;script&gt;" in out and "f.png" not in out


def test_report_refuses_nothing_and_wrong_names(tmp_path):
    with pytest.raises(AnalysisError, match="found no results"):
        write_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(AnalysisError, match="name it like report.html"):
        write_report([tmp_path], tmp_path / "r.pdf")
    with pytest.raises(AnalysisError, match="no such file or folder"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")


def test_commands_without_matplotlib_say_how_to_install_it_or_write_tables_only(digits_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ft = [str(p) for p in digits_run.paths[:2]]
    with pytest.raises(SoupError, match=r"pip install 'modelsoup\[plot\]'"):
        from modelsoup.analysis.plots import require_matplotlib

        require_matplotlib()
    assert main(["-q", "inspect", *ft, "-o", str(tmp_path / "a")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: figures need matplotlib: pip install 'modelsoup[plot]'\n"
    assert captured.out == "" and not (tmp_path / "a").exists()
    assert main(["-q", "inspect", *ft, "-o", str(tmp_path / "b"), "--no-plots"]) == 0
    assert _json(tmp_path / "b" / "inspect.json")["figures"] == []


def test_existing_output_is_refused_before_any_work(digits_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["-q", "inspect", *map(str, digits_run.paths[:2]), "-o", str(tmp_path / "taken")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {tmp_path / 'taken'}: already exists; choose another output or pass --overwrite (overwrite: true)\n"
    assert captured.out == "" and list((tmp_path / "taken").iterdir()) == []


def test_report_takes_in_other_commands_results(results, tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "templates.json").write_text(json.dumps({"reference": "uniform soup", "correlations": {"ft-0": [0.9]}}))
    (folder / "templates.md").write_text("| model | mean correlation |\n|---|---:|\n| ft-0 | 0.9 |\n")
    (folder / "templates.png").write_bytes((results / "curve" / "curve.png").read_bytes())
    page_path, _ = write_report([folder], tmp_path / "r.html")
    page = Page()
    page.feed(page_path.read_text())
    assert page.tables == 1 and len(page.images) == 1 and "Weight templates: templates" in " ".join(page.text)

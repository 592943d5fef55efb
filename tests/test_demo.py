"""`soup demo --quick`: real data (scikit-learn digits), real training, merges through the public API."""

from __future__ import annotations

from modelsoup.cli import main
from modelsoup.demo import run_demo


def test_quick_demo_trains_merges_and_reports(tmp_path, capsys):
    rows = run_demo(tmp_path, quick=True, seed=1)
    names = [r[0] for r in rows]
    assert names[:4] == ["pre-trained start", "ft-0", "ft-1", "ft-2"]
    assert names[4:] == ["uniform soup (linear)", "task_arithmetic", "ties", "dare_ties", "model_stock"]
    for name, val, test in rows[1:]:
        assert 0.5 < val <= 1.0 and 0.5 < test <= 1.0, name  # chance is 0.1; a broken merge lands near it
    for method in ("linear", "task_arithmetic", "ties", "dare_ties", "model_stock"):
        assert (tmp_path / "soups" / f"{method}.safetensors").is_file()
    out = capsys.readouterr().out
    assert "| uniform soup (linear)" in out and "(best on val)" in out


def test_demo_command_line(tmp_path):
    assert main(["-q", "demo", "--digits", "--quick", "--out", str(tmp_path / "d")]) == 0

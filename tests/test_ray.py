"""Evaluation on a Ray cluster (``--ray local``, two workers) gives exactly what a serial run gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelsoup.analysis.curves import line_curve, triangle_curve
from modelsoup.analysis.ensembling import soup_vs_ensemble
from modelsoup.errors import OptionError
from modelsoup.eval import EvalCache
from modelsoup.recipes import Pantry, cook, greedy_soup
from modelsoup.recipes.executor import shard_ranges

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from modelsoup.recipes.executor import RayExecutor

    ex = RayExecutor("local", workers=2)
    yield ex
    ex.close()


def _pantry(paths, executor=None) -> Pantry:
    return Pantry(paths, cache=EvalCache(enabled=False), executor=executor)


def test_shards_are_contiguous_whole_batches_none_empty():
    assert shard_ranges(5, 2) == [(0, 3), (3, 5)]
    assert shard_ranges(1, 4) == [(0, 1)]
    assert shard_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]


def test_one_evaluation_split_into_shards_gives_the_serial_logits(digits_run, cluster):
    val = digits_run.evaluator("val")
    serial, on_ray = _pantry(digits_run.paths), _pantry(digits_run.paths, cluster)
    rec = serial.recipe([0, 1, 2])
    s1, p1 = serial.evaluate(rec, val, "soup")
    s2, p2 = on_ray.evaluate(on_ray.recipe([0, 1, 2]), val, "soup")
    assert torch.equal(p1.logits, p2.logits) and torch.equal(p1.labels, p2.labels)
    assert (s1.value, s1.metrics["loss"]) == (s2.value, s2.metrics["loss"])


def _rows(result):
    return [(r.name, r.members, r.heldout.value if r.heldout else None, r.heldout.metrics.get("loss") if r.heldout else None,
             r.test.value if r.test else None) for r in result.rows]


def test_cook_on_ray_gives_the_serial_table(digits_run, cluster, tmp_path):
    val, test = digits_run.evaluator("val"), digits_run.evaluator("test")
    kw = dict(recipes=["uniform", "greedy", "learned", "ensemble"], learned_options={"epochs": 2}, progress=False)
    with _pantry(digits_run.paths) as p:
        serial = cook(p, val, test=test, **kw)
    with _pantry(digits_run.paths, cluster) as p:
        on_ray = cook(p, val, test=test, **kw)
    assert _rows(on_ray) == _rows(serial)
    for a, b in zip(serial.rows, on_ray.rows):
        if a.heldout_predictions is not None:
            assert torch.equal(a.heldout_predictions.logits, b.heldout_predictions.logits), a.name


def test_curves_and_compare_on_ray_equal_serial(digits_run, cluster):
    val = digits_run.evaluator("val")
    paths = digits_run.paths[:3]
    for run in (lambda p: line_curve(p, None, val, alphas=[0.25, 0.5], progress=False),
                lambda p: triangle_curve(p, val, steps=2, progress=False)):
        with _pantry(paths[:2] if run.__code__.co_names[0] == "line_curve" else paths) as p:
            serial = run(p)
        with _pantry(paths[:2] if run.__code__.co_names[0] == "line_curve" else paths, cluster) as p:
            on_ray = run(p)
        assert serial.points == on_ray.points
        assert [(s.value, s.metrics["loss"]) for s in serial.scores] == [(s.value, s.metrics["loss"]) for s in on_ray.scores]
    with _pantry(paths) as p:
        serial = soup_vs_ensemble(p, val, progress=False)
    with _pantry(paths, cluster) as p:
        on_ray = soup_vs_ensemble(p, val, progress=False)
    assert serial.rows == on_ray.rows


def test_greedy_on_ray_equals_greedy_with_the_running_sum(digits_run, cluster):
    val = digits_run.evaluator("val")
    serial = greedy_soup(_pantry(digits_run.paths), val, allow_equal=True, progress=False)
    on_ray = greedy_soup(_pantry(digits_run.paths, cluster), val, allow_equal=True, progress=False)
    assert on_ray.members == serial.members and [h.score for h in on_ray.history] == [h.score for h in serial.history]


def test_in_memory_models_are_refused_on_a_cluster(digits_run, cluster):
    from safetensors.torch import load_file

    p = _pantry([load_file(digits_run.paths[0]), load_file(digits_run.paths[1])], cluster)
    with pytest.raises(OptionError, match="in-memory models cannot be evaluated on other workers"):
        p.score(0, digits_run.evaluator("val"))


def test_a_second_executor_on_a_full_cluster_is_refused_and_leaves_the_first_working(digits_run, cluster, monkeypatch):
    from modelsoup.recipes import executor

    monkeypatch.setattr(executor, "WORKER_START_TIMEOUT", 10.0)
    with pytest.raises(OptionError, match="not enough for"):
        executor.RayExecutor("local", workers=1)  # the module's two workers hold both CPUs
    assert ray.is_initialized()
    p = _pantry(digits_run.paths[:2], cluster)
    assert p.score(0, digits_run.evaluator("val")).value > 0.5


def test_cli_cook_with_ray_local_prints_the_serial_table(digits_run, cluster, tmp_path, capsys):
    """Last in this file: it stops the module's cluster, so that the command line starts its own local one."""
    from modelsoup.cli import main

    cluster.close()
    args = ["cook", *map(str, digits_run.paths), "--eval", f"{Path(__file__).parent / 'digits_scoring.py'}:accuracy",
            "--heldout", str(digits_run.folder / "val.safetensors"), "--soups", "uniform,greedy", "--no-cache", "--no-progress", "--save", "none"]
    assert main(args + ["-o", str(tmp_path / "serial")]) == 0
    serial = capsys.readouterr().out
    assert main(args + ["-o", str(tmp_path / "ray"), "--ray", "local"]) == 0
    on_ray = capsys.readouterr().out
    assert not ray.is_initialized()  # the command's own cluster is stopped when it ends
    assert _strip_seconds(serial) == _strip_seconds(on_ray)


def _strip_seconds(text: str) -> list[list[str]]:
    rows = [line.split("|") for line in text.splitlines() if line.startswith("|")]
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    keep = [k for k, c in enumerate(header) if "time" not in c.lower() and "second" not in c.lower() and c != "s"]
    return [[r[k].strip() for k in keep if k < len(r)] for r in rows]

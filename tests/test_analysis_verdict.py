"""Will it soup? The verdict on constructed cases: two fine-tunes of one digits base (they soup) vs two digits
nets trained from different random starts (they do not), and each rule at its thresholds."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelsoup.analysis import barrier_reasons, ensemble_reasons, line_curve, similarity, similarity_reasons, soup_vs_ensemble, verdict
from modelsoup.analysis.curves import Barrier, Curve
from modelsoup.analysis.verdict import THRESHOLDS, Reason, _barrier_reason
from modelsoup.demo.digits import Hyper, make_net, train
from modelsoup.eval import EvalCache, Score

NO_CACHE = {"cache": EvalCache(enabled=False)}


@contextmanager
def one_thread():
    """Train tiny networks on one thread: several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Independent:
    """Two digits MLPs trained from different random starts (and the first one's start, as a would-be base)."""

    def __init__(self, folder: Path, data) -> None:
        self.paths = []
        with one_thread():
            for s in (1, 2):
                torch.manual_seed(100 + s)
                net = make_net()
                if s == 1:
                    self.init = folder / "init-1.safetensors"
                    save_file({k: v.clone() for k, v in net.state_dict().items()}, self.init)
                train(net, data["train"], Hyper(3e-3, 6, s))
                self.paths.append(folder / f"scratch-{s}.safetensors")
                save_file(net.state_dict(), self.paths[-1])


@pytest.fixture(scope="module")
def independent(digits_run, tmp_path_factory) -> Independent:
    return Independent(tmp_path_factory.mktemp("independent"), digits_run.data)


def test_fine_tunes_of_one_base_soup(digits_run):
    ft = digits_run.paths[:2]
    sim = similarity(ft, base=digits_run.base, progress=False)
    t = sim.total
    assert t.cosine()[0, 1] > 0.95 and t.task_cosine()[0, 1] > 0.8 and t.sign_conflict_all() < 0.2
    v = verdict(similarity_reasons(sim))
    assert v.level == "ok" and v.headline == "these models should soup well"
    curve = line_curve(*ft, digits_run.evaluator("val"), alphas=[0.25, 0.5, 0.75], progress=False, **NO_CACHE)
    b = curve.barriers()["score"]
    assert b.relative < THRESHOLDS["score_barrier"][0]  # measured +0.001 accuracy: linearly connected
    assert verdict(barrier_reasons(curve)).level == "ok"


def test_nets_from_different_random_starts_do_not_soup(digits_run, independent):
    sim = similarity(independent.paths, progress=False)
    assert abs(float(sim.total.cosine()[0, 1])) < 0.1  # measured 0.018
    assert sim.total.relative_distance()[0, 1] > 1.3  # unrelated vectors of equal norm: sqrt(2)
    v = verdict(similarity_reasons(sim))
    assert v.level == "stop" and "models do not share a base" in v.headline
    assert "averaging will likely fail" in v.reasons[0].message
    # with the first net's start as the base: the second is no fine-tune of it, task vectors are unrelated
    with_base = similarity(independent.paths, base=independent.init, progress=False)
    t = with_base.total
    assert abs(float(t.task_cosine()[0, 1])) < 0.15 and t.sign_conflict_all() > 0.45  # measured -0.055 and 0.52
    codes = {r.code: r.level for r in similarity_reasons(with_base)}
    assert codes["cosine_to_base"] == "stop" and codes["sign_conflicts"] == "caution" and codes["task_cosine"] == "caution"
    curve = line_curve(*independent.paths, digits_run.evaluator("val"), alphas=[0.25, 0.5, 0.75], progress=False, **NO_CACHE)
    b = curve.barriers()
    assert b["score"].relative > THRESHOLDS["score_barrier"][1] and b["score"].at == (0.5, 0.5)  # measured +0.21 accuracy (23%)
    assert b["loss"].relative > THRESHOLDS["loss_barrier"][1]
    cv = verdict(barrier_reasons(curve))
    assert cv.level == "stop" and "different basins" in cv.reasons[0].message


def test_the_soup_falls_short_of_the_ensemble_only_for_unrelated_models(digits_run, independent):
    ev = digits_run.evaluator("val")
    good = soup_vs_ensemble(digits_run.paths[:3], ev, progress=False, **NO_CACHE)
    assert ensemble_reasons(good)[0].level == "ok"
    bad = soup_vs_ensemble([digits_run.paths[0], *independent.paths], ev, progress=False, **NO_CACHE)
    r = ensemble_reasons(bad)[0]
    assert r.level == "stop" and r.value > THRESHOLDS["ensemble_gap"][1]


def _barrier(value: float, relative: float) -> Barrier:
    return Barrier(value, (0.5, 0.5), relative)


@pytest.mark.parametrize(("relative", "level"), [(0.02, "ok"), (0.021, "caution"), (0.10, "caution"), (0.101, "stop")])
def test_score_barrier_thresholds(relative, level):
    r = _barrier_reason(_barrier(relative, relative), "score_barrier", "accuracy", "between a and b")
    assert r.level == level


def test_no_barrier_is_ok_and_says_so():
    r = _barrier_reason(_barrier(-0.01, -0.01), "score_barrier", "accuracy", "between a and b")
    assert r.level == "ok" and r.message.startswith("no accuracy barrier between a and b")


def test_weight_cosine_thresholds_and_the_worst_pair_is_named():
    # three models: a and b nearly parallel, c at 60 degrees from a (cosine 0.5): caution, naming a and c
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01]), torch.tensor([0.5, 0.8660254])
    sim = similarity([{"w": a}, {"w": b}, {"w": c}], labels=["a", "b", "c"], progress=False)
    r = next(x for x in similarity_reasons(sim) if x.code == "weight_cosine")
    assert r.level == "caution" and "a and c have weight cosine 0.500" in r.message


def test_verdict_combines_levels_and_advises():
    ok = Reason("ok", "weight_cosine", "close")
    conflicts = Reason("caution", "sign_conflicts", "many conflicts: ...")
    v = verdict([ok, conflicts])
    assert v.level == "caution" and any("TIES" in a for a in v.advice) and any("soup curve" in a for a in v.advice)
    stop = Reason("stop", "score_barrier", "long message: details", short="accuracy barrier +0.2")
    v = verdict([ok, stop])
    assert v.level == "stop" and v.headline == "do not soup these models (accuracy barrier +0.2)"
    assert verdict([]).headline == "nothing measured"
    assert Reason.from_json(stop.to_json()) == stop


def test_a_triangle_verdict_names_the_three(digits_run):
    scores = [Score(v, "accuracy", {"accuracy": v}) for v in (0.9, 0.9, 0.9, 0.5, 0.9, 0.9)]
    points = [(1, 0, 0), (0.5, 0.5, 0), (0, 1, 0), (0.5, 0, 0.5), (0, 0.5, 0.5), (0, 0, 1)]
    curve = Curve(["a", "b", "c"], points, scores, None, 0.0)
    (r,) = barrier_reasons(curve)
    assert r.level == "stop" and "across the triangle of a, b, c" in r.message and "at weights 0.5, 0, 0.5" in r.message

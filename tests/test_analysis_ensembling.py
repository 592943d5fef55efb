"""Weight vs logit averaging, and weight-magnitude stability: against direct computation and identities."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelsoup import merge_state_dicts
from modelsoup.analysis.ensembling import soup_vs_ensemble
from modelsoup.analysis.predictions import agreement
from modelsoup.analysis.scaling import ScaledState, magnitude_stability
from modelsoup.errors import AnalysisError
from modelsoup.eval import ClassificationEvaluator, EvalCache, FunctionEvaluator, Predictions

NO_CACHE = {"cache": EvalCache(enabled=False)}


def test_soup_vs_ensemble_against_direct_computation(digits_run):
    ev = digits_run.evaluator("val")
    paths = digits_run.paths[:3]
    cmp = soup_vs_ensemble(paths, ev, progress=False, **NO_CACHE)
    assert [r["k"] for r in cmp.rows] == [1, 2, 3] and cmp.labels == ["ft-0", "ft-1", "ft-2"]
    first = cmp.rows[0]
    assert first["agreement"] == 1.0 and first["soup"] == first["ensemble"]  # one ingredient: both are the model
    states = [load_file(p) for p in paths]
    x, y = digits_run.data["val"]
    from modelsoup.demo.digits import make_net

    net = make_net()
    with torch.no_grad():
        logits = []
        for sd in states:
            net.load_state_dict(sd)
            logits.append(net(x))
        net.load_state_dict(merge_state_dicts(states))
        soup_logits = net(x)
    ens = torch.stack(logits).mean(0)
    last = cmp.rows[-1]
    assert last["soup"]["accuracy"] == pytest.approx(float((soup_logits.argmax(1) == y).double().mean()))
    assert last["ensemble"]["accuracy"] == pytest.approx(float((ens.argmax(1) == y).double().mean()))
    assert last["ensemble"]["loss"] == pytest.approx(float(nn.functional.cross_entropy(ens.double(), y)), rel=1e-5)
    assert last["agreement"] == pytest.approx(float((soup_logits.argmax(1) == ens.argmax(1)).double().mean()))
    p = torch.softmax(soup_logits.double(), 1)
    assert last["soup"]["confidence"] == pytest.approx(float(p.max(1).values.mean()), rel=1e-5)
    assert last["soup"]["entropy"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)


def test_best_first_order_follows_the_held_out_scores(digits_run):
    ev = digits_run.evaluator("val")
    cmp = soup_vs_ensemble(digits_run.paths, ev, order="best", progress=False, **NO_CACHE)
    singles = {lab: ev.evaluate(load_file(p)).value for lab, p in zip(["ft-0", "ft-1", "ft-2", "ft-3", "ft-4"], digits_run.paths)}
    assert [singles[lab] for lab in cmp.labels] == sorted(singles.values(), reverse=True)
    assert cmp.rows[0]["soup"]["accuracy"] == max(singles.values()) and cmp.order == "best"
    with pytest.raises(AnalysisError, match="choose one of input, best"):
        soup_vs_ensemble(digits_run.paths, ev, order="worst", **NO_CACHE)
    with pytest.raises(AnalysisError, match="distinct ingredient indices"):
        soup_vs_ensemble(digits_run.paths, ev, order=[0, 0], **NO_CACHE)


def test_comparisons_need_predictions():
    ev = FunctionEvaluator(lambda sd: 1.0, "constant")
    models = [{"w": torch.ones(1)}, {"w": torch.zeros(1)}]
    with pytest.raises(AnalysisError, match="soup-vs-ensemble comparison needs per-example predictions"):
        soup_vs_ensemble(models, ev, **NO_CACHE)
    with pytest.raises(AnalysisError, match="weight-scaling diagnostic"):
        magnitude_stability(models, ev, **NO_CACHE)


def test_agreement_by_hand():
    labels = torch.tensor([0, 1, 2, 0])
    a = Predictions(torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]), labels)
    b = Predictions(torch.tensor([[2.0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 3, 0]]), labels)
    assert agreement(a, b) == 0.5


def test_scaled_state_scales_what_its_scope_says_and_reads_lazily():
    reads = []

    class Recording(dict):
        def __getitem__(self, k):
            reads.append(k)
            return dict.__getitem__(self, k)

    state = Recording(w=torch.ones(2, 3, dtype=torch.bfloat16), b=torch.ones(3), step=torch.tensor(7))
    m = ScaledState(state, 2.0)
    assert reads == []
    assert torch.equal(m["w"], torch.full((2, 3), 2.0, dtype=torch.bfloat16)) and m["w"].dtype == torch.bfloat16
    assert torch.equal(m["b"], torch.ones(3)) and torch.equal(m["step"], torch.tensor(7))
    a = ScaledState(state, 0.5, "all")
    assert torch.equal(a["b"], torch.full((3,), 0.5)) and torch.equal(a["step"], torch.tensor(7))
    assert list(a) == ["w", "b", "step"] and len(a) == 3
    with pytest.raises(AnalysisError, match="choose one of matrices, all"):
        ScaledState(state, 2.0, "biases")


def test_bias_free_relu_net_keeps_its_predictions_at_every_scale(digits_run):
    # f(c W1, c W2) = c^2 f(W1, W2) for a bias-free ReLU net: the classes never change, confidence grows with c
    def net():
        return nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False))

    models = []
    for s in (1, 2):
        torch.manual_seed(s)
        models.append({k: v.clone() for k, v in net().state_dict().items()})
    ev = ClassificationEvaluator(net(), DataLoader(TensorDataset(*digits_run.data["val"]), batch_size=200), name="bias-free", progress=False)
    res = magnitude_stability(models, ev, factors=[0.5, 2.0, 4.0], progress=False, **NO_CACHE)
    assert res.factors == [0.5, 1.0, 2.0, 4.0]
    assert [m["kind"] for m in res.models] == ["ingredient", "ingredient", "soup"]
    for m in res.models:
        assert [r["agreement"] for r in m["rows"]] == [1.0, 1.0, 1.0, 1.0]
        assert len({r["accuracy"] for r in m["rows"]}) == 1
        conf = [r["confidence"] for r in m["rows"]]
        assert conf == sorted(conf) and conf[0] < conf[-1]


def test_scaling_real_ingredients_and_their_soup(digits_run):
    ev = digits_run.evaluator("val")
    res = magnitude_stability(digits_run.paths[:3], ev, factors=[0.5, 2.0], progress=False, **NO_CACHE)
    soup = res.models[-1]
    assert soup["kind"] == "soup" and soup["label"] == "uniform soup of 3"
    # |mean of w_i| <= mean of |w_i| (triangle inequality): averaging never grows the weight matrices
    assert soup["norm"] <= sum(m["norm"] for m in res.models[:3]) / 3
    one = next(r for r in soup["rows"] if r["factor"] == 1.0)
    assert one["agreement"] == 1.0
    direct = ev.evaluate(merge_state_dicts([load_file(p) for p in digits_run.paths[:3]]))
    assert one["accuracy"] == pytest.approx(direct.value)
    half = ev.evaluate(ScaledState(load_file(digits_run.paths[0]), 0.5))
    assert res.models[0]["rows"][0]["accuracy"] == pytest.approx(half.value)
    assert "agreement with the unscaled predictions" in res.to_markdown()
    with pytest.raises(AnalysisError, match="must be positive"):
        magnitude_stability(digits_run.paths[:2], ev, factors=[0.0, 1.0], **NO_CACHE)

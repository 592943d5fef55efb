"""Multi-domain evaluation and merges (digits 0-4 vs 5-9), and class weight templates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelsoup.analysis.templates import class_templates, template_correlations, vocabulary_templates
from modelsoup.cli import main
from modelsoup.errors import EvaluatorError
from modelsoup.eval import ClassificationEvaluator, FunctionEvaluator
from modelsoup.eval.domains import ModuleDomains, MultiDomainEvaluator, PredictingDomains, domain_scores, multi_domain

from .test_cli_recipes import SCORER


def _toy(seed, n=20):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=8)


def test_mean_of_domains_with_weights_and_per_domain_metrics():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    a = ClassificationEvaluator(nn.Linear(4, 3), _toy(1), name="a", progress=False)
    b = ClassificationEvaluator(nn.Linear(4, 3), _toy(2, 12), name="b", progress=False)
    md = multi_domain({"a": a, "b": b}, weights={"a": 3, "b": 1})
    assert isinstance(md, ModuleDomains) and b.module is a.module
    s = md.evaluate(net.state_dict())
    sa, sb = a.evaluate(net.state_dict()), b.evaluate(net.state_dict())
    assert s.value == pytest.approx(0.75 * sa.value + 0.25 * sb.value)
    assert domain_scores(s) == {"a": sa.value, "b": sb.value}
    assert s.metrics["domain/b/loss"] == sb.metrics["loss"] and s.metrics["loss"] == pytest.approx(0.75 * sa.metrics["loss"] + 0.25 * sb.metrics["loss"])
    preds = md.predict(net.state_dict())
    assert preds.labels.numel() == 32 and md.score(preds).value == s.value
    # the learned soup's loss: the weighted mean of the domains' mean losses
    total, count = 0.0, 0
    for batch in md.batches():
        t, n = md.batch_loss(net, batch)
        total, count = total + float(t.detach()), count + n
    assert total / count == pytest.approx(0.75 * sa.metrics["loss"] + 0.25 * sb.metrics["loss"], rel=1e-5)
    f = multi_domain({"a": FunctionEvaluator(lambda sd: 1.0, "f"), "b": FunctionEvaluator(lambda sd: 0.0, "f")})
    assert type(f) is MultiDomainEvaluator and f.evaluate({}).value == 0.5
    assert not isinstance(f, PredictingDomains)
    with pytest.raises(EvaluatorError, match="unknown domain"):
        multi_domain({"a": a}, weights={"z": 1})
    with pytest.raises(EvaluatorError, match="measure different things"):
        multi_domain({"a": a, "f": FunctionEvaluator(lambda sd: 0.0, "f")})


@pytest.fixture(scope="module")
def domains_run(tmp_path_factory):
    from modelsoup.demo.digits import run_domains_demo

    out = tmp_path_factory.mktemp("domains")
    result, corr = run_domains_demo(out, progress=False)
    return out, result, corr


def test_digits_domains_table_soups_and_templates(domains_run):
    out, res, corr = domains_run
    rows = {r.name: r for r in res.rows}
    ing = [r for r in res.rows if r.kind == "ingredient"]
    for r in ing:  # each ingredient only knows its own digits
        per = domain_scores(r.heldout)
        own = "digits 0-4" if r.name.startswith("0-4") else "digits 5-9"
        other = ({"digits 0-4", "digits 5-9"} - {own}).pop()
        assert per[own] > 0.9 and per[other] < 0.1, r.name
    uniform = domain_scores(rows["uniform soup"].heldout)
    assert min(uniform.values()) > 0.8  # the soup serves both domains
    assert rows["greedy soup"].heldout.value >= max(r.heldout.value for r in ing)
    assert rows["learned soup"].heldout.value >= rows["uniform soup"].heldout.value
    md = (out / "soups" / "results.md").read_text()
    assert "### Per-domain accuracy" in md and "| digits 0-4 (held-out) |" in md
    assert (out / "templates.png").read_bytes()[:4] == b"\x89PNG"
    # soup templates correlate with every ingredient's, and look like digits: close to the class means
    assert all(sum(v) / len(v) > 0.9 for k, v in corr.items() if k != "class means")
    assert sum(corr["class means"]) / 10 > 0.7
    assert json.loads((out / "templates.json").read_text())["reference"] == "uniform soup"


def test_templates_of_a_linear_stack_and_correlations_by_hand():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(5, 4, generator=g), torch.randn(3, 5, generator=g)
    sd = {"a.weight": w1, "a.bias": torch.zeros(5), "b.weight": w2}
    torch.testing.assert_close(class_templates(sd), (w2 @ w1).double())
    torch.testing.assert_close(class_templates(sd, weight="a.weight"), w1.double())
    t = {"x": torch.tensor([[1.0, 2.0, 3.0]]), "y": torch.tensor([[3.0, 2.0, 1.0]]), "z": torch.tensor([[2.0, 4.0, 6.5]])}
    c = template_correlations(t, "x")
    assert c["y"] == pytest.approx([-1.0]) and c["x"] == pytest.approx([1.0]) and 0.99 < c["z"][0] < 1.0


def test_vocabulary_templates_on_minilm(minilm_classifier):
    sd = load_file(minilm_classifier / "model.safetensors")
    t = vocabulary_templates(sd)
    assert t.shape == (2, sd["bert.embeddings.word_embeddings.weight"].shape[0])
    want = sd["classifier.weight"].double() @ sd["bert.pooler.dense.weight"].double() @ sd["bert.embeddings.word_embeddings.weight"].double()[123]
    torch.testing.assert_close(t[:, 123], want)


def test_cli_domains_and_templates(digits_run, tmp_path, capsys):
    x, y = digits_run.data["val"]
    for name, keep in (("low", y < 5), ("high", y >= 5)):
        save_file({"x": x[keep].contiguous(), "y": y[keep].contiguous()}, tmp_path / f"{name}.safetensors")
    out = tmp_path / "cooked"
    assert main(["-q", "cook", *map(str, digits_run.paths[:3]), "--eval", SCORER, "--heldout", f"low={tmp_path / 'low.safetensors'}",
                 "--heldout", f"high={tmp_path / 'high.safetensors'}", "--domain-weights", "low=1,high=3", "--soups", "uniform,greedy",
                 "-o", str(out), "--no-cache", "--no-progress"]) == 0
    assert "### Per-domain accuracy" in capsys.readouterr().out
    row = json.loads((out / "results.json").read_text())["rows"][0]["heldout"]
    m = row["metrics"]
    assert row["value"] == pytest.approx(0.25 * m["domain/low"] + 0.75 * m["domain/high"])
    assert main(["-q", "cook", *map(str, digits_run.paths[:2]), "--eval", SCORER, "--heldout", str(tmp_path / "low.safetensors"),
                 "--heldout", str(tmp_path / "high.safetensors"), "-o", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --heldout: with several data files, name each domain as NAME=FILE (got {str(tmp_path / 'low.safetensors')!r})\n"
    assert captured.out == "" and not (tmp_path / "x").exists()
    assert main(["-q", "templates", *map(str, digits_run.paths[:2]), "--soup", str(out / "uniform"), "-o", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "templates.png").is_file() and "mean r with" in capsys.readouterr().out

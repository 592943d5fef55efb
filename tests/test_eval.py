"""Evaluators: scores against direct computation, weights loading, caching, batch norm, real MiniLM."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelsoup.errors import EvaluatorError, KeyMismatchError, TensorMismatchError
from modelsoup.eval import ClassificationEvaluator, EvalCache, FunctionEvaluator, Score, function_evaluator, load_weights, recalibrate_bn
from modelsoup.eval.factory import make_evaluators
from modelsoup.recipes import Pantry

from .conftest import REVIEWS, TinyNet
from .tolerances import FP32_VS_LIBRARY, MODEL_OUTPUT


def _loader(n=37, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle), x, y


def test_classification_accuracy_and_loss_match_direct_computation():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    loader, x, y = _loader()
    ev = ClassificationEvaluator(net, loader, name="toy", progress=False)
    s = ev.evaluate(net.state_dict())
    with torch.no_grad():
        logits = net(x)
    assert s.metric == "accuracy" and s.value == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert s.metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert s.metrics["examples"] == 37 and s.metrics["examples_per_s"] > 0
    preds = ev.predict(net.state_dict())
    torch.testing.assert_close(preds.logits, logits, **FP32_VS_LIBRARY)


def test_shuffling_loader_is_refused():
    loader, _, _ = _loader(shuffle=True)
    with pytest.raises(EvaluatorError, match="shuffle=False"):
        ClassificationEvaluator(nn.Linear(4, 3), loader)


def test_load_weights_names_missing_unexpected_and_shape_problems():
    net = TinyNet()
    sd = {k: v.clone() for k, v in TinyNet().state_dict().items()}
    load_weights(net, sd)
    assert torch.equal(net.fc.weight, sd["fc.weight"])
    bad = dict(sd)
    bad.pop("fc.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"missing 1 \(fc.bias\); unexpected 1 \(extra.weight\)"):
        load_weights(net, bad)
    load_weights(net, {**sd, "extra.weight": torch.zeros(1)}, ignore_unexpected=["extra.*"])
    with pytest.raises(TensorMismatchError, match=r"'fc.weight' has shape \[2, 2\].*expects \[5, 6\]"):
        load_weights(net, {**sd, "fc.weight": torch.zeros(2, 2)})


def test_load_weights_reads_a_tied_tensor_once_and_needs_only_one_name():
    net = TinyNet(tied=True)
    reads = []

    class Counting(dict):
        def __getitem__(self, k):
            reads.append(k)
            return super().__getitem__(k)

    sd = {k: v.clone() for k, v in TinyNet(tied=True).state_dict().items()}
    sd.pop("head.weight")  # tied to embed.weight: a checkpoint may store one name
    load_weights(net, Counting(sd))
    assert reads.count("embed.weight") == 1 and torch.equal(net.head.weight, sd["embed.weight"])


def test_recalibrate_bn_agrees_with_torch_swa_utils():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    b.load_state_dict(a.state_dict())
    loader, _, _ = _loader(n=50)
    assert recalibrate_bn(a, loader) == 1
    torch.optim.swa_utils.update_bn(loader, b)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], **FP32_VS_LIBRARY)
    assert recalibrate_bn(nn.Linear(2, 2), loader) == 0


def test_evaluator_with_bn_loader_scores_recalibrated_weights(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    loader, _, _ = _loader(n=50)
    ClassificationEvaluator(net, loader, name="bn", progress=False)
    assert "batch-norm" in caplog.text and "bn_loader=" in caplog.text
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.running_mean"] += 100.0  # averaged statistics that are badly off
    plain = ClassificationEvaluator(net, loader, name="bn", progress=False).evaluate(sd)
    fixed = ClassificationEvaluator(net, loader, name="bn", bn_loader=loader, progress=False).evaluate(sd)
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    ref.load_state_dict(sd)
    torch.optim.swa_utils.update_bn(loader, ref)
    want = ClassificationEvaluator(ref, loader, name="bn", progress=False).evaluate(ref.state_dict())
    assert fixed.metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-5) and plain.metrics["loss"] != fixed.metrics["loss"]


# -- the user's own function ---------------------------------------------------------------------

def test_function_evaluator_return_forms_and_bad_returns():
    sd = {"w": torch.tensor([2.0])}
    assert FunctionEvaluator(lambda s: float(s["w"]), "f").evaluate(sd).value == 2.0
    s = FunctionEvaluator(lambda s: {"score": 0.5, "metric": "f1", "loss": 1.5}, "f").evaluate(sd)
    assert (s.value, s.metric, s.metrics["loss"], s.metrics["f1"]) == (0.5, "f1", 1.5, 0.5)
    assert FunctionEvaluator(lambda s: Score(0.25, "auc"), "f").evaluate(sd).metric == "auc"
    assert FunctionEvaluator(lambda s, data: len(data), "f", data="abc").evaluate(sd).value == 3.0
    with pytest.raises(EvaluatorError, match="must return a finite number"):
        FunctionEvaluator(lambda s: "good", "mine").evaluate(sd)
    with pytest.raises(EvaluatorError, match="without a 'score' key"):
        FunctionEvaluator(lambda s: {"acc": 1}, "mine").evaluate(sd)
    with pytest.raises(EvaluatorError, match="must return a finite number"):
        FunctionEvaluator(lambda s: float("nan"), "mine").evaluate(sd)


def test_function_evaluator_from_a_file_and_a_module(tmp_path, monkeypatch):
    f = tmp_path / "my_eval.py"
    f.write_text("def score(state, data):\n    return {'score': float(state['w'].sum()), 'data': len(data)}\n")
    ev = function_evaluator(f"{f}:score", data="xyz")
    assert ev.evaluate({"w": torch.ones(3)}).metrics["data"] == 3.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert function_evaluator("my_eval:score", data="ab").evaluate({"w": torch.ones(2)}).value == 2.0
    with pytest.raises(EvaluatorError, match="cannot import module 'nope_mod'"):
        function_evaluator("nope_mod:f")
    with pytest.raises(EvaluatorError, match="has no attribute 'missing'"):
        function_evaluator(f"{f}:missing")
    with pytest.raises(EvaluatorError, match="unknown evaluator 'accuracy'"):
        make_evaluators("accuracy", heldout="x")
    with pytest.raises(EvaluatorError, match="--model FOLDER"):
        make_evaluators("text-classification", heldout="x")


def test_editing_the_scoring_function_invalidates_cached_scores(tmp_path):
    f = tmp_path / "ev.py"
    f.write_text("def score(state):\n    return 1.0\n")
    a = function_evaluator(f"{f}:score").identity()
    f.write_text("def score(state):\n    return 2.0  # changed\n")
    os.utime(f, ns=(1, 2))
    assert function_evaluator(f"{f}:score").identity() != a


def test_scores_are_cached_by_file_hash_and_evaluator(tmp_path):
    from safetensors.torch import save_file

    calls = []

    def score(state):
        calls.append(1)
        return float(state["w"].sum())

    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.full((3,), float(i))}, p)
        paths.append(p)
    cache = EvalCache(tmp_path / "cache")
    ev = FunctionEvaluator(score, "sum")
    with Pantry(paths, cache=cache) as p:
        assert [p.score(i, ev).value for i in range(2)] == [0.0, 3.0]
    assert len(calls) == 2
    with Pantry(paths, cache=cache) as p:
        assert [p.score(i, ev).value for i in range(2)] == [0.0, 3.0]
    assert len(calls) == 2  # nothing re-evaluated
    save_file({"w": torch.full((3,), 5.0)}, paths[1])  # a changed file is scored again
    with Pantry(paths, cache=cache) as p:
        assert p.score(1, ev).value == 15.0
    assert len(calls) == 3
    for entry in cache.root.glob("*.json"):
        entry.write_text("{broken")
    with Pantry(paths, cache=cache) as p:  # a damaged entry is a miss, not a crash
        assert [p.score(i, ev).value for i in range(2)] == [0.0, 15.0]
    assert len(calls) == 5


# -- Hugging Face, on the real MiniLM -------------------------------------------------------------

def test_text_classification_matches_one_by_one_forward_on_minilm(minilm_classifier, reviews_csv):
    transformers = pytest.importorskip("transformers")
    from modelsoup.eval.text import TextClassificationEvaluator

    ev = TextClassificationEvaluator(minilm_classifier, reviews_csv, batch_size=3, progress=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_classifier, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_classifier, local_files_only=True)
    from safetensors.torch import load_file

    preds = ev.predict(load_file(minilm_classifier / "model.safetensors"))
    with torch.no_grad():
        want = torch.cat([model(**tok(t, return_tensors="pt")).logits for t, _ in REVIEWS])
    torch.testing.assert_close(preds.logits, want, **MODEL_OUTPUT)
    assert preds.labels.tolist() == [1 if lab == "fresh" else 0 for _, lab in REVIEWS]
    s = ev.score(preds)
    assert s.value == pytest.approx(float((want.argmax(1) == preds.labels).float().mean()))
    same = ev.with_data(reviews_csv, batch_size=64)
    assert same.module is ev.module
    torch.testing.assert_close(same.predict(load_file(minilm_classifier / "model.safetensors")).logits, want, **MODEL_OUTPUT)


def test_text_classification_data_errors(minilm_classifier, tmp_path):
    from modelsoup.eval.text import TextClassificationEvaluator

    (tmp_path / "a.csv").write_text("sentence,label\nhello,fresh\n")
    with pytest.raises(EvaluatorError, match=r"no column 'text' \(columns: sentence, label\)"):
        TextClassificationEvaluator(minilm_classifier, tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "hi", "label": "meh"}\n')
    with pytest.raises(EvaluatorError, match=r"label 'meh' is not one of the model's labels \(rotten=0, fresh=1\)"):
        TextClassificationEvaluator(minilm_classifier, tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "hi", "label": 1}\n{"text": "ho", "label": "Rotten"}\n')
    assert TextClassificationEvaluator(minilm_classifier, tmp_path / "c.jsonl")._labels == [1, 0]


def test_perplexity_of_a_small_causal_lm_matches_direct_computation(minilm_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    from modelsoup.eval.lm import PerplexityEvaluator

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = " ".join(t for t, _ in REVIEWS) * 3
    (tmp_path / "t.txt").write_text(text)
    ev = PerplexityEvaluator(folder, tmp_path / "t.txt", max_length=16, batch_size=2, progress=False)
    s = ev.evaluate(model.state_dict())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 16):
            block = torch.tensor([ids[i : i + 16]])
            if block.shape[1] < 2:
                continue
            logits = model(block).logits[0, :-1]
            total += float(nn.functional.cross_entropy(logits, block[0, 1:], reduction="sum"))
            n += block.shape[1] - 1
    assert s.metric == "neg_perplexity" and s.metrics["tokens"] == n
    assert s.metrics["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(total / n))), rel=1e-5)
    assert s.value == -s.metrics["perplexity"]


def test_an_evaluator_class_receives_the_data_path(tmp_path):
    f = tmp_path / "cls_eval.py"
    f.write_text(
        "from modelsoup.eval import Evaluator, Score\n"
        "class Split(Evaluator):\n"
        "    def __init__(self, data):\n        self.data = data\n"
        "    def identity(self):\n        return self.data\n"
        "    def evaluate(self, state, *, label=None):\n        return Score(float(len(self.data)), 'len')\n")
    assert function_evaluator(f"{f}:Split", data="abcd").evaluate({}).value == 4.0

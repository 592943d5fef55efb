"""Soups that look at data: greedy, learned, ensembles, interpolation, top-k, and the cooked table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge, merge_state_dicts
from modelsoup.errors import EvaluatorError, InsufficientMemoryError
from modelsoup.eval import EvalCache, FunctionEvaluator, Score
from modelsoup.recipes import Pantry, cook, ensemble_predictions, greedy_ensemble, greedy_soup, interpolate, learned_soup, topk_average
from modelsoup.recipes import metrics_from_log, metrics_from_names
from modelsoup.recipes.greedy import greedy_select

from .tolerances import FP32_VS_LIBRARY


def scripted(values: dict[tuple[int, ...], float], scores: list[float]):
    """A `try_with` that looks the score of a member list up in a table (members sorted as added)."""
    calls = []

    def try_with(members):
        calls.append(tuple(members))
        return Score(values[tuple(members)], "acc")

    return [Score(s, "acc") for s in scores], try_with, calls


# -- the greedy rule, by hand ---------------------------------------------------------------------

def test_greedy_orders_best_first_and_keeps_strict_improvements():
    # ingredient scores 0.5, 0.9, 0.7, 0.6 -> order 1, 2, 3, 0
    scores, try_with, calls = scripted({(1, 2): 0.92, (1, 2, 3): 0.91, (1, 2, 0): 0.95}, [0.5, 0.9, 0.7, 0.6])
    members, final, history = greedy_select(["a", "b", "c", "d"], scores, try_with, progress=False)
    assert calls == [(1, 2), (1, 2, 3), (1, 2, 0)]
    assert members == [1, 2, 0] and final.value == 0.95
    assert [(h.ingredient, h.kept, h.size) for h in history] == [("b", True, 1), ("c", True, 2), ("d", False, 2), ("a", True, 3)]


def test_greedy_strict_rejects_a_tie_and_allow_equal_keeps_it():
    table = {(0, 1): 0.8, (0, 2): 0.8, (0, 1, 2): 0.8}
    scores, try_with, _ = scripted(table, [0.8, 0.7, 0.6])
    assert greedy_select(list("abc"), scores, try_with, progress=False)[0] == [0]
    scores, try_with, _ = scripted(table, [0.8, 0.7, 0.6])
    assert greedy_select(list("abc"), scores, try_with, allow_equal=True, progress=False)[0] == [0, 1, 2]


def test_greedy_ties_in_ingredient_score_keep_input_order():
    scores, try_with, calls = scripted({(1, 2): 0.1, (1, 0): 0.1, (1, 3): 0.1}, [0.5, 0.7, 0.5, 0.5])
    greedy_select(list("abcd"), scores, try_with, progress=False)
    assert calls == [(1, 0), (1, 2), (1, 3)]  # 0, 2, 3 tie at 0.5: input order


def test_greedy_first_ingredient_that_nothing_improves_is_the_soup():
    scores, try_with, _ = scripted({(2, 0): 0.5, (2, 1): 0.4}, [0.6, 0.5, 0.9])
    members, final, history = greedy_select(list("abc"), scores, try_with, progress=False)
    assert members == [2] and final.value == 0.9 and [h.kept for h in history] == [True, False, False]


# -- greedy soup over real merges -----------------------------------------------------------------

def _scalar_models(values):
    return [{"w": torch.tensor([v], dtype=torch.float32), "step": torch.tensor(7)} for v in values]


def test_greedy_soup_on_a_closed_form_evaluator():
    # score = -|w - 1|; ingredients w = 0, 3, 1.5, -1 -> own scores -1, -2, -0.5, -2
    # order: 1.5 (-0.5), 0 (-1), 3 (-2), -1 (-2, later in input order)
    # + 0  -> 0.75: -0.25 kept; + 3 -> 1.5: -0.5 rejected; + -1 -> 0.1667: -0.833 rejected
    ev = FunctionEvaluator(lambda sd: -abs(float(sd["w"]) - 1.0), "closed-form")
    res = greedy_soup(_scalar_models([0.0, 3.0, 1.5, -1.0]), ev, progress=False, cache=EvalCache(enabled=False))
    assert res.labels == ["model[2]", "model[0]"]
    assert res.score.value == pytest.approx(-0.25)
    assert [h.kept for h in res.history] == [True, True, False, False]
    assert [h.score for h in res.history] == pytest.approx([-0.5, -0.25, -0.5, -(1 - 0.5 / 3)])


def test_greedy_score_is_the_score_of_the_written_soup(digits_run, tmp_path):
    val = digits_run.evaluator("val")
    res = greedy_soup(digits_run.paths, val, allow_equal=True, progress=False, cache=EvalCache(tmp_path / "c"))
    best_ingredient = max(val.evaluate(load_file(p)).value for p in digits_run.paths)
    assert res.score.value >= best_ingredient
    merge(res.recipe, tmp_path / "soup", progress=False)
    written = load_file(tmp_path / "soup" / "model.safetensors")
    again = val.evaluate(written)
    assert again.value == res.score.value and again.metrics["loss"] == res.score.metrics["loss"]
    want = merge_state_dicts([load_file(digits_run.paths[digits_run.paths.index(Path(p.path))]) for p in res.recipe.models])
    assert all(torch.equal(written[k], want[k]) for k in want)


def test_in_memory_modules_soup_like_files(digits_run):
    from modelsoup.demo.digits import make_net

    nets = []
    for p in digits_run.paths:
        net = make_net()
        net.load_state_dict(load_file(p))
        nets.append(net)
    val = digits_run.evaluator("val")
    a = greedy_soup(nets, val, progress=False, cache=EvalCache(enabled=False))
    b = greedy_soup(digits_run.paths, val, progress=False, cache=EvalCache(enabled=False))
    assert [m.replace("model[", "ft-").rstrip("]") for m in a.labels] == b.labels
    assert (a.score.value, a.score.metrics["loss"]) == (b.score.value, b.score.metrics["loss"])


# -- learned soup --------------------------------------------------------------------------------

def _corrupted(path: Path, out: Path, scale: float, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(path).items()}
    save_file(sd, out)
    return out


@pytest.mark.parametrize("by", ["model", "tensor"])
def test_learned_soup_concentrates_on_the_clearly_best_and_never_ends_below_uniform(digits_run, tmp_path, by):
    good = digits_run.paths[3]
    bad = [_corrupted(digits_run.base, tmp_path / f"bad{i}.safetensors", 0.15, i) for i in range(2)]
    val = digits_run.evaluator("val")
    res = learned_soup([bad[0], good, bad[1]], val, by=by, epochs=4, lr=0.1, start="uniform", progress=False, cache=EvalCache(enabled=False))
    assert res.start == "uniform" and res.score.value >= res.start_score.value
    assert res.epoch > 0
    if by == "model":
        assert res.weights[1] > 0.5 and res.weights[1] == max(res.weights)
    else:
        mean_good = sum(w[1] for w in res.weights.values()) / len(res.weights)
        assert mean_good > 0.45
    # the reported score is that of the recipe's weights, as merge would write them
    again = val.evaluate(merge_state_dicts([load_file(p) for p in (bad[0], good, bad[1])],
                                           weights=res.weights if by == "model" else None,
                                           overrides=[{"match": o.match, "weights": list(o.weights)} for o in res.recipe.overrides] or None))
    assert again.value == res.score.value


def test_learned_soup_refuses_what_will_not_fit_and_function_evaluators(digits_run):
    val = digits_run.evaluator("val")
    with pytest.raises(InsufficientMemoryError, match=r"about .* GB.*greedy soup"):
        learned_soup(digits_run.paths, val, max_memory=1000, progress=False, cache=EvalCache(enabled=False))
    with pytest.raises(EvaluatorError, match="greedy soup"):
        learned_soup(digits_run.paths, FunctionEvaluator(lambda sd: 0.0, "f"), progress=False, cache=EvalCache(enabled=False))


# -- ensembles, interpolation, top-k -------------------------------------------------------------

def test_logit_ensemble_is_the_mean_of_logits(digits_run):
    from modelsoup.demo.digits import make_net

    val = digits_run.evaluator("val")
    with Pantry(digits_run.paths[:3], cache=EvalCache(enabled=False)) as pantry:
        got = ensemble_predictions(pantry, val, [0, 1, 2])
    x, y = digits_run.data["val"]
    want = torch.zeros(len(y), 10)
    for p in digits_run.paths[:3]:
        net = make_net()
        net.load_state_dict(load_file(p))
        with torch.no_grad():
            want += net(x) / 3
    torch.testing.assert_close(got.logits, want, **FP32_VS_LIBRARY)
    assert torch.equal(got.labels, y)
    ge = greedy_ensemble(digits_run.paths, val, progress=False, cache=EvalCache(enabled=False))
    assert ge.score.value >= max(h.ingredient_score for h in ge.history)


def test_interpolation_endpoints_are_the_models_and_the_best_alpha_is_chosen(digits_run):
    ev = FunctionEvaluator(lambda sd: -abs(float(sd["w"]) - 2.2), "closed-form")
    res = interpolate(*_scalar_models([1.0, 3.0]), ev, alphas=[0, 0.25, 0.5, 0.75, 1.0], progress=False, cache=EvalCache(enabled=False))
    assert [s.value for s in res.scores] == pytest.approx([-1.2, -0.7, -0.2, -0.3, -0.8])
    assert res.best_alpha == 0.5 and res.recipe.models[1].weight == 0.5
    val = digits_run.evaluator("val")
    res = interpolate(digits_run.base, digits_run.paths[0], val, alphas=[0.0, 1.0], progress=False, cache=EvalCache(enabled=False))
    for s, p in zip(res.scores, (digits_run.base, digits_run.paths[0])):
        direct = val.evaluate(load_file(p))
        assert (s.value, s.metrics["loss"]) == (direct.value, direct.metrics["loss"])


def test_topk_from_a_timm_log_lightning_log_and_file_names(tmp_path):
    sds = _scalar_models([1.0, 2.0, 4.0, 8.0])
    paths = []
    for e, sd in enumerate(sds):
        p = tmp_path / f"checkpoint-{e}.safetensors"
        save_file(sd, p)
        paths.append(p)
    (tmp_path / "summary.csv").write_text("epoch,train_loss,eval_top1\n0,1.0,70.0\n1,0.9,75.5\n2,0.8,75.0\n3,0.7,71.0\n")
    assert metrics_from_log(paths, tmp_path / "summary.csv", "eval_top1") == [70.0, 75.5, 75.0, 71.0]
    res = topk_average(paths, 2, metrics=metrics_from_log(paths, tmp_path / "summary.csv", "eval_top1"), metric_name="eval_top1",
                       cache=EvalCache(enabled=False))
    assert res.labels == ["checkpoint-1", "checkpoint-2"]
    assert float(merge_state_dicts([load_file(m.path) for m in res.recipe.models])["w"]) == 3.0
    # Lightning writes validation metrics on their own rows, with blanks elsewhere; and val_loss ranks ascending
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,val_loss\n0,10,1.0,\n0,10,,0.5\n1,20,0.9,\n1,20,,0.4\n2,30,,0.6\n3,40,,0.45\n")
    res = topk_average(paths, 2, metrics=metrics_from_log(paths, tmp_path / "metrics.csv", "val_loss"), lower_is_better=True, cache=EvalCache(enabled=False))
    assert res.labels == ["checkpoint-1", "checkpoint-3"]
    named = [tmp_path / "epoch=3-val_acc=0.91.ckpt", tmp_path / "epoch=4-val_acc=0.935.ckpt"]
    assert metrics_from_names(named, "val_acc") == [0.91, 0.935]
    with pytest.raises(EvaluatorError, match="epoch 7 has no 'eval_top1'"):
        metrics_from_log([tmp_path / "checkpoint-7.pt"], tmp_path / "summary.csv", "eval_top1")


def _four_checkpoints(tmp_path):
    paths = []
    for e, sd in enumerate(_scalar_models([1.0, 2.0, 4.0, 8.0])):
        save_file(sd, tmp_path / f"checkpoint-{e}.safetensors")
        paths.append(tmp_path / f"checkpoint-{e}.safetensors")
    return paths


def test_topk_infers_the_direction_from_the_metric_name(tmp_path):
    paths = _four_checkpoints(tmp_path)
    values = [0.9, 0.3, 0.5, 0.4]
    loss = topk_average(paths, 2, metrics=values, metric_name="eval_loss", cache=EvalCache(enabled=False))
    assert loss.labels == ["checkpoint-1", "checkpoint-3"] and loss.lower_is_better and loss.direction_inferred
    assert [v for _, v in loss.ranking] == [0.3, 0.4, 0.5, 0.9]
    assert "lower is better (inferred from the name 'eval_loss'; pass --higher-is-better if that is wrong)" in loss.to_markdown()
    assert loss.to_json()["lower_is_better"] is True and loss.to_json()["direction_source"] == "inferred"
    top1 = topk_average(paths, 2, metrics=values, metric_name="eval_top1", cache=EvalCache(enabled=False))
    assert top1.labels == ["checkpoint-0", "checkpoint-2"] and not top1.lower_is_better and top1.direction_inferred
    assert "higher is better (inferred from the name 'eval_top1'; pass --lower-is-better" in top1.to_markdown()
    # an explicit direction overrides the name, and is reported as given
    forced = topk_average(paths, 2, metrics=values, metric_name="eval_loss", lower_is_better=False, cache=EvalCache(enabled=False))
    assert forced.labels == ["checkpoint-0", "checkpoint-2"] and not forced.direction_inferred
    assert "higher is better (as given)" in forced.to_markdown() and forced.to_json()["direction_source"] == "given"
    assert topk_average(paths, 1, metrics=values, metric_name="eval_top1", lower_is_better=True, cache=EvalCache(enabled=False)).labels == ["checkpoint-1"]


def test_topk_refuses_a_metric_whose_direction_it_cannot_tell(tmp_path):
    from modelsoup.errors import OptionError

    paths = _four_checkpoints(tmp_path)
    with pytest.raises(OptionError, match=r"cannot tell whether a lower or a higher 'foo' is better; pass lower_is_better=True/False "
                                          r"\(CLI: --lower-is-better / --higher-is-better\)"):
        topk_average(paths, 2, metrics=[1, 2, 3, 4], metric_name="foo", cache=EvalCache(enabled=False))
    with pytest.raises(OptionError, match="name the metric with metric_name="):  # the default name says nothing either
        topk_average(paths, 2, metrics=[1, 2, 3, 4], cache=EvalCache(enabled=False))
    assert topk_average(paths, 1, metrics=[1, 2, 3, 4], metric_name="foo", lower_is_better=True, cache=EvalCache(enabled=False)).labels == ["checkpoint-0"]


@pytest.mark.parametrize("name, lower", [
    ("eval_loss", True), ("val/loss", True), ("train_loss", True), ("valLoss", True), ("top1_err", True), ("top1error", True),
    ("perplexity", True), ("eval_ppl", True), ("wer", True), ("test/cer", True), ("error", True), ("mae", True), ("val_mse", True),
    ("rmse", True), ("mean_squared_error", True), ("acc_loss", True),
    ("eval_top1", False), ("eval_top5", False), ("val_acc", False), ("acc1", False), ("eval_accuracy", False), ("f1", False),
    ("eval_f1", False), ("f1_score", False), ("auc", False), ("map", False), ("metrics/mAP50-95(B)", False), ("bleu", False),
    ("rouge1", False), ("rougeL", False), ("precision", False), ("recall", False), ("score", False), ("eval_matthews_correlation", False),
    ("foo", None), ("epoch", None), ("lr", None), ("eval_runtime", None), ("metric", None), ("neg_log_loss", None), ("answer", None),
    ("power", None), ("bitmap", None),
])
def test_metric_direction_by_name(name, lower):
    from modelsoup.recipes.topk import metric_direction

    assert metric_direction(name) is lower


# -- cook: the whole table -----------------------------------------------------------------------

def test_cook_on_digits_table_is_consistent_and_soups_are_written(digits_run, tmp_path):
    val, test = digits_run.evaluator("val"), digits_run.evaluator("test")
    test.share_module(val)
    cache = EvalCache(tmp_path / "cache")
    out = tmp_path / "cooked"
    res = cook(digits_run.paths, val, test=test, output=out, learned_options={"epochs": 2}, cache=cache, progress=False)
    names = [r.name for r in res.rows]
    assert names[:5] == [f"ft-{i}" for i in range(5)]
    assert names[5].startswith("best individual: ")
    assert names[6:] == ["uniform soup", "greedy soup", "learned soup", "logit ensemble", "probability ensemble", "majority vote",
                         "greedy ensemble", "stacking"]
    best = max(res.rows[:5], key=lambda r: r.heldout.value)
    assert res.row("greedy soup").heldout.value >= best.heldout.value
    assert res.row("learned soup").heldout.value >= res.row("uniform soup").heldout.value
    assert res.row("logit ensemble").cost == 5 and res.row("greedy soup").cost == 1 and res.row("stacking").cost == 5
    assert all(r.test is not None for r in res.rows)
    for soup in ("uniform", "greedy", "learned"):
        written = load_file(out / soup / "model.safetensors")
        row = res.row(f"{soup} soup")
        assert test.evaluate(written).value == row.test.value, soup
        assert val.evaluate(written).value == row.heldout.value, soup
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == names and data["greedy_history"][0]["kept"] is True
    md = (out / "results.md").read_text()
    assert "| greedy soup | soup |" in md and "candidates best first" in md and "### Calibration on test data" in md
    for png in ("heldout_vs_test.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    for r in res.rows:  # temperature fitted on held-out predictions, applied to test: NLL cannot get much worse
        assert r.temperature is not None and r.calibrated["nll"] <= r.test.metrics["nll"] + 0.05, r.name
    assert data["rows"][0]["test_after_temperature"]["ece"] == res.rows[0].calibrated["ece"]
    # a rerun scores no ingredient again
    misses = cache.misses
    hits = cache.hits
    cook(digits_run.paths, val, test=test, recipes=["uniform"], cache=cache, progress=False)
    assert cache.misses == misses and cache.hits == hits + 10


def test_probability_averaging_and_majority_vote_by_hand():
    from modelsoup.eval import Predictions
    from modelsoup.recipes.ensemble import combine_predictions

    labels = torch.tensor([0, 1])
    a = Predictions(torch.log(torch.tensor([[0.9, 0.1], [0.4, 0.6]])), labels)
    b = Predictions(torch.log(torch.tensor([[0.3, 0.7], [0.2, 0.8]])), labels)
    c = Predictions(torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]])), labels)
    probs = combine_predictions([a, b], "probs").logits.exp()
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.4], [0.3, 0.7]]), **FP32_VS_LIBRARY)
    vote = combine_predictions([a, b, c], "vote").logits.exp()
    torch.testing.assert_close(vote, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), **FP32_VS_LIBRARY)
    # a 1-1 tie goes to the class with the higher mean probability: row 0 of a, b -> class 0 (0.6 vs 0.4)
    tie = combine_predictions([a, b], "vote").logits
    assert tie.argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(tie.exp()[0], torch.tensor([0.5, 0.5]), rtol=0, atol=1e-6)


def test_stacking_never_scores_an_example_with_a_model_fitted_on_it():
    from modelsoup.eval import Predictions
    from modelsoup.recipes.stacking import features, fit_logistic, out_of_fold, stack

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (60,), generator=g)
    members = [Predictions(torch.randn(60, 3, generator=g) + 2 * torch.nn.functional.one_hot(labels, 3), labels) for _ in range(3)]
    res = stack(members, members, folds=2)
    x = features(members)
    for f in (0, 1):  # fold f is predicted by a fit on the other fold only
        held = res.fold == f
        w, b = fit_logistic(x[~held], labels[~held], 3)
        torch.testing.assert_close(res.heldout.logits[held], (x[held] @ w.T + b).float(), rtol=1e-4, atol=1e-4)
    # relabelling fold 0 (split kept) leaves fold 0's predictions unchanged: they never saw those labels
    zero = res.fold == 0
    flipped = labels.clone()
    flipped[zero] = (flipped[zero] + 1) % 3
    again = out_of_fold(x, flipped, res.fold, 3).float()
    torch.testing.assert_close(again[zero], res.heldout.logits[zero])
    assert not torch.allclose(again[~zero], res.heldout.logits[~zero])


def _mostly_right(labels: torch.Tensor, members: int, classes: int, seed: int = 0):
    from modelsoup.eval import Predictions

    g = torch.Generator().manual_seed(seed)
    hot = torch.nn.functional.one_hot(labels, classes).float()
    return [Predictions(2.0 * hot + torch.randn(len(labels), classes, generator=g), labels) for _ in range(members)]


def _accuracy(preds) -> float:
    return float((preds.logits.argmax(1) == preds.labels).float().mean())


def test_stacking_on_alternating_labels_scores_like_its_members():
    # labels 0, 1, 0, 1, ...: an interleaved split (example i in fold i mod 2) puts one class in each fold,
    # so each fold is predicted by a meta-classifier that never saw its class
    from modelsoup.eval.calibration import fit_temperature
    from modelsoup.recipes.stacking import features, out_of_fold, stack

    labels = torch.arange(400) % 2
    members = _mostly_right(labels, 3, 2)
    accs = [_accuracy(m) for m in members]
    assert min(accs) > 0.85  # members are mostly right
    interleaved = out_of_fold(features(members), labels, torch.arange(400) % 2, 2)
    assert float((interleaved.argmax(1) == labels).float().mean()) < 0.1  # the old split's failure, pinned
    res = stack(members, folds=2)
    assert _accuracy(res.heldout) >= sum(accs) / len(accs) - 0.02
    assert 0.3 < fit_temperature(res.heldout.logits, labels).value < 3.0  # out-of-fold logits are sane, not inverted


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_stacking_folds_are_stratified_and_balanced(folds):
    from modelsoup.recipes.stacking import stratified_folds

    counts = {0: 17, 1: 5, 2: 2, 4: 11}  # class 2 has fewer examples than some fold counts; class 3 absent
    labels = torch.cat([torch.full((k,), c) for c, k in counts.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    fold = stratified_folds(labels, folds)
    assert set(fold.tolist()) == set(range(folds))
    for c, k in counts.items():
        per_fold = torch.bincount(fold[labels == c], minlength=folds)
        assert per_fold.sum() == k and all(abs(int(v) - k / folds) < 1 for v in per_fold), (c, per_fold.tolist())
    sizes = torch.bincount(fold, minlength=folds)
    assert int(sizes.max() - sizes.min()) <= 1


def test_stacking_folds_are_deterministic_per_seed():
    from modelsoup.recipes.stacking import stack, stratified_folds

    labels = torch.arange(90) % 3
    members = _mostly_right(labels, 2, 3, seed=3)
    a, b = stack(members, folds=3, seed=7), stack(members, folds=3, seed=7)
    assert torch.equal(a.fold, b.fold) and torch.equal(a.heldout.logits, b.heldout.logits) and torch.equal(a.weights, b.weights)
    assert torch.equal(stack(members, folds=3).fold, stratified_folds(labels, 3, seed=0))  # seed 0 by default
    assert not torch.equal(stratified_folds(labels, 3, seed=0), stratified_folds(labels, 3, seed=1))
    # whatever the seed, a class of 30 is dealt 10 to each of 3 folds
    assert torch.equal(torch.bincount(stratified_folds(labels, 3, seed=1)[labels == 0], minlength=3), torch.tensor([10, 10, 10]))


def test_stacking_a_class_rarer_than_the_folds_is_allowed_and_logged(caplog):
    from modelsoup.recipes.stacking import stack

    labels = torch.tensor([0] * 20 + [1] * 20 + [2])  # one example of class 2, three folds
    members = _mostly_right(labels, 2, 3)
    with caplog.at_level("WARNING", logger="modelsoup.recipes.stacking"):
        res = stack(members, folds=3)
    assert "class(es) 2 (1) have fewer held-out examples than folds" in caplog.text
    assert torch.isfinite(res.heldout.logits).all()
    # its fold's meta-classifier never saw class 2, so it cannot predict it: the pessimism the docstring promises
    assert int(res.heldout.logits[-1].argmax()) != 2


def test_cook_notes_what_a_function_evaluator_cannot_do(digits_run):
    from modelsoup.demo.digits import make_net

    x, y = digits_run.data["val"]

    def acc(sd):
        net = make_net()
        net.load_state_dict(sd)
        with torch.no_grad():
            return float((net(x).argmax(1) == y).float().mean())

    res = cook(digits_run.paths[:3], FunctionEvaluator(acc, "acc"), cache=EvalCache(enabled=False), progress=False, learned_options={"epochs": 1})
    assert res.row("learned soup").note.startswith("skipped:") and res.row("learned soup").heldout is None
    assert "skipped" in res.row("logit ensemble").note
    assert res.row("greedy soup").heldout.value >= max(r.heldout.value for r in res.rows[:3])


def test_baselines_are_scored_but_never_souped(digits_run):
    val = digits_run.evaluator("val")
    res = cook(digits_run.paths, val, recipes=["uniform", "greedy"], baselines={"pre-trained start": digits_run.base},
               cache=EvalCache(enabled=False), progress=False)
    assert res.rows[0].name == "pre-trained start" and res.rows[0].kind == "baseline"
    assert res.rows[0].heldout.value == val.evaluate(load_file(digits_run.base)).value
    best = max((r for r in res.rows if r.kind == "ingredient"), key=lambda r: r.heldout.value)
    assert res.row("best individual").heldout is best.heldout and res.row("best individual").members == [best.name]
    assert "pre-trained start" not in res.row("greedy soup").members + res.row("uniform soup").members

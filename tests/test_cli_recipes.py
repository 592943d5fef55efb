"""The data-driven commands: cook, greedy, learn, ensemble, interpolate, topk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup.cli import main

SCORER = str(Path(__file__).with_name("digits_scoring.py")) + ":accuracy"


def _eval_args(run, tmp_path):
    return ["--eval", SCORER, "--heldout", str(run.folder / "val.safetensors"), "--test", str(run.folder / "test.safetensors"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]


def test_cook_with_a_scoring_function_writes_table_and_soups(digits_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "cook", *map(str, digits_run.paths), "-o", str(out), *_eval_args(digits_run, tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| greedy soup | soup |" in text and "| uniform soup | soup |" in text
    assert "skipped" in text  # a scoring function gives no gradient (learned) and no predictions (ensembles)
    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["greedy soup"]["heldout"]["value"] >= max(rows[f"ft-{i}"]["heldout"]["value"] for i in range(5))
    assert set(data["written"]) == {"uniform", "greedy"}
    assert (out / "greedy" / "model.safetensors").is_file() and (out / "greedy" / "recipe.yaml").is_file()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["-q", "cook", *map(str, digits_run.paths), "-o", str(out), *_eval_args(digits_run, tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {out}: already exists; choose another output or pass --overwrite (overwrite: true)\n"
    assert captured.out == ""
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier results are untouched


def test_greedy_learn_and_ensemble_on_real_minilm_folders(minilm_classifier, reviews_csv, tmp_path, capsys):
    # a second ingredient: the same model with a different head
    other = tmp_path / "other"
    other.mkdir()
    for f in minilm_classifier.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    sd = load_file(other / "model.safetensors")
    sd["classifier.weight"] = -sd["classifier.weight"]
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    common = ["--heldout", str(reviews_csv), "--test", str(reviews_csv), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(["-q", "greedy", str(minilm_classifier), str(other), "-o", str(tmp_path / "g"), *common]) == 0
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "g" / "greedy", local_files_only=True)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    assert (tmp_path / "g" / "greedy" / "tokenizer.json").is_file()
    assert main(["-q", "learn", str(minilm_classifier), str(other), "-o", str(tmp_path / "l"), "--epochs", "1", *common]) == 0
    assert "learned soup" in capsys.readouterr().out
    assert main(["-q", "ensemble", str(minilm_classifier), str(other), "-o", str(tmp_path / "e"), *common]) == 0
    text = capsys.readouterr().out
    assert "| logit ensemble | ensemble |" in text and "ECE after T" in text
    assert all("test_after_temperature" in r for r in json.loads((tmp_path / "e" / "results.json").read_text())["rows"])
    assert main(["-q", "ensemble", str(minilm_classifier), str(other), "-o", str(tmp_path / "e2"), "--no-temperature-scaling", *common]) == 0
    text = capsys.readouterr().out
    assert "| logit ensemble | ensemble |" in text and "ECE after T" not in text and "ECE (equal-mass)" in text
    assert not any("test_after_temperature" in r for r in json.loads((tmp_path / "e2" / "results.json").read_text())["rows"])


def test_interpolate_writes_the_best_point(digits_run, tmp_path, capsys):
    out = tmp_path / "wise"
    assert main(["-q", "interpolate", str(digits_run.base), str(digits_run.paths[0]), "-o", str(out), "--alphas", "0:1:0.5",
                 *_eval_args(digits_run, tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| 0.5" in text and "(chosen)" in text
    data = json.loads((out / "results.json").read_text())
    best = data["best_alpha"]
    assert data["heldout"][data["alphas"].index(best)]["value"] == max(s["value"] for s in data["heldout"])
    got = load_file(out / "interpolated" / "model.safetensors")
    a, b = load_file(digits_run.base), load_file(digits_run.paths[0])
    torch.testing.assert_close(got["0.weight"], (1 - best) * a["0.weight"] + best * b["0.weight"])


def test_topk_from_a_training_log(tmp_path, capsys):
    paths = []
    for e in range(4):
        p = tmp_path / f"checkpoint-{e}.safetensors"
        save_file({"w": torch.tensor([float(e)])}, p)
        paths.append(str(p))
    (tmp_path / "summary.csv").write_text("epoch,eval_top1\n0,1\n1,4\n2,3\n3,2\n")
    out = tmp_path / "avg"
    assert main(["-q", "topk", *paths, "-k", "2", "--log", str(tmp_path / "summary.csv"), "--metric", "eval_top1", "-o", str(out), "--no-progress"]) == 0
    assert float(load_file(out / "topk" / "model.safetensors")["w"]) == 1.5
    capsys.readouterr()
    assert main(["-q", "topk", *paths, "-k", "2", "-o", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: rank the checkpoints by exactly one of: --log FILE --metric COLUMN, --from-names KEY, "
                            "or an evaluator (--heldout FILE)\n")
    assert captured.out == ""
    assert not (tmp_path / "x").exists()


def test_greedy_on_causal_lms_by_perplexity(minilm_path, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        f = tmp_path / f"lm{seed}"
        transformers.GPT2LMHeadModel(cfg).save_pretrained(f)
        tok.save_pretrained(f)
        folders.append(str(f))
    (tmp_path / "val.txt").write_text("a witty and moving film. a dull and tedious sequel. " * 4)
    assert main(["-q", "greedy", *folders, "--eval", "perplexity", "--heldout", str(tmp_path / "val.txt"), "--max-length", "16",
                 "-o", str(tmp_path / "out"), "--no-cache", "--no-progress"]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert data["metric"] == "neg_perplexity"
    assert rows["greedy soup"]["heldout"]["metrics"]["perplexity"] <= min(rows[f"lm{s}"]["heldout"]["metrics"]["perplexity"] for s in (0, 1))
    assert (tmp_path / "out" / "greedy" / "config.json").is_file()

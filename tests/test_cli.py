"""The `soup` command: flag and recipe forms, validate, methods, and errors with exit code 2 and no output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup.cli import main

from .conftest import make_state
from .tolerances import FP32_VS_LIBRARY


@pytest.fixture
def ckpts(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / f"ft{i}.safetensors"
        save_file(make_state(i + 1), p)
        paths.append(p)
    save_file(make_state(0), tmp_path / "base.safetensors")
    return paths


def test_flag_form_with_set_and_weights(tmp_path, ckpts, capsys):
    out = tmp_path / "soup"
    rc = main(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base.safetensors"), *map(str, ckpts),
               "--weights", "1,2,1", "--set", "scale=0.5", "-o", str(out), "--no-progress"])
    assert rc == 0
    # the "wrote" line once, naming the output and the tensor count (9 in the tiny net)
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \(9 tensors, \d+\.\d MB, \d+\.\d s\)\n", capsys.readouterr().out)
    base = make_state(0)
    want = base["fc.weight"] + 0.5 * sum(w * (make_state(i + 1)["fc.weight"] - base["fc.weight"]) for i, w in enumerate([1, 2, 1]))
    torch.testing.assert_close(load_file(out / "model.safetensors")["fc.weight"], want, **FP32_VS_LIBRARY)
    assert "scale: 0.5" in (out / "recipe.yaml").read_text()


def test_recipe_form_and_resolved_recipe_reruns(tmp_path, ckpts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - ft0.safetensors\n  - path: ft1.safetensors\n    weight: 3\n")
    assert main(["validate", "r.yaml"]) == 0
    assert main(["merge", "r.yaml", "-o", "a"]) == 0
    assert main(["merge", "a/recipe.yaml", "-o", "b"]) == 0  # the recorded recipe reproduces the merge
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


MISSING_HINT = ("modelsoup reads local files and folders only and cannot fetch Hugging Face hub ids: download the model first "
                "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and give that folder")
# arguments of `soup merge` ({0}-{2}: the three fine-tunes, {missing}: a path that does not exist) and the one problem reported
CLI_ERRORS = {
    "slerp-three-models": (["--method", "slerp", "{0}", "{1}", "{2}"], "models: method 'slerp' takes 1 to 2 models, got 3"),
    "unknown-method": (["--method", "nope", "{0}", "{1}", "{2}"], "method: unknown merge method 'nope'; valid methods: {valid}"),
    "density-out-of-range": (["--method", "ties", "--base", "{0}", "{1}", "--set", "density=1.5"], "parameters.density: must be in (0, 1], got 1.5"),
    "missing-model": (["{0}", "{missing}"], "models[1].path: '{missing}' does not exist (looked for {missing}); " + MISSING_HINT),
    "weights-sum-to-zero": (["--method", "linear", "{0}", "{1}", "--weights", "1,-1"],
                            ("models: weights [1.0, -1.0] sum to zero, but 'linear' divides by their sum (normalize: true); "
                             "change the weights or set `normalize: false`")),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_errors_exit_2_name_the_problem_and_leave_no_output(tmp_path, ckpts, capsys, case):
    from modelsoup.methods import available_methods

    args, problem = CLI_ERRORS[case]
    names = {"missing": tmp_path / "missing.safetensors", "valid": ", ".join(m.name for m in available_methods())}
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "o"
    assert main(["merge", *(a.format(*ckpts, **names) for a in args), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: recipe command line has 1 problem:\n  - command line: {problem.format(*ckpts, **names)}\n"
    assert captured.out == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left either


def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("linear", "ema", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "model_stock"):
        assert f"\n{name}  (" in "\n" + text, name
    assert "density = 0.2 [per model]  (0, 1]" in text
    assert "paper:" in text


def test_torch_is_imported_with_the_collector_paused_and_frozen_only_in_a_fresh_process():
    """`soup` imports torch itself, collector off, and freezes what the import made (no later collection scans it); in a
    process that already has torch (a caller of main) it changes nothing about the collector."""
    import gc
    import subprocess
    import sys

    code = ("import gc, sys; from modelsoup.cli import _import_torch; assert 'torch' not in sys.modules; "
            "_import_torch(); print(gc.get_freeze_count(), gc.isenabled(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 100_000 and out[1:] == ["True", "True"]

    from modelsoup.cli import _import_torch

    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    _import_torch()
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)

"""The `soup` command: flag and recipe forms, validate, methods, and errors with exit code 2 and no output."""

from __future__ import annotations

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
    assert "wrote" in capsys.readouterr().out
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


def test_errors_exit_2_name_the_problem_and_leave_no_output(tmp_path, ckpts, capsys):
    out = tmp_path / "o"
    assert main(["merge", "--method", "slerp", *map(str, ckpts), "-o", str(out)]) == 2
    assert "slerp" in capsys.readouterr().err
    assert main(["merge", "--method", "nope", *map(str, ckpts), "-o", str(out)]) == 2
    assert "valid methods" in capsys.readouterr().err
    assert main(["merge", "--method", "ties", "--base", str(ckpts[0]), str(ckpts[1]), "--set", "density=1.5", "-o", str(out)]) == 2
    assert "density" in capsys.readouterr().err
    assert main(["merge", str(ckpts[0]), str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["merge", "--method", "linear", str(ckpts[0]), str(ckpts[1]), "--weights", "1,-1", "-o", str(out)]) == 2
    assert "sum to zero" in capsys.readouterr().err
    assert not out.exists()


def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("linear", "ema", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "model_stock"):
        assert f"\n{name}  (" in "\n" + text, name
    assert "density = 0.2 [per model]  (0, 1]" in text
    assert "paper:" in text

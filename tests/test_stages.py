"""Multi-stage recipes (mergekit-multi): order, intermediate folders, and refusals before anything is merged."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoup import merge
from modelsoup.api import merge_stages
from modelsoup.errors import OutputExistsError, RecipeError

from .golden.mergekit_fixtures import build_fixtures
from .test_hostile import refused


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    build_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(root: Path, text: str) -> Path:
    p = root / "stages.yml"
    p.write_text(textwrap.dedent(text))
    return p


THREE = """\
    name: final
    merge_method: linear
    models:
      - {model: ab, parameters: {weight: 1.0}}
      - {model: c_half, parameters: {weight: 1.0}}
    ---
    name: ab
    merge_method: linear
    models:
      - {model: models/ft_a, parameters: {weight: 1.0}}
      - {model: models/ft_b, parameters: {weight: 1.0}}
    ---
    name: c_half
    merge_method: task_arithmetic
    base_model: models/base
    models:
      - {model: models/ft_c, parameters: {weight: 0.5}}
    """


def test_stages_run_in_dependency_order_and_the_final_one_is_the_output(root: Path) -> None:
    r = write(root, THREE)
    result = merge(r, root / "out", hash_files=False)
    assert [n.split(" (")[0] for n in result.notes[:2]] == ["stage 'ab'", "stage 'c_half'"]
    m = {n: load_file(root / "models" / n / "model.safetensors") for n in ("base", "ft_a", "ft_b", "ft_c")}
    got = load_file(root / "out" / "model.safetensors")
    for k in got:
        ab = (m["ft_a"][k] + m["ft_b"][k]) / 2
        c_half = m["base"][k] + 0.5 * (m["ft_c"][k] - m["base"][k])
        torch.testing.assert_close(got[k], (ab + c_half) / 2)
    assert not [p for p in root.iterdir() if p.name.startswith(".soup-stages-")]


def test_intermediate_dir_keeps_the_stages(root: Path) -> None:
    r = write(root, THREE)
    merge_stages(r, root / "out", intermediate_dir=root / "inter", hash_files=False)
    assert sorted(p.name for p in (root / "inter").iterdir()) == ["ab", "c_half"]
    assert (root / "inter" / "ab" / "soup_manifest.json").is_file()
    with pytest.raises(OutputExistsError):  # a second run does not silently reuse or replace them
        merge_stages(r, root / "out2", intermediate_dir=root / "inter", hash_files=False)
    assert not (root / "out2").exists()


def test_every_stage_is_validated_before_any_merge(root: Path) -> None:
    r = write(root, THREE.replace("weight: 0.5", "weight: abc"))
    with pytest.raises(RecipeError) as e:
        merge(r, root / "out")
    assert e.value.problems == [f"{r}:17: models[0].parameters.weight: must be a number, got 'abc'"]
    assert not (root / "out").exists() and not [p for p in root.iterdir() if p.name.startswith(".soup-stages-")]


@pytest.mark.parametrize(("text", "message"), [
    ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\nname: b\nmerge_method: linear\n"
     "models: [{model: a, parameters: {weight: 1}}]\n", "stages use each other in a cycle: "),
    ("name: a\nmerge_method: linear\nmodels: [{model: models/ft_a, parameters: {weight: 1}}]\n---\nname: a\nmerge_method: linear\n"
     "models: [{model: models/ft_b, parameters: {weight: 1}}]\n", "stage name 'a' is given twice (documents 1 and 2)"),
    ("merge_method: linear\nmodels: [{model: models/ft_a, parameters: {weight: 1}}]\n---\nmerge_method: linear\n"
     "models: [{model: models/ft_b, parameters: {weight: 1}}]\n", "documents 1, 2 have no `name:`; only the final stage may be unnamed"),
    ("name: a\nmerge_method: linear\nmodels: [{model: models/ft_a, parameters: {weight: 1}}]\n---\nname: b\nmerge_method: linear\n"
     "models: [{model: models/ft_b, parameters: {weight: 1}}]\n", "no single final stage: a, b are used by no other stage"),
    ("name: ../x\nmerge_method: linear\nmodels: [{model: models/ft_a, parameters: {weight: 1}}]\n---\nmerge_method: linear\n"
     "models: [{model: models/ft_b, parameters: {weight: 1}}]\n", "name must be a plain name (it names the stage's folder), got '../x'"),
])
def test_refused_stage_sets(root: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    r = write(root, text)
    refused(["merge", str(r), str(root / "out")], capsys, message.replace("(", r"\(").replace(")", r"\)"), inputs=[root / "models", r],
            output=root / "out")
    assert not [p for p in root.iterdir() if p.name.startswith(".soup-stages-")]


def test_a_failing_stage_leaves_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the second stage's models do not line up with the first stage's output (keys): found only when merging
    r = write(root, """\
        name: ab
        merge_method: linear
        models:
          - {model: models/ft_a, parameters: {weight: 1.0}}
          - {model: models/ft_b, parameters: {weight: 1.0}}
        ---
        slices:
          - sources:
              - {model: ab, layer_range: [0, 9]}
        merge_method: passthrough
        """)
    refused(["merge", str(r), str(root / "out")], capsys, r"layers \[0, 9\] but .*ab has 4 layers", inputs=[root / "models", r], output=root / "out")
    assert not [p for p in root.iterdir() if p.name.startswith(".soup-stages-")]


def test_one_document_files_still_refuse_extra_documents_in_settings(root: Path) -> None:
    from modelsoup.recipe import load_recipe

    r = write(root, "method: linear\nmodels: [models/ft_a]\n---\nmethod: linear\nmodels: [models/ft_b]\n")
    with pytest.raises(RecipeError, match="holds 2 YAML documents .* soup merge STAGES.yml OUT"):
        load_recipe(r)


def test_intermediate_dir_inside_an_input_is_refused_before_any_stage(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = write(root, THREE)
    refused(["merge", str(r), str(root / "out"), "-I", str(root / "models" / "ft_c")], capsys, r"models/ft_c/ab: .*input",
            inputs=[root / "models"], output=root / "out")
    assert sorted(p.name for p in (root / "models" / "ft_c").iterdir()) == ["config.json", "model.safetensors"]


def test_a_killed_run_leaves_a_stage_folder_the_next_run_removes(root: Path) -> None:
    from modelsoup.io.output import scratch_folder

    stale = scratch_folder(root / "out", "stages")
    owner = json.loads((stale / ".soup-owner.json").read_text())
    (stale / ".soup-owner.json").write_text(json.dumps({**owner, "pid": 2**22 + 12345}))  # a process that no longer runs
    (stale / "ab").mkdir()
    merge(write(root, THREE), root / "out", hash_files=False)
    assert not stale.exists()


def test_stages_into_a_missing_parent_folder(root: Path) -> None:
    merge(write(root, THREE), root / "new" / "sub" / "out", hash_files=False)
    assert (root / "new" / "sub" / "out" / "model.safetensors").is_file()
    assert not [p for p in root.rglob("*") if ".soup-tmp-" in p.name]


def test_a_stage_name_works_as_tokenizer_source(root: Path) -> None:
    import shutil

    for name in ("ft_a", "ft_b", "ft_c", "base"):
        shutil.copy(Path(__file__).parent / "golden" / "mergekit" / "manifest.json", root / "models" / name / "unrelated.json")
    r = write(root, THREE.replace("merge_method: linear\n    models:\n      - {model: ab", "merge_method: linear\n    tokenizer_source: ab\n    models:\n      - {model: ab", 1))
    with pytest.raises(Exception, match="the tokenizer of .*ab cannot be read"):  # substituted: it names the stage's folder, which has no tokenizer
        merge(r, root / "out", hash_files=False)


def test_the_final_output_records_the_whole_multi_stage_recipe(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = write(root, THREE)
    merge(r, root / "out", hash_files=False)
    assert (root / "out" / "recipe.stages.yaml").read_text() == r.read_text()
    assert "soup merge recipe.stages.yaml OUT" in (root / "out" / "README.md").read_text()
    assert json.loads((root / "out" / "soup_manifest.json").read_text())["stages"] == "recipe.stages.yaml"
    merge(root / "out" / "recipe.stages.yaml", tmp_path / "again", hash_files=False)  # from the folder the original ran in
    a, b = load_file(root / "out" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    merge_stages(r, root / "kept", intermediate_dir=root / "inter", hash_files=False)  # stages kept: recipe.yaml re-runs, no copy
    assert not (root / "kept" / "recipe.stages.yaml").exists()

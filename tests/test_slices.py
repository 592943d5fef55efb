"""``slices:`` recipes (mergekit's layer-range form): renumbering, identities, the output config, and refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge
from modelsoup.errors import KeyMismatchError, OutputError, RecipeError
from modelsoup.recipe import load_recipe

from .golden.mergekit_fixtures import build_fixtures
from .test_hostile import refused


@pytest.fixture
def llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    build_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(root: Path, text: str, name: str = "r.yml") -> Path:
    p = root / name
    p.write_text(textwrap.dedent(text))
    return p


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_one_full_slice_of_passthrough_is_the_model(llama: Path) -> None:
    r = recipe(llama, "slices:\n  - sources:\n      - model: models/ft_a\n        layer_range: [0, 4]\nmerge_method: passthrough\n")
    merge(r, llama / "out")
    got, want = weights(llama / "out"), weights(llama / "models" / "ft_a")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((llama / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_frankenmerge_renumbers_layers_and_takes_the_ends_from_the_first_and_last_slice(llama: Path) -> None:
    r = recipe(llama, """\
        slices:
          - sources:
              - {model: models/ft_a, layer_range: [1, 3]}
          - sources:
              - {model: models/ft_b, layer_range: [0, 4], parameters: {scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]}}
        merge_method: passthrough
        """)
    merge(r, llama / "out")
    got, a, b = weights(llama / "out"), weights(llama / "models" / "ft_a"), weights(llama / "models" / "ft_b")
    q = ".self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.0{q}"], a[f"model.layers.1{q}"]) and torch.equal(got[f"model.layers.1{q}"], a[f"model.layers.2{q}"])
    for k in range(4):
        assert torch.equal(got[f"model.layers.{k + 2}{q}"], b[f"model.layers.{k}{q}"])
        assert torch.equal(got[f"model.layers.{k + 2}.self_attn.o_proj.weight"], torch.zeros_like(b[f"model.layers.{k}.self_attn.o_proj.weight"]))
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"]) and torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert sum(1 for n in got if n.startswith("model.layers.")) == 6 * 9
    assert json.loads((llama / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    # the recipe written beside the output is a native slices recipe that reruns to the same tensors
    merge(llama / "out" / "recipe.yaml", llama / "again")
    again = weights(llama / "again")
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_linear_over_slices_equals_the_layerwise_mean(llama: Path) -> None:
    r = recipe(llama, """\
        slices:
          - sources:
              - {model: models/ft_a, layer_range: [0, 2], parameters: {weight: 1.0}}
              - {model: models/ft_b, layer_range: [2, 4], parameters: {weight: 3.0}}
        merge_method: linear
        """)
    merge(r, llama / "out")
    got, a, b = weights(llama / "out"), weights(llama / "models" / "ft_a"), weights(llama / "models" / "ft_b")
    for k in range(2):
        n = f".mlp.up_proj.weight"
        torch.testing.assert_close(got[f"model.layers.{k}{n}"], (a[f"model.layers.{k}{n}"] + 3 * b[f"model.layers.{k + 2}{n}"]) / 4)
    torch.testing.assert_close(got["lm_head.weight"], (a["lm_head.weight"] + 3 * b["lm_head.weight"]) / 4)
    assert json.loads((llama / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_layer_types_follow_the_layers(llama: Path) -> None:
    for name, types in (("ft_a", ["full", "sliding", "full", "sliding"]), ("ft_b", ["a", "b", "c", "d"])):
        cfg = llama / "models" / name / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "layer_types": types}))
    r = recipe(llama, "slices:\n  - sources:\n      - {model: models/ft_a, layer_range: [1, 3]}\n  - sources:\n"
                      "      - {model: models/ft_b, layer_range: [2, 4]}\nmerge_method: passthrough\n")
    merge(r, llama / "out")
    cfg = json.loads((llama / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["layer_types"] == ["sliding", "full", "c", "d"]


def test_slices_beyond_the_model_are_refused(llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = recipe(llama, "slices:\n  - sources:\n      - {model: models/ft_a, layer_range: [2, 6]}\nmerge_method: passthrough\n")
    refused(["merge", str(r), str(llama / "out")], capsys,
            r"error: the slices do not fit the models:\n  slices\[0\]\.sources\[0\]: layers \[2, 6\] but models/ft_a has 4 layers \(0 to 3\)",
            inputs=[llama / "models"], output=llama / "out")


def test_a_layer_some_source_lacks_a_tensor_of_is_refused(llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = weights(llama / "models" / "ft_b")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, llama / "models" / "ft_b" / "model.safetensors")
    r = recipe(llama, "slices:\n  - sources:\n      - {model: models/ft_a, layer_range: [0, 4]}\n      - {model: models/ft_b, layer_range: [0, 4]}\n"
                      "merge_method: slerp\nbase_model: models/ft_a\nparameters: {t: 0.5}\n")
    refused(["merge", str(r), str(llama / "out")], capsys,
            r"layer 2 of models/ft_b and layer 2 of models/ft_a hold different tensors: missing 1 \(\.mlp\.up_proj\.weight\)\n$",
            inputs=[llama / "models"], output=llama / "out")


def test_a_model_without_one_layer_stack_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_file({"fc.weight": torch.ones(2, 2), "head.bias": torch.ones(2)}, tmp_path / "flat.safetensors")
    save_file({"encoder.layer.0.w": torch.ones(2), "decoder.layers.0.w": torch.ones(2)}, tmp_path / "two.safetensors")
    for f, found in (("flat", "none"), ("two", "decoder.layers., encoder.layer.")):
        r = recipe(tmp_path, f"method: passthrough\nslices:\n  - sources:\n      - {{path: {f}.safetensors, layers: [0, 1]}}\n")
        with pytest.raises(KeyMismatchError, match=f"{f}.safetensors: a `slices:` recipe needs a model with one stack of numbered layers; found {found}"):
            merge(r, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()


def test_a_config_without_a_layer_count_is_refused_before_anything_is_written(llama: Path) -> None:
    cfg = llama / "models" / "ft_a" / "config.json"
    data = json.loads(cfg.read_text())
    del data["num_hidden_layers"]
    cfg.write_text(json.dumps(data))
    r = recipe(llama, "slices:\n  - sources:\n      - {model: models/ft_a, layer_range: [0, 2]}\nmerge_method: passthrough\n")
    with pytest.raises(OutputError, match="ft_a/config.json: no top-level layer count .* to set to 2"):
        merge(r, llama / "out")
    assert not (llama / "out").exists() and not [p for p in llama.iterdir() if ".soup-tmp-" in p.name]


def test_native_slices_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    r = recipe(tmp_path, """\
        method: linear
        models: [a]
        slices:
          - sources:
              - {path: a, layers: [0, 2]}
              - {path: a, layers: [3, 1]}
              - {path: a, layers: [0, 2]}
          - sources:
              - {path: a}
        overrides:
          - {match: "*", weights: [1]}
        """)
    refused(["merge", str(r), str(tmp_path / "out")], capsys, "has 5 problems", inputs=[tmp_path / "a"], output=tmp_path / "out")
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    assert e.value.problems == [
        f"{r}:3: slices: give either `models:` (whole models) or `slices:` (layer ranges of models), not both",
        f"{r}:6: slices[0].sources[1].layers: must satisfy 0 <= start < end (end excluded), got [3, 1]",
        f"{r}:7: slices[0].sources[2]: 'a' is already a source of this slice; a slice merges distinct models",
        f"{r}:9: slices[1].sources[0].layers: is required: [start, end], the layer indices taken from this model (end excluded)",
        f"{r}:11: overrides[0].weights: overrides cannot give weights in a `slices:` recipe (each slice has its own sources); give `weight:` on the slice's sources",
    ]


def _passthrough(root: Path, a: str = "models/ft_a", b: str = "models/ft_b") -> Path:
    return recipe(root, f"slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n  - sources:\n"
                        f"      - {{model: {b}, layer_range: [1, 4]}}\nmerge_method: passthrough\n")


def _copy_model(root: Path, src: str, dst: str, state: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> None:
    (root / dst).mkdir(parents=True)
    save_file(state if state is not None else weights(root / src), root / dst / "model.safetensors")
    cfg = json.loads((root / src / "config.json").read_text())
    (root / dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))


@pytest.mark.parametrize(("case", "message"), [
    ("tied", r"models/tied and models/ft_a hold different tensors outside their layers \(tied embeddings in one\?\): missing 1 \(lm_head.weight\)"),
    ("half", r"the slices stack layers of different dtypes \('.input_layernorm.weight': float32 in model.layers.0.input_layernorm.weight, "
             r"float16 in model.layers.2.input_layernorm.weight\); set `dtype:`"),
    ("gap", r"models/gap: its layer stack 'model.layers.' has no layer 2 \(of 0 to 3\)"),
    ("zero", r"models/zero: 'model.layers.00.[a-z_.]+' numbers its layer '00' \(leading zeros\)"),
])
def test_slices_of_models_that_do_not_stack_cleanly_are_refused(llama: Path, capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    b = weights(llama / "models" / "ft_b")
    if case == "tied":
        _copy_model(llama, "models/ft_b", "models/tied", {k: v for k, v in b.items() if k != "lm_head.weight"}, {"tie_word_embeddings": True})
    elif case == "half":
        _copy_model(llama, "models/ft_b", "models/half", {k: v.half() for k, v in b.items()})
    elif case == "gap":
        _copy_model(llama, "models/ft_b", "models/gap", {k: v for k, v in b.items() if ".layers.2." not in k})
    else:
        _copy_model(llama, "models/ft_b", "models/zero", {k.replace("layers.0.", "layers.00."): v for k, v in b.items()})
    refused(["merge", str(_passthrough(llama, b=f"models/{case}")), str(llama / "out")], capsys, message, inputs=[llama / "models"], output=llama / "out")


@pytest.mark.parametrize(("config", "message"), [
    ({"no_rope_layers": [1, 0, 1, 0]}, None),
    ({"text_config": {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"]}}, None),
    ({"sliding_layers": [0, 1, 0, 1]}, r"`sliding_layers` has one entry per layer \(4\) and is not known to modelsoup"),
    ({"mlp_only_layers": [2]}, r"`mlp_only_layers` names layers by number"),
])
def test_per_layer_config_settings_follow_the_layers_or_are_refused(llama: Path, capsys: pytest.CaptureFixture[str], config: dict, message: str | None) -> None:
    for name in ("ft_a", "ft_b"):
        cfg = llama / "models" / name / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **config}))
    if message is not None:
        refused(["merge", str(_passthrough(llama)), str(llama / "out")], capsys, message, inputs=[llama / "models"], output=llama / "out")
        return
    merge(_passthrough(llama), llama / "out")
    got = json.loads((llama / "out" / "config.json").read_text())
    assert got["num_hidden_layers"] == 5
    if "no_rope_layers" in config:
        assert got["no_rope_layers"] == [1, 0, 0, 1, 0]  # ft_a's layers 0, 1, then ft_b's 1, 2, 3
    else:
        assert got["text_config"] == {"num_hidden_layers": 5, "layer_types": ["a", "b", "b", "c", "d"]}


def test_skipping_a_layer_tensor_is_refused(llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = recipe(llama, "method: passthrough\nslices:\n  - sources:\n      - {path: models/ft_a, layers: [0, 4]}\n"
                      "overrides:\n  - {match: 'model.layers.3.*', take: skip}\n")
    refused(["merge", str(r), str(llama / "out")], capsys, r"'model.layers.3.[a-z_.]+': `take: skip` would leave a hole in a layer",
            inputs=[llama / "models"], output=llama / "out")

"""Native recipes: schema, every validation message (with its line), parameter resolution, round trip."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from modelsoup.errors import RecipeError
from modelsoup.plan import evaluate_setting, layer_index, layer_positions, tensor_rules
from modelsoup.recipe import Recipe, describe, load_recipe, parse_size, recipe_from_dict, recipe_from_yaml_text


@pytest.fixture
def ckpts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Placeholder checkpoints (existence is all a recipe checks) in the working directory."""
    for d in ("base", "ft-a", "ft-b", "ft-c"):
        (tmp_path / d).mkdir()
    (tmp_path / "single.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(text: str, source: str = "recipe.yaml") -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe_from_yaml_text(textwrap.dedent(text), source)
    return e.value.problems


def one_problem(text: str) -> str:
    ps = problems_of(text)
    assert len(ps) == 1, ps
    return ps[0]


# ------------------------------------------------------------------------------------------------
# valid recipes


def test_full_native_recipe(ckpts: Path) -> None:
    r = recipe_from_yaml_text(
        textwrap.dedent(
            """\
            method: ties
            base: base
            models:
              - ft-a
              - path: ft-b
                weight: 0.7
                parameters: {density: 0.5}
                key: state_dict
                strip_prefix: "module."
            parameters: {density: 0.3, lambda: 0.8}
            dtype: bfloat16
            keys: intersection
            seed: 7
            allow_nonfinite: true
            overrides:
              - match: "*attention*"
                parameters: {density: 0.9}
              - match: "classifier.*"
                take: base
              - match: "re:\\\\.bias$"
                weights: [1, 0]
            output: {shard_size: 2GiB, format: torch, copy_files: false, model_card: false}
            """
        ),
        "r.yaml",
    )
    assert r.method == "ties" and r.source == "r.yaml" and r.source_format == "native"
    assert [m.path for m in r.models] == ["ft-a", "ft-b"]
    assert r.models[1].resolved == ckpts / "ft-b"
    assert r.models[1].key == "state_dict" and r.models[1].strip_prefix == "module."
    assert r.base is not None and r.base.path == "base" and r.base.resolved == ckpts / "base"
    assert r.parameters == {
        "density": 0.3, "scale": 0.8, "rescale": "none", "keep_at_least_one": False, "tie_break": "index", "sign_method": "sum", "sign_from": "weighted",
        "normalize": True, "divide_by": "weight_sum",
    }
    assert (r.dtype, r.keys, r.seed, r.allow_nonfinite) == ("bfloat16", "intersection", 7, True)
    assert (r.output.shard_size, r.output.format, r.output.copy_files, r.output.model_card) == (2 * 2**30, "torch", False, False)

    rules = tensor_rules(r, ["enc.attention.q.weight", "classifier.weight", "enc.ffn.bias", "enc.ffn.weight"])
    # first matching override wins; per-model density falls back to the global value
    assert rules["enc.attention.q.weight"].params["density"] == (0.9, 0.9)
    assert rules["enc.attention.q.weight"].take is None
    assert rules["classifier.weight"].take == "base"
    assert rules["enc.ffn.bias"].weights == (1.0, 0.0)
    assert rules["enc.ffn.weight"].params["density"] == (0.3, 0.5)
    assert rules["enc.ffn.weight"].weights == (1.0, 0.7)  # a missing weight is 1
    assert rules["enc.ffn.weight"].params["scale"] == 0.8


def test_first_matching_override_wins(ckpts: Path) -> None:
    r = recipe_from_dict(
        {
            "method": "slerp",
            "base": "base",
            "models": ["ft-a"],
            "parameters": {"t": 0.5},
            "overrides": [{"match": "*attn*", "parameters": {"t": 0.3}}, {"match": "*.bias", "parameters": {"t": 0.9}}],
        }
    )
    rules = tensor_rules(r, ["attn.bias", "mlp.bias", "mlp.weight"])
    assert rules["attn.bias"].params["t"] == 0.3
    assert rules["mlp.bias"].params["t"] == 0.9
    assert rules["mlp.weight"].params == {"t": 0.5, "dot_threshold": 0.9995, "eps": 1e-8}
    assert rules["mlp.weight"].weights is None


def test_defaults_filled_and_alias_resolved(ckpts: Path) -> None:
    r = recipe_from_dict({"method": "task_arithmetic", "base": "base", "models": ["ft-a", "ft-b"], "parameters": {"lambda": 0.5}})
    assert r.parameters == {"scale": 0.5, "normalize": False}
    rule = tensor_rules(r, ["w"])["w"]
    assert rule.params == {"scale": 0.5, "normalize": False} and rule.weights is None and rule.take is None


def test_per_model_defaults(ckpts: Path) -> None:
    r = recipe_from_dict({"method": "breadcrumbs", "base": "base", "models": ["ft-a", {"path": "ft-b", "parameters": {"gamma": 0.05}}]})
    p = tensor_rules(r, ["w"])["w"].params
    assert p["density"] == (0.9, 0.9) and p["gamma"] == (0.01, 0.05) and p["sign_method"] == "none"


def test_in_memory_sources_skip_path_checks() -> None:
    sd1, sd2 = {"w": 1}, {"w": 2}
    r = recipe_from_dict({"method": "linear", "models": [{"source": sd1}, {"source": sd2}]})
    assert r.models[0].source is sd1 and r.models[1].source is sd2 and r.models[0].path is None
    assert tensor_rules(r, ["w"])["w"].params == {"normalize": True}


def test_python_api_tuples_and_paths(ckpts: Path) -> None:
    r = recipe_from_dict(
        {"method": "linear", "models": [ckpts / "ft-a", {"path": ckpts / "ft-b", "weight": 2}], "overrides": [{"match": "*", "weights": (1, 3)}]}
    )
    assert r.models[0].path == str(ckpts / "ft-a") and tensor_rules(r, ["w"])["w"].weights == (1.0, 3.0)


def test_same_checkpoint_twice_is_allowed(ckpts: Path) -> None:
    r = recipe_from_dict({"method": "linear", "models": ["ft-a", "ft-a", "single.safetensors"]})
    assert len(r.models) == 3


def test_base_listed_among_models_is_not_counted(ckpts: Path) -> None:
    # slerp takes base + 1: the base listed again is not an ingredient (the engine drops it too)
    recipe_from_dict({"method": "slerp", "base": "base", "models": ["base", "ft-a"], "parameters": {"t": 0.2}})


def test_native_gradient_and_conditional(ckpts: Path) -> None:
    r = recipe_from_dict(
        {
            "method": "slerp",
            "base": "base",
            "models": ["ft-a"],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
        }
    )
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)] + ["model.layers.2.mlp.up.weight", "lm_head.weight"]
    rules = tensor_rules(r, names)
    assert [rules[n].params["t"] for n in names[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rules["model.layers.2.mlp.up.weight"].params["t"] == 0.5
    assert rules["lm_head.weight"].params["t"] == 0.5


# ------------------------------------------------------------------------------------------------
# settings, layer positions, sizes


def test_evaluate_setting_gradient_by_hand() -> None:
    g = [0.0, 0.5, 0.3, 0.7, 1.0]
    # t = 3/9 -> scaled 4/3 -> between g[1]=0.5 and g[2]=0.3 at 1/3: 0.5 - 0.2/3
    assert evaluate_setting(g, "x", 3 / 9) == pytest.approx(0.5 - 0.2 / 3)
    assert evaluate_setting(g, "x", 1.0) == 1.0
    assert evaluate_setting(g, "x", 0.0) == 0.0
    assert evaluate_setting(["a", "b", "c"], "x", 0.99) == "b"  # non-numbers: indexed, not interpolated
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0.0) is None
    assert evaluate_setting([{"filter": "*", "value": 2}], "attn", 0.0) == 2


def test_layer_positions() -> None:
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.weight" for i in range(4)),
        "model.norm.weight",
        "lm_head.weight",
    ]
    pos = layer_positions(names)
    assert [pos[f"model.layers.{i}.mlp.weight"] for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert pos["model.embed_tokens.weight"] == 0.0 and pos["model.norm.weight"] == 0.0 and pos["lm_head.weight"] == 0.0
    assert layer_index("bert.encoder.layer.3.attention.self.query.weight") == ("bert.encoder.layer.", 3)
    assert layer_index("transformer.h.5.attn.c_attn.weight") == ("transformer.h.", 5)
    assert layer_index("blocks.7.attn.qkv.weight") == ("blocks.", 7)
    assert layer_index("classifier.weight") is None
    # separate stacks each span [0, 1]; a single layer gets t = 1 as in mergekit
    two = layer_positions(["encoder.layer.0.w", "encoder.layer.1.w", "decoder.layer.0.w"])
    assert two == {"encoder.layer.0.w": 0.0, "encoder.layer.1.w": 1.0, "decoder.layer.0.w": 1.0}


def test_parse_size() -> None:
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    assert parse_size("5XB") is None and parse_size(0) is None and parse_size(True) is None


# ------------------------------------------------------------------------------------------------
# validation: all problems at once, with lines


def test_several_errors_reported_together_with_lines(ckpts: Path) -> None:
    ps = problems_of(
        """\
        method: ties
        base: base
        models:
          - ft-a
          - path: ft-b
            weight: abc
          - path: missing-model
        parameters:
          density: 1.5
          colour: red
        dtype: fp16
        overrides:
          - match: "re:(unclosed"
        """
    )
    assert ps[0] == "recipe.yaml:6: models[1].weight: must be a number, got 'abc'"
    assert ps[1].startswith("recipe.yaml:7: models[2].path: 'missing-model' does not exist")
    assert ps[2] == "recipe.yaml:9: parameters.density: must be in (0, 1], got 1.5"
    assert ps[3].startswith("recipe.yaml:10: parameters.colour: unknown parameter 'colour' for method 'ties'; valid: density")
    assert ps[4].startswith("recipe.yaml:11: dtype: unknown dtype 'fp16'; valid: float32, float16, bfloat16")
    assert ps[5].startswith("recipe.yaml:13: overrides[0].match: regular expression '(unclosed' does not compile")
    assert len(ps) == 6
    with pytest.raises(RecipeError, match=r"recipe recipe.yaml has 6 problems:"):
        recipe_from_yaml_text(textwrap.dedent("method: ties\nbase: base\nmodels: [ft-a, {path: ft-b, weight: abc}, missing-model]\n"
                                              "parameters: {density: 1.5, colour: red}\ndtype: fp16\noverrides: [{match: 're:(unclosed'}]\n"), "recipe.yaml")


def test_yaml_syntax_error_has_line() -> None:
    p = one_problem("method: linear\nmodels:\n  - a\n  - [b\n")
    assert p.startswith("recipe.yaml:5: YAML syntax error:")


def test_duplicate_key(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels: [ft-a]\nmethod: ema\n") == (
        "recipe.yaml:3: method: key given twice (the later one would silently win); keep one"
    )


def test_unknown_top_level_key_suggests(ckpts: Path) -> None:
    p = one_problem("method: linear\nmodels: [ft-a]\nparamters: {normalize: true}\n")
    assert p.startswith("recipe.yaml:3: paramters: unknown key 'paramters'; did you mean 'parameters'?")


def test_type_errors(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels: [ft-a]\nseed: abc\n") == "recipe.yaml:3: seed: must be an integer, got 'abc'"
    assert one_problem("method: linear\nmodels: [ft-a]\nkeys: all\n") == (
        "recipe.yaml:3: keys: must be 'exact', 'intersection' or 'base', got 'all'"
    )
    assert one_problem("method: linear\nmodels: [ft-a]\nallow_nonfinite: 1\n") == (
        "recipe.yaml:3: allow_nonfinite: must be true or false, got 1"
    )
    assert one_problem("method: linear\nmodels: ft-a\n") == "recipe.yaml:2: models: must be a list, got 'ft-a'"


def test_every_part_is_type_checked_strictly(ckpts: Path) -> None:
    """Each part's keys in their declared order, then its unknown keys; a wrong key is left out and the rest checked."""
    ps = problems_of("""\
        method: linear
        zz: 1
        models:
          - {path: ft-a, key: 3, strip_prefix: 4}
          - {path: ft-b, parameters: {1: x}, colour: red}
        dtype: 16
        seed: 1.0
        overrides:
          - {match: '*', weights: [1, 2.5, true], take: all}
          - {weights: [1, 2]}
        output: {format: null, copy_files: 'yes', pad_to_multiple_of: 8.0, model_crd: false}
        """)
    assert ps == [
        ("recipe.yaml:2: zz: unknown key 'zz' (valid keys: method, models, slices, base, parameters, dtype, keys, seed, "
         "allow_nonfinite, overrides, output)"),
        "recipe.yaml:4: models[0].key: must be a string, got 3",
        "recipe.yaml:4: models[0].strip_prefix: must be a string, got 4",
        "recipe.yaml:5: models[1].parameters[1].[key]: must be a string, got 1",
        "recipe.yaml:5: models[1].colour: unknown key 'colour' (valid keys: path, source, weight, parameters, key, strip_prefix, adapter, statistics, data)",
        "recipe.yaml:6: dtype: must be a string, got 16",
        "recipe.yaml:7: seed: must be an integer, got 1.0",
        "recipe.yaml:9: overrides[0].take: must be 'base', 'first' or 'skip', got 'all'",
        "recipe.yaml:9: overrides[0].weights[2]: must be a number, got True",
        "recipe.yaml:10: overrides[1].match: is required",
        "recipe.yaml:11: output.format: must be 'safetensors' or 'torch', got None",
        "recipe.yaml:11: output.copy_files: must be true or false, got 'yes'",
        "recipe.yaml:11: output.pad_to_multiple_of: must be an integer, got 8.0",
        ("recipe.yaml:11: output.model_crd: unknown key 'model_crd'; did you mean 'model_card'? (valid keys: shard_size, format, "
         "copy_files, copy_tokenizer, model_card, tokenizer_source, pad_to_multiple_of, chat_template)"),
    ]


def test_typed_values_are_taken_as_their_plain_type(ckpts: Path) -> None:
    """A number list takes integers (as floats); str and int subclasses (enums, from the Python API) are plain values."""
    import enum

    class Keys(str, enum.Enum):
        base = "base"

    class Seed(enum.IntEnum):
        seven = 7

    r = recipe_from_dict({"method": "linear", "base": "base", "models": ["ft-a", "ft-b"], "keys": Keys.base, "seed": Seed.seven,
                          "overrides": [{"match": "*", "weights": [1, 3]}]})
    assert type(r.keys) is str and r.keys == "base" and type(r.seed) is int and r.seed == 7
    assert r.overrides[0].weights == (1.0, 3.0) and all(type(w) is float for w in r.overrides[0].weights)


def test_missing_method_and_models() -> None:
    ps = problems_of("seed: 1\n")
    assert ps[0].startswith("recipe.yaml: method: is required; one of:")
    assert ps[1] == "recipe.yaml: models: is required: a list of checkpoint paths"


def test_unknown_method_lists_valid_ones(ckpts: Path) -> None:
    p = one_problem("method: linaer\nmodels: [ft-a]\n")
    assert p.startswith("recipe.yaml:1: method: unknown merge method 'linaer'; did you mean 'linear'?; valid methods: ")
    assert "linear" in p and "ties" in p


def test_parameter_value_checked(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels: [ft-a]\nparameters: {normalize: 3}\n") == (
        "recipe.yaml:3: parameters.normalize: must be true or false, got 3"
    )
    assert one_problem("method: ema\nmodels: [ft-a]\nparameters: {decay: [0.5, 1.0]}\n") == (
        "recipe.yaml:3: parameters.decay: gradient [1]: must be in [0, 1), got 1.0"
    )


def test_parameter_given_twice_via_alias(ckpts: Path) -> None:
    p = one_problem("method: task_arithmetic\nbase: base\nmodels: [ft-a]\nparameters: {scale: 1, lambda: 2}\n")
    assert p == "recipe.yaml:4: parameters.lambda: 'scale' is given twice (as 'scale' and 'lambda'); keep one"


def test_per_model_value_for_global_parameter(ckpts: Path) -> None:
    p = one_problem("method: ties\nbase: base\nmodels:\n  - path: ft-a\n    parameters: {normalize: false}\n")
    assert p == (
        "recipe.yaml:5: models[0].parameters.normalize: 'normalize' is not a per-model parameter of 'ties'; "
        "set it under the top-level `parameters:`"
    )


def test_model_count_and_base(ckpts: Path) -> None:
    assert one_problem("method: ties\nmodels: [ft-a, ft-b]\n") == (
        "recipe.yaml:2: models: method 'ties' needs a base model (set `base:`)"
    )
    p = one_problem("method: model_stock\nbase: base\nmodels: [ft-a]\n")
    assert p.startswith("recipe.yaml:3: models: method 'model_stock' takes at least 2 models")


def test_weights_refused_for_methods_without_weights(ckpts: Path) -> None:
    p = one_problem("method: slerp\nbase: base\nmodels:\n  - path: ft-a\n    weight: 0.5\n")
    assert p == "recipe.yaml:5: models[0].weight: method 'slerp' takes no weights; remove `weight:`"
    p = one_problem("method: model_stock\nbase: base\nmodels: [ft-a, ft-b]\noverrides:\n  - match: '*'\n    weights: [1, 2]\n")
    assert p == "recipe.yaml:6: overrides[0].weights: method 'model_stock' takes no weights; remove `weights:`"


def test_zero_weight_sum(ckpts: Path) -> None:
    text = "method: linear\nmodels:\n  - path: ft-a\n    weight: 1\n  - path: ft-b\n    weight: -1\n"
    assert one_problem(text) == (
        "recipe.yaml:2: models: weights [1.0, -1.0] sum to zero, but 'linear' divides by their sum (normalize: true); "
        "change the weights or set `normalize: false`"
    )
    recipe_from_yaml_text(text + "parameters: {normalize: false}\n", "recipe.yaml")  # fine without normalising
    p = one_problem("method: task_arithmetic\nbase: base\nmodels: [ft-a, ft-b]\nparameters: {normalize: true}\n"
                    "overrides:\n  - match: '*'\n    weights: [2, -2]\n")
    assert p.startswith("recipe.yaml:7: overrides[0].weights: weights [2.0, -2.0] sum to zero")


def test_missing_path_mentions_hub(ckpts: Path) -> None:
    p = one_problem("method: linear\nmodels: [ft-a, meta-llama/Llama-3-8B]\n")
    assert p.startswith("recipe.yaml:2: models[1].path: 'meta-llama/Llama-3-8B' does not exist (looked for ")
    assert "cannot fetch Hugging Face hub ids" in p


def test_output_shard_size(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels: [ft-a]\noutput:\n  shard_size: 5 gigs\n") == (
        "recipe.yaml:4: output.shard_size: cannot read '5 gigs' as a size; give bytes (a positive integer up to 2**63 - 1) or e.g. '500MB', '5GB', '2GiB'"
    )


def test_override_checks(ckpts: Path) -> None:
    assert one_problem("method: slerp\nbase: base\nmodels: [ft-a]\noverrides:\n  - match: '*'\n    parameters: {t: 2}\n") == (
        "recipe.yaml:6: overrides[0].parameters.t: must be in [0, 1], got 2"
    )
    assert one_problem("method: linear\nmodels: [ft-a]\noverrides:\n  - match: 'head.*'\n    take: base\n") == (
        "recipe.yaml:5: overrides[0].take: `take: base` needs a `base:` model in the recipe"
    )
    assert one_problem("method: linear\nmodels: [ft-a, ft-b]\noverrides:\n  - match: '*.bias'\n    weights: [1, 2, 3]\n") == (
        "recipe.yaml:5: overrides[0].weights: gives 3 weight(s) but the recipe has 2 model(s); give one per model, in order"
    )
    assert one_problem("method: linear\nmodels: [ft-a]\noverrides:\n  - match: 're:[a-'\n").startswith(
        "recipe.yaml:4: overrides[0].match: regular expression '[a-' does not compile"
    )


def test_keys_base_without_base(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels: [ft-a]\nkeys: base\n") == (
        "recipe.yaml:3: keys: `keys: base` takes missing tensors from the base, but the recipe has no `base:`"
    )


def test_source_not_allowed_in_yaml(ckpts: Path) -> None:
    assert one_problem("method: linear\nmodels:\n  - source: x\n") == (
        "recipe.yaml:3: models[0].source: `source` is only for in-memory objects given through the Python API; use `path:`"
    )


def test_dict_input_problems_have_paths_without_lines() -> None:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"method": "linear", "models": [{"source": {}}, {"source": {}, "weight": "x"}]})
    assert e.value.problems == ["models[1].weight: must be a number, got 'x'"]


# ------------------------------------------------------------------------------------------------
# files, round trip, summary


def test_load_recipe_file_and_round_trip(ckpts: Path) -> None:
    (ckpts / "r.yaml").write_text(
        "method: dare_ties\nbase: base\nmodels:\n  - ft-a\n  - path: ft-b\n    weight: [0.2, 0.8]\n    parameters: {density: 0.7}\n"
        "parameters: {density: [{filter: mlp, value: 0.4}, {value: 0.6}]}\n"
        "overrides:\n  - match: 'lm_head.*'\n    take: base\noutput: {shard_size: 500MB}\n"
    )
    r = load_recipe(ckpts / "r.yaml")
    assert r.source == str(ckpts / "r.yaml")
    back = recipe_from_yaml_text(r.to_yaml(), "again.yaml")
    assert back.to_yaml() == r.to_yaml()
    assert (back.method, back.parameters, back.output, back.overrides) == (r.method, r.parameters, r.output, r.overrides)
    assert [(m.path, m.weight, m.parameters) for m in back.models] == [(m.path, m.weight, m.parameters) for m in r.models]
    names = ["model.layers.0.mlp.w", "model.layers.1.attn.w", "lm_head.weight"]
    assert tensor_rules(back, names) == tensor_rules(r, names)
    rules = tensor_rules(r, names)
    assert rules["model.layers.0.mlp.w"].params["density"] == (0.4, 0.7)
    assert rules["model.layers.1.attn.w"].weights == (1.0, 0.8)
    assert rules["lm_head.weight"].take == "base"


def test_load_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read the recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_describe(ckpts: Path) -> None:
    r = recipe_from_dict({"method": "linear", "models": ["ft-a", {"path": "ft-b", "weight": 3}], "overrides": [{"match": "*", "take": "first"}]})
    text = describe(r)
    assert "method: linear" in text and "  - ft-b  weight 3" in text and "parameters: normalize=True" in text
    assert "overrides: 1" in text and "base: (none)" in text


def test_recipe_is_frozen(ckpts: Path) -> None:
    r = recipe_from_dict({"method": "linear", "models": ["ft-a"]})
    assert isinstance(r, Recipe)
    with pytest.raises(dataclasses.FrozenInstanceError, match="^cannot assign to field 'method'$"):
        r.method = "ema"  # type: ignore[misc]
    assert r.method == "linear"

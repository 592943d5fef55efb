"""mergekit recipes (whole-model form) translate to the parameters mergekit itself would use.

Expected values follow mergekit's source (see the docstring of modelsoup/recipe/mergekit.py): per-method defaults
from merge_methods/registry.py and generalized_task_arithmetic.py, gradients from config.py
``evaluate_setting`` with layer positions from plan.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from modelsoup.errors import RecipeError
from modelsoup.plan import tensor_rules
from modelsoup.recipe import Recipe, load_recipe, recipe_from_dict, recipe_from_yaml_text
from modelsoup.recipe.schema import describe


LLAMA = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.{m}.weight" for i in range(5) for m in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")]
    + ["model.norm.weight", "lm_head.weight"]
)


@pytest.fixture
def ckpts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for d in ("base", "a", "b", "c"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def mk(text: str) -> Recipe:
    return recipe_from_yaml_text(textwrap.dedent(text), "mk.yaml")


def mk_problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as e:
        mk(text)
    return e.value.problems


def test_ties(ckpts: Path) -> None:
    r = mk(
        """\
        models:
          - model: base
          - model: a
            parameters: {density: 0.5, weight: 0.5}
          - model: b
            parameters: {density: 0.3, weight: [0, 1]}
        merge_method: ties
        base_model: base
        parameters: {normalize: true, int8_mask: true}
        dtype: bfloat16
        """
    )
    assert r.source_format == "mergekit" and r.method == "ties"
    assert r.base is not None and r.base.path == "base"
    assert [m.path for m in r.models] == ["a", "b"]  # base_model listed in models is not a task vector
    assert r.parameters == {
        "density": 1.0, "scale": 1.0, "rescale": "none", "keep_at_least_one": True, "tie_break": "torch_sort", "sign_method": "sum", "sign_from": "weighted",
        "normalize": True, "divide_by": "weight_sum",
    }
    assert r.dtype == "bfloat16"
    rules = tensor_rules(r, LLAMA)
    first = rules["model.layers.0.mlp.up_proj.weight"]
    assert first.params["density"] == (0.5, 0.3) and first.weights == (0.5, 0.0)
    assert rules["model.layers.2.mlp.up_proj.weight"].weights == (0.5, 0.5)  # t = 2/4
    assert rules["model.layers.4.mlp.up_proj.weight"].weights == (0.5, 1.0)
    assert rules["lm_head.weight"].weights == (0.5, 0.0)  # outside the layer stack: t = 0
    assert any("int8_mask" in n for n in r.notes)


def test_ties_without_density_keeps_everything(ckpts: Path) -> None:
    # mergekit's density default is 1.0 (ours is 0.2): a mergekit recipe must get mergekit's
    r = mk("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: ties\nbase_model: base\n")
    assert tensor_rules(r, ["w"])["w"].params["density"] == (1.0,)


def test_dare_ties(ckpts: Path) -> None:
    r = mk(
        """\
        models:
          - model: a
            parameters: {weight: 0.6, density: 0.53}
          - model: b
            parameters: {weight: 0.4}
        merge_method: dare_ties
        base_model: base
        parameters: {lambda: 1.2}
        """
    )
    assert r.method == "dare_ties"
    assert r.parameters == {
        "density": 1.0, "scale": 1.2, "rescale": "l1", "sign_method": "sum", "sign_from": "weighted",
        "normalize": False, "divide_by": "weight_sum",
    }
    rule = tensor_rules(r, ["x"])["x"]
    assert rule.params["density"] == (0.53, 1.0) and rule.weights == (0.6, 0.4)


def test_dare_linear_rescale_false(ckpts: Path) -> None:
    r = mk("models:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\nmerge_method: dare_linear\nbase_model: base\n"
           "parameters: {rescale: false}\n")
    assert r.parameters == {"density": 1.0, "scale": 1.0, "rescale": "none", "normalize": False}


def test_task_arithmetic(ckpts: Path) -> None:
    r = mk(
        """\
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: a
            parameters: {weight: 1.0}
          - model: b
            parameters: {weight: -0.5}
        parameters: {lambda: 0.7}
        dtype: float16
        """
    )
    assert r.parameters == {"scale": 0.7, "normalize": False}
    assert tensor_rules(r, ["x"])["x"].weights == (1.0, -0.5)
    assert r.dtype == "float16"


def test_breadcrumbs_and_breadcrumbs_ties(ckpts: Path) -> None:
    text = "models:\n  - model: a\n    parameters: {weight: 1, density: 0.9, gamma: 0.02}\nmerge_method: {m}\nbase_model: base\n"
    plain = mk(text.replace("{m}", "breadcrumbs"))
    assert plain.method == "breadcrumbs"
    assert plain.parameters == {
        "density": 1.0, "gamma": 0.01, "scale": 1.0, "rescale": "none", "tie_break": "torch_sort", "sign_method": "none", "sign_from": "weighted", "normalize": False,
        "divide_by": "weight_sum",
    }
    assert tensor_rules(plain, ["x"])["x"].params["gamma"] == (0.02,)
    tied = mk(text.replace("{m}", "breadcrumbs_ties"))
    assert tied.method == "breadcrumbs_ties" and tied.parameters["sign_method"] == "sum" and tied.parameters["normalize"] is False


def test_linear_base_listed_takes_part(ckpts: Path) -> None:
    r = mk("models:\n  - model: base\n    parameters: {weight: 0.3}\n  - model: a\n    parameters: {weight: 0.7}\n"
           "merge_method: linear\nbase_model: base\n")
    assert r.method == "linear" and [m.path for m in r.models] == ["base", "a"]
    assert r.parameters == {"normalize": True}
    assert tensor_rules(r, ["x"])["x"].weights == (0.3, 0.7)


def test_linear_global_weight_and_unlisted_base(ckpts: Path) -> None:
    r = mk("models:\n  - model: a\n  - model: b\n    parameters: {weight: 2}\nmerge_method: linear\nbase_model: base\n"
           "parameters: {weight: 0.5, normalize: false}\n")
    assert [m.path for m in r.models] == ["a", "b", "base"]  # mergekit appends the unlisted base as an input
    assert tensor_rules(r, ["x"])["x"].weights == (0.5, 2.0, 0.5)
    assert r.parameters == {"normalize": False}


def test_slerp_canonical_gradient_example(ckpts: Path) -> None:
    r = mk(
        """\
        models:
          - model: base
          - model: a
        merge_method: slerp
        base_model: base
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: bfloat16
        """
    )
    assert r.method == "slerp" and r.base is not None and r.base.path == "base" and [m.path for m in r.models] == ["a"]
    rules = tensor_rules(r, LLAMA)
    t = {n: rules[n].params["t"] for n in LLAMA}
    # 5 layers: layer i at position i/4, gradient of 5 points -> exactly the listed values
    assert [t[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(5)] == pytest.approx([0, 0.5, 0.3, 0.7, 1])
    assert [t[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)] == pytest.approx([1, 0.5, 0.7, 0.3, 0])
    assert t["model.layers.3.input_layernorm.weight"] == 0.5
    assert t["model.embed_tokens.weight"] == 0.5 and t["lm_head.weight"] == 0.5
    assert rules["lm_head.weight"].params["dot_threshold"] == 0.9995 and rules["lm_head.weight"].params["eps"] == 1e-8
    assert rules["lm_head.weight"].weights is None


def test_gradient_between_points(ckpts: Path) -> None:
    # 3-point gradient over 5 layers: layer 1 sits at t = 1/4 -> scaled 0.5 -> halfway between 0.2 and 0.6
    r = mk("models:\n  - model: a\nmerge_method: slerp\nbase_model: base\nparameters: {t: [0.2, 0.6, 1.0]}\n")
    rules = tensor_rules(r, LLAMA)
    assert rules["model.layers.1.mlp.up_proj.weight"].params["t"] == pytest.approx(0.4)
    assert rules["model.layers.3.mlp.up_proj.weight"].params["t"] == pytest.approx(0.8)
    assert rules["model.embed_tokens.weight"].params["t"] == pytest.approx(0.2)


def test_conditional_without_default_gets_mergekit_default(ckpts: Path) -> None:
    r = mk("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: ties\nbase_model: base\n"
           "parameters:\n  density:\n    - filter: mlp\n      value: 0.4\n")
    rules = tensor_rules(r, ["layers.0.mlp.w", "layers.0.attn.w"])
    assert rules["layers.0.mlp.w"].params["density"] == (0.4,)
    assert rules["layers.0.attn.w"].params["density"] == (1.0,)  # mergekit's default, not ours


def test_model_stock(ckpts: Path) -> None:
    r = mk("models:\n  - model: a\n  - model: b\n  - model: base\nmerge_method: model_stock\nbase_model: base\n")
    assert r.method == "model_stock" and [m.path for m in r.models] == ["a", "b"]
    assert r.parameters == {"filter_wise": False}
    assert tensor_rules(r, ["x"])["x"].weights is None


def test_slerp_needs_exactly_one_other_model(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\n  - model: b\nmerge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\n")
    assert ps == ["mk.yaml:1: models: mergekit's slerp interpolates base_model (t=0) and exactly one other model (t=1); got 2 other model(s)"]


def test_slices_form_translates_layer_ranges_weights_and_parameters(ckpts: Path) -> None:
    r = mk(
        """\
        slices:
          - sources:
              - model: a
                layer_range: [0, 2]
                parameters: {weight: 0.3}
              - model: b
                layer_range: [2, 4]
            parameters: {weight: 0.7, normalize: false}
          - sources:
              - model: b
                layer_range: [0, 1]
                parameters: {weight: 1.0}
              - model: a
                layer_range: [3, 4]
        merge_method: linear
        parameters: {weight: 0.5}
        """
    )
    assert [m.path for m in r.models] == ["a", "b"] and r.base is None
    (s0, s1) = r.slices
    assert [(s.model, s.layers, s.weight) for s in s0.sources] == [(0, (0, 2), 0.3), (1, (2, 4), 0.7)]
    assert s0.parameters == {"normalize": False}
    # the slice's weight, else the global one, as mergekit's ConfigReader looks them up
    assert [(s.model, s.layers, s.weight) for s in s1.sources] == [(1, (0, 1), 1.0), (0, (3, 4), 0.5)]
    again = recipe_from_yaml_text(r.to_yaml(), source="again.yaml")
    assert again.slices == r.slices and [m.path for m in again.models] == ["a", "b"]


def test_slices_problems_at_their_lines(ckpts: Path) -> None:
    ps = mk_problems(
        """\
        slices:
          - sources:
              - model: a
                layer_range: [0, 2]
              - model: b
                layer_range: [0, 3]
          - sources:
              - model: a
                layer_range: [2]
          - sources:
              - model: b
          - sources: []
            base_model: a
        merge_method: slerp
        base_model: a
        parameters: {t: 0.5}
        """
    )
    assert ps == [
        "mk.yaml:2: slices[0].sources: every source of a slice must span the same number of layers, got [2, 3]",
        "mk.yaml:9: slices[1].sources[0].layer_range: must be [start, end], two layer indices (end excluded), got [2]",
        "mk.yaml:11: slices[2].sources[0].layer_range: is required: [start, end], the layers taken from this model (end excluded)",
        "mk.yaml:12: slices[3].sources: is required: a non-empty list of `- model: PATH` with `layer_range: [start, end]`",
        "mk.yaml:13: slices[3].base_model: a per-slice base_model is not supported; set the top-level `base_model:`",
    ]


def test_slices_need_the_base_among_the_sources_of_base_methods(ckpts: Path) -> None:
    ps = mk_problems(
        "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n"
        "merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\n"
    )
    assert ps == ["mk.yaml:2: slices[0].sources: method 'slerp' reads the base in every slice: list the base (base) among this slice's "
                  "sources, with the layers it contributes"]
    ps = mk_problems("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n"
                     "merge_method: passthrough\n")
    assert ps == ["mk.yaml:2: slices[0].sources: method 'passthrough' takes exactly 1 model, got 2"]


def test_unsupported_method_lists_supported(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\nmerge_method: frankenstein\nbase_model: base\n")
    assert ps == [
        "mk.yaml:3: merge_method: mergekit method 'frankenstein' is not supported; supported: linear, task_arithmetic, ties, "
        "dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp, karcher, "
        "model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough"
    ]


def test_mergekit_problems_all_at_once_with_lines(ckpts: Path) -> None:
    ps = mk_problems(
        """\
        models:
          - model: a
            parameters:
              weight: 1
              density: 2
          - model: b
            parameters: {densty: 0.5}
          - model: org/hub-model
            parameters: {weight: 1}
        merge_method: ties
        base_model: base
        parameters:
          lambda: abc
          normalize: true
        tokenizer_source: union
        out_dtype: float8
        """
    )
    assert ps == [
        "mk.yaml:5: models[0].parameters.density: must be in (0, 1], got 2",
        "mk.yaml:6: models[1]: mergekit's 'ties' needs a weight for every model (mergekit fails with 'Missing required "
        "parameter weight'); give `parameters: {weight: ...}` here or a global `weight`",
        ps[2],
        "mk.yaml:13: parameters.lambda: must be a number, got 'abc'",
        "mk.yaml:16: out_dtype: unknown dtype 'float8'; did you mean 'float32'?; valid: float32, float16, bfloat16 (or leave it out to keep each tensor's dtype)",
    ]
    assert ps[2].startswith("mk.yaml:8: models[2].model: 'org/hub-model' does not exist")
    assert "cannot fetch Hugging Face hub ids" in ps[2]


def test_missing_weight_and_t(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\nmerge_method: slerp\nbase_model: base\n")
    assert ps == ["mk.yaml:3: merge_method: mergekit's 'slerp' needs the parameter 't' (it has no default)"]
    ps = mk_problems("models:\n  - model: a\nmerge_method: linear\n")
    assert ps[0].startswith("mk.yaml:2: models[0]: mergekit's 'linear' needs a weight for every model")


def test_base_required(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: task_arithmetic\n")
    assert ps == ["mk.yaml:4: merge_method: mergekit's 'task_arithmetic' needs `base_model:`"]


def test_linear_unlisted_base_without_weight(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: linear\nbase_model: base\n")
    assert ps[0].startswith("mk.yaml:5: base_model: mergekit's linear merge also averages base_model")


def test_rescale_true_for_ties_and_breadcrumbs_is_l1(ckpts: Path) -> None:
    for m in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        r = mk(f"models:\n  - model: a\n    parameters: {{weight: 1}}\nmerge_method: {m}\nbase_model: base\nparameters: {{rescale: true}}\n")
        assert r.parameters["rescale"] == "l1", m
    r = mk("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: task_arithmetic\nbase_model: base\nparameters: {rescale: true}\n")
    assert "rescale" not in r.parameters and "rescale is ignored by task_arithmetic (no sparsification), as in mergekit" in r.notes


def test_parameters_mergekit_does_not_read_are_warned_and_ignored(ckpts: Path) -> None:
    r = mk(
        "models:\n  - model: a\n    parameters: {weight: 1, normalize: false, densty: 0.5}\n    weigth: 2\nmerge_method: ties\n"
        "base_model: base\nparameters: {t: 0.3}\nbase_mdoel: x\n"
    )
    assert r.parameters["normalize"] is True and r.models[0].parameters == {} and "t" not in r.parameters
    assert list(r.warnings) == [
        "mk.yaml:8: base_mdoel: unknown mergekit key 'base_mdoel' ignored, as mergekit ignores it; did you mean 'base_model'? "
        "(mergekit keys: merge_method, models, base_model, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, slices, modules)",
        "mk.yaml:7: parameters.t: mergekit's 'ties' does not read a parameter 't'; ignored, as mergekit ignores it (it reads: int8_mask, "
        "normalize, rescale, lambda, weight, density)",
        "mk.yaml:4: models[0].weigth: unknown key 'weigth' in a mergekit model entry ignored, as mergekit ignores it (it reads: model, parameters)",
        "mk.yaml:3: models[0].parameters.normalize: 'normalize' is a global parameter of mergekit's 'ties'; mergekit ignores it per model, "
        "and so does modelsoup (move it to the top-level `parameters:` to use it)",
        "mk.yaml:3: models[0].parameters.densty: mergekit's 'ties' does not read a parameter 'densty'; ignored, as mergekit ignores it; "
        "did you mean 'density'? (it reads: int8_mask, normalize, rescale, lambda, weight, density)",
    ]
    assert "warning: mk.yaml:7: parameters.t:" in describe(r)


def test_tokenizer_and_chat_template(ckpts: Path) -> None:
    r = mk("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\ntokenizer_source: union\nchat_template: auto\n")
    assert (r.output.tokenizer_source, r.output.chat_template, r.output.pad_to_multiple_of) == ("union", "auto", None)
    (ckpts / "b" / "config.json").write_text("{}")
    r = mk("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\ntokenizer:\n  source: b\n  pad_to_multiple_of: 64\n")
    assert (r.output.tokenizer_source, r.output.pad_to_multiple_of) == (str(ckpts / "b"), 64)
    again = recipe_from_yaml_text(r.to_yaml(), "again.yaml")
    assert again.output == r.output
    ps = mk_problems("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\ntokenizer_source: base\n"
                     "tokenizer:\n  source: a+lora\n  tokens: {x: {source: a}}\nchat_template: chatml\n")
    assert ps == [
        "mk.yaml:7: tokenizer: give `tokenizer_source:` or the `tokenizer:` block, not both (mergekit refuses both)",
        "mk.yaml:8: tokenizer.source: LoRA references ('a+lora') are not supported here (only as a merged model); merge the adapter into its model first",
        "mk.yaml:9: tokenizer.tokens: added or re-sourced `tokens:` build new embedding rows, which is not supported; remove them",
        "mk.yaml:10: chat_template: 'chatml': give the template's jinja text, or auto (the models' most common template); mergekit's bundled "
        "named templates are not shipped with modelsoup",
    ]


def test_unknown_mergekit_key(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_mdoel: base\n")
    assert ps == ["mk.yaml:4: merge_method: mergekit's 'model_stock' needs `base_model:`"]


def test_lora_reference_needs_an_adapter_folder(ckpts: Path) -> None:
    ps = mk_problems("models:\n  - model: a+lora\n    parameters: {weight: 1}\n  - model: a+b+c\n    parameters: {weight: 1}\nmerge_method: linear\n")
    assert sorted(ps) == [
        "mk.yaml:2: models[0].model: 'lora' does not exist; `adapter:` is a PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors)",
        "mk.yaml:4: models[1].model: 'a+b+c' is not a model reference: mergekit reads `MODEL+LORA` with exactly one '+'",
    ]


def test_load_file_detects_mergekit_and_round_trips(ckpts: Path) -> None:
    (ckpts / "mk.yaml").write_text(
        "models:\n  - model: a\n    parameters: {weight: [0.2, 1.0], density: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n"
        "merge_method: ties\nbase_model: base\nparameters:\n  density: [{filter: mlp, value: 0.7}]\n  lambda: 1.1\nout_dtype: torch.float16\n"
    )
    r = load_recipe(ckpts / "mk.yaml")
    assert r.source_format == "mergekit" and r.dtype == "float16"
    text = r.to_yaml()
    assert text.startswith("# translated from the mergekit recipe")
    back = recipe_from_yaml_text(text, "native.yaml")
    assert back.source_format == "native"
    assert tensor_rules(back, LLAMA) == tensor_rules(r, LLAMA)
    assert back.parameters == r.parameters


def test_mergekit_dict_input(ckpts: Path) -> None:
    r = recipe_from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    assert r.source_format == "mergekit" and r.method == "linear"


def test_a_malformed_required_parameter_is_reported_once_as_malformed(ckpts: Path) -> None:
    # mergekit's old `pattern:` conditions: the problem is the key, not a missing t
    ps = mk_problems("models:\n  - model: a\nmerge_method: slerp\nbase_model: base\nparameters:\n  t:\n    - pattern: self_attn\n"
                     "      value: [0, 1]\n    - value: 0.5\n")
    assert ps == ["mk.yaml:6: parameters.t: condition [0] has unknown key(s) ['pattern']; a condition is {filter: <substring>, value: ...}"]

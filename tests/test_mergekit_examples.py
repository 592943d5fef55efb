"""mergekit's own example recipes run unchanged in modelsoup and give what mergekit's rules give.

The recipes are mergekit's ``examples/*.yml`` (arcee-ai/mergekit, LGPL-3.0), copied verbatim into
tests/golden/mergekit/examples/ below a one-line comment naming the source. They name hub models
(``psmathur/orca_mini_v3_13b``); mergekit takes a relative path that exists as a local model, so each test writes
tiny Llama-shaped stand-ins (40 layers of hidden size 4) at those paths under a temporary folder, makes it the
working directory and runs ``merge(recipe, out)``.

Expected values follow mergekit 0.1.5's source: gradients from ``config.py`` ``evaluate_setting`` with layer
``i`` of ``n`` at ``t = i / (n - 1)`` and the weights outside the layer stack at ``t = 0`` (``plan.py``); TIES
top-k with at least one entry kept (``sparsify.magnitude``), the sign elected on weighted deltas, the divisor the
sum of the agreeing weights; slices take the embeddings from the first slice and the final norm and lm_head from
the last. They are computed by the slow loops of tests/reference.py (float64), so they share no code with the
library. mergekit computes in the recipe's ``dtype`` (float16 here) where modelsoup computes in float32 and casts at
the end, so the outputs agree to half-precision rounding (tests/tolerances.py ``HALF``), not bit for bit.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modelsoup import merge

from . import reference as ref
from .golden.mergekit_fixtures import llama_config
from .tolerances import HALF

EXAMPLES = Path(__file__).parent / "golden" / "mergekit" / "examples"

LAYERS = 40  # the examples' largest layer_range end
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4, 8, 2, 8
LAYER_TENSORS = {
    "input_layernorm": (HIDDEN,),
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "post_attention_layernorm": (HIDDEN,),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

ORCA, PLATYPUS = "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"
WIZARD_LM, WIZARD_MATH, LLAMA2 = "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0", "TheBloke/Llama-2-13B-fp16"
MISTRAL, MISTRAL_INSTRUCT, BIOMISTRAL = "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B"

Tensors = dict[str, torch.Tensor]


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    out.update({f"model.layers.{i}.{m}.weight": s for i in range(layers) for m, s in LAYER_TENSORS.items()})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def stand_in(name: str) -> Tensors:
    """One model: a shared ancestor plus noise seeded by the model's name (so every model differs, deterministically)."""
    g0, g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return {k: torch.randn(s, generator=g0) + 0.3 * torch.randn(s, generator=g) for k, s in shapes().items()}


def write_stand_ins(root: Path, recipe: Path) -> dict[str, Tensors]:
    """Write every model the recipe names (not its stage names) at that path under ``root``; return their tensors."""
    docs = list(yaml.safe_load_all(recipe.read_text(encoding="utf-8")))
    stages = {d["name"] for d in docs if d.get("name")}
    names = {d["base_model"] for d in docs if d.get("base_model")}
    names |= {m["model"] for d in docs for m in d.get("models") or []}
    names |= {s["model"] for d in docs for sl in d.get("slices") or [] for s in sl["sources"]}
    models: dict[str, Tensors] = {}
    for name in sorted(names - stages):
        mistral = "mistral" in name.lower()
        config = llama_config() | {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"], "model_type": "mistral" if mistral else "llama",
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "head_dim": HIDDEN // HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
        }
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        models[name] = stand_in(name)
        save_file(models[name], str(folder / "model.safetensors"), metadata={"format": "pt"})
    return models


def run_example(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Tensors], Tensors, dict]:
    """(stand-ins by name, output tensors, output config.json) of one example run in a fresh folder."""
    recipe = EXAMPLES / example
    root = tmp_path / "work"
    root.mkdir()
    models = write_stand_ins(root, recipe)
    monkeypatch.chdir(root)  # mergekit resolves a model name as a local path when it exists there
    result = merge(recipe, tmp_path / "out")
    out: Tensors = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(f))
    assert result.tensors == len(out)
    return models, out, json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))


def gradient(values: float | list[float], t: float) -> float:
    """mergekit's ``evaluate_setting`` for a number or a list of numbers (piecewise linear over [0, 1])."""
    if not isinstance(values, list):
        return float(values)
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def position(name: str) -> float:
    """mergekit's t of a tensor: i / (n - 1) for layer i of the n-layer stack, 0 outside it."""
    return int(name.split(".")[2]) / (LAYERS - 1) if name.startswith("model.layers.") else 0.0


def assert_half(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """``actual`` (written in half precision) is ``expected`` (float64) cast to that dtype, to half rounding."""
    torch.testing.assert_close(actual.double(), expected.to(actual.dtype).double(), **HALF[actual.dtype], msg=lambda m: f"{name}: {m}")


def assert_llama_output(out: Tensors, config: dict, dtype: torch.dtype, layers: int = LAYERS) -> None:
    assert len(out) == layers * len(LAYER_TENSORS) + len(OUTSIDE)
    assert sorted(out) == sorted(shapes(layers))
    assert {t.dtype for t in out.values()} == {dtype}
    assert all(out[k].shape == s for k, s in shapes(layers).items())
    assert config["num_hidden_layers"] == layers


# The tensors whose values are checked against the formulas: the first, an inner and the last layer (the
# gradients' ends and a point between knots), attention, MLP and norm weights, and the weights outside the stack.
CHECKED = [f"model.layers.{i}.{m}.weight" for i in (0, 10, 39) for m in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")]
CHECKED += list(OUTSIDE)


def test_every_example_is_covered() -> None:
    covered = {"linear.yml", "gradient-slerp.yml", "ties.yml", "bio-merge.yml", "orcamini-platy-44layer.yml", "arcee_fusion.yml", "mega.yml"}
    files = {p.name for p in EXAMPLES.glob("*.yml")}
    assert files == covered
    for p in EXAMPLES.glob("*.yml"):
        assert p.read_text(encoding="utf-8").startswith(f"# mergekit's examples/{p.name} (arcee-ai/mergekit @ ")


def test_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("linear.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16)
    weights = {ORCA: 1.0, WIZARD_LM: 0.3, PLATYPUS: 0.5}  # normalize defaults to true: divided by 1.8
    for k in out:  # cheap enough for every tensor
        expected = sum(w * m[n][k].double() for n, w in weights.items()) / sum(weights.values())
        assert_half(out[k], expected, k)


def slerp_t(name: str) -> float:
    """gradient-slerp.yml's t: the first filter that is a substring of the tensor name, else the 0.5 fallback."""
    if "self_attn" in name:
        return gradient([0, 0.5, 0.3, 0.7, 1], position(name))
    if "mlp" in name:
        return gradient([1, 0.5, 0.7, 0.3, 0], position(name))
    return 0.5


def test_gradient_slerp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("gradient-slerp.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16)
    for k in CHECKED:
        assert_half(out[k], ref.slerp(m[ORCA][k], m[PLATYPUS][k], slerp_t(k)), k)  # base_model is the t = 0 end
    # the gradients' ends: layer 0's attention is the base, its MLP the other model; the last layer the reverse
    torch.testing.assert_close(out["model.layers.0.self_attn.k_proj.weight"], m[ORCA]["model.layers.0.self_attn.k_proj.weight"].half(), **HALF[torch.float16])
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], m[PLATYPUS]["model.layers.0.mlp.up_proj.weight"].half(), **HALF[torch.float16])
    torch.testing.assert_close(out["model.layers.39.self_attn.k_proj.weight"], m[PLATYPUS]["model.layers.39.self_attn.k_proj.weight"].half(), **HALF[torch.float16])
    torch.testing.assert_close(out["model.layers.39.mlp.up_proj.weight"], m[ORCA]["model.layers.39.mlp.up_proj.weight"].half(), **HALF[torch.float16])


def mk_ties(tensors: list[torch.Tensor], base: torch.Tensor, weights: list[float], density: list[float], normalize: bool) -> torch.Tensor:
    """mergekit's ties: magnitude top-k keeping at least one entry, weighted sign sum, divide by the agreeing weights."""
    return ref.ties(tensors, base, weights, density, keep_at_least_one=True, sign_method="sum", sign_from="weighted",
                    normalize=normalize, divide_by="weight_sum")


def test_ties(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("ties.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16)
    for k in CHECKED:
        t = position(k)
        weights = [1.0, gradient([0, 0.3, 0.7, 1], t), 0.5 if "mlp" in k else 0.0]
        density = [gradient([1, 0.7, 0.1], t), 0.5, 0.33]
        assert_half(out[k], mk_ties([m[ORCA][k], m[PLATYPUS][k], m[WIZARD_MATH][k]], m[LLAMA2][k], weights, density, normalize=True), k)
    # lm_head sits at t = 0 and has no "mlp": only orca (density 1, weight 1) has a weight, so it is orca itself
    torch.testing.assert_close(out["lm_head.weight"], m[ORCA]["lm_head.weight"].half(), **HALF[torch.float16])


def test_bio_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("bio-merge.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16)
    assert config["architectures"] == ["MistralForCausalLM"]
    for k in CHECKED:
        expected = mk_ties([m[MISTRAL_INSTRUCT][k], m[BIOMISTRAL][k]], m[MISTRAL][k], [0.5, 0.5], [0.5, 0.5], normalize=False)
        assert_half(out[k], expected, k)


def test_orcamini_platy_44layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("orcamini-platy-44layer.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16, layers=24 + 20)  # [0, 24) of orca, then [20, 40) of platypus
    for j in range(44):
        source, i = (ORCA, j) if j < 24 else (PLATYPUS, j - 4)
        for t in LAYER_TENSORS:
            assert torch.equal(out[f"model.layers.{j}.{t}.weight"], m[source][f"model.layers.{i}.{t}.weight"].half()), (j, t)
    # mergekit's plan.py: the weights before the stack from the first slice, those after it from the last
    assert torch.equal(out["model.embed_tokens.weight"], m[ORCA]["model.embed_tokens.weight"].half())
    assert torch.equal(out["model.norm.weight"], m[PLATYPUS]["model.norm.weight"].half())
    assert torch.equal(out["lm_head.weight"], m[PLATYPUS]["lm_head.weight"].half())


def test_arcee_fusion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, out, config = run_example("arcee_fusion.yml", tmp_path, monkeypatch)
    # dtype: bfloat16 is written as bfloat16. mergekit 0.1.5 writes float32 tensors here: its fusion mask is
    # float32 (``.float()``), which promotes the result, and it only casts on save when out_dtype is set.
    assert_llama_output(out, config, torch.bfloat16)
    taken = 0
    for k in out:
        a, b = m["model_a"][k].bfloat16(), m["model_b"][k].bfloat16()
        assert_half(out[k], ref.arcee_fusion(m["model_b"][k], m["model_a"][k]), k)  # base_model model_a
        assert bool(((out[k] == a) | (out[k] == b)).all()), k  # each entry is one model's, never a mix
        taken += int((out[k] != a).sum())
    # the threshold median + 1.5 IQR takes a small minority of model_b's changes, and not none of them
    assert 0 < taken < 0.2 * sum(t.numel() for t in out.values())


def test_mega_two_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mergekit-multi form: stage "gradient-slerp" (the slerp of gradient-slerp.yml) feeds stage "gradient-slerp-ties"
    m, out, config = run_example("mega.yml", tmp_path, monkeypatch)
    assert_llama_output(out, config, torch.float16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup-stages-")]  # the intermediate is removed
    for k in CHECKED:
        stage = ref.slerp(m[ORCA][k], m[PLATYPUS][k], slerp_t(k)).half().float()  # the first stage is written in float16
        t = position(k)
        weights, density = [1.0, 0.5 if "mlp" in k else 0.0], [gradient([1, 0.7, 0.1], t), 0.33]
        assert_half(out[k], mk_ties([stage, m[WIZARD_MATH][k]], m[LLAMA2][k], weights, density, normalize=True), k)

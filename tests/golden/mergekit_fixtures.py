"""Tiny Llama-shaped checkpoints that the mergekit golden outputs were computed from.

``build_fixtures(root)`` writes ``root/models/{base,ft_a,ft_b,ft_c}`` (config.json + model.safetensors,
float32) and returns ``{relative path: sha256}`` for every file written; ``tests/golden/mergekit/manifest.json``
records the same hashes, so a test can check that the fixtures it rebuilds are byte-identical to the ones
mergekit saw. Only torch, safetensors and json are used (no mergekit), and every value comes from a
``torch.Generator`` with a fixed seed, so the files are the same on every machine.

The deltas are shaped so that each branch of the methods is reached:

* ``base``: matrices ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02).
* ``ft_a``: base + dense N(0, 0.01).
* ``ft_b``: base + a delta that is ``-0.8 * delta_a`` on about half of the entries (sign conflicts with
  ``ft_a``) and independent N(0, 0.01) elsewhere.
* ``ft_c``: base + a sparse delta: about 70% exact zeros, the rest N(0, 0.015).

So ``|ft_a - base|`` has median ~0.0067: nearswap with ``t: 0.005`` swaps fully where ``|a - b| <= t``
and only partly elsewhere; ram with ``epsilon: 0.005`` keeps roughly 60% of the dense delta entries, none of
ft_c's zeros, and leaves entries where one, two or three models contribute.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 8
INTERMEDIATE = 16
LAYERS = 4
HEADS = 2
KV_HEADS = 2
VOCAB = 32

MODELS = ("base", "ft_a", "ft_b", "ft_c")


def llama_config() -> dict:
    """A config.json that transformers and mergekit accept for a LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 64,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, in a fixed order (the order the generators are drawn in)."""
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * head_dim, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * head_dim, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * head_dim, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _is_norm(name: str) -> bool:
    return "layernorm" in name or name == "model.norm.weight"


def fixture_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """The four models' tensors, float32, from fixed seeds (one generator per role)."""
    g_base = torch.Generator().manual_seed(1234)
    g_a = torch.Generator().manual_seed(2345)
    g_b = torch.Generator().manual_seed(3456)
    g_c = torch.Generator().manual_seed(4567)
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODELS}
    for name, shape in tensor_shapes().items():
        noise = torch.randn(shape, generator=g_base, dtype=torch.float32) * 0.02
        base = (1.0 + noise) if _is_norm(name) else noise
        d_a = torch.randn(shape, generator=g_a, dtype=torch.float32) * 0.01
        conflict = torch.rand(shape, generator=g_b) < 0.5
        d_b = torch.where(conflict, -0.8 * d_a, torch.randn(shape, generator=g_b, dtype=torch.float32) * 0.01)
        keep_c = torch.rand(shape, generator=g_c) < 0.3
        d_c = torch.where(keep_c, torch.randn(shape, generator=g_c, dtype=torch.float32) * 0.015, 0.0)
        out["base"][name] = base.contiguous()
        out["ft_a"][name] = (base + d_a).contiguous()
        out["ft_b"][name] = (base + d_b).contiguous()
        out["ft_c"][name] = (base + d_c).contiguous()  # exact zeros in ft_c - base where keep_c is false
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_fixtures(root: Path) -> dict[str, str]:
    """Write the fixture models under ``root/models/`` and return ``{path relative to root: sha256}``."""
    root = Path(root)
    written: dict[str, str] = {}
    config_text = json.dumps(llama_config(), indent=2, sort_keys=True) + "\n"
    for model, tensors in fixture_state_dicts().items():
        folder = root / "models" / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config_text, encoding="utf-8")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for filename in ("config.json", "model.safetensors"):
            rel = f"models/{model}/{filename}"
            written[rel] = _sha256(root / rel)
    return written

"""Tiny real models and real PEFT LoRA adapters made with peft, for the adapter tests.

Every adapter is made by peft itself (``get_peft_model`` + ``save_pretrained``) with its ``lora_B`` (zero at
initialisation) and its ``modules_to_save`` copies filled from a seeded generator, so it changes the model;
:func:`make_lora` also returns peft's own ``merge_and_unload`` state dict of the adapted model, the reference
that modelsoup's reading is checked against.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def quiet() -> Any:
    """Silence transformers' and peft's load reports and progress bars."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        transformers.logging.set_verbosity(old)


def tiny_bert(path: Path, *, seed: int = 0, num_labels: int = 2, head: bool = True, hidden: int = 16) -> Path:
    """A seeded two-layer BERT (with a sequence-classification head unless ``head`` is False) saved at ``path``."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  num_labels=num_labels, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg) if head else transformers.BertModel(cfg)
    with quiet():
        model.save_pretrained(path)
    return path


def tiny_gpt2(path: Path, *, seed: int = 0) -> Path:
    """A seeded two-layer GPT-2 (Conv1D layers: LoRA on them is ``fan_in_fan_out``) saved at ``path``."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(seed)
    with quiet():
        transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def load_model(path: Path, kind: str = "bert") -> torch.nn.Module:
    import transformers

    cls = {"bert": transformers.BertForSequenceClassification, "gpt2": transformers.GPT2LMHeadModel,
           "bertmodel": transformers.BertModel}[kind]
    with quiet():
        return cls.from_pretrained(path).eval()


def make_lora(base: Path, out: Path, *, seed: int, kind: str = "bert", scale: float = 0.2, **config: Any) -> dict[str, torch.Tensor]:
    """A real peft LoRA adapter of the model at ``base``, saved at ``out``; returns peft's merged state dict of it.

    ``config``: :class:`peft.LoraConfig` fields (default r=4, alpha=8, on query/value, the classifier in modules_to_save).
    """
    import peft

    opts: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    if kind == "bert":
        opts.update(modules_to_save=["classifier"], task_type="SEQ_CLS")
    opts.update(config)
    model = load_model(base, kind)
    with quiet():
        pm = peft.get_peft_model(model, peft.LoraConfig(**opts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or ("modules_to_save" in name and "original_module" not in name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    with quiet():
        pm.save_pretrained(out)
        merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_model(base: Path, adapter: Path, kind: str = "bert") -> torch.nn.Module:
    """``PeftModel.from_pretrained(base, adapter)`` in eval mode."""
    import peft

    with quiet():
        return peft.PeftModel.from_pretrained(load_model(base, kind), adapter).eval()

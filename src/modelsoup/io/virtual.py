"""A virtual checkpoint: tensors generated on demand, deterministically from (seed, tensor name), at any size.

With :class:`~modelsoup.io.sinks.NullSink` it runs the real plan and engine on a model of any size (a
Llama-70B has 70.6 B parameters: 141 GB in bfloat16 per model) with no disk, so a benchmark can show
that memory stays bounded by the engine's budget and largest tensor, not by the model
(``benchmarks/virtual_merge.py``). Each read draws the tensor afresh; nothing is kept.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoints import Checkpoint

# Llama-family shapes (Hugging Face LlamaForCausalLM names), as their config.json give them.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "llama-70b": {"hidden": 8192, "layers": 80, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 128256},
    "llama-8b": {"hidden": 4096, "layers": 32, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256},
    "llama-1b": {"hidden": 2048, "layers": 16, "intermediate": 8192, "heads": 32, "kv_heads": 8, "vocab": 128256},
    "llama-tiny": {"hidden": 64, "layers": 2, "intermediate": 176, "heads": 4, "kv_heads": 2, "vocab": 256},
}


def llama_shapes(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, *,
                 tie_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama model in Hugging Face form, in file order.

    Args:
        hidden: hidden size; the head size is ``hidden // heads``.
        layers: decoder layers.
        intermediate: MLP size.
        heads: attention heads.
        kv_heads: key/value heads (grouped-query attention).
        vocab: vocabulary size.
        tie_embeddings: leave out ``lm_head.weight`` (tied to the embeddings, as such checkpoints are saved).

    Raises:
        CheckpointError: a size that is not positive, or heads that do not divide the hidden size or each other.
    """
    sizes = {"hidden": hidden, "layers": layers, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads, "vocab": vocab}
    bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < (0 if k == "layers" else 1)]
    if bad:
        raise CheckpointError(f"llama_shapes: {', '.join(bad)}; every size must be a positive integer (layers may be 0)")
    if hidden % heads or heads % kv_heads:
        raise CheckpointError(f"llama_shapes: hidden {hidden}, heads {heads}, kv_heads {kv_heads}: heads must divide hidden and kv_heads divide heads")
    hd = hidden // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (heads * hd, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv_heads * hd, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv_heads * hd, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * hd)
        out[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        out[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    if not tie_embeddings:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def virtual_seed(seed: int, name: str) -> int:
    """Seed of one virtual tensor's generator: depends on the checkpoint's seed and the tensor name only."""
    return int.from_bytes(hashlib.sha256(f"virtual\0{seed}\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class VirtualCheckpoint(Checkpoint):
    """A checkpoint whose tensors are drawn on demand: N(0, scale^2) from a generator seeded by (seed, name).

    The same seed, name, dtype, scale and block give the same bits on every read, in any process; two
    names (or two seeds) give different tensors. Norm weights (1-D tensors whose name ends in ``norm.weight``)
    are drawn around 1, as trained ones are.

    Args:
        shapes: tensor name -> shape, in file order (e.g. :func:`llama_shapes`).
        seed: the checkpoint's seed (one per virtual model).
        dtype: the stored dtype (bfloat16, float16 or float32).
        scale: standard deviation of the weights.
        block: None draws every element; a number draws a random block of that many elements per tensor and
            repeats it (the same determinism, a fraction of the cost: for benchmarks of the engine rather than
            of the random number generator).
        label: how messages name it.

    Raises:
        CheckpointError: a dtype that is not a float, a negative dimension or a block below 1.
    """

    kind = "virtual"

    def __init__(self, shapes: Mapping[str, Iterable[int]], *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, scale: float = 0.02,
                 block: int | None = None, label: str | None = None) -> None:
        super().__init__(label or f"virtual(seed={seed})")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"{self.label}: dtype {dtype} is not bfloat16, float16 or float32")
        if block is not None and block < 1:
            raise CheckpointError(f"{self.label}: block {block}: give a positive number of elements, or None to draw every element")
        self.seed, self.dtype, self.scale, self.block = int(seed), dtype, float(scale), block
        self.reads = 0  # tensors read so far (tests count reads)
        self._lock = threading.Lock()
        for name, shape in shapes.items():
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise CheckpointError(f"{self.label}: tensor '{name}' has a negative dimension {list(dims)}")
            self._meta[name] = (dtype, dims)

    @classmethod
    def llama(cls, preset: str = "llama-70b", *, layers: int | None = None, tie_embeddings: bool = False, **options: Any) -> VirtualCheckpoint:
        """A virtual Llama of a preset's shapes (:data:`LLAMA_PRESETS`), optionally with only its first ``layers`` layers.

        Args:
            preset: ``llama-70b``, ``llama-8b``, ``llama-1b`` or ``llama-tiny``.
            layers: keep the first this many decoder layers (None: all).
            tie_embeddings: no ``lm_head.weight``.
            options: :class:`VirtualCheckpoint` options (seed, dtype, scale, block, label).

        Raises:
            CheckpointError: an unknown preset, or more layers than it has.
        """
        if preset not in LLAMA_PRESETS:
            raise CheckpointError(f"unknown virtual model preset {preset!r}; choose one of {', '.join(LLAMA_PRESETS)}")
        sizes = dict(LLAMA_PRESETS[preset])
        if layers is not None:
            if not 0 <= layers <= sizes["layers"]:
                raise CheckpointError(f"{preset} has {sizes['layers']} layers; give layers from 0 to {sizes['layers']}, got {layers}")
            sizes["layers"] = layers
        options.setdefault("label", f"{preset}(seed={options.get('seed', 0)})")
        return cls(llama_shapes(**sizes, tie_embeddings=tie_embeddings), **options)

    @property
    def parameters(self) -> int:
        """Number of elements of all tensors."""
        return sum(math.prod(shape) for _, shape in self._meta.values())

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self._meta[name]  # a KeyError for a name it does not have, as every checkpoint
        gen = torch.Generator().manual_seed(virtual_seed(self.seed, name))
        n = math.prod(shape)
        with self._lock:
            self.reads += 1
        around = 1.0 if len(shape) == 1 and name.endswith("norm.weight") else 0.0
        t = torch.randn(min(n, self.block or n), generator=gen, dtype=dtype).mul_(self.scale)
        if around:
            t.add_(around)
        if t.numel() < n:
            t = t.repeat(-(-n // t.numel()))[:n]
        return t.view(shape)

    def identity(self, name: str) -> tuple[Any, ...] | None:
        if name not in self._meta:
            return None
        dtype, shape = self._meta[name]
        return ("virtual", self.seed, str(dtype), self.scale, self.block, name, shape)


__all__ = ["LLAMA_PRESETS", "VirtualCheckpoint", "llama_shapes", "virtual_seed"]

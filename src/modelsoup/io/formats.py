"""File names of weights (which suffixes are torch pickles, which make an output a single file, which are never copied) and tensor sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

# PyTorch pickles; `.pth.tar` is timm's name for the same zip format.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
# Weight files of any framework: never copied next to merged weights as if they were config or tokenizer files.
FOREIGN_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".mlmodel", ".pb")
# An output with one of these suffixes is a single weights file; any other name is a folder.
FILE_OUTPUT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def weights_suffix(path: str | Path) -> str | None:
    """The weights suffix a name ends with (``.pth.tar`` before ``.tar``), lower-cased, or None."""
    name = Path(path).name.lower()
    return next((s for s in FILE_OUTPUT_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def is_torch_file(path: str | Path) -> bool:
    """Whether the name is a PyTorch pickle's (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``)."""
    return weights_suffix(path) in TORCH_SUFFIXES


def is_file_output(out: str | Path) -> bool:
    """Whether an output name is a single weights file (``soup.safetensors``) rather than a folder (``wise-ft-0.5``)."""
    return weights_suffix(out) is not None


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of a contiguous tensor of this dtype and shape."""
    return math.prod(shape) * dtype.itemsize

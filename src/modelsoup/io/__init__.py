"""Reading and writing checkpoints, lazily: safetensors first, torch pickles only with weights_only."""

from .checkpoints import Checkpoint, open_checkpoint
from .virtual import VirtualCheckpoint, llama_shapes

__all__ = ["Checkpoint", "VirtualCheckpoint", "llama_shapes", "open_checkpoint"]

"""Reading and writing checkpoints, lazily: safetensors first, torch pickles only with weights_only."""

from .checkpoints import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]

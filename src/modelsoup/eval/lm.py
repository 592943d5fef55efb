"""Causal language-model perplexity on a text file (Hugging Face ``AutoModelForCausalLM``).

The text is tokenised as one stream and cut into consecutive blocks of ``max_length`` tokens; each
block is scored on its own (no context carried between blocks), every token after the first of a
block is predicted. Perplexity = exp(mean negative log-likelihood per predicted token). The score soups
maximise is ``neg_perplexity`` = -perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EvaluatorError
from .base import Score, file_digest, timing
from .module import ModuleEvaluator, model_output_logits, to_device
from .text import TOKENIZER_FILES, _folder_digest, load_hf_model, read_records


def read_text(path: Path, text_column: str) -> str:
    """The whole text of a .txt/.md file, or the ``text_column`` of a CSV/JSONL file joined by blank lines."""
    if not path.is_file():
        raise EvaluatorError(f"{path}: no such text file")
    if path.suffix in (".txt", ".md", ".text", ""):
        return path.read_text(encoding="utf-8")
    return "\n\n".join(str(r[text_column]) for r in read_records(path, [text_column]))


class PerplexityEvaluator(ModuleEvaluator):
    """Perplexity of a causal LM on a text file; score = -perplexity (higher is better).

    Args:
        model: a model folder (``AutoModelForCausalLM``) or a loaded model (then give ``tokenizer``).
        data: .txt/.md file, or CSV/JSONL with a ``text_column``.
        max_length: tokens per block.
        batch_size: blocks per forward pass.
        max_tokens: use only the first ``max_tokens`` tokens of the stream.
        options: see :class:`ModuleEvaluator`.
    """

    metric = "neg_perplexity"
    bar_unit = "tok"

    def __init__(self, model: str | Path | nn.Module, data: str | Path, *, tokenizer: Any = None, text_column: str = "text",
                 max_length: int = 512, batch_size: int = 4, max_tokens: int | None = None, **options: Any) -> None:
        self.folder, module, tokenizer = load_hf_model(model, tokenizer, "AutoModelForCausalLM")
        if max_length < 2:
            raise EvaluatorError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.data_path = Path(data)
        self.text_column = text_column
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        ids = tokenizer(read_text(self.data_path, text_column), add_special_tokens=False)["input_ids"]
        if max_tokens:
            ids = ids[:max_tokens]
        blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        self._blocks = [b for b in blocks if len(b) >= 2]
        if not self._blocks:
            raise EvaluatorError(f"{self.data_path}: the text has fewer than 2 tokens")
        ignore = tuple(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()) + (r"(^|\.)position_ids$",)
        options.setdefault("ignore_unexpected", ignore)
        super().__init__(module, **options)

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        # full blocks in batches; the shorter last block alone, so that no padding is ever needed
        full = [b for b in self._blocks if len(b) == self.max_length]
        for i in range(0, len(full), self.batch_size):
            yield {"input_ids": torch.tensor(full[i : i + self.batch_size], dtype=torch.long)}
        for b in self._blocks:
            if len(b) != self.max_length:
                yield {"input_ids": torch.tensor([b], dtype=torch.long)}

    def data_size(self) -> int | None:
        return sum(len(b) - 1 for b in self._blocks)

    def batch_loss(self, call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, int]:
        ids = batch["input_ids"]
        logits = model_output_logits(call(input_ids=ids)).float()
        pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        return torch.nn.functional.cross_entropy(pred, target, reduction="sum"), int(target.numel())

    def evaluate(self, state: Mapping[str, torch.Tensor], *, label: str | None = None) -> Score:
        t0 = time.perf_counter()
        self.load(state, label=label)
        self.module.eval()
        total, tokens = 0.0, 0
        with torch.inference_mode(), self._bar(label) as bar:
            for batch in self.batches():
                loss, n = self.batch_loss(self.module, to_device(batch, self.device))
                total += float(loss)
                tokens += n
                bar.update(n)
        nll = total / tokens
        ppl = math.exp(min(nll, 700.0))
        m = timing({"perplexity": ppl, "loss": nll, "tokens": float(tokens), "examples": float(len(self._blocks))}, time.perf_counter() - t0)
        m["neg_perplexity"] = -ppl
        return Score(-ppl, self.metric, m)

    def with_data(self, data: str | Path) -> PerplexityEvaluator:
        """An evaluator of the same model on another text (e.g. the test split), sharing the module."""
        other = PerplexityEvaluator(self.module, data, tokenizer=self.tokenizer, text_column=self.text_column, max_length=self.max_length,
                                    batch_size=self.batch_size, max_tokens=self.max_tokens, progress=self.progress, bn_loader=self.bn_loader)
        other.folder = self.folder
        other.share_module(self)
        return other

    def _identity_parts(self) -> dict[str, Any]:
        parts = super()._identity_parts()
        parts["data"] = {"file": str(self.data_path), "sha256": file_digest(self.data_path), "text_column": self.text_column,
                         "max_length": self.max_length, "max_tokens": self.max_tokens}
        if self.folder is not None:
            parts["tokenizer"] = _folder_digest(self.folder, TOKENIZER_FILES)
        return parts

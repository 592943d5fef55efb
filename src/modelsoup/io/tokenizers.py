"""Which tokenizer an output gets, and the check that every model's token rows mean the same tokens.

mergekit's ``tokenizer_source`` (base, union, a model) and ``tokenizer: {source: ...}`` build an output vocabulary
and re-order each model's embedding and LM-head rows to it. When every model has the same vocabulary as the source
and the embedding has exactly one row per token (a ``pad_to_multiple_of`` the token count already is a multiple of),
that re-ordering is the identity and the rows merge as they are: that case is run here. Any other (a model with other
tokens or another order, rows beyond the tokens, padding rows, added ``tokens:``) would need rows built for tokens some
model lacks (mergekit zero-fills or averages them), and is refused, never merged as if the rows lined up.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, TokenizerError
from .checkpoints import resolve_within

# A tokenizer file larger than this is refused (the largest real ones are ~30 MB).
MAX_TOKENIZER_BYTES = 256 << 20


def _file(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a file that stays inside the model folder, None if absent.

    Raises:
        TokenizerError: a link that leaves the folder, or a file too large to be a tokenizer.
    """
    p = folder / name
    if not os.path.lexists(p):
        return None
    try:
        real = resolve_within(p, folder, "copy the file into the model folder")
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    if not real.is_file():
        return None
    if real.stat().st_size > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{p}: {real.stat().st_size} bytes is larger than any tokenizer file ({MAX_TOKENIZER_BYTES >> 20} MB); refused")
    return real

# Tensors whose first axis is the vocabulary (mergekit marks them in its architecture files).
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|lm_head|embed_out)\.weight$")


def vocabulary(folder: Path) -> dict[str, int] | None:
    """token -> id of a Hugging Face tokenizer folder (tokenizer.json, else vocab.json / vocab.txt); None if none can be read."""
    tj = _file(folder, "tokenizer.json")
    try:
        if tj is not None:
            data = json.loads(tj.read_text(encoding="utf-8"))
            model = data.get("model", {}) if isinstance(data, dict) else {}
            raw = model.get("vocab")
            vocab: dict[str, int] = {}
            if isinstance(raw, dict):
                vocab = {str(k): int(v) for k, v in raw.items()}
            elif isinstance(raw, list):  # Unigram: [[piece, score], ...], ids in order
                vocab = {str(e[0]): i for i, e in enumerate(raw)}
            else:
                return None
            for t in data.get("added_tokens") or []:
                vocab[str(t["content"])] = int(t["id"])
            return vocab
        vj, vt = _file(folder, "vocab.json"), _file(folder, "vocab.txt")
        if vj is not None:
            vocab = {str(k): int(v) for k, v in json.loads(vj.read_text(encoding="utf-8")).items()}
        elif vt is not None:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(vt.read_text(encoding="utf-8").splitlines())}
        else:
            return None
        added = _file(folder, "added_tokens.json")
        if added is not None:
            vocab.update({str(k): int(v) for k, v in json.loads(added.read_text(encoding="utf-8")).items()})
        return vocab
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def shared_vocabulary(source: tuple[str, Path | None], models: Sequence[tuple[str, Path | None]], rows: int | None,
                      pad_to_multiple_of: int | None) -> None:
    """Check that every model has the source's vocabulary and the embedding one row per token (padded).

    Args:
        source: (label, folder) of the tokenizer the output gets.
        models: (label, folder) of every model whose rows are merged.
        rows: the number of rows of the vocabulary tensors (None: the models have none).
        pad_to_multiple_of: mergekit's padding of the vocabulary size.

    Raises:
        TokenizerError: a tokenizer that cannot be read, a different vocabulary, or rows that do not match the tokens.
    """
    label, folder = source
    want = vocabulary(folder) if folder is not None else None
    if want is None:
        raise TokenizerError(f"the tokenizer of {label} cannot be read (no tokenizer.json, vocab.json or vocab.txt in a model folder), so "
                             "it cannot be checked that every model's token rows mean its tokens")
    differ = []
    for m_label, m_folder in models:
        theirs = vocabulary(m_folder) if m_folder is not None else None
        if theirs is None:
            raise TokenizerError(f"the tokenizer of {m_label} cannot be read, so it cannot be checked that its token rows mean the tokens "
                                 f"of {label}'s tokenizer")
        if theirs != want:
            only = sorted(set(theirs) - set(want))[:3]
            moved = sorted(t for t in set(theirs) & set(want) if theirs[t] != want[t])[:3]
            differ.append(f"{m_label} ({len(theirs)} tokens; " + (f"not in {label}: {only}" if only else f"other ids for {moved}" if moved else "fewer tokens") + ")")
    if differ:
        raise TokenizerError(f"the models' vocabularies differ from {label}'s ({len(want)} tokens): " + "; ".join(differ) + ". Building rows for "
                             "tokens a model lacks (mergekit's union / added tokens) is not supported; merge models that share one tokenizer")
    size = len(want)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        padded = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
        raise TokenizerError(f"pad_to_multiple_of {pad_to_multiple_of}: the tokenizer of {label} has {size} tokens, so mergekit would add "
                             f"{padded - size} zero rows after them ({padded} in all); building rows is not supported here")
    if rows is not None and rows != size:
        raise TokenizerError(f"the embeddings have {rows} rows but the tokenizer of {label} has {size} tokens; mergekit would resize the "
                             f"token rows to {size}, which is not supported here. Leave out tokenizer_source / tokenizer: to keep the rows as they are")


def chat_template_text(value: str, folders: Sequence[Path | None]) -> str:
    """The template a ``chat_template`` setting means: jinja text as given, or ``auto`` (the models' most common one).

    Raises:
        TokenizerError: ``auto`` where no model has a template, or a template name (mergekit bundles templates by name).
    """
    if value == "auto":
        found: list[str] = []
        for f in folders:
            cfg_file = _file(f, "tokenizer_config.json") if f is not None else None
            cfg = _read_json(cfg_file) if cfg_file is not None else None
            jinja = _file(f, "chat_template.jinja") if f is not None else None
            if jinja is not None:
                found.append(jinja.read_text(encoding="utf-8"))
            elif isinstance(cfg, dict) and isinstance(cfg.get("chat_template"), str):
                found.append(cfg["chat_template"])
        if not found:
            raise TokenizerError("chat_template: auto, but no model has a chat template (tokenizer_config.json or chat_template.jinja)")
        return max(found, key=found.count)  # the most common; ties go to the first model's
    if "{" in value:
        return value
    raise TokenizerError(f"chat_template {value!r}: give the template's jinja text, or auto (mergekit's bundled named templates are not "
                         "shipped with modelsoup)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_chat_template(folder: Path, template: str) -> None:
    """Set the output's chat template: ``chat_template.jinja`` and the ``chat_template`` of ``tokenizer_config.json``."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else None
    if isinstance(cfg, dict):
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

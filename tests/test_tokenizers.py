"""mergekit's tokenizer options: run where every model shares the tokenizer's vocabulary, refused where rows would be rebuilt."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelsoup import merge

from .golden.mergekit_fixtures import build_fixtures
from .test_hostile import refused

TOKENS = [f"tok{i}" for i in range(32)]  # the fixtures' vocab_size


def tokenizer(folder: Path, tokens: list[str], template: str | None = None) -> None:
    data = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]},
            "added_tokens": []}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **({"chat_template": template} if template else {})}))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    build_fixtures(tmp_path)
    for name in ("base", "ft_a", "ft_b"):
        tokenizer(tmp_path / "models" / name, TOKENS, template="{{ messages }}" if name != "ft_b" else "{{ other }}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(root: Path, extra: str) -> Path:
    p = root / "r.yml"
    p.write_text(textwrap.dedent("""\
        merge_method: ties
        base_model: models/base
        models:
          - {model: models/ft_a, parameters: {weight: 1.0, density: 0.5}}
          - {model: models/ft_b, parameters: {weight: 1.0, density: 0.5}}
        """) + textwrap.dedent(extra))
    return p


@pytest.mark.parametrize("extra", ["tokenizer_source: base\n", "tokenizer_source: union\n", "tokenizer_source: models/ft_b\n",
                                   "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"])
def test_a_shared_vocabulary_merges_the_rows_as_they_are(root: Path, tmp_path: Path, extra: str) -> None:
    merge(recipe(root, ""), tmp_path / "plain")
    merge(recipe(root, extra), tmp_path / "tok")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "tok" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    src = "ft_b" if "ft_b" in extra else "base"
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (root / "models" / src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("change", "extra", "message"), [
    ("swap", "tokenizer_source: union\n", r"the models' vocabularies differ from models/base's \(32 tokens\): models/ft_b \(32 tokens; other ids for \['tok0', 'tok1'\]\)"),
    ("new", "tokenizer_source: base\n", r"models/ft_b \(32 tokens; not in models/base: \['extra'\]\)"),
    ("short", "tokenizer_source: base\n", r"the embeddings have 32 rows but the tokenizer of models/base has 30 tokens; mergekit would resize"),
    ("short", "tokenizer:\n  source: base\n  pad_to_multiple_of: 8\n", r"pad_to_multiple_of 8: the tokenizer of models/base has 30 tokens, so mergekit would add 2 zero rows"),
    ("none", "tokenizer_source: base\n", r"the tokenizer of models/ft_b cannot be read"),
])
def test_tokenizers_that_would_need_rebuilt_rows_are_refused(root: Path, capsys: pytest.CaptureFixture[str], change: str, extra: str, message: str) -> None:
    if change == "swap":
        tokenizer(root / "models" / "ft_b", [TOKENS[1], TOKENS[0], *TOKENS[2:]])
    elif change == "new":
        tokenizer(root / "models" / "ft_b", [*TOKENS[:-1], "extra"])
    elif change == "short":
        for name in ("base", "ft_a", "ft_b"):
            tokenizer(root / "models" / name, TOKENS[:30])
    else:
        (root / "models" / "ft_b" / "tokenizer.json").unlink()
    refused(["merge", str(recipe(root, extra)), str(root / "out")], capsys, message, inputs=[root / "models"], output=root / "out")


def test_added_tokens_are_refused_at_their_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = recipe(root, "tokenizer:\n  source: union\n  tokens:\n    <|im_start|>: {source: models/ft_a}\n")
    refused(["merge", str(r), str(root / "out")], capsys,
            r"r.yml:8: tokenizer.tokens: added or re-sourced `tokens:` build new embedding rows, which is not supported", inputs=[root / "models"], output=root / "out")


def test_chat_template_auto_and_text(root: Path, tmp_path: Path) -> None:
    merge(recipe(root, "chat_template: auto\n"), tmp_path / "auto")
    assert (tmp_path / "auto" / "chat_template.jinja").read_text() == "{{ messages }}"  # 2 of the 3 models
    assert json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    merge(recipe(root, "chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n"), tmp_path / "text")
    assert (tmp_path / "text" / "chat_template.jinja").read_text() == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_a_named_chat_template_is_refused(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(["merge", str(recipe(root, "chat_template: chatml\n")), str(root / "out")], capsys,
            r"r.yml:6: chat_template: 'chatml': give the template's jinja text, or auto", inputs=[root / "models"], output=root / "out")


def test_a_tokenizer_donor_is_an_input(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merge(recipe(root, ""), root / "prev")
    tokenizer(root / "prev", TOKENS)
    refused(["merge", str(recipe(root, "tokenizer_source: prev\n")), str(root / "prev"), "--overwrite"], capsys, r"prev: .*input",
            inputs=[root / "models"], output=root / "prev")


def test_a_linked_chat_template_outside_the_folder_is_refused(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_text("{{ secret }}")
    (root / "models" / "ft_a" / "chat_template.jinja").symlink_to(secret)
    refused(["merge", str(recipe(root, "chat_template: auto\n")), str(root / "out")], capsys, r"models/ft_a/chat_template.jinja: is a link to .*-secret.txt, outside the model folder",
            inputs=[root / "models"], output=root / "out")


def test_mergekit_cli_options(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelsoup.cli import main

    r = recipe(root, "")
    refused(["merge", str(r), str(root / "o"), "extra"], capsys, r"a recipe file takes one output: soup merge .*r.yml OUT; got 2 \(.*o, extra\)",
            inputs=[root / "models"], output=root / "o")
    refused(["merge", str(r), str(root / "o"), "--out-shard-size", "\u00b2"], capsys, r"--out-shard-size '\u00b2': give a number of bytes",
            inputs=[root / "models"], output=root / "o")
    refused(["merge", str(r), str(root / "o"), "--out-shard-size", ""], capsys, r"--out-shard-size '': give a number of bytes",
            inputs=[root / "models"], output=root / "o")
    upper = root / "R.YAML"
    upper.write_text(r.read_text())  # an upper-case suffix is still a recipe file
    assert main(["merge", str(upper), "-o", str(root / "up"), "--no-progress", "--copy-tokenizer"]) == 0
    assert (root / "up" / "tokenizer.json").is_file()
    native = root / "n.yml"
    native.write_text("method: linear\nmodels: [models/ft_a, models/ft_b]\noutput: {copy_tokenizer: false}\n")
    assert main(["merge", str(native), str(root / "n1"), "--no-progress"]) == 0 and not (root / "n1" / "tokenizer.json").exists()
    assert main(["merge", str(native), str(root / "n2"), "--no-progress", "--copy-tokenizer", "--out-shard-size", "5K"]) == 0
    assert (root / "n2" / "tokenizer.json").is_file() and (root / "n2" / "model.safetensors.index.json").is_file()

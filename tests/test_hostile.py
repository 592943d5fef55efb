"""Hostile and unusual inputs: every one is refused with a named error (exit 2), no output, inputs untouched.

Each case builds its tiny fixture in code. ``refused`` runs ``soup`` in-process and checks the whole
promise: exit code 2, ``error:`` naming the file/flag, the expected message, no output (or the earlier
one unchanged), no temporary folder or created parent left behind, and every input's sha256 unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge, merge_modules, merge_state_dicts
from modelsoup.cli import main
from modelsoup.errors import AdapterInputError, CheckpointError, EmptyMergeError, RecipeError, UnsafeCheckpointError
from modelsoup.io import open_checkpoint

from .conftest import make_state

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tree_hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files/folders (symlinks recorded as their target text)."""
    out = {}
    for root in paths:
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".soup-tmp-" in p.name or ".soup-old-" in p.name] if folder.is_dir() else []


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], match: str, *, inputs: list[Path], output: Path | None) -> str:
    """Run ``soup argv``; assert the refusal promise; return the error message."""
    before = tree_hashes(*inputs)
    had_output = output is not None and os.path.lexists(output)
    out_before = tree_hashes(output) if had_output else None
    rc = main([*argv, "--no-progress"] if argv[0] == "merge" else argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(match, err, re.S), err
    assert tree_hashes(*inputs) == before
    if output is not None:
        if had_output:
            assert tree_hashes(output) == out_before
        else:
            assert not os.path.lexists(output)
        assert leftovers(output.parent) == []
    return err


@pytest.fixture
def two(tmp_path: Path) -> list[Path]:
    paths = []
    for i in (1, 2):
        p = tmp_path / f"m{i}.safetensors"
        save_file(make_state(i), p)
        paths.append(p)
    return paths


def hf_folder(path: Path, seed: int, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(make_state(seed), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config or {"model_type": "tiny", "torch_dtype": "float32"}))
    return path


# ------------------------------------------------------------------------------------------------
# Data loss: the output never is, holds or sits inside an input; --overwrite replaces only our outputs


def test_output_is_an_input_file(two, capsys):
    refused(["merge", *map(str, two), "-o", str(two[0]), "--overwrite"], capsys, r"is an input", inputs=two, output=two[0])


def test_output_is_an_input_folder(tmp_path, capsys):
    a, b = hf_folder(tmp_path / "a", 1), hf_folder(tmp_path / "b", 2)
    refused(["merge", str(a), str(b), "-o", str(a), "--overwrite"], capsys, r"is an input", inputs=[a, b], output=a)


def test_output_holds_the_inputs(tmp_path, capsys):
    d = tmp_path / "dir"
    a, b = hf_folder(d / "a", 1), hf_folder(d / "b", 2)
    (d / "notes.txt").write_text("mine")
    refused(["merge", str(a), str(b), "-o", str(d), "--overwrite"], capsys, r"holds the input", inputs=[d], output=d)


def test_output_inside_an_input_folder(tmp_path, capsys):
    a, b = hf_folder(tmp_path / "a", 1), hf_folder(tmp_path / "b", 2)
    out = a / "soup"
    refused(["merge", str(a), str(b), "-o", str(out)], capsys, r"inside the input folder", inputs=[a, b], output=out)


def test_output_is_a_hard_link_to_an_input(two, tmp_path, capsys):
    link = tmp_path / "same.safetensors"
    os.link(two[0], link)
    refused(["merge", *map(str, two), "-o", str(link), "--overwrite"], capsys, r"is an input", inputs=two, output=link)


def test_output_through_a_symlinked_parent_is_still_an_input(two, tmp_path, capsys):
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path)
    out = alias / two[0].name
    refused(["merge", *map(str, two), "-o", str(out), "--overwrite"], capsys, r"is an input", inputs=two, output=two[0])


def test_overwrite_refuses_a_folder_that_is_not_ours(two, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    refused(["merge", *map(str, two), "-o", str(out), "--overwrite"], capsys, r"without soup_manifest.json.*Remove it yourself", inputs=two, output=out)


def test_overwrite_refuses_a_file_where_a_folder_goes(two, tmp_path, capsys):
    out = tmp_path / "soup"
    out.write_text("a file of mine")
    refused(["merge", *map(str, two), "-o", str(out), "--overwrite"], capsys, r"is a file, but the output is a folder", inputs=two, output=out)


def test_overwrite_replaces_an_earlier_output(two, tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["merge", *map(str, two), "-o", str(out), "--weights", "1,0", "--no-progress"]) == 0
    assert main(["merge", *map(str, two), "-o", str(out), "--overwrite", "--no-progress"]) == 0
    got = load_file(out / "model.safetensors")["fc.weight"]
    torch.testing.assert_close(got, (make_state(1)["fc.weight"] + make_state(2)["fc.weight"]) / 2)
    assert leftovers(tmp_path) == []


def test_symlinked_output_is_replaced_as_a_link_and_its_target_kept(two, tmp_path, capsys):
    real = tmp_path / "v1"
    assert main(["merge", *map(str, two), "-o", str(real), "--weights", "1,0", "--no-progress"]) == 0
    before = tree_hashes(real)
    link = tmp_path / "latest"
    link.symlink_to(real)
    assert main(["merge", *map(str, two), "-o", str(link), "--overwrite", "--no-progress"]) == 0, capsys.readouterr().err
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert tree_hashes(real) == before
    assert leftovers(tmp_path) == []


def test_symlink_to_a_foreign_folder_is_refused(two, tmp_path, capsys):
    target = tmp_path / "docs"
    target.mkdir()
    (target / "a.txt").write_text("x")
    link = tmp_path / "out"
    link.symlink_to(target)
    refused(["merge", *map(str, two), "-o", str(link), "--overwrite"], capsys, r"symlink to .*not a modelsoup output", inputs=[*two, target], output=link)


def test_dangling_symlink_output(two, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    refused(["merge", *map(str, two), "-o", str(link)], capsys, r"already exists", inputs=two, output=link)
    refused(["merge", *map(str, two), "-o", str(link), "--overwrite"], capsys, r"dangling symlink", inputs=two, output=link)


def test_overwrite_onto_each_kind_of_input_through_the_api(tmp_path):
    a, b = hf_folder(tmp_path / "a", 1), hf_folder(tmp_path / "b", 2)
    before = tree_hashes(tmp_path)
    for out in (a, a / "model.safetensors", tmp_path, a / "inner"):
        with pytest.raises(Exception) as info:
            merge(models=[a, b], output=out, overwrite=True, progress=False)
        assert type(info.value).__name__ == "OutputError", info.value
    assert tree_hashes(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Silent wrong output: refused instead


def _peft_adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}))
    save_file({"base_model.model.fc.lora_A.weight": torch.randn(2, 6), "base_model.model.fc.lora_B.weight": torch.zeros(5, 2)},
              folder / "adapter_model.safetensors")
    return folder


def test_peft_adapter_folders_are_refused(tmp_path, capsys):
    a, b = _peft_adapter(tmp_path / "ad1"), _peft_adapter(tmp_path / "ad2")
    err = refused(["merge", str(a), str(b), "-o", str(tmp_path / "out")], capsys, r"is a PEFT adapter: it changes a model, so give the model "
                  r"it was trained on as `base:` \(--base B\)", inputs=[a, b], output=tmp_path / "out")
    assert err.count("is a PEFT adapter") == 2


def test_adapter_tensors_without_a_config_are_refused(tmp_path, capsys):
    p = _peft_adapter(tmp_path / "ad") / "adapter_model.safetensors"
    refused(["merge", str(p), str(p), "-o", str(tmp_path / "out.safetensors")], capsys, r"adapter tensors such as '.*lora_A",
            inputs=[p], output=tmp_path / "out.safetensors")


def test_peft_models_in_memory_are_refused():
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 5)

    models = [peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc"])) for _ in range(2)]
    with pytest.raises(AdapterInputError, match="PEFT adapter"):
        merge_modules(models)
    with pytest.raises(AdapterInputError, match="lora_A"):
        merge_state_dicts([m.state_dict() for m in models])


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


def test_pt_with_a_storage_record_shorter_than_its_tensor(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save(make_state(1), good)
    short = tmp_path / "short.pt"
    # shorten the biggest storage record; torch's mmap load would read past it into whatever follows
    import zipfile

    with zipfile.ZipFile(good) as z:
        biggest = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    _rewrite_zip(good, short, lambda name, data: data[: len(data) // 2] if name == biggest else data)
    refused(["merge", str(short), str(good), "-o", str(tmp_path / "o.safetensors")], capsys, r"short.pt: storage '\d+' declares \d+ bytes but its record holds",
            inputs=[short, good], output=tmp_path / "o.safetensors")


def _raw_safetensors(path: Path, header: dict | str | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
         bytes(12), r"overlap"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
         bytes(8), r"lists the key 'a' twice"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), r"belong to no tensor"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(12), r"after the last tensor belong to no tensor"),
        ({"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"__metadata__ must map strings"),
        ({"__metadata__": "x", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"__metadata__ must map strings"),
        ('{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}', bytes(4), r"Infinity is not JSON"),
        ('{"a": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], "data_offsets": [0, 0]}}', b"", r"larger than any tensor"),
        ('{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), r"not valid Unicode"),
        ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, bytes(16), r"shape .*non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), r"shape .*non-negative integers"),
        ('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}", b"", r"nests (\d+ levels deep|too deep)"),
    ],
    ids=["overlap", "duplicate", "gap", "trailing", "meta-list", "meta-string", "infinity", "huge-empty", "surrogate", "negative", "float-dim", "deep"],
)
def test_bad_safetensors_headers(tmp_path, capsys, header, data, match):
    bad = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(1)}, good)
    t0 = time.perf_counter()
    refused(["merge", str(bad), str(good), "-o", str(tmp_path / "o.safetensors")], capsys, rf"bad.safetensors: .*{match}",
            inputs=[bad, good], output=tmp_path / "o.safetensors")
    assert time.perf_counter() - t0 < 5


def _sharded(folder: Path, weight_map: object) -> Path:
    folder.mkdir()
    save_file(make_state(1), folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("shard, match", [("../outside.safetensors", "not a file inside"), ("/etc/passwd", "not a file inside")])
def test_index_naming_a_shard_outside_the_folder(tmp_path, capsys, shard, match):
    save_file(make_state(2), tmp_path / "outside.safetensors")
    names = list(make_state(1))
    m = _sharded(tmp_path / "m", {n: shard for n in names})
    refused(["merge", str(m), str(m), "-o", str(tmp_path / "o")], capsys, rf"lists shard '{re.escape(shard)}', which is {match}",
            inputs=[m, tmp_path / "outside.safetensors"], output=tmp_path / "o")


def test_index_shard_that_is_a_link_out_of_the_folder(tmp_path, capsys):
    save_file(make_state(2), tmp_path / "outside.safetensors")
    m = _sharded(tmp_path / "m", {n: "model-00001-of-00001.safetensors" for n in make_state(1)})
    (m / "model-00001-of-00001.safetensors").unlink()
    (m / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    refused(["merge", str(m), str(m), "-o", str(tmp_path / "o")], capsys, r"is a link to .*outside the model folder", inputs=[m], output=tmp_path / "o")


@pytest.mark.parametrize("weight_map, match", [(["a", "b"], r"'weight_map' is list"), ({"fc.weight": 3}, r"maps to int")])
def test_malformed_index(tmp_path, capsys, weight_map, match):
    m = _sharded(tmp_path / "m", weight_map)
    refused(["merge", str(m), str(m), "-o", str(tmp_path / "o")], capsys, rf"index.json: not a valid shard index \(.*{match}", inputs=[m], output=tmp_path / "o")


def test_symlink_in_a_model_folder_to_a_file_outside_is_not_copied(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh key")
    a, b = hf_folder(tmp_path / "a", 1), hf_folder(tmp_path / "b", 2)
    (a / "tokenizer.json").symlink_to(secret)
    refused(["merge", str(a), str(b), "-o", str(tmp_path / "o")], capsys, r"tokenizer.json: is a link to .*outside the model folder",
            inputs=[a, b, secret], output=tmp_path / "o")


def test_symlink_loop_inside_a_model_folder(tmp_path, capsys):
    a, b = hf_folder(tmp_path / "a", 1), hf_folder(tmp_path / "b", 2)
    (a / "loop").symlink_to(a / "loop")
    refused(["merge", str(a), str(b), "-o", str(tmp_path / "o")], capsys, r"loop: cannot be resolved.*symlink loop", inputs=[a, b], output=tmp_path / "o")
    (a / "loop").unlink()
    (a / "sub").mkdir()
    (a / "sub" / "up").symlink_to(a)
    refused(["merge", str(a), str(b), "-o", str(tmp_path / "o")], capsys, r"symlink loop", inputs=[a, b], output=tmp_path / "o")


def test_hugging_face_cache_layout_still_loads(tmp_path, capsys):
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file(make_state(1), blobs / "w1")
    (blobs / "c1").write_text(json.dumps({"model_type": "tiny", "_name_or_path": "org/tiny"}))
    (snap / "model.safetensors").symlink_to("../../blobs/w1")
    (snap / "config.json").symlink_to("../../blobs/c1")
    other = hf_folder(tmp_path / "b", 2)
    out = tmp_path / "o"
    assert main(["merge", str(snap), str(other), "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert not (out / "config.json").is_symlink() and json.loads((out / "config.json").read_text())["model_type"] == "tiny"
    assert "base_model: org/tiny" in (out / "README.md").read_text()


def test_intersection_with_nothing_in_common(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(2)}, a)
    save_file({"y": torch.zeros(2)}, b)
    out = tmp_path / "o.safetensors"
    refused(["merge", str(a), str(b), "--keys", "intersection", "-o", str(out)], capsys, r"no tensors: no tensor name is shared", inputs=[a, b], output=out)
    with pytest.raises(EmptyMergeError, match="hold no tensors"):
        merge_state_dicts([{}, {}])


def test_output_overflowing_its_dtype(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.full((4,), 1.0, dtype=torch.float16)}, a)
    save_file({"w": torch.full((4,), 2.0, dtype=torch.float16)}, b)
    out = tmp_path / "o.safetensors"
    refused(["merge", str(a), str(b), "--weights", "1e5,1e5", "--set", "normalize=false", "-o", str(out)], capsys,
            r"merged tensor 'w' holds 4 NaN/Inf .*float16.*--allow-nonfinite", inputs=[a, b], output=out)
    assert main(["merge", str(a), str(b), "--weights", "1e5,1e5", "--set", "normalize=false", "-o", str(out), "--allow-nonfinite", "--no-progress"]) == 0
    assert torch.isinf(load_file(out)["w"]).all()


@pytest.mark.parametrize("weights", [[1, 1, 100], [1.0]])
def test_api_weight_count(weights):
    with pytest.raises(RecipeError, match=rf"weights: {len(weights)} given for 2 model\(s\)"):
        merge_state_dicts([make_state(1), make_state(2)], weights=weights)


def test_topk_infers_the_direction_of_a_loss(tmp_path, capsys):
    paths = []
    for i, loss in enumerate([0.9, 0.1, 0.5]):
        p = tmp_path / f"ckpt-{i}.safetensors"
        save_file(make_state(i + 1), p)
        paths.append(p)
    log = tmp_path / "summary.csv"
    log.write_text("epoch,eval_loss,lr\n0,0.9,1\n1,0.1,1\n2,0.5,1\n")
    rc = main(["topk", *map(str, paths), "-k", "1", "--log", str(log), "--metric", "eval_loss", "-o", str(tmp_path / "avg"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    got = load_file(tmp_path / "avg" / "topk" / "model.safetensors")["fc.weight"]
    torch.testing.assert_close(got, make_state(2)["fc.weight"])  # the lowest loss, not the highest
    refused(["topk", *map(str, paths), "-k", "1", "--log", str(log), "--metric", "lr", "-o", str(tmp_path / "avg2")], capsys,
            r"cannot tell whether a lower or a higher 'lr'.*--higher-is-better", inputs=paths, output=tmp_path / "avg2")


# ------------------------------------------------------------------------------------------------
# Denial of service: bounded, refused with the line


@pytest.mark.parametrize(
    "text, match",
    [
        ('a: &a ["l","l","l","l","l","l","l","l","l"]\n' + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 9) + "]\n" for i in range(8))
         + "method: linear\nmodels: [x]\n", r"alias bomb"),
        ("method: linear\nmodels: &m [*m]\n", r"recursive alias"),
        ("method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", r"nesting is deeper than"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep"],
)
def test_yaml_bombs(tmp_path, capsys, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    t0 = time.perf_counter()
    refused(["merge", str(recipe), "-o", str(tmp_path / "o")], capsys, rf"r.yaml:\d+: .*{match}", inputs=[recipe], output=tmp_path / "o")
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------------------------------------
# Named errors instead of tracebacks


def test_output_in_unwritable_places(two, tmp_path, capsys):
    refused(["merge", *map(str, two), "-o", "/proc/x"], capsys, r"/proc/x: cannot create its temporary folder", inputs=two, output=Path("/proc/x"))
    if Path("/sys").is_dir():
        refused(["merge", *map(str, two), "-o", "/sys/x"], capsys, r"/sys/x: cannot", inputs=two, output=Path("/sys/x"))
    parent = tmp_path / "afile"
    parent.write_text("x")
    refused(["merge", *map(str, two), "-o", str(parent / "soup")], capsys, r"not a directory|is a file", inputs=[*two, parent], output=None)
    refused(["merge", *map(str, two), "-o", str(parent / "deep" / "soup")], capsys, r"not a directory|is a file", inputs=[*two, parent], output=None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(two, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(["merge", *map(str, two), "-o", str(ro / "soup")], capsys, r"not writable", inputs=two, output=ro / "soup")
    finally:
        ro.chmod(0o755)


def test_name_too_long_and_working_folder(two, tmp_path, capsys, monkeypatch):
    refused(["merge", *map(str, two), "-o", str(tmp_path / ("x" * 300))], capsys, r"over the 255", inputs=two, output=None)
    out = tmp_path / ("y" * 250)  # fits, though its temporary folder's name would not: shortened
    assert main(["merge", *map(str, two), "-o", str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []
    monkeypatch.chdir(tmp_path)
    refused(["merge", *map(str, two), "-o", ".", "--overwrite"], capsys, r"needs a name of its own", inputs=two, output=None)
    refused(["merge", *map(str, two), "-o", str(tmp_path.parent), "--overwrite"], capsys, r"working folder", inputs=two, output=None)


def test_file_output_over_a_folder(two, tmp_path, capsys):
    d = tmp_path / "x.safetensors"
    d.mkdir()
    (d / "keep").write_text("k")
    refused(["merge", *map(str, two), "-o", str(d), "--overwrite"], capsys, r"is a folder, but a name ending in .safetensors", inputs=two, output=d)


def test_recipe_not_utf8(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_bytes(b"method: linear\nmodels: [\xff\xfe]\n")
    refused(["merge", str(r), "-o", str(tmp_path / "o")], capsys, r"r.yaml: is not UTF-8 text", inputs=[r], output=tmp_path / "o")


def test_shard_size_with_400_digits(two, tmp_path, capsys):
    refused(["merge", *map(str, two), "--shard-size", "9" * 400, "-o", str(tmp_path / "o")], capsys, r"shard_size: cannot read '9999.*characters\) as a size",
            inputs=two, output=tmp_path / "o")
    refused(["merge", *map(str, two), "--shard-size", "9" * 400 + "GB", "-o", str(tmp_path / "o")], capsys, r"up to 2\*\*63", inputs=two, output=tmp_path / "o")


@pytest.mark.parametrize("flags, match", [(["--weights", "a,b"], r"--weights 'a,b': give one number per model"),
                                          (["--set", "density=["], r"--set 'density=\[': cannot read the value .*YAML syntax error")])
def test_bad_flags(two, tmp_path, capsys, flags, match):
    refused(["merge", "--method", "ties", "--base", str(two[0]), *map(str, two), *flags, "-o", str(tmp_path / "o")], capsys, match, inputs=two, output=tmp_path / "o")


def test_meta_and_sparse_tensors_in_the_api():
    a = make_state(1)
    with pytest.raises(CheckpointError, match=r"tensor 'fc.weight' is on the meta device"):
        merge_state_dicts([a, {**a, "fc.weight": torch.empty(5, 6, device="meta")}])
    with pytest.raises(CheckpointError, match=r"tensor 'fc.weight' is a sparse_coo tensor"):
        merge_state_dicts([a, {**a, "fc.weight": a["fc.weight"].to_sparse()}])


@pytest.mark.parametrize("content", ["[]", "{not json", '{"k": 3}', "null"])
def test_broken_hash_cache_is_ignored_and_rewritten(two, tmp_path, capsys, content):
    cache = Path(os.environ["MODELSOUP_CACHE_DIR"]) / "sha256.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content)
    assert main(["merge", *map(str, two), "-o", str(tmp_path / "o"), "--no-progress"]) == 0, capsys.readouterr().err
    assert isinstance(json.loads(cache.read_text()), dict) and len(json.loads(cache.read_text())) == 2


def test_full_disk_is_a_named_error(two, tmp_path):
    """A file-size limit makes the kernel refuse writes past it (EFBIG), as a full disk does (ENOSPC)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {SRC!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        from modelsoup.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    big = []
    for i in range(2):
        p = tmp_path / f"big{i}.safetensors"
        save_file({"w": torch.randn(64, 64)}, p)  # 16 KB each, the limit is 2 KB
        big.append(p)
    for out in (tmp_path / "folder", tmp_path / "file.safetensors", tmp_path / "file.pt"):
        before = tree_hashes(*big)
        r = subprocess.run([sys.executable, "-c", script, "merge", *map(str, big), "-o", str(out), "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and str(out) in r.stderr and "too large" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists() and leftovers(tmp_path) == [] and tree_hashes(*big) == before


# ------------------------------------------------------------------------------------------------
# Signals and leftovers


def _slow_merge(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / f"big{i}.safetensors"
        save_file({f"w{j}": torch.randn(512, 512) for j in range(64)}, p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_leave_nothing(tmp_path, sig):
    paths = _slow_merge(tmp_path)
    out = tmp_path / "out" / "soup"
    env = {**os.environ, "PYTHONPATH": SRC}
    script = ("import signal, sys, time, modelsoup.engine as e\n"  # both paths slowed: whole tensors, and the chunks linear streams
              # a session's default SIGHUP, whatever this one has (under nohup it is ignored, and so, by design, is a merge's)
              "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
              "orig, chunked = e.MergeRun.compute, e.MergeRun.compute_chunked\n"
              "def slow(self, job):\n    time.sleep(0.2)\n    return orig(self, job)\n"
              "def slow_chunks(self, job, emit):\n    time.sleep(0.2)\n    return chunked(self, job, emit)\n"
              "e.MergeRun.compute, e.MergeRun.compute_chunked = slow, slow_chunks\n"
              "from modelsoup.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "merge", *map(str, paths), "-o", str(out), "--no-progress", "--workers", "1"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.parent.is_dir() and leftovers(out.parent)):
        time.sleep(0.05)
    assert leftovers(out.parent), "the merge never started"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"terminated ({signal.Signals(sig).name})" in err
    assert not out.parent.exists()  # its temporary folder and the parent it created are gone


def test_stale_temporary_folder_of_a_killed_process_is_removed(two, tmp_path, capsys, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".soup.soup-tmp-{pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    import socket

    (stale / ".soup-owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    foreign = tmp_path / ".other.soup-tmp-1-cafe"  # no owner record: not ours to remove
    foreign.mkdir()
    assert main(["merge", *map(str, two), "-o", str(tmp_path / "soup"), "--no-progress"]) == 0
    assert not stale.exists() and foreign.exists()
    assert f"left by modelsoup process {pid} which no longer runs" in caplog.text


def test_failed_merge_removes_the_parents_it_created(two, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.full((5, 6), float("nan"))}, bad)
    out = tmp_path / "new" / "deeper" / "soup"
    refused(["merge", str(two[0]), str(bad), "--keys", "intersection", "-o", str(out)], capsys, r"NaN/Inf", inputs=[*two, bad], output=out)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# Real files that must load, and records that must be right


def test_timm_checkpoint_with_argparse_namespace(tmp_path, capsys):
    ckpts = []
    for i in (1, 2):
        p = tmp_path / f"checkpoint-{i}.pth.tar"
        torch.save({"epoch": i, "arch": "tiny", "state_dict": make_state(i), "args": argparse.Namespace(lr=0.1, model="tiny"),
                    "metric": 0.5 + i, "version": 2}, p)
        ckpts.append(p)
    out = tmp_path / "avg.pth.tar"
    assert main(["merge", *map(str, ckpts), "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert out.is_file()
    sd = torch.load(out, weights_only=True)["state_dict"]
    torch.testing.assert_close(sd["fc.weight"], (make_state(1)["fc.weight"] + make_state(2)["fc.weight"]) / 2)


class TrainConfig:  # a user's own data class, as some training scripts pickle into checkpoints
    def __init__(self, lr: float) -> None:
        self.lr = lr


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/modelsoup-pwned",))


class EvalPayload:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('/tmp/modelsoup-pwned').touch()",))


def test_allow_global_loads_a_named_class_as_inert_data(tmp_path, capsys):
    p = tmp_path / "ck.pt"
    torch.save({"state_dict": make_state(1), "cfg": TrainConfig(0.1)}, p)
    name = f"{TrainConfig.__module__}.TrainConfig"
    refused(["merge", str(p), str(p), "-o", str(tmp_path / "o.safetensors")], capsys, rf"--allow-global {re.escape(name)}", inputs=[p], output=tmp_path / "o.safetensors")
    assert main(["merge", str(p), str(p), "-o", str(tmp_path / "o.safetensors"), "--allow-global", name, "--no-progress"]) == 0
    ck = open_checkpoint(p, allow_globals=[name])
    assert "fc.weight" in ck.names()


def test_code_in_a_pickle_never_runs_even_if_allowed_by_name(tmp_path):
    marker = Path("/tmp/modelsoup-pwned")
    marker.unlink(missing_ok=True)
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": make_state(1), "x": Payload()}, p)
    with pytest.raises(UnsafeCheckpointError, match="never runs code"):
        open_checkpoint(p)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to posix.system, from a module torch never loads\)\. modelsoup never runs code stored in checkpoints\. If you trust"):
        open_checkpoint(p, allow_globals=["posix.system"])  # torch blocks the module outright
    q = tmp_path / "evil2.pt"
    torch.save({"state_dict": make_state(1), "x": EvalPayload()}, q)
    with pytest.raises(UnsafeCheckpointError, match="--allow-global builtins.eval"):
        open_checkpoint(q)
    ck = open_checkpoint(q, allow_globals=["builtins.eval"])  # an inert stand-in: called with the text, runs nothing
    assert "fc.weight" in ck.names()
    assert not marker.exists()


def test_lightning_attribute_dict_hyper_parameters(tmp_path):
    import types

    mod = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = mod.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    mod.AttributeDict = AttributeDict
    saved = {k: sys.modules.get(k) for k in ("lightning", "lightning.fabric", "lightning.fabric.utilities", mod.__name__)}
    for k in saved:
        sys.modules[k] = mod if k == mod.__name__ else types.ModuleType(k)
    try:
        p = tmp_path / "epoch=1.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in make_state(1).items()}, "hyper_parameters": AttributeDict(lr=0.1),
                    "pytorch-lightning_version": "2.4.0"}, p)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    ck = open_checkpoint(p)
    assert set(ck.names()) == set(make_state(1))


def test_recipe_yaml_reruns_from_anywhere_bit_for_bit(two, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = [os.path.relpath(p, work) for p in two]
    assert main(["merge", "--method", "linear", *rel, "--weights", "0.3,0.7", "-o", "outs/soup", "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(work / "outs" / "soup" / "recipe.yaml"), "-o", "again", "--no-progress"]) == 0
    first = (work / "outs" / "soup" / "model.safetensors").read_bytes()
    assert (elsewhere / "again" / "model.safetensors").read_bytes() == first
    assert "../../../m1.safetensors" in (work / "outs" / "soup" / "recipe.yaml").read_text()


def test_dtype_flag_updates_the_copied_config(tmp_path):
    a = hf_folder(tmp_path / "a", 1, {"model_type": "tiny", "torch_dtype": "float32"})
    b = hf_folder(tmp_path / "b", 2, {"model_type": "tiny", "dtype": "float32", "text_config": {"dtype": "float32"}})
    merge(models=[a, b], output=tmp_path / "o1", dtype="bfloat16", progress=False)
    assert json.loads((tmp_path / "o1" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merge(models=[b, a], output=tmp_path / "o2", dtype="float16", progress=False)
    cfg = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["text_config"]["dtype"] == "float16"
    assert load_file(tmp_path / "o2" / "model.safetensors")["fc.weight"].dtype == torch.float16


def _front_matter(card: Path) -> dict:
    import yaml

    return yaml.safe_load(card.read_text().split("---")[1])


def test_model_card_names_hub_ids_only(tmp_path):
    base = hf_folder(tmp_path / "base", 0, {"model_type": "tiny", "_name_or_path": "org/tiny-base"})
    a = hf_folder(tmp_path / "a", 1, {"model_type": "tiny", "_name_or_path": "org/tiny-ft-a"})
    b = hf_folder(tmp_path / "b", 2, {"model_type": "tiny", "_name_or_path": str(tmp_path / "b")})
    merge(models=[a, b], base=base, method="task_arithmetic", output=tmp_path / "o", progress=False)
    meta = _front_matter(tmp_path / "o" / "README.md")
    assert meta["base_model"] == ["org/tiny-base", "org/tiny-ft-a"] and meta["base_model_relation"] == "merge"
    merge(models=[b, b], output=tmp_path / "o2", progress=False)
    assert "base_model" not in _front_matter(tmp_path / "o2" / "README.md")  # unknown: left out, not guessed


# ------------------------------------------------------------------------------------------------
# Found by a red-team pass over the above (each was a wrong model, a lost file, a hang or a traceback)


def test_a_name_tied_in_one_model_only_is_merged_on_its_own(tmp_path, capsys):
    e = torch.randn(3, 3)
    torch.save({"emb": e, "head": e}, tmp_path / "tied.pt")  # tied in this model
    save_file({"emb": torch.ones(3, 3), "head": torch.zeros(3, 3)}, tmp_path / "untied.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(tmp_path / "tied.pt"), str(tmp_path / "untied.safetensors"), "-o", str(out), "--no-progress"]) == 0
    got = load_file(out)
    torch.testing.assert_close(got["head"], e / 2)
    torch.testing.assert_close(got["emb"], (e + 1) / 2)


def test_an_override_on_a_tied_name_applies_to_it(tmp_path):
    e1, e2 = torch.randn(3, 3), torch.randn(3, 3)
    a = merge_state_dicts([{"emb": e1, "head": e1}, {"emb": e2, "head": e2}], overrides=[{"match": "head", "weights": [1, 0]}])
    torch.testing.assert_close(a["head"], e1)
    torch.testing.assert_close(a["emb"], (e1 + e2) / 2)
    b = merge_state_dicts([{"emb": e1, "head": e1}, {"emb": e2, "head": e2}], overrides=[{"match": "emb", "take": "first"}])
    torch.testing.assert_close(b["emb"], e1)
    torch.testing.assert_close(b["head"], (e1 + e2) / 2)


def test_a_zip_directory_lying_about_a_record_size(tmp_path, capsys):
    import zipfile

    src = tmp_path / "src8.pt"
    torch.save({"w": torch.arange(8.0) + 1}, src)
    lie = tmp_path / "lie.pt"
    _rewrite_zip(src, lie, lambda name, data: data[:16] if name.endswith("data/0") else data)
    raw = bytearray(lie.read_bytes())
    i = raw.find(b"PK\x01\x02")
    while i != -1:  # the central directory claims 32 bytes where the record holds 16
        n = struct.unpack("<H", raw[i + 28:i + 30])[0]
        if raw[i + 46:i + 46 + n].endswith(b"data/0"):
            struct.pack_into("<II", raw, i + 20, 32, 32)
        i = raw.find(b"PK\x01\x02", i + 4)
    lie.write_bytes(bytes(raw))
    with zipfile.ZipFile(lie) as z:
        assert next(i for i in z.infolist() if i.filename.endswith("data/0")).file_size == 32
    other = tmp_path / "zeros.pt"
    torch.save({"w": torch.zeros(8)}, other)
    out = tmp_path / "o.safetensors"
    refused(["merge", str(lie), str(other), "-o", str(out)], capsys, r"lie.pt: storage '0' declares 32 bytes but its record has room for 16",
            inputs=[lie, other], output=out)


def test_weights_whose_sum_overflows(two, tmp_path, capsys):
    refused(["merge", *map(str, two), "--weights", "1e308,1e308", "-o", str(tmp_path / "o")], capsys, r"sum to inf, too large to normalise",
            inputs=two, output=tmp_path / "o")
    out = tmp_path / "tiny.safetensors"  # tiny weights are not "zero": the sum is judged relative to them
    assert main(["merge", *map(str, two), "--weights", "1e-13,1e-13", "-o", str(out), "--no-progress"]) == 0
    torch.testing.assert_close(load_file(out)["fc.weight"], (make_state(1)["fc.weight"] + make_state(2)["fc.weight"]) / 2)


def test_folder_with_several_weight_layouts_reads_what_transformers_reads(tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.ones(2)}, m / "model.safetensors")
    save_file({"w": torch.full((2,), 100.0)}, m / "old-00001-of-00001.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "old-00001-of-00001.safetensors"}}))
    (m / "config.json").write_text("{}")
    ck = open_checkpoint(m)
    assert torch.equal(ck.read("w"), torch.ones(2))
    assert any("as transformers does" in n for n in ck.notes)


def test_strip_prefix_that_makes_two_names_one(tmp_path, capsys):
    pre, plain = tmp_path / "pre.safetensors", tmp_path / "plain.safetensors"
    save_file({"module.w": torch.ones(2), "w": torch.zeros(2)}, pre)
    save_file({"w": torch.full((2,), 4.0)}, plain)
    refused(["merge", str(pre), str(plain), "--strip-prefix", "module.", "-o", str(tmp_path / "o")], capsys,
            r"stripping 'module.' makes 'module.w' and 'w' both 'w'", inputs=[pre, plain], output=tmp_path / "o")


def test_tensor_names_that_are_not_strings(tmp_path, capsys):
    p = tmp_path / "keys.pt"
    torch.save({1: torch.ones(2), "1": torch.zeros(2)}, p)
    refused(["merge", str(p), str(p), "-o", str(tmp_path / "o")], capsys, r"the tensor under key 1 is named by a int", inputs=[p], output=tmp_path / "o")
    with pytest.raises(CheckpointError, match="key 1 is a int"):
        merge_state_dicts([{1: torch.ones(2)}, {1: torch.ones(2)}])  # type: ignore[dict-item]


def test_numbers_too_large_for_a_float(two, tmp_path, capsys):
    big = str(10**400)
    refused(["merge", "--method", "slerp", *map(str, two), "--set", f"t={big}", "-o", str(tmp_path / "o")], capsys,
            r"--set 't=1000.*cannot read the value .*a number of 401 characters", inputs=two, output=tmp_path / "o")
    r = tmp_path / "r.yaml"
    r.write_text(f"method: linear\nmodels: [{{path: {two[0]}, weight: [0, {big}]}}, {two[1]}]\n")
    refused(["merge", str(r), "-o", str(tmp_path / "o")], capsys, r"r.yaml:2: a number of 401 characters", inputs=[*two, r], output=tmp_path / "o")
    with pytest.raises(RecipeError, match="must be a number in float range, got an integer of 1329 bits"):
        merge_state_dicts([make_state(1), make_state(2)], method="slerp", parameters={"t": 10**400})
    with pytest.raises(RecipeError, match="float range"):
        merge_state_dicts([make_state(1), make_state(2)], weights=[1, 10**400])


def test_override_regex_that_backtracks_catastrophically(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        save_file({"a" * 40 + "!": torch.ones(1)}, p)
    r = tmp_path / "r.yaml"
    r.write_text(f'method: linear\nmodels: [{a}, {b}]\noverrides:\n  - match: "re:^(a+)+$"\n    take: first\n')
    t0 = time.perf_counter()
    refused(["merge", str(r), "-o", str(tmp_path / "o")], capsys, r"r.yaml:4: overrides\[0\].match: .*exponential time", inputs=[a, b, r], output=tmp_path / "o")
    assert time.perf_counter() - t0 < 2


def test_fifo_inputs_are_refused_not_waited_on(two, tmp_path, capsys):
    fifo, recipe = tmp_path / "fifo.safetensors", tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    os.mkfifo(recipe)
    refused(["merge", str(fifo), str(two[0]), "-o", str(tmp_path / "o")], capsys, r"fifo.safetensors: is not a regular file", inputs=two, output=tmp_path / "o")
    refused(["merge", str(recipe), "-o", str(tmp_path / "o")], capsys, r"fifo.yaml: is not a regular file", inputs=two, output=tmp_path / "o")


def test_open_file_limit_leaves_no_temporary_folder(tmp_path):
    paths = []
    for k in range(2):
        p = tmp_path / f"m{k}.safetensors"
        save_file({f"t{i}": torch.full((4,), float(k)) for i in range(200)}, p)
        paths.append(p)
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {SRC!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from modelsoup.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", script, "merge", *map(str, paths), "-o", str(out), "--shard-size", "1", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Too many open files" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_report_never_replaces_a_file_that_is_not_a_report(tmp_path, capsys):
    res = tmp_path / "R"
    res.mkdir()
    (res / "results.json").write_text('{"modelsoup_version": "0.1", "rows": []}')
    (res / "results.md").write_text("# cook table\n")
    refused(["report", str(res), "-o", str(res / "results.html"), "--overwrite"], capsys, r"results.md: exists and is not an earlier modelsoup report",
            inputs=[res], output=None)


def test_an_input_given_as_a_symlink_is_still_an_input(two, tmp_path, capsys):
    link = tmp_path / "link.safetensors"
    link.symlink_to(two[0])
    refused(["merge", str(link), str(two[1]), "-o", str(link), "--overwrite"], capsys, r"is an input", inputs=[*two, link], output=link)


def test_yaml_floats_without_a_dot_are_numbers():
    from modelsoup.recipe import load_yaml

    data, _ = load_yaml("density: 1e-3\nscale: 1.0e308\nname: x1e3\n")
    assert data == {"density": 0.001, "scale": 1e308, "name": "x1e3"}

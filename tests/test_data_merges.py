"""Fisher merging and RegMean: the methods, their statistics, the recipe and plan checks, the cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelsoup import merge, merge_state_dicts
from modelsoup.errors import EvaluatorError, RecipeError, TensorMismatchError
from modelsoup.eval import ClassificationEvaluator
from modelsoup.methods import get_method
from modelsoup.recipes.statistics import fisher_statistics, gram_statistics, model_statistics

from . import reference as ref


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _data(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _evaluator(x: torch.Tensor, y: torch.Tensor, module: nn.Module | None = None, batch_size: int = 8) -> ClassificationEvaluator:
    return ClassificationEvaluator(module if module is not None else _mlp(99), DataLoader(TensorDataset(x, y), batch_size=batch_size), name="t")


# ---------------------------------------------------------------- the methods, by hand


def test_fisher_hand_worked_and_floor():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, -1.0])
    fa, fb = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 1.0])
    out = get_method("fisher")([a, b], statistics=[fa, fb], epsilon=1e-6)
    # (1*1 + 3*3)/4 = 2.5; both at the floor -> the mean 4; (1e-6*3 + 1*-1)/(1 + 1e-6)
    assert torch.allclose(out, torch.tensor([2.5, 4.0, (3e-6 - 1) / (1 + 1e-6)]))
    w = get_method("fisher")([a, b], statistics=[fa, fb], weights=[3.0, 1.0])
    assert torch.allclose(w[0], torch.tensor((3 * 1 * 1 + 1 * 3 * 3) / (3 + 3.0)))


def test_fisher_with_identical_fishers_is_the_plain_mean():
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(4, 6, generator=g) for _ in range(3)]
    f = torch.rand(4, 6, generator=g) + 0.1
    out = get_method("fisher")(ms, statistics=[f, f, f])
    assert torch.allclose(out, ref.linear(ms, [1.0, 1.0, 1.0]).float(), atol=1e-6)


def test_regmean_on_least_squares_fits_is_the_pooled_fit():
    """Linear models fitted by least squares on different data, merged by RegMean (alpha 1, no ridge) = the least-squares
    fit on the pooled data (exact up to float rounding)."""
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(3, 5, generator=g, dtype=torch.float64)
    xs = [torch.randn(40, 5, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(3)]
    ys = [x @ w_true.T + 0.3 * torch.randn(40, 3, generator=g, dtype=torch.float64) for x in xs]
    fits = [ref.least_squares(x, y) for x, y in zip(xs, ys)]
    grams = [x.T @ x for x in xs]
    pooled = ref.least_squares(torch.cat(xs), torch.cat(ys))
    out = get_method("regmean")([f.float() for f in fits], statistics=grams, alpha=1.0, ridge=0.0)
    assert torch.allclose(out.double(), pooled, atol=1e-5), (out.double() - pooled).abs().max()
    # the default ridge (1e-8 of the mean diagonal) changes it below float32 resolution
    out = get_method("regmean")([f.float() for f in fits], statistics=grams, alpha=1.0)
    assert torch.allclose(out.double(), pooled, atol=1e-5)
    # and it is not the plain mean (the data differ)
    assert (out.double() - sum(fits) / 3).abs().max() > 1e-2


def test_regmean_alpha_zero_is_the_per_input_weighted_mean_and_no_data_is_the_mean():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(2, 3, generator=g) for _ in range(2)]
    d = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 2.0, 0.0])]
    grams = [torch.diag(x).double() + 0.5 for x in d]  # off-diagonals vanish at alpha 0
    out = get_method("regmean")(ws, statistics=grams, alpha=0.0)
    want = (ws[0] * (d[0] + 0.5) + ws[1] * (d[1] + 0.5)) / (d[0] + d[1] + 1.0)
    assert torch.allclose(out, want, atol=1e-6)
    zero = [torch.zeros(3, 3, dtype=torch.float64)] * 2
    assert torch.allclose(get_method("regmean")(ws, statistics=zero), (ws[0] + ws[1]) / 2)


def test_regmean_keeps_the_mean_on_inputs_the_data_never_excites():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(2, 3, generator=g) for _ in range(2)]
    xs = [torch.randn(10, 3, generator=g) * torch.tensor([1.0, 1.0, 0.0]) for _ in range(2)]  # input 2 always 0
    out = get_method("regmean")(ws, statistics=[(x.T @ x).double() for x in xs])
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, atol=1e-5)


# ---------------------------------------------------------------- statistics


def test_fisher_statistics_match_the_per_example_reference():
    net = _mlp(0)
    x, y = _data(0, n=10)
    want = ref.fisher_diag(net, x, y)
    got = fisher_statistics(net.state_dict(), _evaluator(x, y, batch_size=4), progress=False)
    assert list(got) == [n for n, _ in net.named_parameters()]
    for (name, _), w in zip(net.named_parameters(), want):
        assert torch.allclose(got[name].double(), w, rtol=1e-4, atol=1e-9), name


def test_sampled_fisher_draws_labels_from_the_model_and_is_seeded():
    net = _mlp(0)
    x, y = _data(0, n=12)
    ev = _evaluator(x, y)
    a = fisher_statistics(net.state_dict(), ev, kind="sampled", seed=1, progress=False)
    b = fisher_statistics(net.state_dict(), ev, kind="sampled", seed=1, progress=False)
    c = fisher_statistics(net.state_dict(), ev, kind="sampled", seed=2, progress=False)
    e = fisher_statistics(net.state_dict(), ev, kind="empirical", progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a) and any(not torch.equal(a[k], e[k]) for k in a)


def test_gram_statistics_are_the_inputs_gram_of_every_linear_layer():
    net = _mlp(0)
    x, y = _data(0, n=10)
    got = gram_statistics(net.state_dict(), _evaluator(x, y, batch_size=3), progress=False)
    assert sorted(got) == ["0.weight", "2.weight"]
    assert torch.allclose(got["0.weight"], x.double().T @ x.double(), atol=1e-10)
    h = torch.tanh(net[0](x)).detach().double()
    assert torch.allclose(got["2.weight"], h.T @ h, atol=1e-5)
    assert got["0.weight"].dtype == torch.float64


def test_gram_leaves_out_padded_positions():
    from modelsoup.recipes.statistics import _rows

    x = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert torch.equal(_rows(x, mask), x[0, :2].double())
    assert _rows(x, None).shape == (4, 3)


def test_statistics_need_a_classifier_for_the_fisher():
    from modelsoup.eval.base import FunctionEvaluator

    with pytest.raises(EvaluatorError, match="log-likelihood of each example"):
        fisher_statistics({}, FunctionEvaluator(lambda s: 1.0, "f"))  # type: ignore[arg-type]


def test_model_statistics_are_cached_by_weights_and_data(tmp_path, monkeypatch):
    import modelsoup.recipes.statistics as st

    net = _mlp(0)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    x, y = _data(0)
    first = model_statistics(path, _evaluator(x, y), "fisher", cache_dir=tmp_path / "cache", progress=False)
    calls = []
    monkeypatch.setattr(st, "fisher_statistics", lambda *a, **k: calls.append(1) or {})
    again = model_statistics(path, _evaluator(x, y), "fisher", cache_dir=tmp_path / "cache", progress=False)
    assert again == first and not calls
    x2, y2 = _data(5)  # other data: computed again
    model_statistics(path, ClassificationEvaluator(_mlp(99), DataLoader(TensorDataset(x2, y2), batch_size=8), name="other"), "fisher",
                     cache_dir=tmp_path / "cache", progress=False)
    assert calls == [1]
    meta_file = load_file(first)
    assert set(meta_file) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ---------------------------------------------------------------- merges, recipes and plans


def _two(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in _mlp(i).state_dict().items()}, p)
        paths.append(p)
    return paths


def test_fisher_merge_end_to_end_is_the_weighted_average_by_fisher(tmp_path):
    paths = _two(tmp_path)
    stats = []
    for i, p in enumerate(paths):
        x, y = _data(10 + i)
        stats.append(model_statistics(p, _evaluator(x, y), "fisher", output=tmp_path / f"f{i}.safetensors", use_cache=False, progress=False))
    merge(models=[str(p) for p in paths], method="fisher", statistics=[str(s) for s in stats], output=tmp_path / "out", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    ms, fs = [load_file(p) for p in paths], [load_file(s) for s in stats]
    for k in got:
        f0, f1 = fs[0][k].double().clamp_min(1e-6), fs[1][k].double().clamp_min(1e-6)
        want = (f0 * ms[0][k].double() + f1 * ms[1][k].double()) / (f0 + f1)
        assert torch.allclose(got[k].double(), want, atol=1e-6), k
    recipe = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "statistics:" in recipe and "f0.safetensors" in recipe


def test_regmean_merge_end_to_end_solves_linear_weights_and_averages_biases(tmp_path):
    paths = _two(tmp_path)
    grams = []
    for i, p in enumerate(paths):
        x, y = _data(20 + i)
        grams.append(load_file(model_statistics(p, _evaluator(x, y), "gram", output=tmp_path / f"g{i}.safetensors", use_cache=False, progress=False)))
    ms = [load_file(p) for p in paths]
    got = merge_state_dicts(ms, method="regmean", statistics=grams, parameters={"alpha": 0.9})
    for k in ms[0]:
        if k.endswith("bias"):
            assert torch.allclose(got[k], (ms[0][k] + ms[1][k]) / 2)
        else:
            want = get_method("regmean")([ms[0][k], ms[1][k]], statistics=[grams[0][k], grams[1][k]], alpha=0.9)
            assert torch.equal(got[k], want)
            assert not torch.allclose(got[k], (ms[0][k] + ms[1][k]) / 2, atol=1e-3)


def test_data_aware_recipes_are_checked(tmp_path):
    paths = _two(tmp_path)
    with pytest.raises(RecipeError, match=r"models\[0\]: method 'fisher' weighs each model by its fisher statistics: give `data:`"):
        merge(models=[str(p) for p in paths], method="fisher", output=tmp_path / "o1")
    with pytest.raises(RecipeError, match=r"method 'linear' uses no per-model data; `statistics:` is for fisher and regmean"):
        merge(models=[str(p) for p in paths], method="linear", statistics=[str(paths[0])] * 2, output=tmp_path / "o2")
    with pytest.raises(RecipeError, match=r"'nope.safetensors' is not a file"):
        merge(models=[str(p) for p in paths], method="fisher", statistics=["nope.safetensors"] * 2, output=tmp_path / "o3")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n")
    with pytest.raises(RecipeError, match=r"statistics are not computed yet"):
        merge({"method": "fisher", "models": [{"path": str(p), "data": str(data)} for p in paths]}, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_statistics_that_do_not_fit_are_refused_before_any_tensor_is_written(tmp_path):
    paths = _two(tmp_path)
    sds = [load_file(p) for p in paths]
    wrong = [{"0.weight": torch.ones(7, 5)}, {"0.weight": torch.ones(5, 7)}]
    with pytest.raises(TensorMismatchError, match=r"0.weight \[7, 5\]: its fisher statistic in the statistics of model\[1\] \[5, 7\] float32"):
        merge_state_dicts(sds, method="fisher", statistics=wrong)
    partial = [{"0.weight": torch.ones(7, 5), "2.weight": torch.ones(3, 7)}, {"0.weight": torch.ones(7, 5)}]
    with pytest.raises(TensorMismatchError, match=r"2.weight: the statistics of model\[1\] lacks it while the others have it"):
        merge_state_dicts(sds, method="fisher", statistics=partial)
    gram_of_bias = [{"0.bias": torch.ones(7, 7)}] * 2
    with pytest.raises(TensorMismatchError, match=r"only 2-D \(out, in\) weights have a Gram matrix"):
        merge_state_dicts(sds, method="regmean", statistics=gram_of_bias)
    nan = [{"0.weight": torch.full((7, 5), float("nan"))}] * 2
    from modelsoup.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"the statistics of model\[0\]: tensor '0.weight' holds 35 NaN"):
        merge_state_dicts(sds, method="fisher", statistics=nan)
    with pytest.raises(Exception, match="negative values"):
        merge_state_dicts(sds, method="fisher", statistics=[{"0.weight": -torch.ones(7, 5)}] * 2)


# ---------------------------------------------------------------- the command line


_EVAL = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
from modelsoup.eval import ClassificationEvaluator
from torch import nn


class Tiny(ClassificationEvaluator):
    def __init__(self, path):
        d = torch.load(path, weights_only=True)
        torch.manual_seed(99)
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        super().__init__(net, DataLoader(TensorDataset(d["x"], d["y"]), batch_size=8))
'''


def test_soup_merge_computes_each_models_statistics_from_its_data_and_caches_them(tmp_path, monkeypatch, caplog):
    import logging

    from modelsoup.cli import main

    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path / "cache"))
    paths = _two(tmp_path)
    (tmp_path / "tiny_eval.py").write_text(_EVAL)
    files = []
    for i in range(2):
        x, y = _data(30 + i)
        files.append(tmp_path / f"d{i}.pt")
        torch.save({"x": x, "y": y}, files[-1])
    argv = ["merge", "--method", "regmean", str(paths[0]), str(paths[1]), "--data", f"{paths[0]}={files[0]}", "--data", f"{paths[1]}={files[1]}",
            "--eval", f"{tmp_path / 'tiny_eval.py'}:Tiny", "-o", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    ms = [load_file(p) for p in paths]
    evs = [_evaluator(*torch.load(f, weights_only=True).values()) for f in files]
    grams = [gram_statistics(m, ev, progress=False) for m, ev in zip(ms, evs)]
    want = merge_state_dicts(ms, method="regmean", statistics=grams)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(list((tmp_path / "cache" / "statistics").glob("gram-*.safetensors"))) == 2
    # again: both from the cache
    with caplog.at_level(logging.INFO, logger="modelsoup"):
        assert main([*argv, "--overwrite"]) == 0
    assert sum("from the cache" in r.getMessage() for r in caplog.records) == 2


def test_soup_merge_refuses_data_it_cannot_use(tmp_path, capsys):
    from modelsoup.cli import main

    paths = _two(tmp_path)
    d = tmp_path / "d.pt"
    torch.save({"x": torch.zeros(1, 5), "y": torch.zeros(1, dtype=torch.long)}, d)
    assert main(["merge", str(paths[0]), str(paths[1]), "--data", str(d), "--data", str(d), "-o", str(tmp_path / "o1")]) == 2
    assert "--data is for the data-aware methods (fisher, regmean); method 'linear' does not use it" in capsys.readouterr().err
    assert main(["merge", "--method", "fisher", str(paths[0]), str(paths[1]), "--data", f"{paths[0]}={d}", "-o", str(tmp_path / "o2")]) == 2
    assert "models[1]: method 'fisher' weighs each model by its fisher statistics: give `data:`" in capsys.readouterr().err
    assert main(["merge", "--method", "fisher", str(paths[0]), str(paths[1]), "--data", f"elsewhere.safetensors={d}", "-o", str(tmp_path / "o3")]) == 2
    assert "'elsewhere.safetensors' is none of the models" in capsys.readouterr().err
    assert main(["merge", "--method", "fisher", str(paths[0]), str(paths[1]), "--data", str(d), "--data", str(d), "--dry-run",
                 "-o", str(tmp_path / "o4")]) == 2
    assert "a dry run computes nothing" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_soup_statistics_then_a_recipe_file_with_statistics(tmp_path, capsys):
    from modelsoup.cli import main

    paths = _two(tmp_path)
    (tmp_path / "tiny_eval.py").write_text(_EVAL)
    stats = []
    for i, p in enumerate(paths):
        x, y = _data(40 + i)
        torch.save({"x": x, "y": y}, tmp_path / f"d{i}.pt")
        stats.append(tmp_path / f"f{i}.safetensors")
        argv = ["statistics", str(p), "--data", str(tmp_path / f"d{i}.pt"), "--kind", "fisher", "--eval", f"{tmp_path / 'tiny_eval.py'}:Tiny",
                "-o", str(stats[-1]), "--no-progress", "--no-statistics-cache"]
        assert main(argv) == 0
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # no silent replacement
    assert main([*argv, "--overwrite"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: fisher\nmodels:\n" + "".join(f"  - path: {p.name}\n    statistics: {s.name}\n" for p, s in zip(paths, stats)))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = merge_state_dicts([load_file(p) for p in paths], method="fisher", statistics=[load_file(s) for s in stats])
    assert all(torch.equal(got[k], want[k]) for k in want)
    from safetensors import safe_open

    with safe_open(str(stats[0]), "pt") as f:
        meta = f.metadata()
    assert meta["statistic"] == "fisher" and meta["kind"] == "empirical" and meta["examples"] == "24"


def test_statistics_of_another_model_are_refused(tmp_path):
    paths = _two(tmp_path)
    sds = [load_file(p) for p in paths]
    other = [{"module.0.weight": torch.ones(7, 5)}] * 2  # another prefix: it would quietly give the plain mean
    with pytest.raises(TensorMismatchError, match=r"holds 1 tensor\(s\) the merge does not have \(module.0.weight\): these are not this model's"):
        merge_state_dicts(sds, method="fisher", statistics=other)
    with pytest.raises(TensorMismatchError, match="has no statistic of any tensor the merge computes"):
        merge_state_dicts(sds, method="fisher", statistics=[{"0.weight": torch.ones(7, 5)}] * 2,
                          overrides=[{"match": "0.weight", "take": "first"}])
    # a statistic of a tensor the recipe leaves out is not foreign
    fine = [{"0.weight": torch.ones(7, 5), "2.weight": torch.ones(3, 7)}] * 2
    out = merge_state_dicts(sds, method="fisher", statistics=fine, overrides=[{"match": "2.*", "take": "skip"}])
    assert "2.weight" not in out and torch.allclose(out["0.weight"], (sds[0]["0.weight"] + sds[1]["0.weight"]) / 2)


def test_a_recipe_file_with_data_per_model(tmp_path):
    from modelsoup.cli import main

    paths = _two(tmp_path)
    (tmp_path / "tiny_eval.py").write_text(_EVAL)
    for i in range(2):
        x, y = _data(50 + i)
        torch.save({"x": x, "y": y}, tmp_path / f"d{i}.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: regmean\nparameters: {alpha: 0.5}\nmodels:\n" + "".join(f"  - path: {p.name}\n    data: d{i}.pt\n" for i, p in enumerate(paths)))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--eval", f"{tmp_path / 'tiny_eval.py'}:Tiny", "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    grams = [gram_statistics(load_file(p), _evaluator(*torch.load(tmp_path / f"d{i}.pt", weights_only=True).values()), progress=False)
             for i, p in enumerate(paths)]
    want = merge_state_dicts([load_file(p) for p in paths], method="regmean", statistics=grams, parameters={"alpha": 0.5})
    assert all(torch.equal(got[k], want[k]) for k in want)
    written = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "data: ../d0.pt" in written and "statistics:" in written  # the record says which data and which statistics
    assert main(["merge", str(recipe), str(tmp_path / "o2"), "--data", "x=y"]) == 2


def test_regmean_refuses_what_is_not_a_gram_matrix():
    from modelsoup.errors import MethodError

    w = [torch.ones(2, 3), torch.ones(2, 3)]
    skew = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(MethodError, match="not one"):
        get_method("regmean")(w, statistics=[skew, torch.eye(3, dtype=torch.float64)])
    with pytest.raises(MethodError, match="not one"):
        get_method("regmean")(w, statistics=[-torch.eye(3, dtype=torch.float64)] * 2)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # symmetric, diagonal >= 0, an eigenvalue -1
    with pytest.raises(MethodError, match="positive semi-definite"):
        get_method("regmean")([torch.ones(2, 2)] * 2, statistics=[indefinite, torch.eye(2, dtype=torch.float64)])
    x = torch.randn(5, 3, dtype=torch.float64)
    singular = x[:, :1] @ x[:, :1].T  # rank one, zero eigenvalues in rounding: still a Gram
    get_method("regmean")([torch.ones(2, 5)] * 2, statistics=[singular, singular])


def test_a_tied_name_the_checkpoint_does_not_store_gets_no_statistic(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 5)
            self.head = nn.Linear(5, 6, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x))

    torch.manual_seed(0)
    net = Tied()
    ev = ClassificationEvaluator(net, DataLoader(TensorDataset(torch.tensor([1, 2, 3]), torch.tensor([0, 4, 5])), batch_size=2))
    stored = {"emb.weight": net.emb.weight.detach().clone()}  # as safetensors stores a tie: once
    assert set(fisher_statistics(stored, ev, progress=False)) == {"emb.weight"}
    with pytest.raises(EvaluatorError, match="Tied has no nn.Linear layer"):  # its only one is the tied head the file does not store
        gram_statistics(stored, ev, progress=False)


# ---------------------------------------------------------------- red-team findings: statistics that would not apply


def _adapter(folder, seed):
    import json

    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "2"]}))
    save_file({"base_model.model.0.lora_A.weight": torch.randn(2, 5, generator=g), "base_model.model.0.lora_B.weight": torch.randn(7, 2, generator=g),
               "base_model.model.2.lora_A.weight": torch.randn(2, 7, generator=g), "base_model.model.2.lora_B.weight": torch.randn(3, 2, generator=g)},
              folder / "adapter_model.safetensors")
    return folder


def test_statistics_of_adapters_and_of_a_nested_key_are_of_the_model_as_merged(tmp_path, monkeypatch):
    from modelsoup.cli import main
    from modelsoup.io import open_checkpoint
    from modelsoup.io.adapters import adapted

    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tiny_eval.py").write_text(_EVAL)
    save_file({k: v.contiguous() for k, v in _mlp(0).state_dict().items()}, tmp_path / "base.safetensors")
    ads = [_adapter(tmp_path / f"a{i}", i) for i in range(2)]
    files = []
    for i in range(2):
        x, y = _data(60 + i)
        files.append(tmp_path / f"d{i}.pt")
        torch.save({"x": x, "y": y}, files[-1])
    ev = f"{tmp_path / 'tiny_eval.py'}:Tiny"
    assert main(["merge", "--method", "fisher", "--base", str(tmp_path / "base.safetensors"), str(ads[0]), str(ads[1]), "--data", str(files[0]),
                 "--data", str(files[1]), "--eval", ev, "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    states = []
    for a in ads:
        ck = adapted(open_checkpoint(tmp_path / "base.safetensors"), a)
        states.append({n: ck.read(n) for n in ck.names()})
        ck.close()
    fishers = [fisher_statistics(sd, _evaluator(*torch.load(f, weights_only=True).values()), progress=False) for sd, f in zip(states, files)]
    want = merge_state_dicts(states, method="fisher", statistics=fishers)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    # a nested torch checkpoint read with --key: the statistics are of that entry, and the key is part of the cache key
    for i in range(2):
        torch.save({"state_dict": _mlp(i).state_dict(), "ema": _mlp(10 + i).state_dict()}, tmp_path / f"k{i}.pt")
    out = {}
    for key in ("ema", "state_dict"):
        assert main(["merge", "--method", "fisher", str(tmp_path / "k0.pt"), str(tmp_path / "k1.pt"), "--key", key, "--data", str(files[0]),
                     "--data", str(files[1]), "--eval", ev, "-o", str(tmp_path / f"o-{key}"), "--no-progress"]) == 0
        out[key] = load_file(tmp_path / f"o-{key}" / "model.safetensors")
        sds = [_mlp(10 + i if key == "ema" else i).state_dict() for i in range(2)]
        fishers = [fisher_statistics(sd, _evaluator(*torch.load(f, weights_only=True).values()), progress=False) for sd, f in zip(sds, files)]
        want = merge_state_dicts(sds, method="fisher", statistics=fishers)
        assert all(torch.allclose(out[key][k], want[k], atol=1e-6) for k in want), key


def test_an_evaluator_that_would_not_read_each_models_data_is_refused(tmp_path, capsys):
    from modelsoup.cli import main

    paths = _two(tmp_path)
    (tmp_path / "ev.py").write_text(_EVAL + "\ninstance = Tiny(__import__('pathlib').Path(__file__).with_name('d.pt'))\n"
                                    "class NoArg(Tiny):\n    def __init__(self):\n        super().__init__(__import__('pathlib').Path(__file__).with_name('d.pt'))\n")
    torch.save({"x": torch.zeros(2, 5), "y": torch.zeros(2, dtype=torch.long)}, tmp_path / "d.pt")
    base = ["merge", "--method", "fisher", str(paths[0]), str(paths[1]), "--data", str(tmp_path / "d.pt"), "--data", str(tmp_path / "d.pt")]
    for name in ("instance", "NoArg"):
        assert main([*base, "--eval", f"{tmp_path / 'ev.py'}:{name}", "-o", str(tmp_path / name)]) == 2
        assert "give an Evaluator class whose constructor takes the data path" in capsys.readouterr().err
    assert main([*base, "--eval", f"{tmp_path / 'ev.py'}:Tiny", "--limit", "2", "-o", str(tmp_path / "lim")]) == 2
    assert "--limit are options of the built-in evaluators" in capsys.readouterr().err


def test_the_cache_follows_the_evaluators_code_and_the_file_follows_its_kind_and_owner(tmp_path, monkeypatch):
    from modelsoup.cli import main

    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path / "cache"))
    paths = _two(tmp_path)
    x, y = _data(70)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    (tmp_path / "ev.py").write_text(_EVAL)
    argv = ["merge", "--method", "regmean", str(paths[0]), str(paths[1]), "--data", str(tmp_path / "d.pt"), "--data", str(tmp_path / "d.pt"),
            "--eval", f"{tmp_path / 'ev.py'}:Tiny", "--no-progress", "--overwrite"]
    assert main([*argv, "-o", str(tmp_path / "tanh")]) == 0
    (tmp_path / "ev.py").write_text(_EVAL.replace("nn.Tanh()", "nn.ReLU()"))  # the same data, another module: new statistics
    assert main([*argv, "-o", str(tmp_path / "relu")]) == 0
    a, b = load_file(tmp_path / "tanh" / "model.safetensors"), load_file(tmp_path / "relu" / "model.safetensors")
    assert not torch.equal(a["2.weight"], b["2.weight"])
    assert len(list((tmp_path / "cache" / "statistics").glob("gram-*"))) == 4
    assert main([*argv, "--no-statistics-cache", "-o", str(tmp_path / "again")]) == 0  # computed again, not an error
    # a file of one kind for the other method, or of one model for another, is refused by its metadata
    stats = []
    for i, p in enumerate(paths):
        stats.append(tmp_path / f"g{i}.safetensors")
        assert main(["statistics", str(p), "--data", str(tmp_path / "d.pt"), "--kind", "gram", "--eval", f"{tmp_path / 'ev.py'}:Tiny",
                     "-o", str(stats[-1]), "--no-progress"]) == 0
    with pytest.raises(RecipeError, match="holds gram statistics, and this method needs fisher statistics"):
        merge(models=[str(p) for p in paths], method="fisher", statistics=[str(s) for s in stats], output=tmp_path / "o1")
    with pytest.raises(RecipeError, match=r"models\[0\]: \S*g1.safetensors was computed for other weights than"):
        merge(models=[str(p) for p in paths], method="regmean", statistics=[str(stats[1]), str(stats[0])], output=tmp_path / "o2")

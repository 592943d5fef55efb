"""AdaMerging: entropy-minimised task-arithmetic coefficients, against a brute-force grid and across memory modes."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from modelsoup import merge_state_dicts
from modelsoup.demo.digits import Hyper, load_splits, make_net, train
from modelsoup.errors import EvaluatorError, OptionError
from modelsoup.eval import ClassificationEvaluator
from modelsoup.eval.base import FunctionEvaluator
from modelsoup.recipes import adamerging
from modelsoup.recipes.adaptive import entropy_loss


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    """A base MLP trained briefly on all digits, fine-tuned on digits 0-4 and on 5-9; inputs of both tasks unlabeled."""
    root = tmp_path_factory.mktemp("ada")
    data = load_splits(0)
    x, y = data["train"]
    torch.manual_seed(0)
    base = make_net()
    train(base, (x[:300], y[:300]), Hyper(lr=1e-3, epochs=1, seed=0))
    paths = [root / "base.safetensors"]
    save_file(base.state_dict(), paths[0])
    for k, keep in enumerate((y < 5, y >= 5)):
        ft = make_net()
        ft.load_state_dict(base.state_dict())
        train(ft, (x[keep], y[keep]), Hyper(lr=1e-3, epochs=3, seed=1 + k))
        paths.append(root / f"ft{k}.safetensors")
        save_file(ft.state_dict(), paths[-1])
    vx, vy = data["val"]
    return paths, (vx[:160], vy[:160])


def _ev(data, batch_size=40):
    return ClassificationEvaluator(make_net(), DataLoader(TensorDataset(*data), batch_size=batch_size), name="digits-val")


def _entropy_of(state, data):
    net = make_net()
    net.load_state_dict(state)
    with torch.no_grad():
        logp = torch.log_softmax(net(data[0]), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def test_entropy_decreases_and_the_task_wise_lambdas_match_a_brute_force_grid(task_models):
    """On these two conflicting fine-tunes the entropy over (lambda_0, lambda_1) has more than one basin (a corner at
    (1, 1) and the lowest point near (1, 0.5)); AdaMerging must end at the lowest point of a brute-force grid."""
    from safetensors.torch import load_file

    paths, data = task_models
    base, fts = str(paths[0]), [str(p) for p in paths[1:]]
    res = adamerging(fts, base, _ev(data), by="model", lr=0.02, epochs=40, progress=False)
    assert res.history[-1]["entropy"] < res.history[0]["entropy"]
    assert res.entropy < res.start_entropy - 0.3
    sds = [load_file(p) for p in paths]
    step = 0.1
    grid = [round(i * step, 10) for i in range(int(1 / step) + 1)]
    best = min((_entropy_of(merge_state_dicts(sds[1:], method="task_arithmetic", base=sds[0], weights=list(lams)), data), lams)
               for lams in itertools.product(grid, grid))
    assert res.entropy <= best[0] + 1e-3, (res.entropy, best)
    assert max(abs(a - b) for a, b in zip(res.lambdas, best[1])) <= step, (res.lambdas, best)
    # the recipe is the linear soup of the base and the fine-tunes whose entropy was reported
    merged = merge_state_dicts(sds, weights=[m.weight for m in res.recipe.models])
    assert _entropy_of(merged, data) == pytest.approx(res.entropy, abs=1e-5)
    assert [m.weight for m in res.recipe.models][1:] == pytest.approx(res.lambdas)


def test_layer_wise_resident_and_streaming_learn_the_same_lambdas(task_models):
    paths, data = task_models
    base, fts = str(paths[0]), [str(p) for p in paths[1:]]
    a = adamerging(fts, base, _ev(data), by="layer", epochs=2, lr=0.02, memory="resident", accumulate=2, progress=False)
    b = adamerging(fts, base, _ev(data), by="layer", epochs=2, lr=0.02, memory="streaming", accumulate=2, progress=False)
    assert a.memory == "resident" and b.memory == "streaming"
    assert set(a.lambdas) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    for name in a.lambdas:
        assert a.lambdas[name] == pytest.approx(b.lambdas[name], abs=1e-5), name
    assert len({tuple(v) for v in a.lambdas.values()}) > 1  # tensors learn their own coefficients
    assert all(0.0 <= x <= 1.0 for v in a.lambdas.values() for x in v)


def test_the_objective_ignores_labels(task_models):
    paths, data = task_models
    shuffled = (data[0], data[1].flip(0))
    loss_a, loss_b = entropy_loss(_ev(data)), entropy_loss(_ev(shuffled))
    net = make_net()
    batch_a, batch_b = next(iter(_ev(data).batches())), next(iter(_ev(shuffled).batches()))
    assert torch.equal(loss_a(net, batch_a)[0], loss_b(net, batch_b)[0])


def test_adamerging_refuses_what_it_cannot_learn_from(task_models):
    paths, data = task_models
    with pytest.raises(EvaluatorError, match="differentiates the predictions' entropy"):
        adamerging([str(paths[1])], str(paths[0]), FunctionEvaluator(lambda s: 1.0, "f"))
    with pytest.raises(OptionError, match="low <= init <= high"):
        adamerging([str(paths[1])], str(paths[0]), _ev(data), init=2.0)
    with pytest.raises(OptionError, match="by must be one of"):
        adamerging([str(paths[1])], str(paths[0]), _ev(data), by="block")


def test_soup_adamerge_writes_the_learned_merge(task_models, tmp_path, capsys):
    from safetensors.torch import load_file

    from modelsoup.cli import main

    paths, data = task_models
    here = tmp_path / "ev.py"
    here.write_text("import torch\nfrom torch.utils.data import DataLoader, TensorDataset\nfrom modelsoup.demo.digits import load_splits, make_net\n"
                    "from modelsoup.eval import ClassificationEvaluator\nx, y = load_splits(0)['val']\n"
                    "ev = ClassificationEvaluator(make_net(), DataLoader(TensorDataset(x[:160], y[:160]), batch_size=40), name='val160')\n")
    out = tmp_path / "out"
    assert main(["adamerge", str(paths[0]), str(paths[1]), str(paths[2]), "-o", str(out), "--eval", f"{here}:ev", "--heldout", "val",
                 "--by", "model", "--lr", "0.02", "--epochs", "4", "--no-progress", "--no-cache"]) == 0
    text = capsys.readouterr().out
    assert "# AdaMerging" in text and "mean entropy" in text
    lib = adamerging([str(p) for p in paths[1:]], str(paths[0]), _ev(data), by="model", lr=0.02, epochs=4, progress=False, score=False)
    got = load_file(out / "adamerging" / "model.safetensors")
    want = merge_state_dicts([load_file(p) for p in paths], weights=[m.weight for m in lib.recipe.models])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert main(["adamerge", str(paths[0]), str(paths[0]), "-o", str(tmp_path / "o2"), "--eval", f"{here}:ev", "--heldout", "val"]) == 2
    assert "is the base; list only the fine-tunes" in capsys.readouterr().err


def test_adamerging_over_several_tasks_weighs_each_tasks_mean_entropy(task_models):
    from modelsoup.eval.domains import multi_domain

    paths, data = task_models
    x, y = data
    tasks = multi_domain({"low": _ev((x[y < 5], y[y < 5])), "high": _ev((x[y >= 5], y[y >= 5]))})
    res = adamerging([str(p) for p in paths[1:]], str(paths[0]), tasks, by="model", lr=0.02, epochs=5, progress=False)
    assert res.entropy < res.start_entropy
    assert {"domain/low", "domain/high"} <= set(res.score.metrics)  # the score is reported per task
    # the objective is the mean of the two tasks' mean entropies, whatever their sizes
    from modelsoup.recipes.adaptive import _mean_entropy, entropy_loss
    from modelsoup.recipes import Pantry

    with Pantry([str(p) for p in paths]) as pantry:
        state = pantry.state(res.recipe)
        both = _mean_entropy(tasks, state, entropy_loss(tasks))
        low = _mean_entropy(tasks.domains["low"], state, entropy_loss(tasks.domains["low"]))
        high = _mean_entropy(tasks.domains["high"], state, entropy_loss(tasks.domains["high"]))
    assert both == pytest.approx((low + high) / 2, rel=1e-5)


def test_a_name_stored_as_one_tensor_with_another_keeps_its_coefficients(tmp_path):
    """A .pt checkpoint whose head shares the embedding's storage: the written recipe must give both names the same
    per-tensor coefficients, or the head would be merged by the start's weights and untied (a red-team finding)."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    base = Tied()
    paths = [tmp_path / "base.pt"]
    torch.save(base.state_dict(), paths[0])
    for k in range(2):
        ft = Tied()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            ft.emb.weight.add_(0.5 * torch.randn(10, 6))
        paths.append(tmp_path / f"ft{k}.pt")
        torch.save(ft.state_dict(), paths[-1])
    x = torch.arange(10).repeat(4)
    ev = ClassificationEvaluator(Tied(), DataLoader(TensorDataset(x, x), batch_size=8))
    res = adamerging([str(p) for p in paths[1:]], str(paths[0]), ev, by="tensor", lr=0.05, epochs=5, progress=False)
    assert res.lambdas["head.weight"] == res.lambdas["emb.weight"] != [0.3, 0.3]
    merged = merge_state_dicts([torch.load(p, weights_only=True) for p in paths], weights=[m.weight for m in res.recipe.models],
                               overrides=[{"match": o.match, "weights": list(o.weights)} for o in res.recipe.overrides])
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    net = Tied()
    net.load_state_dict(merged)
    with torch.no_grad():
        logp = torch.log_softmax(net(x), -1)
    assert float(-(logp.exp() * logp).sum(-1).mean()) == pytest.approx(res.entropy, abs=1e-5)

"""`soup demo`: fine-tune small ingredients from one start on real data, then merge them with every method.

The data are scikit-learn's bundled handwritten digits (1,797 8x8 images, offline). A small MLP is
trained briefly ("pre-trained"), then fine-tuned into several ingredients with different learning
rates, seeds and regularisation, as in the model-soups paper. Ingredients are saved as safetensors and
merged through the public API (``modelsoup.merge``), exactly as a user would.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..api import merge

log = logging.getLogger("modelsoup")


def make_net() -> nn.Module:
    """The demo's classifier: a small MLP on 8x8 digit images."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@dataclass(frozen=True)
class Hyper:
    lr: float
    epochs: int
    seed: int
    weight_decay: float = 0.0
    label_smoothing: float = 0.0


def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 1,797 digits, scaled to [0, 1], split by ``seed`` into train (900), val (400) and test (497)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the demo extra
        raise SystemExit("soup demo needs scikit-learn: pip install 'modelsoup[demo]'") from e
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_tr, n_val = 900, 400
    parts = {"train": perm[:n_tr], "val": perm[n_tr : n_tr + n_val], "test": perm[n_tr + n_val :]}
    return {k: (x[i], y[i]) for k, i in parts.items()}


def train(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], h: Hyper) -> None:
    """Train ``net`` in place with AdamW on (x, y), batches of 32 shuffled by ``h.seed``."""
    g = torch.Generator().manual_seed(h.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=h.label_smoothing)
    x, y = data
    for _ in range(h.epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            opt.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()


@torch.inference_mode()
def _accuracy(state: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> float:
    net = make_net()
    net.load_state_dict(state)
    x, y = data
    return float((net(x).argmax(1) == y).float().mean())


def run_demo(out: Path, *, quick: bool = False, seed: int = 0) -> list[tuple[str, float, float]]:
    """Train ingredients, merge them with each method, print and return (name, val acc, test acc) rows."""
    t0 = time.perf_counter()
    data = load_splits(seed)
    torch.manual_seed(seed)
    base = make_net()
    train(base, data["train"], Hyper(lr=1e-3, epochs=1 if quick else 2, seed=seed))
    ing_dir = out / "ingredients"
    ing_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, ing_dir / "base.safetensors")
    sweep = [Hyper(lr, ep, seed + i, wd, ls) for i, (lr, ep, wd, ls) in enumerate(
        [(3e-3, 4, 0.0, 0.0), (1e-3, 6, 0.01, 0.0), (3e-3, 4, 0.05, 0.1), (2e-3, 5, 0.0, 0.1), (5e-3, 3, 0.01, 0.0), (1e-3, 8, 0.0, 0.05)]
    )]
    if quick:
        sweep = [Hyper(h.lr, 1, h.seed, h.weight_decay, h.label_smoothing) for h in sweep[:3]]
    paths = []
    for i, h in enumerate(sweep):
        net = make_net()
        net.load_state_dict(base.state_dict())
        train(net, data["train"], h)
        p = ing_dir / f"ft-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, p)
        paths.append(p)
    rows = [("pre-trained start", _accuracy(load_file(ing_dir / "base.safetensors"), data["val"]), _accuracy(load_file(ing_dir / "base.safetensors"), data["test"]))]
    for p in paths:
        sd = load_file(p)
        rows.append((p.stem, _accuracy(sd, data["val"]), _accuracy(sd, data["test"])))
    best = max(rows[1:], key=lambda r: r[1])
    recipes = {
        "uniform soup (linear)": dict(method="linear"),
        "task_arithmetic": dict(method="task_arithmetic", base=ing_dir / "base.safetensors", parameters={"scale": 1.0 / len(paths)}),
        "ties": dict(method="ties", base=ing_dir / "base.safetensors", parameters={"density": 0.5, "scale": 1.0}),
        "dare_ties": dict(method="dare_ties", base=ing_dir / "base.safetensors", parameters={"density": 0.7}),
        "model_stock": dict(method="model_stock", base=ing_dir / "base.safetensors"),
    }
    soup_dir = out / "soups"
    for name, kw in recipes.items():
        target = soup_dir / f"{kw['method']}.safetensors"
        merge(models=paths, output=target, overwrite=True, progress=False, **kw)  # type: ignore[arg-type]
        sd = load_file(target)
        rows.append((name, _accuracy(sd, data["val"]), _accuracy(sd, data["test"])))
    labels = [name + (" (best on val)" if (name, va, te) == best else "") for name, va, te in rows]
    width = max(map(len, labels)) + 1
    print(f"\nscikit-learn digits: {len(paths)} MLP ingredients fine-tuned from one start, merged by modelsoup\n")
    print(f"| {'model':<{width}}| val acc | test acc |")
    print(f"|{'-' * (width + 1)}|--------:|---------:|")
    for label, (_, va, te) in zip(labels, rows):
        print(f"| {label:<{width}}| {va:7.3f} | {te:8.3f} |")
    print(f"\ningredients and soups in {out} ({time.perf_counter() - t0:.0f} s)")
    return rows


DOMAINS = {"digits 0-4": lambda y: y < 5, "digits 5-9": lambda y: y >= 5}


def run_domains_demo(out: Path, *, seed: int = 0, progress: bool | None = None) -> tuple[Any, dict[str, list[float]]]:
    """Branch-Train-Merge on digits: a linear classifier fine-tuned on two digit subsets (domains), then souped.

    A linear classifier (its class weights are 8x8 templates) is pre-trained briefly on all digits,
    then fine-tuned twice on digits 0-4 and twice on digits 5-9. Each domain has its own held-out and
    test sets; :func:`modelsoup.recipes.kitchen` scores every ingredient and soup on both domains and on
    their mean, and the class templates of the ingredients, the soups and the class means are drawn
    side by side with their correlations to the uniform soup's.

    Returns:
        (the :class:`~modelsoup.recipes.kitchen.CookResult`, model -> per-class template correlation with
        the uniform soup); ``out`` holds the soups, ``results.md``, ``templates.png`` and ``templates.json``.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from ..analysis.templates import class_templates, template_correlations, template_grid
    from ..eval import ClassificationEvaluator
    from ..eval.domains import multi_domain
    from ..recipes import cook

    data = load_splits(seed)
    x, y = data["train"]
    ing_dir = out / "ingredients"
    ing_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = nn.Linear(64, 10)
    nn.init.zeros_(base.weight)
    nn.init.zeros_(base.bias)
    train(base, data["train"], Hyper(1e-2, 1, seed))
    paths = []
    for d, (name, select) in enumerate(DOMAINS.items()):
        for k, (lr, epochs) in enumerate([(1e-2, 5), (5e-3, 8)]):
            net = nn.Linear(64, 10)
            net.load_state_dict(base.state_dict())
            keep = select(y)
            train(net, (x[keep], y[keep]), Hyper(lr, epochs, seed + 10 * d + k + 1))
            p = ing_dir / f"{name.split()[1]}-ft{k}.safetensors"
            save_file(net.state_dict(), p)
            paths.append(p)

    def evaluators(split: str) -> Any:
        xs, ys = data[split]
        evs = {}
        for name, select in DOMAINS.items():
            keep = select(ys)
            evs[name] = ClassificationEvaluator(nn.Linear(64, 10), DataLoader(TensorDataset(xs[keep], ys[keep]), batch_size=256),
                                                name=f"digits-{split}-{name}-seed{seed}", progress=progress)
        return multi_domain(evs)

    result = cook(paths, evaluators("val"), test=evaluators("test"), output=out / "soups", overwrite=True, progress=progress)
    states = {p.stem: load_file(p) for p in paths}
    for soup in ("uniform", "greedy"):
        states[f"{soup} soup"] = load_file(out / "soups" / soup / "model.safetensors")
    templates = {k: class_templates(v) for k, v in states.items()}
    templates["class means"] = torch.stack([x[y == c].mean(0) - x.mean(0) for c in range(10)]).double()
    corr = template_correlations(templates, "uniform soup")
    template_grid(templates, (8, 8), out / "templates.png", correlations=corr, reference="uniform soup")
    (out / "templates.json").write_text(json.dumps({"reference": "uniform soup", "correlations": corr}, indent=1))
    return result, corr

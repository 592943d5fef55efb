"""Regenerate the digits figures of docs/align.md: barriers before and after permutation alignment and REPAIR.

    python docs/align_digits.py [OUT]        # default out/align; writes docs/figures/align-*.png

Pairs of nets of one architecture trained on the same 900 digits from different random starts (seeds 100+k and
200+k): the demo's MLP (64-128-128-10) and a small CNN with BatchNorm (three 3x3 conv-BN-ReLU layers, 32-64-64
channels, max-pooling, global average pooling, a linear head) on the 8x8 images. Each pair's line
``(1 - alpha) A + alpha B`` is scored on the 400 validation digits (the split of `soup demo`, seed 0): as given,
after weight matching, after activation matching (on the training digits), and after weight matching + REPAIR
(statistics measured on the training digits). Every CNN soup has its BatchNorm statistics recomputed on the
training digits ("reset BN"), since averaged running statistics do not describe a soup. Then the two commands
of docs/align.md run on the first MLP pair.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modelsoup.align import (
    activation_matching,
    align,
    apply_permutation,
    interpolate_states,
    repair,
    weight_matching,
)
from modelsoup.analysis.curves import barrier
from modelsoup.cli import main
from modelsoup.demo.digits import Hyper, load_splits, make_net, train
from modelsoup.eval.batchnorm import recalibrate_bn

DOCS = Path(__file__).resolve().parent
ALPHAS = [i / 10 for i in range(11)]
PAIRS = 3


def make_cnn() -> nn.Module:
    """A small CNN with BatchNorm for the 8x8 digits (flat 64-pixel inputs are unflattened first)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


ARCHS = {"MLP": (make_net, Hyper(3e-3, 6, 0)), "CNN": (make_cnn, Hyper(3e-3, 6, 0))}


def trained(make, hyper: Hyper, seed: int, data) -> nn.Module:
    torch.manual_seed(seed)
    net = make()
    train(net, data["train"], Hyper(hyper.lr, hyper.epochs, seed))
    return net.eval()


def scores(make, state, data, split: str = "val", reset_on=None) -> tuple[float, float]:
    """(accuracy, cross-entropy) of a state on a split (BatchNorm statistics first recomputed on ``reset_on``)."""
    net = make()
    net.load_state_dict(state)
    if reset_on is not None:
        recalibrate_bn(net, reset_on)
    net.eval()
    x, y = data[split]
    with torch.no_grad():
        logits = net(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def line(make, a, b, data, *, reset_on=None, repaired=None) -> list[tuple[float, float]]:
    """Validation (accuracy, loss) at every alpha of the line from a to b (``repaired``: alpha -> a REPAIRed state)."""
    sa, sb = a.state_dict(), b.state_dict()
    out = []
    for al in ALPHAS:
        if repaired is not None and 0 < al < 1:
            out.append(scores(make, repaired(al), data))
        else:
            out.append(scores(make, interpolate_states(sa, sb, al), data, reset_on=reset_on if 0 < al < 1 else None))
    return out


def measure(name: str, k: int, data) -> dict[str, list[tuple[float, float]]]:
    make, hyper = ARCHS[name]
    a, b = trained(make, hyper, 100 + k, data), trained(make, hyper, 200 + k, data)
    batches = [(x, y) for x, y in zip(data["train"][0].split(300), data["train"][1].split(300))]
    reset = batches if name == "CNN" else None
    res = align(a, [b], data=batches)  # weight matching, checked on the training digits
    spec = res.spec
    wm = make().eval()
    wm.load_state_dict(res.models[0].state)
    am = make().eval()
    am.load_state_dict(apply_permutation(spec, b.state_dict(), activation_matching(spec, a, b, batches)))
    curves = {
        "as given": line(make, a, b, data, reset_on=reset),
        "weight matching": line(make, a, wm, data, reset_on=reset),
        "activation matching": line(make, a, am, data, reset_on=reset),
        "weight matching + REPAIR": line(make, a, wm, data, repaired=lambda al: repair(a, wm, al, batches, spec=spec)),
    }
    if name == "CNN":
        curves["as given, BN statistics averaged"] = line(make, a, b, data)
    # weight matching as a second call gives the same permutation (seeded, deterministic)
    assert all(torch.equal(res.models[0].perms[g], weight_matching(spec, a.state_dict(), b.state_dict())[g]) for g in res.models[0].perms)
    return curves


def summary(curves: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float, float]]:
    """(midpoint accuracy, accuracy barrier, loss barrier) per curve (barriers as `soup curve` computes them)."""
    pts = [(1 - x, x) for x in ALPHAS]
    return {k: (v[ALPHAS.index(0.5)][0], barrier(pts, [a for a, _ in v]).value, barrier(pts, [lo for _, lo in v], lower_is_better=True).value)  # type: ignore[union-attr]
            for k, v in curves.items()}


def soup(*argv: str) -> None:
    print("$ soup " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(["-q", *argv]) != 0:
        raise SystemExit(f"soup {argv[0]} failed")


def run(out: Path) -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    data = load_splits(0)
    results = {name: [measure(name, k, data) for k in range(PAIRS)] for name in ARCHS}
    for name, runs in results.items():
        ends = [(r["as given"][0][0] + r["as given"][-1][0]) / 2 for r in runs]
        print(f"\n{name}: {PAIRS} pairs from different random starts, validation accuracy of the end points "
              f"{min(ends):.3f}-{max(ends):.3f} (mean of each pair's two)\n")
        keys = list(runs[0])
        print("midpoint accuracy (accuracy barrier; loss barrier)\n")
        print("| pair | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for k, r in enumerate(runs):
            s = summary(r)
            print(f"| {k + 1} | " + " | ".join(f"{s[c][0]:.3f} ({s[c][1]:+.3f}; {s[c][2]:+.3f})" for c in keys) + " |")
        mean = {c: [sum(summary(r)[c][i] for r in runs) / len(runs) for i in (1, 2)] for c in keys}
        print("| mean barriers | " + " | ".join(f"{mean[c][0]:+.3f}; {mean[c][1]:+.3f}" for c in keys) + " |")
    _figure(results, DOCS / "figures" / "align-digits.png")
    # the commands of docs/align.md, on the first MLP pair
    nets = out / "nets"
    nets.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in (100, 200):
        paths.append(str(nets / f"mlp-{seed}.safetensors"))
        save_file(trained(make_net, ARCHS["MLP"][1], seed, data).state_dict(), paths[-1])
    soup("align", *paths, "--arch", "modelsoup.demo.digits:make_net", "-o", str(out / "aligned"), "--overwrite")
    soup("curve", *paths, "--eval", f"{DOCS / 'digits_eval.py'}:heldout", "--heldout", "val", "--no-progress", "--no-cache",
         "--align", "--repair", "-o", str(out / "curve"), "--overwrite")
    shutil.copyfile(out / "curve" / "curve-aligned.png", DOCS / "figures" / "align-curve-aligned.png")
    print(f"\n{time.perf_counter() - t0:.0f} s")


def _figure(results: dict[str, list[dict[str, list[tuple[float, float]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(11, 4), squeeze=False)
    for ax, (name, runs) in zip(axes.flat, results.items()):
        for key, style in (("as given", "-o"), ("weight matching", "-s"), ("activation matching", "-^"), ("weight matching + REPAIR", "-d")):
            ax.plot(ALPHAS, [a for a, _ in runs[0][key]], style, ms=3, label=key)
        ax.set_title(f"{name}, pair 1" + (" (BN statistics reset)" if name == "CNN" else ""), fontsize=10)
        ax.set_xlabel("alpha (0: net A, 1: net B)")
        ax.set_ylabel("validation accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/align"))

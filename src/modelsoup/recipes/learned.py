"""Learned soup (Wortsman et al. 2022, Section 3): mixing coefficients optimised on held-out data.

The soup is theta = sum_i a_i theta_i with a = softmax(alpha / temperature), one alpha per model
(``by="model"``), one per model and layer of the layer stack (``by="layer"``: every tensor of ``layers.3.`` shares
one; a tensor outside the stack has its own), or one per model and tensor (``by="tensor"``, the paper's "by
layer", whose layers are parameter blocks), starting from
alpha = 0 (the uniform soup). The held-out loss is minimised by gradient descent through
``torch.func.functional_call``, every ingredient resident in float32 on the evaluator's device.

The held-out score is checked after every epoch on the exact weights the merge would write, and the
best point is returned (ties go to the lower held-out loss), the uniform start included: a learned soup
never ends worse on held-out data than the uniform soup it started from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..recipe import Recipe
from ..errors import EvaluatorError, InsufficientMemoryError, OptionError
from ..eval.base import Evaluator, Predictions, Score
from ..eval.module import ModuleEvaluator, load_weights, to_device
from ..eval.base import run_evaluator
from .pantry import as_pantry
from .pantry import Pantry
from ..plan import layer_index
from ..progress import progress_on

log = logging.getLogger("modelsoup")

OPTIMIZERS = ("adamw", "adam", "sgd")
GRANULARITY = ("model", "layer", "tensor")


@dataclass
class LearnedResult:
    """A learned soup.

    Attributes:
        recipe: the soup as a ``linear`` recipe (per-tensor weights as overrides when ``by`` is ``layer`` or ``tensor``).
        weights: mixing coefficients per model (``by="model"``), or tensor name -> per-model coefficients.
        score: held-out score of the returned soup (of the weights :func:`modelsoup.merge` writes).
        start_score: held-out score of the uniform soup it started from.
        epoch: the epoch whose coefficients were kept (0 = the uniform start).
        history: per epoch: the held-out loss averaged over the epoch's steps (epoch 0: the uniform
            soup's) and the held-out score at the epoch's end.
        seconds: wall time.
        predictions: the returned soup's held-out predictions, when the evaluator gives them.
    """

    recipe: Recipe
    weights: list[float] | dict[str, list[float]]
    score: Score
    start_score: Score
    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    predictions: Predictions | None = None


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def memory_estimate(model_bytes_fp32: int, n_models: int) -> int:
    """Bytes a learned soup holds: N ingredients in float32, the merged weights, their gradient, and the module."""
    return (n_models + 3) * model_bytes_fp32


def _better(a: Score, b: Score) -> bool:
    """A higher score wins; on a tie, a lower held-out loss (when both report one)."""
    if a.value != b.value:
        return a.value > b.value
    la, lb = a.metrics.get("loss"), b.metrics.get("loss")
    return la is not None and lb is not None and la < lb


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _groups(names: Sequence[str]) -> list[int]:
    """The coefficient row of each tensor for ``by="layer"``: one per (stack, layer index), one per tensor outside a stack."""
    keys: dict[Any, int] = {}
    out = []
    for name in names:
        key = layer_index(name) or ("tensor", name)
        out.append(keys.setdefault(key, len(keys)))
    return out


def learned_soup(
    ingredients: Pantry | Sequence[Any],
    evaluator: Evaluator,
    *,
    by: str = "model",
    temperature: float = 1.0,
    optimizer: str = "adamw",
    lr: float = 0.05,
    epochs: int = 5,
    weight_decay: float = 0.0,
    max_memory: int | None = None,
    start_score: Score | None = None,
    start_predictions: Predictions | None = None,
    progress: bool | None = None,
    **pantry_options: Any,
) -> LearnedResult:
    """Learn mixing coefficients on ``evaluator``'s data (the paper: AdamW, lr 0.05, 5 epochs).

    Args:
        ingredients: a :class:`Pantry`, or paths / state dicts / modules.
        evaluator: a :class:`~modelsoup.eval.module.ModuleEvaluator` (it supplies the batches and the
            differentiable loss; the built-in evaluators are).
        by: ``model`` (one coefficient per model), ``layer`` (one per model per layer of the stack) or ``tensor``
            (one per model per tensor).
        temperature: softmax temperature of the coefficients.
        optimizer: ``adamw``, ``adam`` or ``sgd``.
        lr, epochs, weight_decay: optimiser settings.
        max_memory: bytes the ingredients may take (default: what the device has free).
        start_score: the uniform soup's held-out score, if already known (and ``start_predictions``, its predictions).
        progress: progress bar; None = only on a terminal.

    Raises:
        EvaluatorError: the evaluator gives no differentiable loss.
        InsufficientMemoryError: the ingredients would not fit; the message gives the estimate.
        OptionError: bad settings (``by``, ``optimizer``, temperature, lr, epochs).
    """
    t_start = time.perf_counter()
    if not isinstance(evaluator, ModuleEvaluator):
        raise EvaluatorError(
            f"the learned soup differentiates the held-out loss through the model, which {type(evaluator).__name__} cannot give; "
            "use a built-in evaluator (or a ModuleEvaluator subclass), or use the greedy soup, which needs only scores"
        )
    if by not in GRANULARITY:
        raise OptionError(f"by must be one of {', '.join(GRANULARITY)}, got {by!r}")
    if optimizer not in OPTIMIZERS:
        raise OptionError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not (temperature > 0 and lr > 0 and epochs >= 0):
        raise OptionError(f"the learned soup needs temperature > 0, lr > 0 and epochs >= 0; got temperature {temperature}, lr {lr}, epochs {epochs}")
    pantry, own = as_pantry(ingredients, **pantry_options)
    try:
        n = len(pantry)
        every = list(range(n))
        uniform_recipe, uniform_state = pantry.soup(every)
        start_preds = start_predictions
        if start_score is None:
            start_score, start_preds = run_evaluator(evaluator, uniform_state, "uniform soup")
        learnable = [j for j in uniform_state.run.plan.jobs if j.action == "merge" and j.alias_of is None]
        model_bytes = sum(4 * j.nbytes // j.dtype.itemsize for j in learnable)
        need = memory_estimate(model_bytes, n)
        device = evaluator.device
        have = max_memory if max_memory is not None else available_memory(device)
        if need > have:
            raise InsufficientMemoryError(
                f"the learned soup keeps all {n} ingredients in float32 on {device}: about {_gb(need)} "
                f"({n} x {_gb(model_bytes)} plus the merged weights, their gradient and the model), but {_gb(have)} is available. "
                "Use the greedy soup (`soup greedy`), which holds one model at a time, learn on fewer ingredients, or run on a larger device."
            )
        log.info("learned soup: %d ingredients, %d tensors, about %s resident", n, len(learnable), _gb(need))

        # everything that is not learned (integer buffers, tensors taken as-is) comes from the uniform soup
        module = evaluator.module
        load_weights(module, uniform_state, ignore_unexpected=evaluator.ignore_unexpected, label="uniform soup")
        names = [j.name for j in learnable]
        cks = [pantry.checkpoint(i) for i in every]
        stacks = {name: torch.stack([ck.read(name).to(device=device, dtype=torch.float32) for ck in cks]) for name in names}
        # by layer: one row of coefficients per layer of the stack (``layers.3.``), and one for every tensor outside it
        group = _groups(names) if by == "layer" else list(range(len(names)))
        rows = max(group, default=-1) + 1
        alpha = torch.zeros((n,) if by == "model" else (rows, n), device=device, requires_grad=True)
        opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        opt = opt_cls([alpha], lr=lr, weight_decay=weight_decay)

        def coefficients() -> torch.Tensor:
            return torch.softmax(alpha / temperature, dim=-1)

        def merged(coef: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: torch.tensordot(coef if by == "model" else coef[group[k]], stacks[name], dims=1) for k, name in enumerate(names)}

        def as_recipe(coef: torch.Tensor) -> tuple[Recipe, list[float] | dict[str, list[float]]]:
            c = coef.detach().double().cpu()
            if by == "model":
                w = [float(x) for x in c]
                return pantry.recipe(every, w), w
            per = {name: [float(x) for x in c[group[k]]] for k, name in enumerate(names)}
            return pantry.recipe(every, tensor_weights=per), per

        uniform_weights: Any = [1.0 / n] * n if by == "model" else {name: [1.0 / n] * n for name in names}
        best: tuple[Score, int, Recipe, Any, Predictions | None] = (start_score, 0, uniform_recipe, uniform_weights, start_preds)
        history: list[dict[str, float]] = [{"epoch": 0.0, "loss": start_score.metrics.get("loss", float("nan")), "score": start_score.value}]
        batches = list(evaluator.batches())
        show = progress_on(progress)
        module.eval()  # dropout off: the coefficients see the model as it will be used
        with tqdm(total=epochs * len(batches), desc="learned soup", unit="batch", disable=not show, leave=False) as bar:
            for epoch in range(1, epochs + 1):
                total, count = 0.0, 0
                for batch in batches:
                    params = merged(coefficients())

                    def call(*args: Any, **kwargs: Any) -> Any:
                        return functional_call(module, params, args, kwargs)

                    loss_sum, items = evaluator.batch_loss(call, to_device(batch, device))
                    opt.zero_grad(set_to_none=True)
                    (loss_sum / max(items, 1)).backward()
                    opt.step()
                    total += float(loss_sum.detach())
                    count += items
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch}, loss {total / max(count, 1):.4f}")
                rec, w = as_recipe(coefficients())
                score, preds = run_evaluator(evaluator, pantry.state(rec), f"learned soup, epoch {epoch}")
                history.append({"epoch": float(epoch), "loss": total / max(count, 1), "score": score.value})
                log.info("learned soup epoch %d: held-out loss %.4f while learning; %s", epoch, total / max(count, 1), score)
                if _better(score, best[0]):
                    best = (score, epoch, rec, w, preds)
        del stacks
        score, epoch, recipe, weights, final_preds = best
        if epoch == 0:
            log.info("learned soup: no epoch beat the uniform start on held-out data; returning the uniform soup")
        return LearnedResult(recipe, weights, score, start_score, epoch, history, time.perf_counter() - t_start, final_preds)
    finally:
        if own:
            pantry.close()

"""AdaMerging (Yang et al. 2024): task-arithmetic coefficients learned by minimising prediction entropy on unlabeled data.

The merged model is theta = theta_0 + sum_i lambda_i (theta_i - theta_0), one lambda per task (``by="model"``,
task-wise AdaMerging) or per task and layer of the layer stack (``by="layer"``, layer-wise; a tensor outside the stack
has its own row), or per task and tensor (``by="tensor"``). The lambdas start at ``init`` (the paper: 0.3) and are
moved by Adam to lower the mean Shannon entropy of the merged model's predictions on the evaluator's data, whose labels
are never read while learning (test-time adaptation: the data may be the test inputs). After each update the lambdas
are clipped to [``low``, ``high``] (the paper's [0, 1]).

It is the learned soup's machinery with another parametrisation and objective: theta is written as the linear soup
(1 - sum_i lambda_i) theta_0 + sum_i lambda_i theta_i of the base and the fine-tunes (coefficients summing to one, so
the linear method's normalisation leaves them alone), and dL/dlambda_i = <dL/dtheta, theta_i - theta_0> follows from the
soup's gradient in the same one pass over the ingredients, resident or streaming (:mod:`modelsoup.recipes.learned`).
The recipe returned is that linear soup, so what :func:`modelsoup.merge` writes is what the entropy was measured on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import EvaluatorError, InsufficientMemoryError, OptionError
from ..eval.base import Evaluator, Score, run_evaluator
from ..eval.domains import ModuleDomains
from ..eval.module import ClassificationEvaluator, ModuleEvaluator, load_weights, to_device
from ..devices import available_memory
from ..progress import progress_on
from ..recipe import Recipe
from .learned import (GRANULARITY, MEMORY_MODES, OPTIMIZER_CLASSES, _gb, _groups, _Resident, _Streaming, batch_updates, check_accumulate,
                      learnable_tensors, memory_estimate, per_tensor)
from .pantry import Pantry, as_pantry

log = logging.getLogger("modelsoup")

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class AdaMergingResult:
    """Learned task-arithmetic coefficients.

    Attributes:
        recipe: the merge as a ``linear`` recipe of the base and the fine-tunes (per-tensor weights as overrides when
            ``by`` is ``layer`` or ``tensor``).
        lambdas: per fine-tune (``by="model"``), or tensor name -> per fine-tune coefficients.
        entropy: the mean prediction entropy (nats) of the returned merge on the data.
        start_entropy: the same at the start (every lambda ``init``).
        history: per epoch: the mean entropy while learning (epoch 0: the start's) and the lambdas' range.
        score, start_score: the evaluator's score of the returned merge and of the start (uses the data's labels;
            reported only, never used to learn or to choose).
        memory, accumulate, seconds: how the gradient was computed, batches per update, wall time.
    """

    recipe: Recipe
    lambdas: list[float] | dict[str, list[float]]
    entropy: float
    start_entropy: float
    history: list[dict[str, float]] = field(default_factory=list)
    score: Score | None = None
    start_score: Score | None = None
    memory: str = "resident"
    accumulate: int = 1
    seconds: float = 0.0
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": "adamerging", "lambdas": self.lambdas, "entropy": self.entropy, "start_entropy": self.start_entropy,
                "history": self.history, "score": self.score.to_dict() if self.score else None,
                "start_score": self.start_score.to_dict() if self.start_score else None, "memory": self.memory,
                "accumulate": self.accumulate, "seconds": self.seconds, "models": self.labels}

    def to_markdown(self) -> str:
        lines = ["# AdaMerging", "", "| | mean entropy (nats) | score |", "|---|---:|---:|"]
        for what, ent, sc in (("start (every lambda at init)", self.start_entropy, self.start_score), ("learned", self.entropy, self.score)):
            lines.append(f"| {what} | {ent:.4f} | {f'{sc.metric} {sc.value:.4f}' if sc else ''} |")
        lines += ["", "The score reads the data's labels; it is reported only. The lambdas were learned from the entropy alone.", ""]
        if isinstance(self.lambdas, dict):
            lines += ["| tensor | " + " | ".join(self.labels or [f"model {i}" for i in range(len(next(iter(self.lambdas.values()), [])))]) + " |",
                      "|---|" + "---:|" * len(next(iter(self.lambdas.values()), []))]
            lines += [f"| {name} | " + " | ".join(f"{x:.3f}" for x in lam) + " |" for name, lam in self.lambdas.items()]
        else:
            lines += ["| model | lambda |", "|---|---:|"] + [f"| {lab} | {x:.4f} |" for lab, x in zip(self.labels or range(len(self.lambdas)), self.lambdas)]
        lines += ["", "| epoch | mean entropy while learning | lambdas min | max |", "|---:|---:|---:|---:|"]
        lines += [f"| {int(h['epoch'])} | {h['entropy']:.4f} | {h['lambda_min']:.3f} | {h['lambda_max']:.3f} |" for h in self.history]
        return "\n".join(lines) + "\n"


def _classifier_of(evaluator: ModuleEvaluator, domain: Any) -> ClassificationEvaluator:
    ev = evaluator.domains[domain] if isinstance(evaluator, ModuleDomains) else evaluator  # type: ignore[index]
    if not isinstance(ev, ClassificationEvaluator):
        raise EvaluatorError(f"AdaMerging minimises the entropy of predicted class probabilities, which {type(ev).__name__} does not give; "
                             "use a classification evaluator (text-classification, ClassificationEvaluator, or several as domains)")
    return ev


def entropy_loss(evaluator: ModuleEvaluator) -> Callable[[Callable[..., Any], Any], tuple[torch.Tensor, int]]:
    """The summed prediction entropy of a batch, for :mod:`.learned`'s engines: -sum_c p_c log p_c per example, summed
    (over several domains each batch is weighted as :class:`~modelsoup.eval.domains.ModuleDomains` weighs its loss, so the
    objective is the weighted mean of the domains' mean entropies)."""
    domains = isinstance(evaluator, ModuleDomains)
    if not domains:
        _classifier_of(evaluator, None)

    def loss(call: Callable[..., Any], batch: Any) -> tuple[torch.Tensor, int]:
        d, inner = batch if domains else (None, batch)
        ev = _classifier_of(evaluator, d)
        logits, _ = ev.forward(call, inner)
        logp = torch.log_softmax(logits.float(), dim=-1)
        total = -(logp.exp() * logp).sum()
        n = int(logits.shape[0])
        if domains:
            total = total * (evaluator.weights[d] * sum(evaluator._n.values()) / evaluator._n[d])  # type: ignore[attr-defined]
        return total, n

    return loss


def _mean_entropy(evaluator: ModuleEvaluator, state: Any, loss: Callable[..., Any]) -> float:
    """The objective of a merge, without gradients."""
    evaluator.load(state, label="adamerging")
    module = evaluator.module
    module.eval()
    total, items = 0.0, 0
    with torch.inference_mode():
        for batch in evaluator.batches():
            t, n = loss(module, to_device(batch, evaluator.device))
            total += float(t)
            items += n
    if items == 0:
        raise EvaluatorError("AdaMerging's data has no examples")
    return total / items


def adamerging(
    models: Sequence[Any],
    base: Any,
    evaluator: Evaluator,
    *,
    by: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    epochs: int = 10,
    optimizer: str = "adam",
    low: float = 0.0,
    high: float = 1.0,
    memory: str = "auto",
    accumulate: int | None = None,
    max_memory: int | None = None,
    score: bool = True,
    progress: bool | None = None,
    **pantry_options: Any,
) -> AdaMergingResult:
    """Learn task-arithmetic coefficients by entropy minimisation (module docstring).

    Args:
        models: the fine-tunes (paths, state dicts or modules), all from ``base``; or a :class:`~.pantry.Pantry` whose first
            ingredient is the base and the others the fine-tunes (then ``base`` is None).
        base: the pre-trained model they were fine-tuned from.
        evaluator: a classification :class:`~modelsoup.eval.module.ModuleEvaluator` (or several tasks' as domains,
            :func:`~modelsoup.eval.multi_domain`) over unlabeled inputs; it supplies the batches and the module.
        by: ``model`` (task-wise), ``layer`` (layer-wise, the paper's best) or ``tensor``.
        init: every lambda's start (the paper: 0.3).
        lr, epochs, optimizer: the paper uses Adam at lr 1e-3.
        low, high: the lambdas are clipped to this range after every update.
        memory, accumulate, max_memory: as for :func:`~modelsoup.recipes.learned.learned_soup`.
        score: also report the evaluator's score (labels) of the start and the result.
        progress: progress bar; None = only on a terminal.

    Raises:
        EvaluatorError: an evaluator without class predictions or a module.
        InsufficientMemoryError: even streaming would not fit.
        OptionError: bad settings.
    """
    t_start = time.perf_counter()
    if not isinstance(evaluator, ModuleEvaluator):
        raise EvaluatorError(f"AdaMerging differentiates the predictions' entropy through the model, which {type(evaluator).__name__} cannot give; "
                             "use a classification evaluator over a module")
    for what, value, allowed in (("by", by, GRANULARITY), ("optimizer", optimizer, OPTIMIZERS), ("memory", memory, MEMORY_MODES)):
        if value not in allowed:
            raise OptionError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    if not (lr > 0 and epochs >= 0 and low <= init <= high):
        raise OptionError(f"AdaMerging needs lr > 0, epochs >= 0 and low <= init <= high; got lr {lr}, epochs {epochs}, init {init}, range [{low}, {high}]")
    check_accumulate(accumulate)
    if isinstance(models, Pantry):
        if base is not None:
            raise OptionError("with a Pantry, its first ingredient is the base: pass base=None")
        pantry, own = models, False
    else:
        pantry, own = as_pantry([base, *models], **pantry_options)
    engine: _Resident | _Streaming | None = None
    try:
        n = len(pantry) - 1
        if n < 1:
            raise OptionError("AdaMerging needs at least one fine-tune besides the base")
        loss = entropy_loss(evaluator)
        every = list(range(n + 1))
        start = [1.0 - n * init] + [init] * n
        _, start_state = pantry.soup(every, start)
        learnable, followers = learnable_tensors(evaluator, start_state)
        names = [j.name for j in learnable]
        group = _groups(names) if by == "layer" else list(range(len(names)))
        rows = max(group, default=-1) + 1
        model_bytes = sum(4 * j.nbytes // j.dtype.itemsize for j in learnable)
        have = max_memory if max_memory is not None else available_memory(evaluator.device)
        if memory == "auto":
            memory = "resident" if memory_estimate(model_bytes, n + 1, "resident") <= have else "streaming"
        need = memory_estimate(model_bytes, n + 1, memory) if epochs > 0 else 0
        if need > have:
            raise InsufficientMemoryError(f"AdaMerging ({memory}) needs about {_gb(need)} on {evaluator.device}, but {_gb(have)} is available; "
                                          + ("use memory=\"streaming\" (--learn-memory streaming), or " if memory == "resident" else "")
                                          + "run on a larger device")
        lam = torch.full((n,) if by == "model" else (rows, n), float(init), dtype=torch.float32, device=evaluator.device, requires_grad=True)
        opt = OPTIMIZER_CLASSES[optimizer]([lam], lr=lr)

        def coefficients() -> torch.Tensor:
            return torch.cat([1.0 - lam.sum(dim=-1, keepdim=True), lam], dim=-1)

        def as_recipe() -> tuple[Recipe, list[float] | dict[str, list[float]]]:
            c = coefficients().detach().double().cpu()
            lams = lam.detach().double().cpu()
            if by == "model":
                return pantry.recipe(every, [float(x) for x in c]), [float(x) for x in lams]
            per, lam_per = per_tensor(c, names, group, followers), per_tensor(lams, names, group, followers)
            return pantry.recipe(every, start, tensor_weights=per), lam_per  # tensors not learned keep the start's weights

        start_entropy = _mean_entropy(evaluator, start_state, loss)
        start_score = run_evaluator(evaluator, start_state, "adamerging start")[0] if score else None
        history: list[dict[str, float]] = [{"epoch": 0.0, "entropy": start_entropy, "lambda_min": init, "lambda_max": init}]
        load_weights(evaluator.module, start_state, ignore_unexpected=evaluator.ignore_unexpected, label="adamerging start")
        cks = [pantry.checkpoint(i) for i in every]
        batches = list(evaluator.batches())
        step, updates = batch_updates(batches, accumulate, memory)
        if epochs > 0:
            engine = (_Resident(evaluator, start_state, [j.dtype for j in learnable], cks, names, group, by, loss) if memory == "resident"
                      else _Streaming(evaluator, pantry, start_state, cks, names, group, by, loss))
        log.info("AdaMerging: %d fine-tunes, %d tensors (%s), %s gradient, start entropy %.4f", n, len(names), by, memory, start_entropy)
        evaluator.module.eval()
        with tqdm(total=epochs * len(batches), desc="adamerging", unit="batch", disable=not progress_on(progress), leave=False) as bar:
            for epoch in range(1, epochs + 1):
                total, count = 0.0, 0
                for chunk in updates:
                    opt.zero_grad(set_to_none=True)
                    assert engine is not None
                    got, items = engine.gradient(coefficients, chunk, as_recipe()[0] if memory == "streaming" else None)
                    assert lam.grad is not None
                    lam.grad.div_(max(items, 1))
                    opt.step()
                    with torch.no_grad():
                        lam.clamp_(low, high)
                    total += got
                    count += items
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"epoch {epoch}, entropy {total / max(count, 1):.4f}")
                history.append({"epoch": float(epoch), "entropy": total / max(count, 1), "lambda_min": float(lam.detach().min()), "lambda_max": float(lam.detach().max())})
                log.info("AdaMerging epoch %d: mean entropy %.4f while learning; lambdas in [%.3f, %.3f]", epoch, history[-1]["entropy"],
                         history[-1]["lambda_min"], history[-1]["lambda_max"])
        recipe, lambdas = as_recipe()
        state = pantry.state(recipe)
        entropy = _mean_entropy(evaluator, state, loss)
        final_score = run_evaluator(evaluator, state, "adamerging")[0] if score else None
        return AdaMergingResult(recipe, lambdas, entropy, start_entropy, history, final_score, start_score, memory, step,
                                time.perf_counter() - t_start, pantry.labels[1:])
    finally:
        if engine is not None:
            engine.close()
        if own:
            pantry.close()

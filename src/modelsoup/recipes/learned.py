"""Learned soup (Wortsman et al. 2022, Section 3): mixing coefficients optimised on held-out data.

The soup is theta = sum_i a_i theta_i with a = softmax(alpha / temperature), one alpha per model
(``by="model"``), one per model and layer of the layer stack (``by="layer"``: every tensor of ``layers.3.`` shares
one; a tensor outside the stack has its own), or one per model and tensor (``by="tensor"``, the paper's "by
layer", whose layers are parameter blocks).

Where it starts (``start``): the uniform soup (alpha = 0), the greedy soup (alpha = T log a with a the greedy
weights, mixed with ``GREEDY_START_MIX`` of the uniform ones so that every ingredient can still gain weight), or,
by default, whichever of the two scores better on the held-out data. The held-out score is checked after every
epoch on the exact weights the merge would write, and the best point is returned (ties go to the lower held-out
loss), the start included: a learned soup never ends below the soup it started from, so by default never below the
uniform or the greedy soup on the held-out data that chose them.

Two ways to compute the same gradient (``memory``):

- ``resident``: every ingredient in float32 on the evaluator's device, the soup built from them and the loss
  differentiated through ``torch.func.functional_call``: (N + 4) x the model's float32 size.
- ``streaming``: the soup is loaded into the evaluator's module, one forward/backward per batch gives dL/dtheta,
  and, since theta = sum_i a_i theta_i per coefficient group, dL/da_i = <dL/dtheta, theta_i> summed over the group's
  tensors: one pass over the ingredients, one tensor at a time, gives every coefficient's gradient, and the next
  soup is streamed in by the merge engine. Memory: the soup, its gradient and one tensor per ingredient, whatever
  N is; each update reads every ingredient twice, so gradients of several batches are accumulated per update
  (``accumulate``).

With the same ``accumulate`` both reach the same coefficients (to float rounding; a test holds them to 1e-5).
``auto`` takes ``resident`` when it fits in the memory available and ``streaming`` otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from ..devices import available_memory
from ..methods.linear import linear

log = logging.getLogger("modelsoup")

OPTIMIZERS = ("adamw", "adam", "sgd")
GRANULARITY = ("model", "layer", "tensor")
STARTS = ("best", "uniform", "greedy")
MEMORY_MODES = ("auto", "resident", "streaming")
# a greedy start mixes this much of the uniform weights into the greedy ones: a coefficient at exactly 0 would need alpha = -inf
GREEDY_START_MIX = 0.05
# streaming without an explicit ``accumulate``: batches per update chosen so that an epoch makes at most this many updates
STREAMING_UPDATES_PER_EPOCH = 8


@dataclass
class LearnedResult:
    """A learned soup.

    Attributes:
        recipe: the soup as a ``linear`` recipe (per-tensor weights as overrides when ``by`` is ``layer`` or ``tensor``).
        weights: mixing coefficients per model (``by="model"``), or tensor name -> per-model coefficients.
        score: held-out score of the returned soup (of the weights :func:`modelsoup.merge` writes).
        start_score: held-out score of the soup it started from.
        epoch: the epoch whose coefficients were kept (0 = the start).
        history: per epoch: the held-out loss averaged over the epoch's steps (epoch 0: the uniform
            soup's) and the held-out score at the epoch's end.
        seconds: wall time.
        predictions: the returned soup's held-out predictions, when the evaluator gives them.
        start: where it started, ``uniform`` or ``greedy``.
        uniform_score, greedy_score: held-out scores of the uniform and greedy soups, where computed.
        memory: how the gradient was computed, ``resident`` or ``streaming``.
        accumulate: batches per update.
        members: the ingredients (indices) in the returned recipe: all of them, or the greedy soup's when its start was kept.
    """

    recipe: Recipe
    weights: list[float] | dict[str, list[float]]
    score: Score
    start_score: Score
    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    predictions: Predictions | None = None
    start: str = "uniform"
    uniform_score: Score | None = None
    greedy_score: Score | None = None
    memory: str = "resident"
    accumulate: int = 1
    members: list[int] = field(default_factory=list)


def memory_estimate(model_bytes_fp32: int, n_models: int, memory: str = "resident") -> int:
    """Bytes a learned soup holds. Resident: N ingredients in float32, the merged weights, their gradient, the module
    and the autograd buffers of a forward/backward (about half a model more, measured: benchmarks/scale.py), so
    N + 4 models. Streaming: the module holding the soup, its gradient, and one tensor per ingredient in flight
    (counted as one more model, an upper bound: 2.8 measured)."""
    return (n_models + 4) * model_bytes_fp32 if memory == "resident" else 3 * model_bytes_fp32


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


def _start_alpha(weights: Sequence[float], temperature: float) -> torch.Tensor:
    """alpha with softmax(alpha / T) = the given weights mixed with ``GREEDY_START_MIX`` of the uniform ones."""
    n = len(weights)
    w = torch.tensor([(1 - GREEDY_START_MIX) * float(x) + GREEDY_START_MIX / n for x in weights], dtype=torch.float64)
    return (temperature * torch.log(w)).float()


# (call, batch on the device) -> (summed loss over the batch's items, items): the evaluator's own loss, or another objective
BatchLoss = Callable[[Callable[..., Any], Any], tuple[torch.Tensor, int]]


def _summed_loss(ev: ModuleEvaluator, call: Callable[..., Any], batches: Sequence[Any], batch_loss: BatchLoss | None = None) -> tuple[float, int]:
    """Backward of each batch's summed loss through ``call`` (gradients accumulate); (summed loss, items)."""
    total, items = 0.0, 0
    loss_of = batch_loss or ev.batch_loss
    for batch in batches:
        loss_sum, n = loss_of(call, to_device(batch, ev.device))
        loss_sum.backward()
        total += float(loss_sum.detach())
        items += n
    return total, items


def _coefficient_gradient(coef: torch.Tensor, names: Sequence[str], group: Sequence[int], by: str,
                          grad_of: Callable[[str], torch.Tensor | None], thetas: Callable[[str], Iterable[torch.Tensor]]) -> None:
    """Backward from dL/da_i = sum over a coefficient's tensors of <dL/dtheta, theta_i> into alpha (both modes form it here).

    ``grad_of(name)`` is dL/dtheta of a tensor (None where the loss does not depend on it), ``thetas(name)`` yields
    each ingredient's tensor in float32 on ``coef``'s device.
    """
    g_coef = torch.zeros(coef.shape, dtype=torch.float64, device=coef.device)
    with torch.no_grad():
        for k, name in enumerate(names):
            grad = grad_of(name)
            if grad is None:
                continue  # the loss does not depend on this tensor
            g = grad.reshape(-1).to(torch.float32)
            row = g_coef if by == "model" else g_coef[group[k]]
            for i, theta in enumerate(thetas(name)):
                row[i] += float(torch.dot(g, theta.reshape(-1)))
    coef.backward(g_coef.to(torch.float32))


class _Resident:
    """Every ingredient stacked in float32 on the device; the loss differentiated through functional_call."""

    def __init__(self, evaluator: ModuleEvaluator, uniform: Any, dtypes: Sequence[torch.dtype], cks: Sequence[Any], names: Sequence[str],
                 group: Sequence[int], by: str, batch_loss: BatchLoss | None = None) -> None:
        device = evaluator.device
        self.evaluator, self.names, self.group, self.by, self.batch_loss = evaluator, names, group, by, batch_loss
        targets = evaluator.module.state_dict(keep_vars=True)
        # floating buffers (batch-norm statistics) are the uniform soup's, whatever soup the module last scored
        buffers = {name for name, _ in evaluator.module.named_buffers(remove_duplicate=False)}
        self.fixed = {name: uniform[name].to(device=device, dtype=targets[name].dtype) for name in buffers
                      if name in targets and targets[name].is_floating_point() and name in uniform}
        # the soup is rounded to the dtype it is written in, then to the module's, as the streaming mode loads it
        self.dtypes = {name: (d, targets[name].dtype if name in targets else torch.float32) for name, d in zip(names, dtypes)}
        self.stacks = {name: torch.stack([ck.read(name).to(device=device, dtype=torch.float32) for ck in cks]) for name in names}

    def gradient(self, coefficients: Any, batches: Sequence[Any], recipe: Any) -> tuple[float, int]:
        """Accumulate d(summed loss)/d alpha over ``batches`` into alpha.grad; (summed loss, items).

        The soup's tensors are leaves: backward gives dL/dtheta, and dL/da_i = <dL/dtheta, theta_i> is formed
        from the stacks exactly as the streaming mode forms it from the files (so ingredients that agree on a
        tensor get exactly equal gradients there, which Adam would otherwise turn from rounding noise into steps).
        """
        module, ev = self.evaluator.module, self.evaluator
        with torch.no_grad():  # the soup as the merge computes it (the linear method, float64 sums), as the streaming mode loads it
            coef = [float(x) for x in coefficients().detach().double().cpu().reshape(-1)]
            n = self.stacks[self.names[0]].shape[0] if self.names else 0
            params = {}
            for k, name in enumerate(self.names):
                row = coef if self.by == "model" else coef[self.group[k] * n:(self.group[k] + 1) * n]
                stack = self.stacks[name]
                written, held = self.dtypes[name]
                params[name] = linear([stack[i] for i in range(n)], weights=row).to(written).to(held).requires_grad_(True)
        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, {**self.fixed, **params}, args, kwargs)

        total, items = _summed_loss(ev, call, batches, self.batch_loss)
        _coefficient_gradient(coefficients(), self.names, self.group, self.by, lambda name: params[name].grad, lambda name: self.stacks[name])
        return total, items

    def close(self) -> None:
        self.stacks = {}


class _Learning(Mapping[str, torch.Tensor]):
    """The weights the streaming mode learns with: the learned tensors from the current soup, the rest (buffers, copies)
    from the uniform soup, as the resident mode holds them (their tokens are the uniform soup's, so they load once)."""

    def __init__(self, soup: Any, uniform: Any, learned: set[str]) -> None:
        self.soup, self.uniform, self.learned = soup, uniform, learned

    def _of(self, name: str) -> Any:
        return self.soup if name in self.learned else self.uniform

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._of(name)[name]

    def token(self, name: str) -> Any:
        return self._of(name).token(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.uniform)

    def __len__(self) -> int:
        return len(self.uniform)


class _Streaming:
    """The soup in the evaluator's module; dL/da_i = <dL/dtheta, theta_i>, read one tensor at a time."""

    def __init__(self, evaluator: ModuleEvaluator, pantry: Pantry, uniform: Any, cks: Sequence[Any], names: Sequence[str],
                 group: Sequence[int], by: str, batch_loss: BatchLoss | None = None) -> None:
        self.evaluator, self.pantry, self.cks, self.names, self.group, self.by = evaluator, pantry, cks, names, group, by
        self.batch_loss = batch_loss
        self.uniform = uniform
        targets = evaluator.module.state_dict(keep_vars=True)
        missing = [name for name in names if name not in targets]
        if missing:
            raise EvaluatorError(f"the evaluator's {type(evaluator.module).__name__} has no tensor {missing[0]!r} of the soup; "
                                 "evaluate checkpoints of the evaluator's architecture")
        self.targets = {name: targets[name] for name in names}
        self._grad_before = {name: t.requires_grad for name, t in self.targets.items()}

    def gradient(self, coefficients: Any, batches: Sequence[Any], recipe: Any) -> tuple[float, int]:
        ev = self.evaluator
        module, device = ev.module, ev.device
        load_weights(module, _Learning(self.pantry.state(recipe), self.uniform, set(self.names)), ignore_unexpected=ev.ignore_unexpected,
                     label="learned soup")
        for t in self.targets.values():
            t.grad = None
            t.requires_grad_(True)
        try:
            total, items = _summed_loss(ev, module, batches, self.batch_loss)
            _coefficient_gradient(coefficients(), self.names, self.group, self.by, lambda name: self.targets[name].grad,
                                  lambda name: (ck.read(name).to(device=device, dtype=torch.float32) for ck in self.cks))
        finally:
            for name, t in self.targets.items():
                t.grad = None
                t.requires_grad_(self._grad_before[name])
        return total, items

    def close(self) -> None:
        self.targets = {}


def check_accumulate(accumulate: int | None) -> None:
    """Refuse an ``accumulate`` that is not a whole number of batches >= 1 (None: the default).

    Raises:
        OptionError: it is not.
    """
    if accumulate is not None and (isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1):
        raise OptionError(f"accumulate is the number of batches per update, a whole number >= 1; got {accumulate!r}")


def batch_updates(batches: Sequence[Any], accumulate: int | None, memory: str) -> tuple[int, list[Sequence[Any]]]:
    """(batches per update, the updates' batches): ``accumulate``, or 1 resident and streaming at most
    ``STREAMING_UPDATES_PER_EPOCH`` updates per epoch."""
    step = accumulate if accumulate is not None else (1 if memory == "resident" else max(1, -(-len(batches) // STREAMING_UPDATES_PER_EPOCH)))
    return step, [batches[k:k + step] for k in range(0, len(batches), step)]


def per_tensor(rows: torch.Tensor, names: Sequence[str], group: Sequence[int], followers: Mapping[str, str]) -> dict[str, list[float]]:
    """Each learned tensor's row of coefficients (``rows[group[k]]`` for ``names[k]``), the tied names following their leader's."""
    per = {name: [float(x) for x in rows[group[k]]] for k, name in enumerate(names)}
    per.update({f: per[lead] for f, lead in followers.items()})
    return per


OPTIMIZER_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def learnable_tensors(evaluator: ModuleEvaluator, state: Any) -> tuple[list[Any], dict[str, str]]:
    """The merge jobs of ``state``'s plan whose tensors the coefficients move, and the tied names that follow them.

    The module's parameters are learned; its floating buffers (batch-norm statistics) come from the start soup while
    learning (they are not differentiable), and from the learned weights in the recipe written. A parameter the module
    ties to another (one tensor under two names) that the files store twice is learned once, under its first name; the
    others follow it (same coefficients, in the recipe too).

    Returns:
        (the learned jobs, follower name -> the name it follows).
    """
    parameters: dict[str, str] = {}
    leader_of: dict[int, str] = {}
    for pname, p in evaluator.module.named_parameters(remove_duplicate=False):
        parameters[pname] = leader_of.setdefault(id(p), pname)
    merged_jobs = [j for j in state.run.plan.jobs if j.action == "merge" and j.alias_of is None and j.name in parameters]
    first_seen: dict[str, str] = {}
    for j in merged_jobs:  # the first merged name of each tie group leads it (the module's first name may be a copy job)
        first_seen.setdefault(parameters[j.name], j.name)
    followers = {j.name: first_seen[parameters[j.name]] for j in merged_jobs if first_seen[parameters[j.name]] != j.name}
    learned = [j for j in merged_jobs if j.name not in followers]
    # a name the files store as one tensor with another (the plan computes it once) must get the same coefficients in
    # the recipe, or its own rule there would untie it and merge it by the start's weights
    leads = {j.name for j in learned}
    for j in state.run.plan.jobs:
        if j.action == "merge" and j.alias_of is not None:
            target = followers.get(j.alias_of, j.alias_of)
            if target in leads:
                followers[j.name] = target
    return learned, followers


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
    start: str = "best",
    memory: str = "auto",
    accumulate: int | None = None,
    max_memory: int | None = None,
    start_score: Score | None = None,
    start_predictions: Predictions | None = None,
    greedy: Any = None,
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
        start: ``best`` (the better of the uniform and greedy soups on held-out data), ``uniform`` or ``greedy``.
        memory: ``resident``, ``streaming`` or ``auto`` (resident when it fits, see the module docstring).
        accumulate: batches whose gradients make one update (default: 1 resident; streaming: enough for at most
            ``STREAMING_UPDATES_PER_EPOCH`` updates per epoch).
        max_memory: bytes the learned soup may use (default: what the device has free).
        start_score: the uniform soup's held-out score, if already known (and ``start_predictions``, its predictions).
        greedy: the greedy soup (:class:`~modelsoup.recipes.greedy.GreedyResult`) on the same evaluator, if already
            cooked; otherwise it is cooked here when ``start`` needs it.
        progress: progress bar; None = only on a terminal.

    Raises:
        EvaluatorError: the evaluator gives no differentiable loss.
        InsufficientMemoryError: even the streaming mode would not fit; the message gives the estimate.
        OptionError: bad settings (``by``, ``optimizer``, ``start``, ``memory``, temperature, lr, epochs, accumulate).
    """
    t_start = time.perf_counter()
    if not isinstance(evaluator, ModuleEvaluator):
        raise EvaluatorError(
            f"the learned soup differentiates the held-out loss through the model, which {type(evaluator).__name__} cannot give; "
            "use a built-in evaluator (or a ModuleEvaluator subclass), or use the greedy soup, which needs only scores"
        )
    for what, value, allowed in (("by", by, GRANULARITY), ("optimizer", optimizer, OPTIMIZERS), ("start", start, STARTS), ("memory", memory, MEMORY_MODES)):
        if value not in allowed:
            raise OptionError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    if not (temperature > 0 and lr > 0 and epochs >= 0):
        raise OptionError(f"the learned soup needs temperature > 0, lr > 0 and epochs >= 0; got temperature {temperature}, lr {lr}, epochs {epochs}")
    check_accumulate(accumulate)
    pantry, own = as_pantry(ingredients, **pantry_options)
    engine: _Resident | _Streaming | None = None
    try:
        n = len(pantry)
        every = list(range(n))
        uniform_recipe, uniform_state = pantry.soup(every)
        learnable, followers = learnable_tensors(evaluator, uniform_state)
        model_bytes = sum(4 * j.nbytes // j.dtype.itemsize for j in learnable)
        device = evaluator.device
        have = max_memory if max_memory is not None else available_memory(device)
        if memory == "auto":
            memory = "resident" if memory_estimate(model_bytes, n, "resident") <= have else "streaming"
        need = memory_estimate(model_bytes, n, memory) if epochs > 0 else 0  # no epoch: nothing is held to learn
        if need > have:
            how = (f"keeps all {n} ingredients in float32 on {device}: about {_gb(need)} ({n} x {_gb(model_bytes)} plus the merged weights, their gradient, the model and the backward pass's buffers)"
                   if memory == "resident" else f"streams the ingredients but holds the soup and its gradient on {device}: about {_gb(need)}")
            fix = "Use --learn-memory streaming (memory=\"streaming\"), which holds one model and its gradient whatever N is, " if memory == "resident" else ""
            raise InsufficientMemoryError(
                f"the learned soup {how}, but {_gb(have)} is available. {fix}"
                "use the greedy soup (`soup greedy`), which holds one model at a time, or run on a larger device."
            )

        # where it starts: the uniform soup, the greedy soup, or the better of the two on held-out data
        uniform_preds = start_predictions
        uniform_score = start_score
        if uniform_score is None and start in ("best", "uniform"):
            uniform_score, uniform_preds = run_evaluator(evaluator, uniform_state, "uniform soup")
        greedy_score = None
        if start in ("best", "greedy"):
            if greedy is None:
                from .greedy import greedy_soup

                greedy = greedy_soup(pantry, evaluator, progress=progress)
            greedy_score = greedy.score
        if start == "uniform" or (start == "best" and not _better(greedy_score, uniform_score)):
            begin, begin_score, begin_preds, begin_recipe = "uniform", uniform_score, uniform_preds, uniform_recipe
            begin_weights = [1.0 / n] * n
        else:
            begin, begin_score, begin_preds, begin_recipe = "greedy", greedy.score, greedy.predictions, greedy.recipe
            begin_weights = [greedy.members.count(i) / len(greedy.members) for i in every]
        assert begin_score is not None
        log.info("learned soup: %d ingredients, %d tensors, %s gradient (about %s), starting from the %s soup (%s)",
                 n, len(learnable), memory, _gb(need), begin, begin_score)

        # everything that is not learned (integer buffers, tensors taken as-is) comes from the uniform soup
        module = evaluator.module
        load_weights(module, uniform_state, ignore_unexpected=evaluator.ignore_unexpected, label="uniform soup")
        names = [j.name for j in learnable]
        cks = [pantry.checkpoint(i) for i in every]
        # by layer: one row of coefficients per layer of the stack (``layers.3.``), and one for every tensor outside it
        group = _groups(names) if by == "layer" else list(range(len(names)))
        rows = max(group, default=-1) + 1
        init = _start_alpha(begin_weights, temperature) if begin == "greedy" else torch.zeros(n)
        alpha = (init if by == "model" else init.expand(rows, n)).clone().to(device).requires_grad_(True)
        opt = OPTIMIZER_CLASSES[optimizer]([alpha], lr=lr, weight_decay=weight_decay)

        def coefficients() -> torch.Tensor:
            return torch.softmax(alpha / temperature, dim=-1)

        def as_recipe(coef: torch.Tensor) -> tuple[Recipe, list[float] | dict[str, list[float]]]:
            c = coef.detach().double().cpu()
            if by == "model":
                w = [float(x) for x in c]
                return pantry.recipe(every, w), w
            per = per_tensor(c, names, group, followers)
            return pantry.recipe(every, tensor_weights=per), per

        begin_w: Any = begin_weights if by == "model" else {name: list(begin_weights) for name in [*names, *followers]}
        best: tuple[Score, int, Recipe, Any, Predictions | None] = (begin_score, 0, begin_recipe, begin_w, begin_preds)
        history: list[dict[str, float]] = [{"epoch": 0.0, "loss": begin_score.metrics.get("loss", float("nan")), "score": begin_score.value}]
        batches = list(evaluator.batches())
        step, updates = batch_updates(batches, accumulate, memory)
        if epochs == 0:
            engine = None
        elif memory == "resident":
            engine = _Resident(evaluator, uniform_state, [j.dtype for j in learnable], cks, names, group, by)
        else:
            engine = _Streaming(evaluator, pantry, uniform_state, cks, names, group, by)
        show = progress_on(progress)
        module.eval()  # dropout off: the coefficients see the model as it will be used
        with tqdm(total=epochs * len(batches), desc="learned soup", unit="batch", disable=not show, leave=False) as bar:
            for epoch in range(1, epochs + 1):
                total, count = 0.0, 0
                for chunk in updates:
                    opt.zero_grad(set_to_none=True)
                    assert engine is not None
                    loss, items = engine.gradient(coefficients, chunk, as_recipe(coefficients())[0] if memory == "streaming" else None)
                    assert alpha.grad is not None
                    alpha.grad.div_(max(items, 1))  # the mean loss of the update's examples
                    opt.step()
                    total += loss
                    count += items
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"epoch {epoch}, loss {total / max(count, 1):.4f}")
                rec, w = as_recipe(coefficients())
                score, preds = run_evaluator(evaluator, pantry.state(rec), f"learned soup, epoch {epoch}")
                history.append({"epoch": float(epoch), "loss": total / max(count, 1), "score": score.value})
                log.info("learned soup epoch %d: held-out loss %.4f while learning; %s", epoch, total / max(count, 1), score)
                if _better(score, best[0]):
                    best = (score, epoch, rec, w, preds)
        score, epoch, recipe, weights, final_preds = best
        if epoch == 0:
            log.info("learned soup: no epoch beat the %s start on held-out data; returning the %s soup", begin, begin)
        members = list(greedy.members) if epoch == 0 and begin == "greedy" else every
        return LearnedResult(recipe, weights, score, begin_score, epoch, history, time.perf_counter() - t_start, final_preds,
                             begin, uniform_score, greedy_score, memory, step, members)
    finally:
        if engine is not None:
            engine.close()
        if own:
            pantry.close()

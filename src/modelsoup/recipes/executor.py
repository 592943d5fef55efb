"""Where evaluations run: in this process (:class:`SerialExecutor`), or across a Ray cluster (:class:`RayExecutor`).

A soup recipe is a list of checkpoint paths and weights, so an evaluation is sent to a worker as a recipe: the
worker opens the checkpoints itself (from storage every worker sees), computes the soup tensor by tensor with the
same merge code as here, and sends back predictions (or a score). No tensor of a soup is ever pickled. The
evaluator (its model and data) is sent once to each worker and kept there.

Two kinds of parallelism:

- independent evaluations (the N ingredient scores, the points of a curve, the k of a comparison) fan out, one per
  worker at a time, and come back in the order asked;
- one evaluation of a classification evaluator is split into shards of whole batches, one per worker, and the
  per-example logits are concatenated in batch order and scored here, as :meth:`predict` would have.

Either way the results are the ones a serial run gives: each batch is computed by the same code on the same
weights (a test holds tables, curves and logits of ``--ray local`` equal to a serial run's).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..eval.base import USER_MODULE_PREFIX, Evaluator, Predictions, Score, run_evaluator
from ..eval.module import ClassificationEvaluator
from ..recipe import Recipe

log = logging.getLogger("modelsoup")

# seconds the workers may take to start (import torch, load the module) before the cluster is taken to be full
WORKER_START_TIMEOUT = float(os.environ.get("MODELSOUP_RAY_START_TIMEOUT", "180"))
# executors open in this process, and whether this process started the local Ray it uses (then the last one stops it)
_OPEN = {"count": 0, "started": False}


@dataclass(frozen=True)
class Task:
    """One evaluation: a recipe over the pantry's ingredients, and how logs name it."""

    label: str
    recipe: Recipe


class SerialExecutor:
    """Every evaluation in this process, one after another."""

    workers = 1

    def run(self, pantry: Any, evaluator: Evaluator, tasks: Sequence[Task]) -> list[tuple[Score, Predictions | None]]:
        return [run_evaluator(evaluator, pantry.state(t.recipe), t.label) for t in tasks]

    def close(self) -> None:
        pass


def shardable(evaluator: Evaluator) -> bool:
    """Whether one evaluation can be split into batch shards: a classification evaluator whose predict is its batches, arranged."""
    return isinstance(evaluator, ClassificationEvaluator) and type(evaluator).predict is ClassificationEvaluator.predict


def shard_ranges(batches: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges of whole batches, as even as possible, at most one per worker, none empty."""
    k = max(1, min(workers, batches))
    base, extra = divmod(batches, k)
    out, start = [], 0
    for j in range(k):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class _WorkerCore:
    """What a Ray worker does: keep evaluators and pantries by key, evaluate recipes on them."""

    def __init__(self, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)  # the driver's thread count: the same kernels, the same bits
        self._evaluators: dict[str, Evaluator] = {}
        self._pantries: dict[str, Any] = {}

    def _setup(self, key: str, evaluator_ref: list[Any], pantry_key: str, items: Any, keys: str) -> tuple[Evaluator, Any]:
        import ray

        if key not in self._evaluators:
            self._evaluators[key] = ray.get(evaluator_ref[0])
        if pantry_key not in self._pantries:
            pantry_cls, ingredients = items
            self._pantries[pantry_key] = pantry_cls.from_items(ingredients, keys=keys)
        return self._evaluators[key], self._pantries[pantry_key]

    def evaluate(self, key: str, evaluator_ref: list[Any], pantry_key: str, items: Any, keys: str, recipe: Recipe,
                 label: str) -> tuple[Score, Predictions | None]:
        ev, pantry = self._setup(key, evaluator_ref, pantry_key, items, keys)
        return run_evaluator(ev, pantry.state(recipe), label)

    def shard(self, key: str, evaluator_ref: list[Any], pantry_key: str, items: Any, keys: str, recipe: Recipe, label: str,
              start: int, stop: int) -> Predictions:
        ev, pantry = self._setup(key, evaluator_ref, pantry_key, items, keys)
        assert isinstance(ev, ClassificationEvaluator)
        return ev.predict_batches(pantry.state(recipe), label=label, start=start, stop=stop)


class RayExecutor:
    """Evaluations on a Ray cluster: ``address="local"`` starts one on this machine, else an address joins one.

    Args:
        address: ``local`` (a new local cluster of ``workers`` CPUs), ``auto`` (the cluster this machine belongs to),
            or ``host:port`` / ``ray://host:port``.
        workers: workers to start (default: the cluster's CPUs, or each GPU when there are GPUs).
        threads: torch threads per worker (default: this process's, so that kernels compute the same bits).

    Raises:
        OptionError: Ray is not installed, or the cluster cannot be reached.
    """

    def __init__(self, address: str = "local", *, workers: int | None = None, threads: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise OptionError("--ray needs Ray: pip install 'modelsoup[ray]'") from None
        import torch

        self._ray = ray
        self._closed = False
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError... for an address it cannot use
                raise OptionError(f"--ray {address}: cannot start or join the Ray cluster ({type(e).__name__}: {e}); "
                                  "give `local`, `auto` or the address `ray start --head` printed") from None
            _OPEN["started"] = True
        _OPEN["count"] += 1
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        cpus = int(free.get("CPU", 0))
        self.workers = workers or (gpus if gpus else cpus)
        full = (f"--ray {address}: the cluster has {cpus} free CPU(s) and {gpus} free GPU(s), not enough for "
                f"{max(self.workers, 1)} worker(s) of one CPU{' and one GPU' if gpus else ''} each; give fewer --ray-workers, or free or add resources")
        if self.workers < 1 or cpus < self.workers or (gpus and gpus < self.workers):
            self._release()
            raise OptionError(full)
        self.threads = threads or torch.get_num_threads()
        options: dict[str, Any] = {"num_cpus": 1}
        if gpus:
            options["num_gpus"] = 1
        actor = ray.remote(**options)(_WorkerCore)
        self._actors = [actor.remote(self.threads) for _ in range(self.workers)]
        try:  # free resources are reserved as actors start: wait for them, or a full cluster hangs every call
            ray.get([a.__ray_ready__.remote() for a in self._actors], timeout=WORKER_START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise OptionError(f"{full} (the workers did not start within {WORKER_START_TIMEOUT:.0f} s; "
                              "MODELSOUP_RAY_START_TIMEOUT sets how long to wait)") from None
        self._refs: dict[int, tuple[str, list[Any]]] = {}
        self._keepalive: list[Any] = []
        log.info("ray: %d worker(s) on %s", self.workers, address)

    def _evaluator(self, evaluator: Evaluator) -> tuple[str, list[Any]]:
        got = self._refs.get(id(evaluator))
        if got is None:
            fn = getattr(evaluator, "fn", None)
            module = sys.modules.get(getattr(fn, "__module__", None) or "")
            if module is not None and module.__name__.startswith(USER_MODULE_PREFIX):
                # a scoring function loaded from a file (--eval file.py:name) is not importable by name on a worker: send its code
                self._ray.cloudpickle.register_pickle_by_value(module)
            got = (f"ev-{len(self._refs)}-{time.monotonic_ns()}", [self._ray.put(evaluator)])
            self._refs[id(evaluator)] = got
            self._keepalive.append(evaluator)  # the id stays this evaluator's while its reference is kept
        return got

    def run(self, pantry: Any, evaluator: Evaluator, tasks: Sequence[Task]) -> list[tuple[Score, Predictions | None]]:
        if not tasks:
            return []
        ingredients, keys, pantry_key = pantry.portable()
        items = (type(pantry), ingredients)  # the worker builds its own pantry of the same checkpoints
        key, ref = self._evaluator(evaluator)
        if len(tasks) == 1 and self.workers > 1 and shardable(evaluator):
            return [self._sharded(evaluator, key, ref, pantry_key, items, keys, tasks[0])]
        futures = [self._actors[k % self.workers].evaluate.remote(key, ref, pantry_key, items, keys, t.recipe, t.label) for k, t in enumerate(tasks)]
        return list(self._ray.get(futures))

    def _sharded(self, evaluator: Evaluator, key: str, ref: list[Any], pantry_key: str, items: Any, keys: str,
                 task: Task) -> tuple[Score, Predictions | None]:
        import torch

        assert isinstance(evaluator, ClassificationEvaluator)
        t0 = time.perf_counter()
        ranges = shard_ranges(evaluator.batch_count(), self.workers)
        futures = [self._actors[j].shard.remote(key, ref, pantry_key, items, keys, task.recipe, task.label, a, b) for j, (a, b) in enumerate(ranges)]
        parts = self._ray.get(futures)
        raw = Predictions(torch.cat([p.logits for p in parts]), torch.cat([p.labels for p in parts]))
        preds = evaluator.arrange(raw)
        return evaluator.score(preds, seconds=time.perf_counter() - t0), preds

    def _release(self) -> None:
        """This executor no longer uses Ray: the last one open stops the local Ray this process started."""
        if self._closed:
            return
        self._closed = True
        _OPEN["count"] -= 1
        if _OPEN["count"] == 0 and _OPEN["started"]:
            self._ray.shutdown()
            _OPEN["started"] = False

    def close(self) -> None:
        for a in getattr(self, "_actors", []):
            self._ray.kill(a)
        self._actors = []
        self._release()

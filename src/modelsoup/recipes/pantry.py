"""The ingredients of a soup: each checkpoint opened once, soups of any subset as lazy states, scores cached.

Every soup these recipes build is a :class:`~modelsoup.recipe.Recipe` of the ``linear`` method over some
ingredients (with per-model or per-tensor weights). :meth:`Pantry.state` evaluates a recipe lazily:
each tensor is computed by the merge engine's own per-tensor code (:meth:`MergeRun.compute`) when an
evaluator reads it, so memory stays at one model (the evaluator's) plus one tensor per ingredient, and
the weights scored are bit for bit the weights that :func:`modelsoup.merge` writes for the same recipe.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..recipe import Recipe, recipe_from_dict
from ..engine import MergeRun
from ..plan import plan_merge
from ..errors import OptionError
from ..eval.base import Evaluator, PredictionEvaluator, Predictions, Score, require_predictions
from ..eval.cache import EvalCache
from ..io import Checkpoint, open_checkpoint
from ..io.adapters import adapted, is_adapter
from ..io.output import cached_sha256
from ..progress import progress_on

log = logging.getLogger("modelsoup")


@dataclass(frozen=True)
class Ingredient:
    """One candidate model.

    Attributes:
        label: its name in tables and logs.
        source: a checkpoint path, or an in-memory state dict / module.
        key: entry of a nested torch pickle holding the weights.
        strip_prefix: tensor-name prefix to remove.
    """

    label: str
    source: Any
    key: str | None = None
    strip_prefix: str | None = None
    base: str | None = None  # for a PEFT adapter folder: the model it is applied to

    @property
    def path(self) -> Path | None:
        return Path(self.source) if isinstance(self.source, (str, Path)) else None

    def model_ref(self) -> dict[str, Any]:
        if self.base is not None:
            ref: dict[str, Any] = {"path": self.base, "adapter": str(self.source)}
        else:
            ref = {"path": str(self.source)} if self.path is not None else {"source": self.source}
        if self.key:
            ref["key"] = self.key
        if self.strip_prefix:
            ref["strip_prefix"] = self.strip_prefix
        return ref


def short_labels(sources: Sequence[Any]) -> list[str]:
    """Short unique names: the file or folder name without a weight suffix, else the path as given
    (in-memory models: ``model[i]``); a source listed again gets ``#2``, ``#3``..."""
    short = []
    for i, s in enumerate(sources):
        if isinstance(s, (str, Path)):
            p = Path(s)
            short.append(p.name[: -len(p.suffix)] if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt") else p.name)
        else:
            short.append(f"model[{i}]")
    names = [s if short.count(s) == 1 else str(src) for s, src in zip(short, sources)]
    out: list[str] = []
    for n in names:
        k = out.count(n) + sum(1 for o in out if o.startswith(n + "#"))
        out.append(n if k == 0 else f"{n}#{k + 1}")
    return out


_STATES = itertools.count()  # a serial per state: an id() could be reused by a later state


class SoupState(Mapping[str, torch.Tensor]):
    """The tensors of a merge, each computed when it is read (nothing is kept).

    ``immutable`` tells evaluators that the same object always yields the same tensors, so a module
    that already holds them need not reload them.
    """

    immutable = True

    def __init__(self, run: MergeRun) -> None:
        self.run = run
        self._jobs = {j.name: j for j in run.plan.jobs}
        self._serial = next(_STATES)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.run.compute(self._jobs[name])

    def token(self, name: str) -> tuple[Any, ...] | None:
        """A token equal between two loads only where both give the same tensor: the stored tensor a copied tensor
        comes from (a tensor no adapter changes is the base's), else this state and the name. Lets an evaluator skip
        reloading it."""
        job = self._jobs[name]
        if job.action in ("first", "base") and job.dtype == self.run.inputs[job.sources[0][0]].meta(job.sources[0][1])[0]:
            stored = self.run.inputs[job.sources[0][0]].identity(job.sources[0][1])
            if stored is not None:
                return stored
        return ("soup", self._serial, name)  # this state always gives the same tensor (immutable)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)


class Pantry:
    """Ingredients opened once, with their evaluation results cached in memory and on disk.

    Args:
        sources: checkpoint paths (files or folders) or in-memory state dicts / modules.
        labels: names for tables (default: file names).
        key, strip_prefix: applied to every path ingredient (see :func:`modelsoup.io.open_checkpoint`).
        base: the model PEFT adapter folders among ``sources`` were trained on; each adapter is that model
            with the adapter applied (:class:`~modelsoup.io.adapters.AdaptedCheckpoint`). Evaluators that
            already hold a soup reload only the tensors the next one changes (for adapters: a few MB).
        keys: how tensor names must line up (``exact``, ``intersection``).
        cache: on-disk evaluation cache (default: the user cache); ``EvalCache(enabled=False)`` turns it off.
        executor: where evaluations run (default :class:`~modelsoup.recipes.executor.SerialExecutor`, this process;
            :class:`~modelsoup.recipes.executor.RayExecutor` spreads them over a Ray cluster).
        close_executor: close the executor with the pantry.

    Raises:
        OptionError: no ingredients, or labels that are not one per ingredient and unique.
    """

    def __init__(self, sources: Sequence[Any], *, labels: Sequence[str] | None = None, key: str | None = None,
                 strip_prefix: str | None = None, keys: str = "exact", cache: EvalCache | None = None, base: str | Path | None = None,
                 executor: Any = None, close_executor: bool = False) -> None:
        if not sources:
            raise OptionError("a soup needs at least one ingredient; give one or more checkpoints")
        names = list(labels) if labels is not None else short_labels(sources)
        if len(names) != len(sources):
            raise OptionError(f"give one label per ingredient: {len(sources)} ingredients, {len(names)} labels ({names})")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise OptionError(f"labels must be unique; {', '.join(map(repr, dups))} appear(s) more than once in {names}")
        items = []
        for n, src in zip(names, sources):
            on_disk = isinstance(src, (str, Path))
            if on_disk and is_adapter(src):
                if base is None:
                    raise OptionError(f"{src}: is a PEFT adapter; give the model it was trained on (--base BASE, or base= in the API)")
                items.append(Ingredient(n, str(src), key, strip_prefix, base=str(base)))
            else:
                items.append(Ingredient(n, src, key if on_disk else None, strip_prefix if on_disk else None))
        self._setup(items, keys, cache, executor)
        self._close_executor = close_executor

    def _setup(self, items: list[Ingredient], keys: str, cache: EvalCache | None, executor: Any) -> None:
        from .executor import SerialExecutor

        self.items = items
        self.keys = keys
        self.cache = cache if cache is not None else EvalCache()
        self.executor = executor if executor is not None else SerialExecutor()
        self._close_executor = False
        self._open: dict[int, Checkpoint] = {}
        self._fingerprints: dict[int, str | None] = {}
        self._memo: dict[tuple[int, int], tuple[Score, Predictions | None]] = {}
        self.seconds: dict[tuple[int, int], float] = {}
        self._evaluators: dict[int, Evaluator] = {}

    def use_executor(self, executor: Any, *, close: bool = False) -> None:
        """Run evaluations on ``executor`` from now on (closed with the pantry if ``close``)."""
        self.executor, self._close_executor = executor, close

    @classmethod
    def from_items(cls, items: Sequence[Ingredient], *, keys: str = "exact") -> Pantry:
        """A pantry of ingredients described by :meth:`portable` (a worker's copy: serial, no cache of its own)."""
        pantry = cls.__new__(cls)
        pantry._setup(list(items), keys, EvalCache(enabled=False), None)
        return pantry

    def portable(self) -> tuple[tuple[Ingredient, ...], str, str]:
        """(the ingredients, the keys rule, a key naming them) for a worker that opens the checkpoints itself.

        Raises:
            OptionError: an in-memory ingredient (its tensors would have to be pickled to reach a worker).
        """
        memory = [it.label for it in self.items if it.path is None]
        if memory:
            raise OptionError(f"{', '.join(memory)}: in-memory models cannot be evaluated on other workers (their tensors would be pickled); "
                              "save them (safetensors) where every worker can read them, and give the paths")
        items = tuple(self.items)
        digest = hashlib.sha256(json.dumps([it.model_ref() for it in items] + [self.keys], sort_keys=True, default=str).encode()).hexdigest()[:16]
        return items, self.keys, digest

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[str]:
        return [it.label for it in self.items]

    def checkpoint(self, i: int) -> Checkpoint:
        """Ingredient ``i``, opened on first use and kept open."""
        if i not in self._open:
            it = self.items[i]
            if it.base is not None:
                self._open[i] = adapted(open_checkpoint(it.base, key=it.key, strip_prefix=it.strip_prefix), Path(it.source), str(it.source))
            else:
                self._open[i] = open_checkpoint(it.source, label=it.label if it.path is None else str(it.source), key=it.key, strip_prefix=it.strip_prefix)
        return self._open[i]

    def fingerprint(self, i: int) -> str | None:
        """sha256 of ingredient ``i``'s weight files and loading options; None for in-memory models."""
        if i not in self._fingerprints:
            it = self.items[i]
            ck = self.checkpoint(i)
            if it.path is None or not ck.files:
                self._fingerprints[i] = None
            else:
                files = {f.name: cached_sha256(f) for f in ck.files}
                self._fingerprints[i] = json.dumps({"files": files, "key": it.key, "strip_prefix": it.strip_prefix}, sort_keys=True)
        return self._fingerprints[i]

    def recipe(self, members: Sequence[int], weights: Sequence[float] | None = None, *,
               tensor_weights: Mapping[str, Sequence[float]] | None = None) -> Recipe:
        """The linear recipe of a soup: ``members`` (indices, repeats allowed) with optional weights.

        Args:
            members: ingredient indices, in the order the soup sums them.
            weights: one per member (normalised by the merge); None = uniform.
            tensor_weights: per-tensor weights (one per member) for some tensors, e.g. a learned soup by layer.
        """
        models = []
        for j, i in enumerate(members):
            ref = self.items[i].model_ref()
            if weights is not None:
                ref["weight"] = float(weights[j])
            models.append(ref)
        data: dict[str, Any] = {"method": "linear", "models": models, "keys": self.keys}
        if tensor_weights:
            import re

            data["overrides"] = [{"match": "re:^" + re.escape(name) + "$", "weights": [float(x) for x in w]} for name, w in tensor_weights.items()]
        return recipe_from_dict(data)

    def state(self, recipe: Recipe) -> SoupState:
        """A lazy state of a recipe built by :meth:`recipe` (its models must be this pantry's ingredients)."""
        index = {self._ref_id(it.model_ref()): i for i, it in enumerate(self.items)}
        cks = []
        for m in recipe.models:
            ref: dict[str, Any] = {"path": str(m.path)} if m.source is None else {"source": m.source}
            if m.adapter is not None:
                ref["adapter"] = str(m.adapter)
            if m.key:
                ref["key"] = m.key
            if m.strip_prefix:
                ref["strip_prefix"] = m.strip_prefix
            i = index.get(self._ref_id(ref))
            if i is None:
                raise OptionError(f"{m.label()} is not an ingredient of this pantry ({', '.join(self.labels)}); build the recipe with Pantry.recipe")
            cks.append(self.checkpoint(i))
        return SoupState(MergeRun(plan_merge(recipe, cks, None)))

    @staticmethod
    def _ref_id(ref: Mapping[str, Any]) -> tuple[Any, ...]:
        src = ref.get("path") if "path" in ref else id(ref["source"])
        return (src, ref.get("adapter"), ref.get("key"), ref.get("strip_prefix"))

    def soup(self, members: Sequence[int], weights: Sequence[float] | None = None, **kw: Any) -> tuple[Recipe, SoupState]:
        """(recipe, lazy state) of a soup of ``members``."""
        rec = self.recipe(members, weights, **kw)
        return rec, self.state(rec)

    # -- evaluation with caching ------------------------------------------------------------------
    def _disk_key(self, i: int, evaluator: Evaluator) -> str | None:
        fp = self.fingerprint(i) if self.cache.enabled else None  # no cache: nothing to key, so no input is hashed
        return EvalCache.key(evaluator.identity(), fp) if fp is not None else None

    def _lookup(self, i: int, evaluator: Evaluator, need_predictions: bool) -> tuple[Score, Predictions | None] | None:
        """A result already known: in memory, or in the on-disk cache (then remembered)."""
        memo_key = (i, id(evaluator))
        self._evaluators[id(evaluator)] = evaluator  # keeps the id from being reused while memoised
        need_predictions = need_predictions and isinstance(evaluator, PredictionEvaluator)  # only those give any
        got = self._memo.get(memo_key)
        if got is not None and (got[1] is not None or not need_predictions):
            return got
        disk_key = self._disk_key(i, evaluator)
        if disk_key is None:
            return None
        wants_preds = isinstance(evaluator, PredictionEvaluator)
        hit = self.cache.get(disk_key, need_predictions=wants_preds)
        if hit is not None and hit[1] is not None:
            # scores are recomputed from cached predictions, so new metrics reach old cache entries
            assert isinstance(evaluator, PredictionEvaluator)
            hit = (evaluator.score(hit[1], seconds=hit[0].metrics.get("seconds")), hit[1])
        if hit is not None:
            log.info("%s: %s (cached)", self.items[i].label, hit[0])
            self._memo[memo_key] = hit
            self.seconds[memo_key] = 0.0
        return hit

    def prefetch(self, indices: Sequence[int], evaluator: Evaluator, *, predictions: bool = False) -> None:
        """Evaluate every ingredient of ``indices`` not known yet, all at once (spread over the executor's workers)."""
        need = list(dict.fromkeys(i for i in indices if self._lookup(i, evaluator, predictions) is None))
        if not need:
            return
        from .executor import Task

        t0 = time.perf_counter()
        results = self.executor.run(self, evaluator, [Task(self.items[i].label, self.recipe([i])) for i in need])
        wall = time.perf_counter() - t0
        for i, (score, preds) in zip(need, results):
            memo_key = (i, id(evaluator))
            self.seconds[memo_key] = score.metrics.get("seconds", wall / len(need))
            log.info("%s: %s", self.items[i].label, score)
            disk_key = self._disk_key(i, evaluator)
            if disk_key is not None:
                self.cache.put(disk_key, score, preds, about={"ingredient": self.items[i].label, "evaluator": evaluator.identity()})
            self._memo[memo_key] = (score, preds)

    def _result(self, i: int, evaluator: Evaluator, need_predictions: bool) -> tuple[Score, Predictions | None]:
        self.prefetch([i], evaluator, predictions=need_predictions)
        got = self._lookup(i, evaluator, need_predictions)
        assert got is not None
        return got

    def evaluate(self, recipe: Recipe, evaluator: Evaluator, label: str) -> tuple[Score, Predictions | None]:
        """(score, predictions or None) of a soup of this pantry's ingredients; on a cluster, split into batch shards."""
        from .executor import Task

        return self.executor.run(self, evaluator, [Task(label, recipe)])[0]

    def evaluate_many(self, tasks: Sequence[tuple[str, Recipe]], evaluator: Evaluator, *, progress: bool | None = None,
                      desc: str = "evaluating") -> list[tuple[Score, Predictions | None]]:
        """(score, predictions or None) of each (label, recipe), in order; on a cluster, one per worker at a time."""
        from .executor import Task

        todo = [Task(label, rec) for label, rec in tasks]
        if self.executor.workers > 1:
            return self.executor.run(self, evaluator, todo)
        out = []
        for t in tqdm(todo, desc=desc, unit="soup", disable=not progress_on(progress), leave=False):
            out.extend(self.executor.run(self, evaluator, [t]))
        return out

    def score(self, i: int, evaluator: Evaluator) -> Score:
        """Score of ingredient ``i`` (from the cache when its files and the evaluator are unchanged)."""
        return self._result(i, evaluator, False)[0]

    def predictions(self, i: int, evaluator: PredictionEvaluator) -> Predictions:
        """Logits of ingredient ``i`` on the evaluator's data (cached like scores).

        Raises:
            EvaluatorError: the evaluator gives no per-example predictions.
        """
        require_predictions(evaluator, "Pantry.predictions")
        preds = self._result(i, evaluator, True)[1]
        assert preds is not None
        return preds

    def close(self) -> None:
        """Close the checkpoints, and the executor if this pantry was given it to close."""
        for ck in self._open.values():
            ck.close()
        self._open.clear()
        if self._close_executor:
            self.executor.close()
            self._close_executor = False

    def __enter__(self) -> Pantry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_pantry(ingredients: Pantry | Sequence[Any], **options: Any) -> tuple[Pantry, bool]:
    """(a pantry, whether the caller made it here and must close it)."""
    if isinstance(ingredients, Pantry):
        return ingredients, False
    return Pantry(list(ingredients), **options), True

"""Evaluators for the digits example of docs/diagnostics.md, for the command line's ``--eval``.

``--eval docs/digits_eval.py:heldout`` scores on the demo's 400 validation digits and
``--eval docs/digits_eval.py:test`` on its 497 test digits (scikit-learn's bundled digits, split with seed 0
as ``soup demo`` splits them). An Evaluator object carries its own data, so the ``--heldout`` value is
only a label here.
"""

from torch.utils.data import DataLoader, TensorDataset

from modelsoup.demo.digits import load_splits, make_net
from modelsoup.eval import ClassificationEvaluator


def _split(name: str) -> ClassificationEvaluator:
    return ClassificationEvaluator(make_net(), DataLoader(TensorDataset(*load_splits(0)[name]), batch_size=256), name=f"digits-{name}")


heldout = _split("val")
test = _split("test")

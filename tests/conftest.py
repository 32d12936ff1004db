"""Fixtures shared across test folders: a small three-layer network and a batch for it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests build Hugging Face models from configs: never download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from tensordict import TensorDict
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(6, 6)
        self.linear3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def td() -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(5, 4), batch_size=[5])

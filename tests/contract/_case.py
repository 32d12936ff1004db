"""The contract every method honours, and the case type each family registers.

Each ``cases_<family>.py`` module in this folder defines ``CASES: list[ContractCase]``.
``test_contract.py`` runs every case, and checks that every method the package exports has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn


@dataclass
class ContractCase:
    """One method on one model.

    Args:
        name: Test id.
        factory: Builds a fresh method instance (a HookingContextFactory).
        model: Builds a fresh model (seeded inside).
        data: Builds the TensorDict to call the hooked module with, given the model.
        prepare_kwargs: Extra ``prepare()`` keyword arguments.
        covers: The exported class this case covers (defaults to the factory's type).
    """

    name: str
    factory: Callable[[], Any]
    model: Callable[[], nn.Module]
    data: Callable[[nn.Module], TensorDict]
    prepare_kwargs: dict[str, Any] = field(default_factory=dict)
    covers: type | None = None


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def mlp_data(_: nn.Module) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(5, 4), batch_size=[5])

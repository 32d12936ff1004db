"""Contract cases of adapters, pruning and task vectors (models with gradients and frozen parameters)."""

from __future__ import annotations

import torch
from torch import nn

from tdhook.contexts import CompositeHookingContextFactory
from tdhook.latent import SteeringVectors
from tdhook.weights import Adapters, Pruning, TaskVectors

from ._case import ContractCase, mlp_data, small_mlp


def trained_mlp() -> nn.Module:
    """A model with ``.grad`` set on its parameters and one frozen parameter."""
    model = small_mlp()
    model(torch.randn(3, 4)).sum().backward()
    model[4].bias.requires_grad_(False)
    return model


def _adapters() -> Adapters:
    torch.manual_seed(2)
    return Adapters(
        {
            "same.layer": (nn.Linear(8, 8), "2", "2"),
            "cross": (nn.Linear(8, 8), "0", "2"),
        }
    )


def _task_vectors() -> TaskVectors:
    return TaskVectors([0.5, 1.0], lambda hooked: 0.0, lambda hooked: True)


CASES = [
    ContractCase("adapters", _adapters, trained_mlp, mlp_data),
    ContractCase("pruning-global", lambda: Pruning(None, amount_to_prune=0.5), trained_mlp, mlp_data),
    ContractCase(
        "pruning-structured",
        lambda: Pruning(None, modules_to_prune={"0": (1, 0.5), "[2]": (0, 3)}),
        trained_mlp,
        mlp_data,
    ),
    ContractCase("task-vectors", _task_vectors, trained_mlp, mlp_data),
    ContractCase(
        "composite-adapters-pruning-steering",
        lambda: CompositeHookingContextFactory(
            Pruning(None, amount_to_prune=0.3),
            _adapters(),
            SteeringVectors(["4"], lambda module_key, output: -output),
        ),
        trained_mlp,
        mlp_data,
        covers=CompositeHookingContextFactory,
    ),
]

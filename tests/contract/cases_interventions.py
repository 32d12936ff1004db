"""Contract cases of patching, steering, activation addition and their composition."""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict

from tdhook.contexts import CompositeHookingContextFactory
from tdhook.latent import ActivationAddition, ActivationCaching, ActivationPatching, SteeringVectors

from ._case import ContractCase, small_mlp


def _patch_data(_: Any) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict({"input": torch.randn(5, 4), ("patched", "input"): torch.randn(5, 4)}, batch_size=[5])


def _addition_data(_: Any) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(
        {("positive", "input"): torch.randn(5, 4), ("negative", "input"): torch.randn(5, 4)}, batch_size=[5]
    )


def _steering() -> SteeringVectors:
    return SteeringVectors(["0", "2"], lambda module_key, output: output + 0.5)


def _composite() -> CompositeHookingContextFactory:
    return CompositeHookingContextFactory(
        SteeringVectors(["0"], vectors={"0": torch.ones(8)}),
        ActivationPatching(["2"], patch_fn=lambda module_key, output, output_to_patch: 0.5 * output_to_patch),
        ActivationCaching(r"4$"),
    )


CASES = [
    ContractCase("patching", lambda: ActivationPatching(["0", "2"]), small_mlp, _patch_data),
    ContractCase(
        "patching-keep-intermediates",
        lambda: ActivationPatching(["2"], clean_intermediate_keys=False),
        small_mlp,
        _patch_data,
    ),
    ContractCase("steering", _steering, small_mlp, _patch_data),
    ContractCase("activation-addition", lambda: ActivationAddition(["1", "3"]), small_mlp, _addition_data),
    ContractCase(
        "composite-steer-patch-cache",
        _composite,
        small_mlp,
        _patch_data,
        covers=CompositeHookingContextFactory,
    ),
]

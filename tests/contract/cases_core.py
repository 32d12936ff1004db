"""Contract cases of the core and of caching/probing."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.linear_model import LinearRegression

from tdhook.contexts import CompositeHookingContextFactory, HookingContextFactory
from tdhook.latent import ActivationCaching, Probing
from tdhook.latent.probing import ProbeManager

from ._case import ContractCase, mlp_data, small_mlp


def _probing() -> Probing:
    manager = ProbeManager(LinearRegression, {}, lambda p, y: {"n": len(p)}, allow_overwrite=True)
    return Probing(r"[024]$", manager.probe_factory, additional_keys=["labels", "step_type"])


def _probe_data(model: Any):
    td = mlp_data(model)
    td["labels"] = torch.randn(5, 1)
    td["step_type"] = "fit"
    return td


CASES = [
    ContractCase("base", HookingContextFactory, small_mlp, mlp_data, covers=HookingContextFactory),
    ContractCase("caching", lambda: ActivationCaching(r"\d$"), small_mlp, mlp_data),
    ContractCase(
        "caching-all-directions",
        lambda: ActivationCaching(r"\d$", directions=["fwd", "fwd_pre"], accumulate=True),
        small_mlp,
        mlp_data,
    ),
    ContractCase("probing", _probing, small_mlp, _probe_data),
    ContractCase(
        "composite-caching-probing",
        lambda: CompositeHookingContextFactory(ActivationCaching(r"\d$"), _probing()),
        small_mlp,
        _probe_data,
        covers=CompositeHookingContextFactory,
    ),
]

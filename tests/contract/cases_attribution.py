"""Contract cases of the attribution family (gradient and perturbation methods)."""

from __future__ import annotations

import torch

from tdhook.attribution import GradientAttribution, InputXGradient, IntegratedGradients, Saliency

from ._case import ContractCase, mlp_data, small_mlp


def _with_baseline(model):
    td = mlp_data(model)
    td["baseline", "input"] = torch.zeros(5, 4)
    return td


CASES = [
    ContractCase("gradient-attribution", GradientAttribution, small_mlp, mlp_data),
    ContractCase("saliency", lambda: Saliency(targets=1, absolute=True), small_mlp, mlp_data),
    ContractCase(
        "saliency-latent",
        lambda: Saliency(
            input_modules=["2"], target_modules=["4"], output_grad_callbacks={"2": lambda **_: None}
        ),
        small_mlp,
        mlp_data,
    ),
    ContractCase(
        "input-x-gradient-separate",
        lambda: InputXGradient(targets=[0, 2], separate_targets=True),
        small_mlp,
        mlp_data,
    ),
    ContractCase(
        "integrated-gradients",
        lambda: IntegratedGradients(
            n_steps=5, chunk_size=2, compute_convergence_delta=True, input_modules=["0"]
        ),
        small_mlp,
        _with_baseline,
    ),
]

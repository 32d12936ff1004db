"""Contract cases of the attribution family (gradient and perturbation methods)."""

from __future__ import annotations

import torch
from torch import nn

from tdhook.attribution import (
    ActivationMaximisation,
    DimsConfig,
    FeatureAblation,
    GradCAM,
    GradientAttribution,
    GradientShap,
    GuidedBackpropagation,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
    VarGrad,
)
from tdhook.attribution.gradient_helpers import GradientAttributionWithBaseline

from ._case import ContractCase, mlp_data, small_mlp


def _inplace_mlp() -> nn.Module:
    model = small_mlp()
    model[1].inplace = True
    return model


def _with_baseline(model):
    td = mlp_data(model)
    td["baseline", "input"] = torch.zeros(5, 4)
    return td


CASES = [
    ContractCase("gradient-attribution", GradientAttribution, small_mlp, mlp_data),
    ContractCase(
        "gradient-attribution-with-baseline", GradientAttributionWithBaseline, small_mlp, _with_baseline
    ),
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
    ContractCase("guided-backprop-inplace", lambda: GuidedBackpropagation(targets=0), _inplace_mlp, mlp_data),
    ContractCase("grad-cam", lambda: GradCAM({"2": DimsConfig((-1,), None)}), small_mlp, mlp_data),
    ContractCase(
        "gradient-shap",
        lambda: GradientShap(n_samples=3, chunk_size=2, stdevs=0.1),
        small_mlp,
        _with_baseline,
    ),
    ContractCase("smoothgrad", lambda: SmoothGrad(GuidedBackpropagation(), n_samples=3), small_mlp, mlp_data),
    ContractCase("vargrad", lambda: VarGrad(n_samples=3, chunk_size=2), small_mlp, mlp_data),
    ContractCase("feature-ablation", lambda: FeatureAblation(targets=1), small_mlp, mlp_data),
    ContractCase("occlusion", lambda: Occlusion((2,), strides=2), small_mlp, mlp_data),
    ContractCase(
        "activation-maximisation", lambda: ActivationMaximisation(["2"], n_steps=2), small_mlp, mlp_data
    ),
]

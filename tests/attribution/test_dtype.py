"""A floating input whose dtype differs from the model's parameters (issue 11 §4).

Every attribution path surfaces the core's dtype check (one error naming both dtypes and the
fix) instead of torch's ``mat1 and mat2`` deep inside, before the model runs.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import (
    LRP,
    DimsConfig,
    FeatureAblation,
    GradCAM,
    GradientShap,
    GuidedBackpropagation,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
)
from tdhook.errors import DtypeMismatchError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        Saliency,
        GuidedBackpropagation,
        lambda: IntegratedGradients(n_steps=3),
        lambda: GradientShap(n_samples=2),
        lambda: SmoothGrad(n_samples=2, stdevs=0.1),
        lambda: LRP(warn_on_missing_rule=False),
        lambda: GradCAM({"0": DimsConfig(None, None)}),
        FeatureAblation,
        lambda: Occlusion((2,)),
    ],
)
def test_input_dtype_mismatch_names_both_dtypes(make, dtype):
    model = _model()
    td = TensorDict(input=torch.randn(3, 4).to(dtype), batch_size=[3])
    td["baseline", "input"] = torch.zeros(3, 4, dtype=dtype)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with make().prepare(model) as hooked, pytest.raises(DtypeMismatchError) as info:
            hooked(td)
    finally:
        handle.remove()
    message = str(info.value)
    assert str(dtype) in message
    assert "torch.float32" in message
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, RuntimeError)
    assert calls == []  # refused before the model ran
    assert all(p.dtype == torch.float32 for p in model.parameters())

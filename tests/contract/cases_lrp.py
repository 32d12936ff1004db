"""Contract cases of LRP: rules, composites and the BatchNorm canonizer (no forward patching)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import LRP
from tdhook.attribution.lrp import EpsilonGammaBox, EpsilonPlus, MergeBatchNorm

from ._case import ContractCase, mlp_data, small_mlp


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Linear(4, 2),
    )
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[6].running_mean.uniform_(-1.0, 1.0)
    return model.eval()


def _image_data(_: nn.Module) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(3, 2, 4, 4), batch_size=[3])


CASES = [
    ContractCase(
        "lrp-epsilon-plus",
        lambda: LRP(rule_mapper=EpsilonPlus(), init_relevance="outputs"),
        small_mlp,
        mlp_data,
    ),
    ContractCase("lrp-no-rules", lambda: LRP(warn_on_missing_rule=False, targets=[1]), small_mlp, mlp_data),
    ContractCase(
        "lrp-gamma-box-merge-bn-inplace",
        lambda: LRP(
            rule_mapper=EpsilonGammaBox(-3.0, 3.0),
            canonizers=[MergeBatchNorm()],
            targets=[0, 1],
            separate_targets=True,
        ),
        _bn_cnn,
        _image_data,
    ),
]

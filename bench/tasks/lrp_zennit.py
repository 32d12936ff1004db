"""LRP vs zennit: EpsilonPlus on the MLP; EpsilonPlusFlat / EpsilonAlpha2Beta1Flat on the CNN.

zennit's environment has torch 2.14.1 + torchvision 0.29.1 (zennit imports torchvision), so ours
runs in that environment too. Relevance is seeded with a one-hot at class 3 (zennit's usual
``attributor(x, one_hot)``); on the CNN, BatchNorm is merged into the convolutions (ours:
``MergeBatchNorm``, zennit: ``SequentialMergeBatchNorm``).

On the MLP a third side needs no library at all: ε-LRP in closed form, layer by layer
(``R ← a ⊙ Wᵀ (R / stab(z))``, ReLU passing relevance through): the limit any hook-based
implementation pays on top of, and the gate's oracle where zennit is not installed (CI's smoke test).
"""

from __future__ import annotations

from typing import Any

import torch

from .._harness import Case, Impl, Skip, Task
from ..models import sequential_mlp, vgg11_bn
from ._ours import OursAttribution

TARGET = 3


def _build(params: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if params["model"] == "mlp":
        model = sequential_mlp(params["depth"], params["width"])
        return model, torch.randn(params["batch"], params["width"], generator=gen)
    model = vgg11_bn(image_size=params["size"], width_factor=params.get("width_factor", 1.0))
    return model, torch.randn(params["batch"], 3, params["size"], params["size"], generator=gen)


class Tdhook(OursAttribution):
    """``LRP(rule_mapper=<composite>(), canonizers=[MergeBatchNorm()], targets=[3])``."""

    label = "tdhook LRP"

    def setup(self, params):
        from tdhook.attribution import lrp

        model, x = _build(params)
        mapper = getattr(lrp, params["composite"])()
        canonizers = [lrp.MergeBatchNorm()] if params["model"] == "cnn" else []
        method = lrp.LRP(
            rule_mapper=mapper, canonizers=canonizers, targets=[TARGET], warn_on_missing_rule=False
        )
        self.enter(method, model, x)


class Zennit(Impl):
    """``<Composite>(canonizers=[SequentialMergeBatchNorm()]).context(model)`` entered once; forward, grad."""

    name = "zennit"
    label = "zennit"

    def setup(self, params):
        import zennit.composites as composites
        from zennit.canonizers import SequentialMergeBatchNorm

        self.model, self.x = _build(params)
        canonizers = [SequentialMergeBatchNorm()] if params["model"] == "cnn" else None
        self.composite = getattr(composites, params["composite"])(canonizers=canonizers)
        out_dim = self.model(self.x[:1]).shape[-1]
        self.seed = torch.zeros(self.x.shape[0], out_dim)
        self.seed[:, TARGET] = 1

        # entered once, like ours (rules registered and BatchNorm merged once, then many calls)
        self.modified = self.composite.context(self.model).__enter__()

    def run(self):
        x = self.x.clone().requires_grad_(True)
        (self.attr,) = torch.autograd.grad(self.modified(x), x, self.seed)

    def output(self):
        return self.attr


class Raw(Impl):
    """ε-LRP in closed form on the MLP (EpsilonPlus's rule for dense layers, ε = 1e-6); no hooks."""

    name = "raw"
    label = "closed form, no hooks (the limit)"
    epsilon = 1e-6  # EpsilonPlus's default, in both libraries

    def setup(self, params):
        if params["model"] != "mlp" or params["composite"] != "EpsilonPlus":
            raise Skip("the closed form is written for EpsilonPlus on the MLP only")
        self.model, self.x = _build(params)

    @torch.no_grad()
    def run(self):
        acts = [self.x]
        for layer in self.model:
            acts.append(layer(acts[-1]))
        relevance = torch.zeros_like(acts[-1])
        relevance[:, TARGET] = 1
        for k in range(len(self.model) - 1, -1, -1):
            layer = self.model[k]
            if isinstance(layer, torch.nn.Linear):
                z = acts[k + 1]
                stabilized = z + self.epsilon * torch.where(z >= 0, 1.0, -1.0)
                relevance = acts[k] * ((relevance / stabilized) @ layer.weight)
        self.attr = relevance

    def output(self):
        return self.attr


_MLP = {"model": "mlp", "depth": 10, "composite": "EpsilonPlus"}
_CNN = {"model": "cnn", "size": 64, "batch": 16}
TASK = Task(
    name="lrp_zennit",
    title="LRP vs zennit (MLP depth 10; VGG-11-style CNN with BatchNorm merged, 64×64)",
    env="zennit",
    impls=[Tdhook, Zennit, Raw],
    cases=[
        Case(
            "MLP EpsilonPlus w256 b100",
            {**_MLP, "width": 256, "batch": 100},
            smoke={**_MLP, "depth": 4, "width": 12, "batch": 5},
        ),
        Case("MLP EpsilonPlus w1000 b1000", {**_MLP, "width": 1000, "batch": 1000}, quick=False),
        Case("CNN EpsilonPlusFlat b16", {**_CNN, "composite": "EpsilonPlusFlat"}),
        Case("CNN EpsilonAlpha2Beta1Flat b16", {**_CNN, "composite": "EpsilonAlpha2Beta1Flat"}),
    ],
    rtol=1e-4,
    atol=1e-7,  # relevances are ~1e-4 on the random CNN
    targets={"zennit": 1.0, "raw": 1.5},
    timing={"warmup": 2, "min_repeats": 7, "max_repeats": 30, "budget_s": 10.0},
)

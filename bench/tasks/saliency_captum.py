"""Saliency and SmoothGrad on the VGG-11-style CNN (64×64, BatchNorm, eval) vs captum.

Target class 3, plain gradients (captum's ``abs=False``). SmoothGrad draws its noise
differently in each library, so its gate runs with ``stdevs=0`` (then it must equal the mean of
identical saliency maps exactly) and its timing with the real noise.
"""

from __future__ import annotations

from typing import Any

import torch

from .._harness import Case, Impl, Task
from ..models import vgg11_bn
from ._ours import OursAttribution

TARGET = 3


def _build(params: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    model = vgg11_bn(image_size=params["size"], width_factor=params.get("width_factor", 1.0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(params["batch"], 3, params["size"], params["size"], generator=gen)
    return model, x


class Tdhook(OursAttribution):
    """``Saliency(targets=3)`` or ``SmoothGrad(Saliency(targets=3), n_samples, stdevs)``."""

    label = "tdhook"

    def setup(self, params):
        from tdhook.attribution import Saliency, SmoothGrad

        model, x = _build(params)
        method: Any = Saliency(targets=[TARGET])
        if params["method"] == "smoothgrad":
            method = SmoothGrad(
                method,
                n_samples=params["n_samples"],
                stdevs=params["stdevs"],
                generator=torch.Generator().manual_seed(2),
            )
        self.enter(method, model, x)


class Captum(Impl):
    """``captum.attr.Saliency`` (``abs=False``), in a ``NoiseTunnel`` for SmoothGrad."""

    name = "captum"
    label = "captum"

    def setup(self, params):
        from captum.attr import NoiseTunnel, Saliency

        model, self.x = _build(params)
        self.params = params
        self.saliency = Saliency(model)
        self.tunnel = NoiseTunnel(self.saliency)

    def run(self):
        p = self.params
        if p["method"] == "smoothgrad":
            self.attr = self.tunnel.attribute(
                self.x,
                nt_type="smoothgrad",
                nt_samples=p["n_samples"],
                stdevs=p["stdevs"],
                target=TARGET,
                abs=False,
            )
        else:
            self.attr = self.saliency.attribute(self.x, target=TARGET, abs=False)

    def output(self):
        return self.attr


class Raw(Impl):
    """The raw-autograd limit: one forward (of all noisy copies), one ``autograd.grad``."""

    name = "raw"
    label = "raw autograd (the limit)"

    def setup(self, params):
        self.model, self.x = _build(params)
        self.params = params
        self.gen = torch.Generator().manual_seed(2)

    def run(self):
        p, x = self.params, self.x
        if p["method"] == "smoothgrad":
            n = p["n_samples"]
            noisy = x.unsqueeze(1) + p["stdevs"] * torch.randn(
                x.shape[0], n, *x.shape[1:], generator=self.gen
            )
            points = noisy.reshape(-1, *x.shape[1:]).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.model(points)[:, TARGET].sum(), points)
            self.attr = grad.view(x.shape[0], n, *x.shape[1:]).mean(1)
        else:
            points = x.clone().requires_grad_(True)
            (self.attr,) = torch.autograd.grad(self.model(points)[:, TARGET].sum(), points)

    def output(self):
        return self.attr


_SMOKE = {"size": 32, "batch": 2, "width_factor": 0.125}
TASK = Task(
    name="saliency_captum",
    title="Saliency and SmoothGrad on a VGG-11-style CNN with BatchNorm (64×64): vs captum",
    env="captum",
    impls=[Tdhook, Captum, Raw],
    cases=[
        Case(
            "saliency b16",
            {"size": 64, "batch": 16, "method": "saliency"},
            smoke={**_SMOKE, "method": "saliency"},
        ),
        Case(
            "smoothgrad b4 n10",
            {"size": 64, "batch": 4, "method": "smoothgrad", "n_samples": 10, "stdevs": 0.15},
            gate={"stdevs": 0.0},
            smoke={**_SMOKE, "method": "smoothgrad", "n_samples": 3, "stdevs": 0.0},
        ),
    ],
    rtol=1e-4,
    atol=1e-9,  # gradients are ~1e-5 on this random CNN
    targets={"raw": 1.1},
    timing={"warmup": 2, "min_repeats": 7, "max_repeats": 30, "budget_s": 10.0},
)

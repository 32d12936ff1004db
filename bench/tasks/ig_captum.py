"""Integrated gradients on the MLP vs captum, and vs the raw-autograd limit.

Cases (MLP depth 10, zero baseline, Gauss-Legendre, ×inputs as captum's default):

- ``single``: one target (output 4);
- ``two summed``: the paper's task, the sum of outputs 4 and 7 (ours: ``targets=[4, 7]``) vs
  captum's two calls (target 4, then 7) summed; captum on a wrapper returning the sum is shown too;
- ``K separate``: K maps (outputs 0..K−1; ours: ``separate_targets=True``) vs K captum calls;
- ``memory``: n_steps grows with ``chunk_size`` (ours) / ``internal_batch_size`` (captum) fixed.

The raw-autograd limit does one forward over all steps and one ``torch.autograd.grad`` (one
batched vector-Jacobian product for separate targets): what any implementation must pay.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._harness import Case, Impl, Task
from ..models import mlp
from ._ours import OursAttribution


def _build(params: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    model = mlp(params.get("depth", 10), params["width"])
    x = torch.randn(params["batch"], params["width"], generator=torch.Generator().manual_seed(1))
    return model, x


def target_list(params: Any) -> list[int]:
    mode = params["mode"]
    if mode == "single":
        return [4]
    if mode == "summed":
        return [4, 7]
    return list(range(params["k"]))


class Tdhook(OursAttribution):
    """``IntegratedGradients(targets=..., separate_targets=..., multiply_by_inputs=True)``."""

    label = "tdhook IntegratedGradients"
    baseline = True

    def setup(self, params):
        from tdhook.attribution import IntegratedGradients

        model, x = _build(params)
        ig = IntegratedGradients(
            targets=target_list(params),
            separate_targets=params["mode"] == "separate",
            multiply_by_inputs=True,
            n_steps=params["n_steps"],
            chunk_size=params.get("chunk"),
        )
        self.enter(ig, model, x)


class Captum(Impl):
    """``captum.attr.IntegratedGradients``: one ``attribute`` call per target (summed or stacked)."""

    name = "captum"
    label = "captum (one call per target)"

    def setup(self, params):
        from captum.attr import IntegratedGradients

        self.model, self.x = _build(params)
        self.ig = IntegratedGradients(self.model)
        self.targets = target_list(params)
        self.mode = params["mode"]
        self.n_steps = params["n_steps"]
        chunk = params.get("chunk")
        self.internal = None if chunk is None else chunk * params["batch"]

    def run(self):
        maps = [
            self.ig.attribute(
                self.x, baselines=0.0, target=t, n_steps=self.n_steps, internal_batch_size=self.internal
            )
            for t in self.targets
        ]
        self.attr = torch.stack(maps, 1) if self.mode == "separate" else sum(maps)

    def output(self):
        return self.attr


class _Summed(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, targets: list[int]) -> None:
        super().__init__()
        self.model = model
        self.targets = targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.targets].sum(-1)


class CaptumWrapper(Impl):
    """captum on a wrapper returning the summed targets: one call (only for ``summed``)."""

    name = "captum_wrapper"
    label = "captum (one call on a summing wrapper)"

    def setup(self, params):
        from captum.attr import IntegratedGradients

        from .._harness import Skip

        if params["mode"] != "summed":
            raise Skip("only for summed targets")
        model, self.x = _build(params)
        self.ig = IntegratedGradients(_Summed(model, target_list(params)))
        self.n_steps = params["n_steps"]

    def run(self):
        self.attr = self.ig.attribute(self.x, baselines=0.0, n_steps=self.n_steps)

    def output(self):
        return self.attr


class Raw(Impl):
    """The raw-autograd limit: one forward over every step, one ``autograd.grad`` (batched VJP if K).

    With ``chunk``, one forward and one backward per chunk of steps (the same memory budget).
    """

    name = "raw"
    label = "raw autograd (the limit)"

    def setup(self, params):
        self.model, self.x = _build(params)
        n = params["n_steps"]
        nodes, weights = np.polynomial.legendre.leggauss(n)
        self.alphas = torch.tensor(0.5 * (1 + nodes), dtype=torch.float32)
        self.weights = torch.tensor(0.5 * weights, dtype=torch.float32)
        self.targets = target_list(params)
        self.separate = params["mode"] == "separate"
        self.chunk = params.get("chunk")
        k = len(self.targets)
        b = self.x.shape[0]
        if self.separate:  # one-hot seeds (K, n*B, out)
            seeds = torch.zeros(k, n * b, params["width"])
            for i, t in enumerate(self.targets):
                seeds[i, :, t] = 1
            self.seeds = seeds

    def run(self):
        x = self.x
        n, b = len(self.alphas), x.shape[0]
        step = self.chunk or n
        attr = None
        for start in range(0, n, step):  # one chunk of steps per forward/backward, like the others
            alphas, weights = self.alphas[start : start + step], self.weights[start : start + step]
            c = len(alphas)
            points = (alphas.view(c, 1, 1) * x).reshape(c * b, -1).requires_grad_(True)
            out = self.model(points)
            if self.separate:
                seeds = self.seeds[:, : c * b]
                (grad,) = torch.autograd.grad(out, points, seeds, is_grads_batched=True)
                part = torch.einsum("n,knbf->bkf", weights, grad.view(len(self.targets), c, b, -1))
            else:
                (grad,) = torch.autograd.grad(out[:, self.targets].sum(), points)
                part = torch.einsum("n,nbf->bf", weights, grad.view(c, b, -1))
            attr = part if attr is None else attr + part
        assert attr is not None
        self.attr = attr * (x.unsqueeze(1) if self.separate else x)

    def output(self):
        return self.attr


def _case(cid: str, quick: bool = True, smoke: dict | None = None, **params: Any) -> Case:
    base = {"width": 256, "batch": 100, "n_steps": 50}
    return Case(cid, {**base, **params}, quick=quick, smoke=smoke)


_SMOKE = {"depth": 3, "width": 16, "batch": 4, "n_steps": 5}
CASES = [
    _case("single w256 b100", mode="single", smoke={**_SMOKE, "mode": "single"}),
    _case("single w256 b1000", mode="single", batch=1000),
    _case("single w1000 b100", mode="single", width=1000, quick=False),
    _case("two summed w256 b100", mode="summed", smoke={**_SMOKE, "mode": "summed"}),
    *[
        _case(
            f"K={k} separate w256 b100",
            mode="separate",
            k=k,
            quick=k in (1, 8),
            smoke={**_SMOKE, "mode": "separate", "k": 3} if k == 8 else None,
        )
        for k in (1, 2, 4, 8, 16)
    ],
    _case("memory n_steps=50 chunk=50", mode="single", chunk=50, quick=False),
    _case("memory n_steps=200 chunk=50", mode="single", n_steps=200, chunk=50, quick=False),
    _case("memory n_steps=400 chunk=50", mode="single", n_steps=400, chunk=50),
    _case("memory n_steps=400 no chunk", mode="single", n_steps=400, quick=False),
]

TASK = Task(
    name="ig_captum",
    title="Integrated gradients, MLP depth 10, zero baseline, Gauss-Legendre: vs captum and the raw-autograd limit",
    env="captum",
    impls=[Tdhook, Captum, CaptumWrapper, Raw],
    cases=CASES,
    rtol=1e-4,
    atol=1e-9,  # attributions are ~1e-4 on this random MLP
    targets={"raw": 1.1},
    # the targets vs captum at width 256, batch 100, 50 steps
    case_targets={
        "single w256 b100": {"captum": 0.75},
        "two summed w256 b100": {"captum": 0.4},
        "K=8 separate w256 b100": {"captum": 0.65},
    },
    timing={"warmup": 2, "min_repeats": 7, "max_repeats": 30, "budget_s": 10.0},
)

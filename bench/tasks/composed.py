"""Integrated gradients over a TensorDict actor-critic: the action logit and the value, two maps.

Ours: one ``IntegratedGradients`` call on the ``TensorDictSequential`` (body → actor, critic),
both heads as targets with ``separate_targets=True`` (one forward, one batched backward). captum
needs a tensor-to-tensor model: one wrapper per head, one ``attribute`` call each. Zero baseline,
50 Gauss-Legendre steps, ×inputs; the action is fixed (index 2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._harness import Case, Impl, Task
from ..models import actor_critic
from ._ours import OursAttribution

ACTION = 2


def _build(params: Any) -> tuple[Any, torch.Tensor]:
    model = actor_critic(params["obs"], params["hidden"])
    x = torch.randn(params["batch"], params["obs"], generator=torch.Generator().manual_seed(1))
    return model, x


def heads(td: Any, additional: Any) -> Any:
    """The two targets: the chosen action's logit and the state value."""
    from tensordict import TensorDict

    return TensorDict(
        action=td["logits"][..., ACTION], value=td["state_value"][..., 0], batch_size=td.batch_size
    )


def one_map_per_head(targets: Any, additional: Any) -> Any:
    """Seeds with a leading K = 2: map 0 is the action logit's, map 1 the value's."""
    from tensordict import TensorDict

    a, v = targets["action"], targets["value"]
    return TensorDict(
        action=torch.stack([torch.ones_like(a), torch.zeros_like(a)]),
        value=torch.stack([torch.zeros_like(v), torch.ones_like(v)]),
        batch_size=[],
    )


class Tdhook(OursAttribution):
    """One ``IntegratedGradients`` call on the TensorDict model, both heads, separate maps."""

    key = "observation"
    baseline = True
    label = "tdhook IntegratedGradients (one call)"

    def setup(self, params):
        from tdhook.attribution import IntegratedGradients

        model, x = _build(params)
        ig = IntegratedGradients(
            init_attr_targets=heads,
            init_attr_grads=one_map_per_head,
            separate_targets=True,
            multiply_by_inputs=True,
            n_steps=params["n_steps"],
        )
        self.enter(ig, model, x)


class _Head(nn.Module):
    """A tensor-to-tensor view of one head of the TensorDict model (what captum needs)."""

    def __init__(self, model: Any, key: str, index: int) -> None:
        super().__init__()
        self.model = model
        self.key = key
        self.index = index

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        from tensordict import TensorDict

        td = self.model(TensorDict(observation=obs, batch_size=obs.shape[:1]))
        return td[self.key][:, self.index]


class Captum(Impl):
    """captum ``IntegratedGradients`` on one wrapper per head: two calls."""

    name = "captum"
    label = "captum (one wrapper and call per head)"

    def setup(self, params):
        from captum.attr import IntegratedGradients

        model, self.x = _build(params)
        self.igs = [
            IntegratedGradients(_Head(model, "logits", ACTION)),
            IntegratedGradients(_Head(model, "state_value", 0)),
        ]
        self.n_steps = params["n_steps"]

    def run(self):
        maps = [ig.attribute(self.x, baselines=0.0, n_steps=self.n_steps) for ig in self.igs]
        self.attr = torch.stack(maps, 1)

    def output(self):
        return self.attr


class Raw(Impl):
    """The raw-autograd limit: one forward of the plain modules over all steps, one batched VJP."""

    name = "raw"
    label = "raw autograd (the limit)"

    def setup(self, params):
        model, self.x = _build(params)
        body, actor, critic = (m.module for m in model.module)
        self.body, self.actor, self.critic = body, actor, critic
        nodes, weights = np.polynomial.legendre.leggauss(params["n_steps"])
        self.alphas = torch.tensor(0.5 * (1 + nodes), dtype=torch.float32)
        self.weights = torch.tensor(0.5 * weights, dtype=torch.float32)

    def run(self):
        x = self.x
        n, b = len(self.alphas), x.shape[0]
        points = (self.alphas.view(n, 1, 1) * x).reshape(n * b, -1).requires_grad_(True)
        h = self.body(points)
        out = torch.stack([self.actor(h)[:, ACTION], self.critic(h)[:, 0]], -1)
        seeds = torch.eye(2).view(2, 1, 2).expand(2, n * b, 2)
        (grad,) = torch.autograd.grad(out, points, seeds, is_grads_batched=True)
        grad = grad.view(2, n, b, -1)
        self.attr = torch.einsum("n,knbf->bkf", self.weights, grad) * x.unsqueeze(1)

    def output(self):
        return self.attr


TASK = Task(
    name="composed",
    title="Composed TensorDict model: IG of an actor-critic's action logit and value (two maps)",
    env="captum",
    impls=[Tdhook, Captum, Raw],
    cases=[
        Case(
            "obs64 h256 b100",
            {"obs": 64, "hidden": 256, "batch": 100, "n_steps": 50},
            smoke={"obs": 6, "hidden": 8, "batch": 3, "n_steps": 4},
        ),
        Case("obs64 h256 b1000", {"obs": 64, "hidden": 256, "batch": 1000, "n_steps": 50}, quick=False),
    ],
    rtol=1e-4,
    atol=1e-7,
    targets={"raw": 1.1},
)

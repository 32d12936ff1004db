"""RL targets on a small TorchRL actor-critic: log-prob of the action, state value, advantage."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from tensordict.nn.distributions import NormalParamExtractor
from torch import nn

from tdhook.attribution import (
    IntegratedGradients,
    Saliency,
    action_log_prob_target,
    advantage_target,
    state_value_target,
)

torchrl_modules = pytest.importorskip("torchrl.modules")


@pytest.fixture
def actor_critic():
    torch.manual_seed(0)
    params = TensorDictModule(
        nn.Sequential(nn.Linear(3, 4), NormalParamExtractor()),
        in_keys=["observation"],
        out_keys=["loc", "scale"],
    )
    actor = torchrl_modules.ProbabilisticActor(
        params, in_keys=["loc", "scale"], distribution_class=torch.distributions.Normal, return_log_prob=True
    )
    critic = torchrl_modules.ValueOperator(nn.Linear(3, 1), in_keys=["observation"])
    return actor, critic


def test_log_prob_and_advantage_targets(actor_critic):
    actor, _ = actor_critic
    obs = torch.randn(5, 3)
    with torch.no_grad():
        batch = actor(TensorDict(observation=obs, batch_size=[5]))
    batch["advantage"] = torch.randn(5, 1)
    params, dist_module = actor.module[0], actor.module[-1]

    method = Saliency(init_attr_targets=action_log_prob_target(dist_module), additional_init_keys=["action"])
    with method.prepare(params) as hooked:
        td = hooked(batch.select("observation", "action"))
    o = obs.clone().requires_grad_()
    loc, scale = params.module(o)
    lp = torch.distributions.Normal(loc, scale).log_prob(batch["action"]).sum(-1)
    (grad,) = torch.autograd.grad(lp.sum(), o, retain_graph=True)
    torch.testing.assert_close(td["attr", "observation"], grad)

    method = Saliency(
        init_attr_targets=advantage_target(dist_module), additional_init_keys=["action", "advantage"]
    )
    with method.prepare(params) as hooked:
        td = hooked(batch.select("observation", "action", "advantage"))
    (grad,) = torch.autograd.grad((lp * batch["advantage"].squeeze(-1)).sum(), o)
    torch.testing.assert_close(td["attr", "observation"], grad)

    td = batch.select("observation", "action")
    td["baseline", "observation"] = torch.zeros(5, 3)
    ig = IntegratedGradients(
        init_attr_targets=action_log_prob_target(dist_module),
        additional_init_keys=["action"],
        multiply_by_inputs=True,
        compute_convergence_delta=True,
        n_steps=64,
    )
    with ig.prepare(params) as hooked:
        td = hooked(td)
    assert td["convergence_delta"].abs().max() < 1e-2


def test_state_value_target(actor_critic):
    _, critic = actor_critic
    obs = torch.randn(5, 3)
    with Saliency(init_attr_targets=state_value_target()).prepare(critic) as hooked:
        td = hooked(TensorDict(observation=obs, batch_size=[5]))
    torch.testing.assert_close(td["attr", "observation"], critic.module.weight.expand(5, 3))

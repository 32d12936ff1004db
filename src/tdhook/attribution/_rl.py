"""RL targets: ``init_attr_targets`` builders for TorchRL policy batches (``tdhook.attribution``).

Each builder returns ``f(targets, additional) -> TensorDict`` for any gradient method:

* :func:`action_log_prob_target`: ``log π(a|s)`` of the action taken (``additional`` holds it);
* :func:`state_value_target`: the critic's state value;
* :func:`advantage_target`: the policy-gradient surrogate ``A · log π(a|s)``, with the advantage
  ``A`` read from the batch (a constant per row), so the map shows what drives the update.

Prepare the module that outputs the distribution parameters (e.g. ``actor.module[0]``, writing
``loc``/``scale`` or ``logits``) and pass the ``ProbabilisticTensorDictModule`` that builds the
distribution (e.g. ``actor.module[-1]``); its ``get_dist`` reads the parameters from the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from ._errors import AttributionError

__all__ = ["action_log_prob_target", "advantage_target", "state_value_target"]


def _align(value: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    while value.dim() < len(batch):
        value = value.unsqueeze(-1)
    return value.expand(*batch, *value.shape[len(batch) :]) if value.shape[: len(batch)] != batch else value


def _log_prob(dist_module: Any, targets: TensorDictBase, action: torch.Tensor) -> torch.Tensor:
    if not hasattr(dist_module, "get_dist"):
        raise AttributionError(
            f"{type(dist_module).__name__} has no get_dist(); pass the ProbabilisticTensorDictModule of the actor "
            "(e.g. actor.module[-1])."
        )
    dist = dist_module.get_dist(targets)
    log_prob = dist.log_prob(action)
    extra = log_prob.dim() - len(targets.batch_size)
    return log_prob.sum(tuple(range(-extra, 0))) if extra > 0 else log_prob


@dataclass(frozen=True)
class _LogProb:
    dist_module: Any
    action_key: NestedKey

    def __call__(self, targets: TensorDictBase, additional: TensorDictBase) -> TensorDictBase:
        action = additional.get(self.action_key)
        value = _log_prob(self.dist_module, targets, _align(action, targets.batch_size))
        return TensorDict(log_prob=value, batch_size=targets.batch_size)


@dataclass(frozen=True)
class _Value:
    value_key: NestedKey

    def __call__(self, targets: TensorDictBase, additional: TensorDictBase) -> TensorDictBase:
        return TensorDict(state_value=targets.get(self.value_key), batch_size=targets.batch_size)


@dataclass(frozen=True)
class _Advantage:
    dist_module: Any
    action_key: NestedKey
    advantage_key: NestedKey

    def __call__(self, targets: TensorDictBase, additional: TensorDictBase) -> TensorDictBase:
        batch = targets.batch_size
        log_prob = _log_prob(self.dist_module, targets, _align(additional.get(self.action_key), batch))
        adv = _align(additional.get(self.advantage_key), batch).detach()
        adv = adv.reshape(*batch, -1).sum(-1) if adv.dim() > len(batch) else adv
        return TensorDict(surrogate=adv * log_prob, batch_size=batch)


def action_log_prob_target(dist_module: Any, action_key: NestedKey = "action") -> Any:
    """Target ``log π(a|s)`` of the taken action; use with ``additional_init_keys=[action_key]``.

    Args:
        dist_module: The actor's ``ProbabilisticTensorDictModule`` (has ``get_dist``).
        action_key: Key of the taken action in the batch.
    """
    return _LogProb(dist_module, action_key)


def state_value_target(value_key: NestedKey = "state_value") -> Any:
    """Target: the critic output at ``value_key`` (prepare the ValueOperator)."""
    return _Value(value_key)


def advantage_target(
    dist_module: Any, action_key: NestedKey = "action", advantage_key: NestedKey = "advantage"
) -> Any:
    """Target ``A · log π(a|s)`` (A from the batch); use ``additional_init_keys=[action_key, advantage_key]``."""
    return _Advantage(dist_module, action_key, advantage_key)

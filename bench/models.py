"""Benchmark models, built in code with a fixed seed (nothing is downloaded).

Every builder seeds torch itself, so two processes (or two libraries) that call the same builder
with the same arguments get bit-identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "actor_critic", "gpt2_small", "mlp", "sequential_mlp", "vgg11_bn"]

SEED = 0


class MLP(nn.Module):
    """``depth`` square linear layers in a ``ModuleList``, ReLU between them (none after the last)."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def mlp(depth: int = 10, width: int = 256, *, seed: int = SEED) -> MLP:
    """The MLP of the attribution and intervention tasks, in eval mode."""
    torch.manual_seed(seed)
    return MLP(depth, width).eval()


def sequential_mlp(depth: int = 12, width: int = 10, *, seed: int = SEED) -> nn.Sequential:
    """A ``Sequential`` MLP (``Linear``/``ReLU`` pairs, no ReLU at the end), for hook overhead and LRP."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11_bn(
    *, image_size: int = 64, num_classes: int = 10, width_factor: float = 1.0, seed: int = SEED
) -> nn.Sequential:
    """A VGG-11 with BatchNorm for ``image_size``² RGB inputs, random BatchNorm statistics, eval mode.

    The running statistics are random so that merging BatchNorm into the convolutions matters.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    size = image_size
    for item in _VGG11:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
            continue
        out = max(1, int(int(item) * width_factor))
        bn = nn.BatchNorm2d(out)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
        layers += [nn.Conv2d(channels, out, 3, padding=1), bn, nn.ReLU()]
        channels = out
    hidden = max(1, int(512 * width_factor))
    layers += [
        nn.Flatten(),
        nn.Linear(channels * size * size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers).eval()


def gpt2_small(*, seed: int = SEED, **overrides: Any) -> nn.Module:
    """GPT-2 small (``GPT2Config()`` defaults, 124M parameters), random init, eval mode, no KV cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(use_cache=False, **overrides)
    return GPT2LMHeadModel(config).eval()


def actor_critic(obs_dim: int = 64, hidden: int = 256, n_actions: int = 8, *, seed: int = SEED):
    """A TensorDict actor-critic: ``observation`` → ``hidden`` → (``logits``, ``state_value``)."""
    from tensordict.nn import TensorDictModule, TensorDictSequential

    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    actor = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))
    critic = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return TensorDictSequential(
        TensorDictModule(body, in_keys=["observation"], out_keys=["hidden"]),
        TensorDictModule(actor, in_keys=["hidden"], out_keys=["logits"]),
        TensorDictModule(critic, in_keys=["hidden"], out_keys=["state_value"]),
    ).eval()

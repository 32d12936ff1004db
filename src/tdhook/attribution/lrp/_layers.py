"""Small modules that make a model LRP-friendly (part of :mod:`tdhook.attribution.lrp`).

An addition written as ``a + b`` in a ``forward`` hands the full relevance to both operands;
written as ``Sum()(torch.stack([a, b], dim=-1))`` it is a module that a rule (the ε-rule, by
default) splits in proportion to the operands.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Sum"]


class Sum(nn.Module):
    """Sum the input along ``dim``.

    Args:
        dim: The dimension to sum over (removed from the output).

    Examples:
        >>> a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
        >>> Sum()(torch.stack([a, b], dim=-1))[0]
        tensor([3., 3., 3.])
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.sum(input, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

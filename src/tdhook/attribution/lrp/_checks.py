"""Relevance-conservation checks (part of :mod:`tdhook.attribution.lrp`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import UnconservedRelevanceError

__all__ = ["raise_for_unconserved_rel_factory"]


@dataclass(frozen=True)
class _ConservationCheck:
    atol: float
    rtol: float

    def __call__(self, module: nn.Module, grad_input: tuple[Any, ...], grad_output: tuple[Any, ...]) -> None:
        r_in = sum(float(g.sum()) for g in grad_input if isinstance(g, torch.Tensor))
        r_out = sum(float(g.sum()) for g in grad_output if isinstance(g, torch.Tensor))
        if abs(r_in - r_out) > self.atol + self.rtol * abs(r_out):
            raise UnconservedRelevanceError(
                f"Unconserved relevance for module {type(module).__name__}: inputs receive {r_in:.6g}, outputs "
                f"hold {r_out:.6g} (atol={self.atol}, rtol={self.rtol}). Biases and ε absorb relevance: zero "
                "the biases or raise the tolerances, or use a conserving rule."
            )


def raise_for_unconserved_rel_factory(
    atol: float = 1e-6, rtol: float = 1e-6
) -> Callable[[nn.Module, tuple[Any, ...], tuple[Any, ...]], None]:
    """Return a full backward hook that raises when a module's input and output relevance differ.

    Register it with ``module.register_full_backward_hook(hook)`` (or ``HookSpec(module, hook,
    "bwd")``) on modules that carry a rule.

    Args:
        atol: Absolute tolerance on ``Σ R_in − Σ R_out``.
        rtol: Relative tolerance (times ``|Σ R_out|``).

    Returns:
        The hook; it raises :class:`UnconservedRelevanceError` (a ``RuntimeError``).
    """
    return _ConservationCheck(atol, rtol)

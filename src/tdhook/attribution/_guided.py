"""Guided backpropagation (Springenberg et al., 2015) in ``tdhook.attribution``.

The gradient flowing back into the output of every ReLU-like module is clamped at zero (so the
ReLU's own backward then masks it by ``x > 0``), exactly captum's ``GuidedBackprop``. Unlike
tdhook 0.1, Linear and Conv gradients are left alone. The clamp is a tensor hook registered on
the module output during the forward pass, so in-place ReLUs work too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._core.directions import HookSpec, Installable
from .._core.hooked import HookedModule
from ._gradient import GradientAttribution, gradient_times_input

__all__ = ["GuidedBackpropagation"]


def _clamp_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


@dataclass(frozen=True)
class _GuideHook:
    """Forward hook: clamp the gradient of the module output at zero."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_clamp_grad)


class GuidedBackpropagation(GradientAttribution):
    """Guided backpropagation: the gradient with negative gradients stopped at every ReLU.

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        multiply_by_inputs: Multiply by the input.
        classes_to_skip: Module classes never guided (on top of those not in ``relu_classes``).
        relu_classes: The ReLU-like module classes to guide (functional ``F.relu`` calls cannot be
            hooked; use modules).
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.
    """

    def __init__(
        self,
        *args: Any,
        multiply_by_inputs: bool = False,
        classes_to_skip: Sequence[type] = (),
        relu_classes: Sequence[type] = (nn.ReLU,),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self.classes_to_skip = tuple(classes_to_skip)
        self.relu_classes = tuple(relu_classes)

    def _plan(self, hooked: HookedModule) -> list[Installable]:
        plan = super()._plan(hooked)
        hook = _GuideHook()
        for module in hooked.root.modules():
            if isinstance(module, self.relu_classes) and not isinstance(module, self.classes_to_skip):
                plan.append(HookSpec(module, hook))
        return plan

    def _grad_attr(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return gradient_times_input(grads, inputs, absolute=False, multiply=self.multiply_by_inputs)

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
from typing_extensions import Unpack

from ..core import HookedModule, HookSpec, Installable
from ._engine import GradientAttribution
from ._gradient import GradTimesInput
from ._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional

__all__ = ["GuidedBackpropagation"]


def _clamp_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


@dataclass(frozen=True)
class _GuideHook:
    """Forward hook: clamp the gradient of the module output at zero."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_clamp_grad)


@dataclass(frozen=True)
class _GuideReLUs:
    """The model edits of guided backpropagation: a :class:`_GuideHook` on every ReLU-like module."""

    relu_classes: tuple[type, ...]
    classes_to_skip: tuple[type, ...]

    def __call__(self, hooked: HookedModule) -> list[Installable]:
        hook = _GuideHook()
        return [
            HookSpec(module, hook)
            for module in hooked.root.modules()
            if isinstance(module, self.relu_classes) and not isinstance(module, self.classes_to_skip)
        ]


class GuidedBackpropagation(GradientAttribution):
    """Guided backpropagation: the gradient with negative gradients stopped at every ReLU.

    Args:
        multiply_by_inputs: Multiply by the input.
        classes_to_skip: Module classes never guided (on top of those not in ``relu_classes``).
        relu_classes: The ReLU-like module classes to guide (functional ``F.relu`` calls cannot be
            hooked; use modules).
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`; also
            accepted in tdhook 0.1's positional order.
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self,
        *,
        multiply_by_inputs: bool = False,
        classes_to_skip: Sequence[type] = (),
        relu_classes: Sequence[type] = (nn.ReLU,),
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self.classes_to_skip = tuple(classes_to_skip)
        self.relu_classes = tuple(relu_classes)
        self._configure(
            GradientOptions.build(options, settings, type(self).__name__),
            combine=GradTimesInput(multiply=self.multiply_by_inputs),
            edits_after=_GuideReLUs(self.relu_classes, self.classes_to_skip),
        )

"""Plain gradient methods: Saliency and InputXGradient (``tdhook.attribution``).

Both are the gradient engine (:class:`~tdhook.attribution.GradientAttribution`) with the plain
sampler (the input itself) and :class:`GradTimesInput` as the way gradients become attributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from typing_extensions import Unpack

from ._engine import GradientAttribution
from ._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional

__all__ = ["GradTimesInput", "InputXGradient", "Saliency"]


@dataclass(frozen=True)
class GradTimesInput:
    """The :class:`~tdhook.attribution._engine.Combine` ``|grad|`` and/or ``grad × input``, per key.

    Broadcasts over a ``K`` dimension (``separate_targets``).
    """

    absolute: bool = False
    multiply: bool = False

    def __call__(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for key, grad in grads.items():
            value = grad.abs() if self.absolute else grad
            if self.multiply:
                value = value * inputs[key]
            out[key] = value
        return out


class Saliency(GradientAttribution):
    """The gradient of the targets with respect to the inputs (Simonyan et al., 2014).

    Args:
        absolute: Return ``|grad|`` (captum ``Saliency(abs=True)``; captum's default).
        multiply_by_inputs: Return ``grad × input`` (= :class:`InputXGradient`); for
            ``input_modules`` the input is the activation.
        options: A ready :class:`~tdhook.attribution.GradientOptions` (the keyword settings
            update it).
        **settings: The shared settings (``targets``, ``input_modules``, ``init_attr_targets``...),
            see :class:`~tdhook.attribution.GradientOptions`; also accepted in tdhook 0.1's
            positional order.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Linear(3, 2)
        >>> with Saliency(targets=[1]).prepare(model) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(4, 3), batch_size=[4]))
        >>> td["attr", "input"].shape
        torch.Size([4, 3])
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self,
        *,
        absolute: bool = False,
        multiply_by_inputs: bool = False,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        self.absolute = bool(absolute)
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self._configure(
            GradientOptions.build(options, settings, type(self).__name__),
            combine=GradTimesInput(self.absolute, self.multiply_by_inputs),
        )


class InputXGradient(GradientAttribution):
    """Gradient × input (captum ``InputXGradient``): :class:`Saliency` with ``multiply_by_inputs``.

    Args:
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`.
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self, *, options: GradientOptions | None = None, **settings: Unpack[GradientSettings]
    ) -> None:
        self.absolute = False
        self.multiply_by_inputs = True
        self._configure(
            GradientOptions.build(options, settings, type(self).__name__),
            combine=GradTimesInput(multiply=True),
        )

"""Grad-CAM (Selvaraju et al., 2017) in ``tdhook.attribution``.

For each attributed module: ``weights = mean(grad, weight_pooling_dims)``, then
``map = relu(sum(weights * activation, feature_sum_dims))``. Dimensions index the tensor with
its batch dimensions restored; prefer negative dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import AttributionError
from ._gradient import GradientAttribution

__all__ = ["DimsConfig", "GradCAM"]


@dataclass(frozen=True)
class DimsConfig:
    """Which dimensions Grad-CAM pools.

    Args:
        weight_pooling_dims: Dimensions the gradient is averaged over to get the channel weights
            (``None``: the raw gradient).
        feature_sum_dims: Dimensions the weighted activation is summed over (``None``: no sum).

    Examples:
        >>> DimsConfig(weight_pooling_dims=(-2, -1), feature_sum_dims=(-3,))  # a [B, C, H, W] conv map
        DimsConfig(weight_pooling_dims=(-2, -1), feature_sum_dims=(-3,))
    """

    weight_pooling_dims: tuple[int, ...] | None = None
    feature_sum_dims: tuple[int, ...] | None = None


_FORCED = ("use_inputs", "input_modules", "init_attr_inputs")


class GradCAM(GradientAttribution):
    """Grad-CAM maps of module activations, written at ``(attribution_key, module_path)``.

    Args:
        modules_to_attribute: ``{module_path: DimsConfig}``.
        *args: The shared arguments of :class:`GradientAttribution` after ``use_inputs`` (which,
            with ``input_modules`` and ``init_attr_inputs``, GradCAM sets itself).
        absolute: Use ``|grad|``.
        relu: Apply the ReLU of standard Grad-CAM (captum's ``relu_attributions=True``).
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.

    Raises:
        AttributionError: If ``modules_to_attribute`` is empty, or an argument GradCAM sets
            itself is passed.
    """

    def __init__(
        self,
        modules_to_attribute: Mapping[str, DimsConfig] | None,
        *args: Any,
        absolute: bool = False,
        relu: bool = True,
        **kwargs: Any,
    ) -> None:
        clash = [k for k in _FORCED if k in kwargs]
        if clash:
            raise AttributionError(
                f"GradCAM sets {clash} itself (it attributes to the modules of modules_to_attribute); "
                "remove these arguments."
            )
        if not modules_to_attribute:
            raise AttributionError(
                f"GradCAM needs modules_to_attribute, e.g. {{'features': DimsConfig((-2, -1), (-3,))}}; "
                f"got {modules_to_attribute!r}."
            )
        for key, dims in modules_to_attribute.items():
            if not isinstance(dims, DimsConfig):
                raise AttributionError(
                    f"modules_to_attribute[{key!r}] must be a DimsConfig, got {type(dims).__name__}."
                )
        self.modules_to_attribute = dict(modules_to_attribute)
        super().__init__(False, *args, input_modules=list(self.modules_to_attribute), **kwargs)  # type: ignore[misc]
        self.absolute = bool(absolute)
        self.relu = bool(relu)

    def _grad_attr(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for key, grad in grads.items():
            dims = self.modules_to_attribute[key]
            g = grad.abs() if self.absolute else grad
            weights = (
                g if dims.weight_pooling_dims is None else g.mean(dims.weight_pooling_dims, keepdim=True)
            )
            value = weights * inputs[key]
            if dims.feature_sum_dims is not None:
                value = value.sum(dims.feature_sum_dims)
            out[key] = torch.relu(value) if self.relu else value
        return out

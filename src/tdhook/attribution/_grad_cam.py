"""Grad-CAM (Selvaraju et al., 2017) in ``tdhook.attribution``.

For each attributed module: ``weights = mean(grad, weight_pooling_dims)``, then
``map = relu(sum(weights * activation, feature_sum_dims))``. Dimensions index the tensor with
its batch dimensions restored; prefer negative dimensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from typing_extensions import Unpack

from ._engine import GradientAttribution
from ._errors import AttributionError
from ._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional

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


@dataclass(frozen=True)
class _GradCamMaps:
    """The :class:`~tdhook.attribution._engine.Combine` of Grad-CAM: pooled gradient × activation."""

    dims: Mapping[str, DimsConfig]
    absolute: bool
    relu: bool

    def __call__(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for key, grad in grads.items():
            dims = self.dims[key]
            g = grad.abs() if self.absolute else grad
            weights = (
                g if dims.weight_pooling_dims is None else g.mean(dims.weight_pooling_dims, keepdim=True)
            )
            value = weights * inputs[key]
            if dims.feature_sum_dims is not None:
                value = value.sum(dims.feature_sum_dims)
            out[key] = torch.relu(value) if self.relu else value
        return out


class GradCAM(GradientAttribution):
    """Grad-CAM maps of module activations, written at ``(attribution_key, module_path)``.

    Args:
        modules_to_attribute: ``{module_path: DimsConfig}`` (also the first positional argument,
            followed by tdhook 0.1's shared arguments from ``use_outputs`` on).
        absolute: Use ``|grad|``.
        relu: Apply the ReLU of standard Grad-CAM (captum's ``relu_attributions=True``).
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`, except
            ``use_inputs``, ``input_modules`` and ``init_attr_inputs``, which GradCAM sets itself.

    Raises:
        AttributionError: If ``modules_to_attribute`` is empty, or an argument GradCAM sets
            itself is passed.
    """

    @accepts_positional("modules_to_attribute", *SHARED_POSITIONAL[1:])
    def __init__(
        self,
        *,
        modules_to_attribute: Mapping[str, DimsConfig] | None,
        absolute: bool = False,
        relu: bool = True,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        clash = [k for k in _FORCED if k in settings]
        if options is not None and (options.input_modules or options.init_attr_inputs is not None):
            clash += [k for k in _FORCED[1:] if getattr(options, k)]
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
                    f"modules_to_attribute[{key!r}] must be a DimsConfig, got {type(dims).__name__}. "
                    "Write DimsConfig(weight_pooling_dims=(-2, -1), feature_sum_dims=(-3,))."
                )
        self.modules_to_attribute = dict(modules_to_attribute)
        self.absolute = bool(absolute)
        self.relu = bool(relu)
        resolved = GradientOptions.build(options, settings, type(self).__name__)
        resolved = dataclasses.replace(
            resolved, use_inputs=False, input_modules=list(self.modules_to_attribute)
        )
        self._configure(resolved, combine=_GradCamMaps(self.modules_to_attribute, self.absolute, self.relu))

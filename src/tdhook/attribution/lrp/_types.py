"""Layer type groups used by the LRP rule mappers (``isinstance(module, Linear)``...).

Each group is a plain tuple of classes, so ``isinstance(module, Convolution)`` and
``issubclass(cls, Activation)`` work without any metaclass. Part of :mod:`tdhook.attribution.lrp`;
re-exported by the compatibility module ``tdhook.attribution.lrp_helpers.types``.
"""

from __future__ import annotations

import importlib.util

from torch import nn

__all__ = [
    "Activation",
    "AvgPool",
    "BatchNorm",
    "Convolution",
    "ConvolutionStandard",
    "ConvolutionTranspose",
    "Dense",
    "Linear",
    "MaxPool",
]

#: Standard (non-transposed) convolutions.
ConvolutionStandard: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Transposed convolutions.
ConvolutionTranspose: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Every convolution.
Convolution: tuple[type[nn.Module], ...] = ConvolutionStandard + ConvolutionTranspose
#: Dense (fully connected) layers.
Dense: tuple[type[nn.Module], ...] = (nn.Linear,)
#: Every linear layer: convolutions and dense layers.
Linear: tuple[type[nn.Module], ...] = Convolution + Dense


def _batch_norms() -> tuple[type[nn.Module], ...]:
    classes: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if importlib.util.find_spec("torchvision") is not None:  # optional; never imported otherwise
        try:
            from torchvision.ops.misc import FrozenBatchNorm2d
        except ImportError:  # a broken torchvision install must not break tdhook
            return classes
        classes += (FrozenBatchNorm2d,)
    return classes


#: Batch normalisations (and torchvision's ``FrozenBatchNorm2d`` when torchvision is installed).
BatchNorm: tuple[type[nn.Module], ...] = _batch_norms()
#: Average pooling, plain and adaptive.
AvgPool: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
#: Max pooling, plain and adaptive.
MaxPool: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
#: Element-wise activations.
Activation: tuple[type[nn.Module], ...] = (
    nn.ELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.PReLU,
    nn.ReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Threshold,
)

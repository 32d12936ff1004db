"""tdhook 0.1 path of the LRP layer type groups; they live in :mod:`tdhook.attribution.lrp`."""

from ..lrp import (
    Activation,
    AvgPool,
    BatchNorm,
    Convolution,
    ConvolutionStandard,
    ConvolutionTranspose,
    Linear,
    MaxPool,
)

__all__ = [
    "Activation",
    "AvgPool",
    "BatchNorm",
    "Convolution",
    "ConvolutionStandard",
    "ConvolutionTranspose",
    "Linear",
    "MaxPool",
]

"""Compatibility path (tdhook 0.1): ``tdhook.attribution.integrated_gradients``."""

from ._integrated import IntegratedGradients

__all__ = ["IntegratedGradients"]

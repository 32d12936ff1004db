"""Compatibility path (tdhook 0.1): ``tdhook.attribution.grad_cam``."""

from ._grad_cam import DimsConfig, GradCAM

__all__ = ["DimsConfig", "GradCAM"]

"""Compatibility path (tdhook 0.1): ``tdhook.attribution.guided_backpropagation``."""

from ._guided import GuidedBackpropagation

__all__ = ["GuidedBackpropagation"]

"""Compatibility path (tdhook 0.1): ``tdhook.attribution.saliency``."""

from ._gradient import Saliency

__all__ = ["Saliency"]

"""Compatibility path (tdhook 0.1): ``tdhook.attribution.gradient_helpers``."""

from .._engine import GradientAttribution
from .._integrated import GradientAttributionWithBaseline

__all__ = ["GradientAttribution", "GradientAttributionWithBaseline"]

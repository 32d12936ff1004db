"""Compatibility path (tdhook 0.1): ``tdhook.attribution.activation_maximisation``."""

from ._maximisation import ActivationMaximisation

__all__ = ["ActivationMaximisation"]

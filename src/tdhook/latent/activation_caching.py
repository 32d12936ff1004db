"""Compatibility path (tdhook 0.1): ``tdhook.latent.activation_caching``."""

from ._caching import ActivationCaching

__all__ = ["ActivationCaching"]

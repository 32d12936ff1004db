"""Compatibility path (tdhook 0.1): ``tdhook.latent.activation_patching``."""

from ._patching import ActivationPatching, InterventionError, InterventionShapeError

__all__ = ["ActivationPatching", "InterventionError", "InterventionShapeError"]

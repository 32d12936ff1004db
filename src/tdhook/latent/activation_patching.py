"""Compatibility path (tdhook 0.1): ``tdhook.latent.activation_patching``."""

from ..errors import InterventionError, InterventionShapeError
from ._patching import ActivationPatching

__all__ = ["ActivationPatching", "InterventionError", "InterventionShapeError"]

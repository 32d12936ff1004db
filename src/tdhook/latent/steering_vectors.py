"""Compatibility path (tdhook 0.1): ``tdhook.latent.steering_vectors``."""

from ..errors import InterventionError, InterventionShapeError
from ._steering import ActivationAddition, SteeringVectors

__all__ = ["ActivationAddition", "InterventionError", "InterventionShapeError", "SteeringVectors"]

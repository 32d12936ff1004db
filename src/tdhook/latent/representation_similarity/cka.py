"""Compatibility path (tdhook 0.1): ``tdhook.latent.representation_similarity.cka``."""

from ..similarity import CkaEstimator

__all__ = ["CkaEstimator"]

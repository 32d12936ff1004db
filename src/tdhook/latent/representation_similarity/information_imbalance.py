"""Compatibility path (tdhook 0.1): ``tdhook.latent.representation_similarity.information_imbalance``."""

from ..similarity import InformationImbalanceEstimator

__all__ = ["InformationImbalanceEstimator"]

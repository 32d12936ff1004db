"""Compatibility path (tdhook 0.1): ``tdhook.latent.dimension_estimation.twonn``."""

from ..dimension import TwoNnDimensionEstimator

__all__ = ["TwoNnDimensionEstimator"]

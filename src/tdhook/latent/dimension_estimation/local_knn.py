"""Compatibility path (tdhook 0.1): ``tdhook.latent.dimension_estimation.local_knn``."""

from ..dimension import LocalKnnDimensionEstimator

__all__ = ["LocalKnnDimensionEstimator"]

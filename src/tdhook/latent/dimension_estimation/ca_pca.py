"""Compatibility path (tdhook 0.1): ``tdhook.latent.dimension_estimation.ca_pca``."""

from ..dimension import CaPcaDimensionEstimator

__all__ = ["CaPcaDimensionEstimator"]

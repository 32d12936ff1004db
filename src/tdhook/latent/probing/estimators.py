"""Compatibility path (tdhook 0.1): ``tdhook.latent.probing.estimators``."""

from ._estimators import (
    BilinearEstimator,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    TorchEstimator,
)

__all__ = [
    "BilinearEstimator",
    "LinearEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "TorchEstimator",
]

"""Compatibility package of tdhook 0.1: the dimension estimators live in :mod:`tdhook.latent.dimension`.

The sub-modules ``twonn``, ``local_knn``, ``local_pca`` and ``ca_pca`` are 0.1's import paths.
"""

from __future__ import annotations

from ..dimension import (
    CaPcaDimensionEstimator,
    LocalKnnDimensionEstimator,
    LocalPcaDimensionEstimator,
    TwoNnDimensionEstimator,
)

__all__ = [
    "CaPcaDimensionEstimator",
    "LocalKnnDimensionEstimator",
    "LocalPcaDimensionEstimator",
    "TwoNnDimensionEstimator",
]

"""Compatibility path of tdhook 0.1: the dimension estimators now live in :mod:`tdhook.latent.dimension`."""

from __future__ import annotations

from .dimension import (
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

"""Compatibility package of tdhook 0.1: the similarity estimators live in :mod:`tdhook.latent.similarity`.

The sub-modules ``cka`` and ``information_imbalance`` are 0.1's import paths.
"""

from __future__ import annotations

from ..similarity import CkaEstimator, InformationImbalanceEstimator

__all__ = ["CkaEstimator", "InformationImbalanceEstimator"]

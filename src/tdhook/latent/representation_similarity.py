"""Compatibility path of tdhook 0.1: the similarity estimators now live in :mod:`tdhook.latent.similarity`."""

from __future__ import annotations

from .similarity import CkaEstimator, InformationImbalanceEstimator

__all__ = ["CkaEstimator", "InformationImbalanceEstimator"]

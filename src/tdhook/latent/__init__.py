"""Latent-space methods: caching, patching, steering, probing, dimension and similarity."""

from ._caching import ActivationCaching
from ._patching import ActivationPatching
from ._steering import ActivationAddition, SteeringVectors
from .probing import (
    BilinearProbe,
    BilinearProbeManager,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    Probe,
    ProbeManager,
    Probing,
)

__all__ = [
    "ActivationAddition",
    "ActivationCaching",
    "ActivationPatching",
    "BilinearProbe",
    "BilinearProbeManager",
    "LinearEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "SteeringVectors",
]

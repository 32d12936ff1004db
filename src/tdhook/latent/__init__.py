"""Latent-space methods: caching, patching, steering, probing, dimension and similarity."""

from ._caching import ActivationCaching
from ._patching import ActivationPatching
from ._steering import ActivationAddition, SteeringVectors
from ._store import ActivationStore, StoreCorruptError, StoreLockedError
from .dimension import LocalKnnDimensionEstimator, TwoNnDimensionEstimator
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
from .similarity import CkaEstimator, InformationImbalanceEstimator

__all__ = [
    "ActivationAddition",
    "ActivationCaching",
    "ActivationPatching",
    "ActivationStore",
    "BilinearProbe",
    "BilinearProbeManager",
    "CkaEstimator",
    "InformationImbalanceEstimator",
    "LinearEstimator",
    "LocalKnnDimensionEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "SteeringVectors",
    "StoreCorruptError",
    "StoreLockedError",
    "TwoNnDimensionEstimator",
]

"""Probing: train estimators on a model's activations (``tdhook.latent.probing``)."""

from ._estimators import (
    BilinearEstimator,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    TorchEstimator,
)
from ._probes import BilinearProbe, BilinearProbeManager, Probe, ProbeManager, StepType
from ._probing import ProbesNeverFiredWarning, Probing

__all__ = [
    "BilinearEstimator",
    "BilinearProbe",
    "BilinearProbeManager",
    "LinearEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "ProbesNeverFiredWarning",
    "Probing",
    "StepType",
    "TorchEstimator",
]

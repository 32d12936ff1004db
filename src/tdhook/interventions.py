"""Optimised activation interventions (see :func:`optimize_interventions`)."""

from ._interventions import (
    EarlyStoppingConfig,
    InterventionObjective,
    InterventionSpec,
    InterventionStage,
    OptimizedInterventionResult,
    OptimizerConfig,
    optimize_intervention,
    optimize_interventions,
)

__all__ = [
    "EarlyStoppingConfig",
    "InterventionObjective",
    "InterventionSpec",
    "InterventionStage",
    "OptimizedInterventionResult",
    "OptimizerConfig",
    "optimize_intervention",
    "optimize_interventions",
]

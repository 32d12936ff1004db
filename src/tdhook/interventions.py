"""Optimised activation interventions: find the activation that makes the model do something.

Each stage optimises one free tensor that replaces a :class:`~tdhook.targets.Target`'s selected
entries (through a :class:`~tdhook.session.HookSession`), while every model parameter stays
frozen. Stages run in order, each with the optimised values of the earlier ones applied. The
model leaves exactly as it came: parameters, ``requires_grad`` flags, gradients, buffers,
training flags and the RNG state are restored, also when an objective raises.
"""

from ._interventions import (
    EarlyStoppingConfig,
    InterventionObjective,
    InterventionSpec,
    InterventionStage,
    InterventionStatus,
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
    "InterventionStatus",
    "OptimizedInterventionResult",
    "OptimizerConfig",
    "optimize_intervention",
    "optimize_interventions",
]

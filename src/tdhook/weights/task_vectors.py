"""Compatibility path (tdhook 0.1): ``tdhook.weights.task_vectors``."""

from ._task_vectors import (
    NoAdequateAlphaError,
    TaskVectorError,
    TaskVectors,
    TaskVectorsContext,
    TaskVectorsModule,
    TaskVectorTools,
)

__all__ = [
    "NoAdequateAlphaError",
    "TaskVectorError",
    "TaskVectorTools",
    "TaskVectors",
    "TaskVectorsContext",
    "TaskVectorsModule",
]

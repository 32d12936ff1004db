"""Compatibility path (tdhook 0.1): ``tdhook.weights.task_vectors``."""

from ._task_vectors import NoAdequateAlphaError, TaskVectors, TaskVectorsContext, TaskVectorsModule

__all__ = ["NoAdequateAlphaError", "TaskVectors", "TaskVectorsContext", "TaskVectorsModule"]

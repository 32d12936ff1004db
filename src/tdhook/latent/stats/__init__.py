"""Streaming statistics for representation analysis: moments, linear and logistic probes.

Every accumulator here is fed batch by batch (``update`` / ``partial_fit``), exposes its
sufficient statistics with ``state()``, and combines them across processes with
``all_reduce(group=None)`` (``torch.distributed``). The streaming CKA lives with the other
similarity measures in :mod:`tdhook.latent.similarity`.

The exception classes shared by :mod:`tdhook.latent.dimension`,
:mod:`tdhook.latent.similarity` and this package live in :mod:`tdhook.errors` and are
re-exported here (the same classes).
"""

from __future__ import annotations

from ...errors import (
    DistributedNotInitializedError,
    IncompatibleInputsError,
    InsufficientSamplesError,
    InvalidParameterError,
    NonFiniteInputError,
    NotFittedError,
    UnknownKernelError,
)
from ._logistic import LogisticOptimizer, StreamingLogisticRegression
from ._moments import StreamingMoments
from ._regression import StreamingLinearRegression

__all__ = [
    "DistributedNotInitializedError",
    "IncompatibleInputsError",
    "InsufficientSamplesError",
    "InvalidParameterError",
    "LogisticOptimizer",
    "NonFiniteInputError",
    "NotFittedError",
    "StreamingLinearRegression",
    "StreamingLogisticRegression",
    "StreamingMoments",
    "UnknownKernelError",
]

"""Exceptions raised by the representation-analysis estimators (dimension, similarity, stats).

Each subclasses :class:`tdhook.errors.TdhookError` *and* the built-in exception that tdhook 0.1
raised in the same situation, so ``except ValueError`` written for 0.1 keeps working. They live
here until the package-wide :mod:`tdhook.errors` adopts them; import them from
:mod:`tdhook.latent.stats`.
"""

from __future__ import annotations

from ...errors import TdhookError

__all__ = [
    "DistributedNotInitializedError",
    "IncompatibleInputsError",
    "InsufficientSamplesError",
    "InvalidParameterError",
    "NonFiniteInputError",
    "UnknownKernelError",
]


class InsufficientSamplesError(TdhookError, ValueError):
    """A dataset has fewer (valid) points than an estimator needs."""


class NonFiniteInputError(TdhookError, ValueError):
    """An input tensor contains NaN or infinite values."""


class IncompatibleInputsError(TdhookError, ValueError):
    """Input tensors have the wrong rank, or disagree in batch shape, sample count, width or device."""


class InvalidParameterError(TdhookError, ValueError):
    """A constructor or call argument has a value outside its valid range or vocabulary."""


class UnknownKernelError(TdhookError, NotImplementedError, ValueError):
    """A kernel name is not one of the implemented kernels.

    Subclasses ``NotImplementedError`` (what tdhook 0.1 raised) and ``ValueError``.
    """


class DistributedNotInitializedError(TdhookError, RuntimeError):
    """``all_reduce`` was called without an initialised ``torch.distributed`` process group."""

"""Exceptions raised by tdhook.

Every exception subclasses :class:`TdhookError` *and* the built-in exception that the
reference library (tdhook 0.1) raised in the same situation, so ``except ValueError`` or
``except KeyError`` written for 0.1 keeps working. Messages name the bad value, what was
expected and one way to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CompiledModelError",
    "CompositionError",
    "ConcurrencyError",
    "ContextStateError",
    "DeadReferenceError",
    "DistributedNotInitializedError",
    "DtypeMismatchError",
    "ExtensionConflictError",
    "HookSignatureError",
    "InPlaceModificationError",
    "IncompatibleInputsError",
    "InsufficientSamplesError",
    "InterventionError",
    "InterventionShapeError",
    "InvalidDirectionError",
    "InvalidInputError",
    "InvalidKeyError",
    "InvalidParameterError",
    "MissingKeyError",
    "ModulePathError",
    "MultipleCallError",
    "NoMatchError",
    "NonFiniteInputError",
    "NotFittedError",
    "ProbingError",
    "StoreCorruptError",
    "StoreLockedError",
    "TargetError",
    "TdhookError",
    "TdhookWarning",
    "UnknownKernelError",
    "nearest",
]


class TdhookError(Exception):
    """Base class of every error raised by tdhook."""


class TdhookWarning(UserWarning):
    """Base class of every warning emitted by tdhook."""


class ModulePathError(TdhookError, ValueError):
    """A module path does not resolve to a submodule of the model."""


class NoMatchError(TdhookError, ValueError):
    """A module pattern matched no submodule."""


class InvalidDirectionError(TdhookError, ValueError):
    """A hook direction is not one of the known directions."""


class HookSignatureError(TdhookError, ValueError):
    """A hook or callback has a signature that cannot receive the hook's arguments."""


class ContextStateError(TdhookError, RuntimeError):
    """A hooking context or run was used in a state that does not allow the operation."""


class DeadReferenceError(ContextStateError, ValueError):
    """A cache reference (a :class:`~tdhook.hooks.CacheProxy` or a weak cache) outlived its TensorDict.

    Also a ``ValueError``, the class tdhook 0.1 raised (``ValueError("Dead reference to cache")``).
    """


class ConcurrencyError(ContextStateError):
    """Two threads would share hooks, edits or per-call state that cannot be kept apart."""


class CompositionError(TdhookError, ValueError):
    """Methods cannot be combined in one context as given (no method, unrelated hooked-module classes)."""


class InvalidKeyError(TdhookError, ValueError):
    """A TensorDict key is malformed, or is not one of the module's keys."""


class ExtensionConflictError(ContextStateError, ValueError):
    """Two methods in one context would add the same name to the hooked module."""


class CompiledModelError(TdhookError, TypeError):
    """The model (or a submodule) is ``torch.compile``d: compiled code does not run hooks added later."""


class InPlaceModificationError(TdhookError, RuntimeError):
    """A stored activation was modified in place after its hook read it (the stored value would be wrong)."""


class MultipleCallError(TdhookError, RuntimeError):
    """A module ran more than once in one forward pass where a method needs exactly one call."""


class DtypeMismatchError(TdhookError, TypeError, RuntimeError):
    """A floating input has a dtype other than the model's parameters (torch would raise a RuntimeError)."""


class MissingKeyError(TdhookError, KeyError):
    """A key needed by a method is absent from the TensorDict."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InvalidInputError(TdhookError, TypeError):
    """An argument has the wrong type (e.g. a tensor where a TensorDict is needed)."""


class ProbingError(TdhookError, ValueError):
    """Probing was misconfigured (missing labels or step type, duplicate probe...)."""


class TargetError(TdhookError, ValueError):
    """A :class:`~tdhook.targets.Target` is malformed, or does not fit the model or the value it selects from."""


class NotFittedError(TdhookError, ValueError, AttributeError):
    """An estimator was used before it was fitted."""


class InterventionError(TdhookError, RuntimeError):
    """An intervention hook could not run (a module did not fire, a callback failed...)."""


class InterventionShapeError(TdhookError, ValueError, RuntimeError):
    """A replacement (patched activation, steered output) does not fit the activation's shape.

    Subclasses ``RuntimeError`` too, the error torch raises for a broadcasting failure.
    """


# -- representation analysis (dimension, similarity, streaming statistics, probes) ---------------


class InsufficientSamplesError(TdhookError, ValueError):
    """A dataset or batch has fewer (valid) samples than an estimator or probe needs."""


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


# -- ActivationStore -----------------------------------------------------------------------------


class StoreCorruptError(TdhookError, ValueError):
    """A store folder's metadata or data files are not what the store wrote (truncated, edited...)."""


class StoreLockedError(TdhookError, RuntimeError):
    """Another writer (thread or process) has the store folder open."""


def nearest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates closest to ``word`` (fuzzy match, then prefix match).

    Args:
        word: The misspelt name.
        candidates: Existing names.
        n: Maximum number of suggestions.

    Returns:
        The suggestions, best first.
    """
    pool = [c for c in candidates if c]
    close = difflib.get_close_matches(word, pool, n=n, cutoff=0.4)
    if len(close) < n:
        head = word.split(".")[0]
        close += [c for c in pool if c.startswith(head) and c not in close][: n - len(close)]
    if not close:
        close = pool[:n]
    return close

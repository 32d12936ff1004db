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
    "ConcurrencyError",
    "ContextStateError",
    "DeadReferenceError",
    "DtypeMismatchError",
    "HookSignatureError",
    "InPlaceModificationError",
    "InvalidDirectionError",
    "InvalidInputError",
    "MissingKeyError",
    "ModulePathError",
    "MultipleCallError",
    "NoMatchError",
    "NotFittedError",
    "ProbingError",
    "TargetError",
    "TdhookError",
    "TdhookWarning",
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

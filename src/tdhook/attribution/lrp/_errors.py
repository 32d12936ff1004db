"""Errors raised by the LRP package (part of :mod:`tdhook.attribution.lrp`).

Each subclasses :class:`~tdhook.errors.TdhookError` and the built-in exception the reference
raised in the same situation, so ``except ValueError`` written for tdhook 0.1 keeps working.
"""

from __future__ import annotations

from ...errors import TdhookError

__all__ = [
    "CanonizerError",
    "ConcurrentLRPError",
    "RuleDefinitionError",
    "RuleInputError",
    "RuleMappingError",
    "RuleParameterError",
    "UnconservedRelevanceError",
    "UnsupportedModuleError",
]


class RuleMappingError(TdhookError, ValueError, TypeError):
    """A rule mapper returned something that is not a rule (or an unknown rule name)."""


class RuleDefinitionError(TdhookError, NotImplementedError):
    """A rule or canonizer subclass does not implement a method it must provide."""


class RuleParameterError(TdhookError, ValueError):
    """A rule was built with invalid parameters (e.g. negative α or β)."""


class RuleInputError(TdhookError, ValueError):
    """A rule met inputs/outputs it cannot handle (e.g. a PassRule on a shape-changing module)."""


class UnsupportedModuleError(TdhookError, NotImplementedError):
    """A rule was applied to a module it does not support (e.g. AlphaBetaRule with two inputs)."""


class UnconservedRelevanceError(TdhookError, RuntimeError):
    """Relevance entering a module differs from the relevance leaving it (conservation check)."""


class CanonizerError(TdhookError, ValueError):
    """A canonizer cannot be applied to the model as it is (e.g. BatchNorm in training mode)."""


class ConcurrentLRPError(TdhookError, RuntimeError):
    """A second LRP context on modules that an active LRP context already explains."""

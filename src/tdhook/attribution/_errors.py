"""Errors and key names of the attribution family (``tdhook.attribution``).

Every error subclasses :class:`tdhook.errors.TdhookError` and the built-in exception tdhook 0.1
raised in the same situation, so ``except ValueError``/``except RuntimeError`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TdhookError

__all__ = [
    "AttributionError",
    "AttributionKeys",
    "BaselineError",
    "IntegerInputError",
    "TargetError",
]


class AttributionError(TdhookError, ValueError):
    """An attribution method was misconfigured or given unusable data."""


class TargetError(AttributionError):
    """A target (the value attributed) cannot be differentiated with respect to the inputs."""


class BaselineError(AttributionError):
    """A baseline has the wrong shape, dtype or device for its input."""


class IntegerInputError(TdhookError, RuntimeError, TypeError):
    """An input to differentiate is not floating point (e.g. token ids).

    tdhook 0.1 let torch raise ``RuntimeError`` here; this one is also a ``TypeError``.
    """


@dataclass(frozen=True)
class AttributionKeys:
    """TensorDict key names the attribution methods read and write (declared once).

    Attributes:
        attr: Default root of the results, ``(attr, in_key)`` / ``(attr, module_key)``.
        baseline: Root of the baselines, ``(baseline, in_key)`` (or ``(baseline, module_key)``).
        convergence_delta: Top-level key of IG's completeness error.
        mod_out: Root of the model outputs written with ``clean_intermediate_keys=False``
            (tdhook 0.1's ``("_mod_out", out_key)``).
    """

    attr: str = "attr"
    baseline: str = "baseline"
    convergence_delta: str = "convergence_delta"
    mod_out: str = "_mod_out"


KEYS = AttributionKeys()

"""Quadrature rules of integrated gradients: Riemann sums and Gauss-Legendre (``tdhook.attribution``).

``approximation_parameters(method)`` gives ``(step_sizes(n), alphas(n))``, the same values as
captum's; :class:`~tdhook.attribution.IntegratedGradients` uses them to place and weight its
path points.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np
import torch

from ._errors import AttributionError

__all__ = [
    "SUPPORTED_METHODS",
    "SUPPORTED_RIEMANN_METHODS",
    "IntegrationMethod",
    "Riemann",
    "approximation_parameters",
    "gauss_legendre_builders",
    "riemann_builders",
]


class Riemann(Enum):
    """Riemann sum variants (captum's ``Riemann``)."""

    left = 1
    right = 2
    middle = 3
    trapezoid = 4


class IntegrationMethod(str, Enum):
    """The quadrature rules of :class:`IntegratedGradients` (the reference's strings)."""

    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"
    RIEMANN_TRAPEZOID = "riemann_trapezoid"
    GAUSS_LEGENDRE = "gausslegendre"

    @classmethod
    def parse(cls, value: str | IntegrationMethod) -> IntegrationMethod:
        """Convert a method name to a member.

        Raises:
            AttributionError: For an unknown name (a ``ValueError``), listing the valid ones.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise AttributionError(
                f"Invalid integral approximation method name: {value!r}. Expected one of "
                f"{[m.value for m in cls]}, e.g. method='gausslegendre'."
            ) from None


SUPPORTED_RIEMANN_METHODS = [m.value for m in IntegrationMethod if m.value.startswith("riemann")]
SUPPORTED_METHODS = [m.value for m in IntegrationMethod]
_RIEMANN = {
    IntegrationMethod.RIEMANN_LEFT: Riemann.left,
    IntegrationMethod.RIEMANN_RIGHT: Riemann.right,
    IntegrationMethod.RIEMANN_MIDDLE: Riemann.middle,
    IntegrationMethod.RIEMANN_TRAPEZOID: Riemann.trapezoid,
}

StepFn = Callable[[int], list[float]]


def _riemann_step_sizes(method: Riemann, n: int) -> list[float]:
    if n < 2:
        raise AttributionError(f"Riemann rules need n_steps >= 2, got {n}. Use more steps.")
    if method is Riemann.trapezoid:
        # captum's weights (they sum to (n - 1) / n; kept for value compatibility)
        return [1 / (2 * n)] + [1 / n] * (n - 2) + [1 / (2 * n)]
    return [1 / n] * n


def _riemann_alphas(method: Riemann, n: int) -> list[float]:
    if n < 2:
        raise AttributionError(f"Riemann rules need n_steps >= 2, got {n}. Use more steps.")
    if method is Riemann.left:
        return torch.linspace(0, 1 - 1 / n, n).tolist()
    if method is Riemann.right:
        return torch.linspace(1 / n, 1, n).tolist()
    if method is Riemann.middle:
        return torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    if method is Riemann.trapezoid:
        return torch.linspace(0, 1, n).tolist()
    raise AttributionError(
        f"Unknown Riemann method {method!r}; expected one of {list(Riemann)}, e.g. Riemann.trapezoid."
    )


def riemann_builders(method: Riemann = Riemann.trapezoid) -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` of a Riemann rule (captum's values)."""

    def step_sizes(n: int) -> list[float]:
        return _riemann_step_sizes(method, n)

    def alphas(n: int) -> list[float]:
        return _riemann_alphas(method, n)

    return step_sizes, alphas


def _gl_step_sizes(n: int) -> list[float]:
    if n < 1:
        raise AttributionError(f"Gauss-Legendre needs n_steps >= 1, got {n}. Use e.g. n_steps=50.")
    return (0.5 * np.polynomial.legendre.leggauss(n)[1]).tolist()


def _gl_alphas(n: int) -> list[float]:
    if n < 1:
        raise AttributionError(f"Gauss-Legendre needs n_steps >= 1, got {n}. Use e.g. n_steps=50.")
    return (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0])).tolist()


def gauss_legendre_builders() -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` of Gauss-Legendre quadrature on ``[0, 1]``."""
    return _gl_step_sizes, _gl_alphas


def approximation_parameters(method: str | IntegrationMethod) -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` for a method name (same values as captum).

    Raises:
        AttributionError: For an unknown method (a ``ValueError``).
    """
    parsed = IntegrationMethod.parse(method)
    if parsed is IntegrationMethod.GAUSS_LEGENDRE:
        return gauss_legendre_builders()
    return riemann_builders(_RIEMANN[parsed])

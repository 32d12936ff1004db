"""Compatibility path (tdhook 0.1): ``tdhook.attribution.gradient_helpers.helpers``."""

from .._quadrature import (
    SUPPORTED_METHODS,
    SUPPORTED_RIEMANN_METHODS,
    Riemann,
    approximation_parameters,
    gauss_legendre_builders,
    riemann_builders,
)

__all__ = [
    "SUPPORTED_METHODS",
    "SUPPORTED_RIEMANN_METHODS",
    "Riemann",
    "approximation_parameters",
    "gauss_legendre_builders",
    "riemann_builders",
]

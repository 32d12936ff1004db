"""Hooked modules (public names of tdhook 0.1's ``tdhook.modules``), and :func:`get_best_device`."""

from __future__ import annotations

import torch

from ._core.hooked import HookedModule
from ._core.run import HookedModuleRun

__all__ = ["HookedModule", "HookedModuleRun", "get_best_device"]


def get_best_device() -> torch.device:
    """Return the best available device: ``cuda``, else ``mps``, else ``cpu`` (as tdhook 0.1).

    Examples:
        >>> get_best_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

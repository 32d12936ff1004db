"""Hooked modules (public names of tdhook 0.1's ``tdhook.modules``)."""

from ._core.context import HookedModule, HookedModuleRun

__all__ = ["HookedModule", "HookedModuleRun"]

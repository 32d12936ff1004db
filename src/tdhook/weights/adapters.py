"""Compatibility path (tdhook 0.1): ``tdhook.weights.adapters``."""

from ._adapters import AdapterError, Adapters, HookedModuleWithAdapters

__all__ = ["AdapterError", "Adapters", "HookedModuleWithAdapters"]

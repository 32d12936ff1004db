"""Compatibility path (tdhook 0.1): ``tdhook.weights.adapters``."""

from ._adapters import AdapterError, Adapters, AdapterSet, HookedModuleWithAdapters

__all__ = ["AdapterError", "AdapterSet", "Adapters", "HookedModuleWithAdapters"]

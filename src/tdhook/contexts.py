"""Hooking contexts and factories (public names of tdhook 0.1's ``tdhook.contexts``)."""

from ._core.factory import CompositeHookingContextFactory, HookingContextFactory
from ._core.lifecycle import HookingContext, HookingContextWithCache

__all__ = [
    "CompositeHookingContextFactory",
    "HookingContext",
    "HookingContextFactory",
    "HookingContextWithCache",
]

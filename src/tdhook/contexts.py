"""Hooking contexts and factories (public names of tdhook 0.1's ``tdhook.contexts``)."""

from ._core.context import (
    CompositeHookingContextFactory,
    HookingContext,
    HookingContextFactory,
    HookingContextWithCache,
)

__all__ = [
    "CompositeHookingContextFactory",
    "HookingContext",
    "HookingContextFactory",
    "HookingContextWithCache",
]

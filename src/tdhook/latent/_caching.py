"""Activation caching: store the activations of every module matching a pattern."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tensordict import TensorDictBase

from .._core.context import HookedModule, HookingContext, HookingContextFactory, HookingContextWithCache
from .._core.hooks import CachingHook, HookDirection, HookSpec, check_callback
from .._core.paths import select_modules

__all__ = ["ActivationCaching"]


class ActivationCaching(HookingContextFactory):
    """Cache the activations of every module whose name matches ``key_pattern``.

    Results live in ``hooked.hooking_context.cache`` (or the ``cache`` you pass, which may be
    memory-mapped) and stay readable after the ``with`` block.

    Args:
        key_pattern: Regular expression matched with ``re.match`` against module names
            (relative to the model root, or absolute ``td_module.…`` names when ``relative`` is
            False). A pattern that matches nothing raises.
        relative: Match relative (True) or absolute names.
        cache: A TensorDict to write into, used by reference.
        callback: ``callback(module, args, output, key, direction)`` returning the tensor (or
            TensorDict) to store; needed for tuple outputs, e.g. ``lambda output, **_: output[0]``.
        directions: Hook points, among ``"fwd"``, ``"fwd_pre"``, ``"bwd"``, ``"bwd_pre"`` (and the
            ``_kwargs`` variants). Defaults to ``["fwd"]``.
        use_nested_keys: Store under ``(direction, name)`` rather than ``name`` (always the case
            with several directions).
        clear_cache: Clear the cache at every enter.
        accumulate: Concatenate along the first (batch) dimension across calls, instead of
            overwriting, so a dataset can be cached batch by batch.
        detach: Store detached tensors (no graph is kept alive).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> with ActivationCaching(r"\\d$").prepare(model) as hooked:
        ...     _ = hooked(TensorDict(input=torch.randn(2, 3), batch_size=[2]))
        >>> sorted(hooked.hooking_context.cache.keys())
        ['0', '1']
    """

    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        key_pattern: str,
        relative: bool = True,
        cache: TensorDictBase | None = None,
        callback: Callable[..., Any] | None = None,
        directions: Sequence[str] | None = None,
        use_nested_keys: bool = False,
        clear_cache: bool = True,
        *,
        accumulate: bool = False,
        detach: bool = False,
    ) -> None:
        self.key_pattern = key_pattern
        self._relative = relative
        self._cache = cache
        self._clear_cache = clear_cache
        self._callback = callback
        self._directions = [HookDirection.parse(d) for d in (directions or ["fwd"])]
        for d in self._directions:
            check_callback(callback, d, ("key", "direction"))
        self._nested = use_nested_keys or len(self._directions) > 1
        self._accumulate = accumulate
        self._detach = detach

    @property
    def key_pattern(self) -> str:
        return self._key_pattern

    @key_pattern.setter
    def key_pattern(self, value: str) -> None:
        self._key_pattern = value

    @staticmethod
    def _context_cache(context: HookingContext | None) -> TensorDictBase:
        if isinstance(context, HookingContextWithCache):
            return context.cache
        raise TypeError("ActivationCaching needs a context with a cache: use it through prepare().")

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        context = hooked.hooking_context
        cache = self._cache if self._cache is not None else self._context_cache(context)
        root = hooked.root if self._relative else hooked
        specs = []
        for direction in self._directions:
            for name, module in select_modules(root, self._key_pattern):
                key = (direction.value, name) if self._nested else name
                hook = CachingHook(key, cache, direction, self._callback, self._detach, self._accumulate)
                specs.append(HookSpec(module, hook, direction))
        return specs

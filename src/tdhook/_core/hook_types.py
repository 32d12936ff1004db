"""The hook values methods build: store, cache, set, read, stop.

Hooks are small callables (no closures over loop variables), so the key a hook reports is the
key it was built for. Each one is called by torch with the direction's positional arguments.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ..errors import (
    ContextStateError,
)
from .cache import CacheProxy, _resolve_cache
from .directions import _FWD, _VALUE_INDEX, HookDirection
from .forward_state import CallTracker, ForwardState, call_key

__all__ = [
    "CachingHook",
    "EarlyStoppingException",
    "HookValueError",
    "ReadingHook",
    "SettingHook",
    "StoppingHook",
    "StoringHook",
    "nested_storable",
]


class HookValueError(ContextStateError):
    """A hook produced a value that cannot replace the original one."""


class EarlyStoppingException(Exception):
    """Raised by a stopping hook to end a forward pass early (swallowed by ``run``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Early stopping triggered for key {key}")
        self.key = key


def _unwrap(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 1:
        return value[0]
    return value


def _default_value(direction: HookDirection, args: tuple[Any, ...]) -> Any:
    return _unwrap(args[_VALUE_INDEX[direction]])


def _named(direction: HookDirection, args: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(direction.params, args))


def _check_storable(value: Any, key: Any) -> None:
    if not isinstance(value, (torch.Tensor, TensorDictBase)):
        raise HookValueError(
            f"{type(value).__name__} values are not supported for caching (key {key!r}), use a `callback` to "
            "return a tensor or a tensordict, e.g. `callback=lambda output, **_: output[0]`."
        )


def _hook_value(direction: HookDirection, callback: Callable[..., Any] | None, key: Any, args: tuple) -> Any:
    """The value a storing hook keeps: the hooked one, or ``callback(...)``'s; checked storable."""
    if callback is None:
        value = _default_value(direction, args)
    else:
        value = callback(**_named(direction, args), key=key, direction=direction.value)
    _check_storable(value, key)
    return value


def nested_storable(value: Any) -> torch.Tensor | TensorDictBase | None:
    """The storage rule of pattern caching (``ActivationCaching``) for one hook value.

    * a tensor or a TensorDict is stored as it is;
    * a tuple or a list becomes a TensorDict keyed ``"0"``, ``"1"``... by position, a mapping
      (``dict``, a Hugging Face ``ModelOutput``) a TensorDict keyed by ``str(key)``; recursively;
    * ``None`` and every other value (numbers, strings, key-value cache objects) are left out;
    * a container with nothing left is not stored: the result is ``None``.

    A GPT-2 attention module's ``(attn_output, None)`` is thus stored as ``{"0": attn_output}``,
    and a ``CausalLMOutput`` as ``{"logits": ...}`` (its ``past_key_values`` object is left out).
    """
    if isinstance(value, (torch.Tensor, TensorDictBase)):
        return value
    if isinstance(value, (tuple, list)):
        items: Iterable[tuple[Any, Any]] = enumerate(value)
    elif isinstance(value, Mapping):
        items = value.items()
    else:
        return None
    leaves = {}
    for name, item in items:
        leaf = nested_storable(item)
        if leaf is not None:
            leaves[str(name)] = leaf
    return TensorDict(leaves, batch_size=[]) if leaves else None


def _concat(previous: Any, value: Any, dim: int) -> Any:
    """``torch.cat([previous, value], dim)``, leaf by leaf for nested values."""
    if isinstance(previous, TensorDictBase) and isinstance(value, TensorDictBase) and not previous.batch_dims:
        if set(previous.keys(True, True)) != set(value.keys(True, True)):
            raise HookValueError(
                f"Cannot accumulate a structured value whose entries changed between calls: "
                f"{sorted(map(str, previous.keys(True, True)))} then {sorted(map(str, value.keys(True, True)))}. "
                "Cache one entry with a `callback`, e.g. `lambda output, **_: output[0]`."
            )
        return previous.apply(lambda p, v: torch.cat([p, v.to(p.device)], dim=dim), value)
    return torch.cat([previous, value.to(previous.device)], dim=dim)


@dataclass(slots=True)  # not frozen: frozen dataclasses build ~5x slower, on the run() hot path
class StoringHook:
    """Store the hooked value (or ``callback(...)``) in a plain dict, ``store[key]``.

    The hook of ``run().get/save``: a run's values go to a dict (a dict write costs a tenth of
    ``TensorDict.set``) and become a TensorDict only if ``run.cache`` is read. With ``calls`` (the
    run's :class:`ForwardState`), call ``k > 0`` of the module is stored under
    ``call_key(key, k)`` and forward values are protected from later in-place operations.
    """

    key: Any
    store: dict
    direction: HookDirection = HookDirection.FWD
    callback: Callable[..., Any] | None = None
    calls: ForwardState | None = None
    thread: int | None = None

    def __call__(self, *args: Any) -> None:
        if self.thread is not None and threading.get_ident() != self.thread:
            return  # another thread's forward: not this run's
        if self.callback is not None:
            value = _hook_value(self.direction, self.callback, self.key, args)
        else:
            value = args[_VALUE_INDEX[self.direction]]  # _hook_value inlined: this runs once per saved module
            if isinstance(value, tuple) and len(value) == 1:
                value = value[0]
            if not isinstance(value, (torch.Tensor, TensorDictBase)):
                _check_storable(value, self.key)
        calls = self.calls
        if calls is None or not calls.depth:
            self.store[self.key] = value
            return
        n = calls.index(self)
        key = call_key(self.key, n) if n else self.key
        self.store[key] = value
        if self.thread is not None:  # forward directions: protect against later in-place ops
            calls.hold(value, self.store, key, key)


@dataclass(slots=True)  # not frozen: frozen dataclasses build ~5x slower, on the run() hot path
class CachingHook:
    """Store the hooked value (or ``callback(...)``) at ``cache[key]``.

    With ``calls`` (a :class:`CallTracker` or :class:`ForwardState`), call ``k > 0`` of the module
    within one forward is stored under ``call_key(key, k)`` (so ``accumulate`` concatenates each
    call with the same call of earlier batches, never calls with samples), and a stored forward
    value is protected from later in-place operations of the model.
    """

    key: Any
    cache: Any
    direction: HookDirection = HookDirection.FWD
    callback: Callable[..., Any] | None = None
    detach: bool = False
    accumulate: bool = False
    #: Store structured values by :func:`nested_storable` (skipping those with no tensor)
    #: instead of refusing them.
    nested: bool = False
    #: The dimension ``accumulate`` concatenates along (0: calls over batches; 1: the steps of
    #: a generation with a key-value cache).
    accumulate_dim: int = 0
    calls: CallTracker | ForwardState | None = None

    def __call__(self, *args: Any) -> None:
        if self.nested:
            value = (
                _default_value(self.direction, args) if self.callback is None else self._callback_value(args)
            )
            value = nested_storable(value)
            if value is None:
                return
        else:
            value = _hook_value(self.direction, self.callback, self.key, args)
        if self.detach:
            value = value.detach()
        cache = _resolve_cache(self.cache)
        key = self.key
        state = self.calls.state() if self.calls is not None else None
        if state is not None and state.depth:
            n = state.index(self)
            if n:
                key = call_key(key, n)
        stored = value
        if self.accumulate:
            previous = cache.get(key, None)
            if previous is not None:
                stored = _concat(previous, value, self.accumulate_dim)
        if cache.is_locked:  # e.g. memory-mapped: write in place into the preallocated entry
            if key not in cache.keys(include_nested=True):
                raise HookValueError(
                    f"Cannot add key {key!r} to a locked (e.g. memory-mapped) cache. Preallocate it with the "
                    f"activation's shape {tuple(value.shape)} before memory-mapping, or unlock the TensorDict."
                )
            cache.set_(key, stored)
            return
        cache.set(key, stored)
        if (
            state is not None
            and stored is value
            and not self.direction.is_backward
            and isinstance(value, torch.Tensor)
            and (cache.device is None or cache.device == value.device)
        ):
            state.hold(value, cache, key, key)

    def _callback_value(self, args: tuple[Any, ...]) -> Any:
        assert self.callback is not None
        return self.callback(**_named(self.direction, args), key=self.key, direction=self.direction.value)


def _fit_replacement(value: Any, original: Any, direction: HookDirection) -> Any:
    if value is None:
        return None
    if isinstance(value, CacheProxy):
        value = value.resolve()
        if value is None:
            return None
    if isinstance(original, tuple) and not isinstance(value, tuple) and len(original) == 1:
        value = (value,)
    if isinstance(original, torch.Tensor) and isinstance(value, torch.Tensor):
        return value
    if isinstance(original, TensorDictBase) and isinstance(value, TensorDictBase):
        return value
    if isinstance(value, type(original)) or isinstance(original, type(value)):
        return value
    raise HookValueError(
        f"Callback returned a value of type {type(value).__name__} but the original value was of type "
        f"{type(original).__name__} ({direction.value!r} hook). Return the same kind of value, or None to keep it."
    )


@dataclass(slots=True)  # not frozen: frozen dataclasses build ~5x slower, on the run() hot path
class SettingHook:
    """Replace the hooked value by ``value`` or ``callback(..., value=value)`` (``None`` keeps it).

    With ``calls``, a value read from a :class:`CacheProxy` and put into the model is protected
    like a stored one: a later in-place operation of the model cannot change the cache.
    """

    value: Any
    direction: HookDirection = HookDirection.FWD
    callback: Callable[..., Any] | None = None
    calls: CallTracker | ForwardState | None = None

    def __call__(self, *args: Any) -> Any:
        index = _VALUE_INDEX[self.direction]
        original = args[index]
        value = self.value
        if isinstance(value, CacheProxy):
            value = value.resolve()
            if self.calls is not None and self.callback is None and isinstance(value, torch.Tensor):
                container = self.value._cache.resolve()
                if container is not None:
                    self.calls.state().hold(value, container, self.value.key, self.value.key)
        if self.callback is not None:
            if self.direction is _FWD:  # the common case, without building the keyword dict
                value = self.callback(
                    module=args[0], args=args[1], output=original, value=value, direction="fwd"
                )
            else:
                value = self.callback(
                    **_named(self.direction, args), value=value, direction=self.direction.value
                )
        new = _fit_replacement(value, original, self.direction)
        if new is None:
            return None
        if self.direction is HookDirection.FWD_PRE_KWARGS:
            return new, args[2]
        return new


@dataclass(frozen=True)
class ReadingHook:
    """Call ``callback(<hook params>, direction=...)``; returns nothing."""

    callback: Callable[..., Any]
    direction: HookDirection = HookDirection.FWD
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any) -> None:
        self.callback(**_named(self.direction, args), direction=self.direction.value, **self.extra)


@dataclass(slots=True)  # not frozen: frozen dataclasses build ~5x slower, on the run() hot path
class StoppingHook:
    """Raise :class:`EarlyStoppingException` after the module ran."""

    key: str

    def __call__(self, *args: Any) -> None:
        raise EarlyStoppingException(self.key)

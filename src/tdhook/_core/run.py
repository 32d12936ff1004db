"""Deferred runs on a hooked module (tdhook 0.1's ``run()``, nnsight-like).

``with hooked.run(td) as run:`` registers hooks in the body and runs the model at its exit; the
values go to a plain dict (a TensorDict only if ``run.cache`` is read).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDict, TensorDictBase

from ..errors import (
    ConcurrencyError,
    ContextStateError,
)
from .boundary import _unhooked
from .cache import CacheProxy, MutableWeakRef, check_cache
from .claims import check_no_foreign_exclusive
from .directions import HandleGroup, HookDirection, register
from .forward_state import ForwardState, ThreadGate
from .hook_types import EarlyStoppingException, StoppingHook, StoringHook
from .signatures import check_callback

if TYPE_CHECKING:
    from .hooked import HookedModule

__all__ = ["HookedModuleRun"]

#: The user-facing direction strings, parsed (a member itself goes through HookDirection.parse).
_PARSED = {d.value: d for d in HookDirection}
_BACKWARD = frozenset((HookDirection.BWD, HookDirection.BWD_PRE))


class _RunStore(dict):
    """A run's values (a dict that :class:`CacheProxy` can reference weakly)."""


def _default_run_callback(module: HookedModule, data: Any) -> Any:
    # ``forward`` itself when nothing hooks the wrapper: nn.Module.__call__ costs ~2 µs per run
    return module.forward(data) if _unhooked(module) else module(data)


class HookedModuleRun:
    """A deferred run: hooks registered inside ``with hooked.run(td) as run:`` fire at its exit.

    The model runs when the ``with`` block exits (even if the body raised; the body's exception
    then propagates after the hooks are removed). A stop hook ends the forward early.
    """

    __slots__ = (
        "__weakref__",
        "_active",
        "_cache",
        "_cache_mirrors_store",
        "_callback",
        "_calls",
        "_data",
        "_grad_enabled",
        "_handles",
        "_module",
        "_name",
        "_outer_cache",
        "_sep",
        "_store",
        "_store_ref",
        "_thread",
    )

    def __init__(
        self,
        module: HookedModule,
        data: Any,
        cache: TensorDictBase | None = None,
        run_name: str | None = None,
        run_sep: str | None = None,
        run_cache: TensorDictBase | None = None,
        grad_enabled: bool = False,
        run_callback: Callable[[HookedModule, Any], Any] | None = None,
    ) -> None:
        self._module = module
        self._data = data
        self._outer_cache = cache
        self._name = "run" if run_name is None else run_name
        self._sep = "." if run_sep is None else run_sep
        # Without a run_cache the values go to a plain dict; ``cache`` builds a TensorDict on demand.
        self._cache: TensorDictBase | None = run_cache
        self._store = _RunStore()
        self._store_ref: MutableWeakRef | None = None  # one weak reference shared by the run's proxies
        self._cache_mirrors_store = False
        self._grad_enabled = grad_enabled
        self._callback = run_callback or _default_run_callback
        self._handles = HandleGroup()
        self._active = False
        self._calls: ForwardState | None = None
        self._thread = threading.get_ident()

    @property
    def cache(self) -> TensorDictBase:
        """The run's values (``get`` and, without an outer ``cache``, ``save``) as a TensorDict."""
        if self._cache is None:
            self._cache = TensorDict()
            self._cache_mirrors_store = True
        self._mirror_store()
        return self._cache

    @cache.setter
    def cache(self, value: TensorDictBase) -> None:
        check_cache(value, "run.cache")
        self._cache = value
        self._cache_mirrors_store = False

    def _mirror_store(self) -> None:
        """Copy the run's dict into the TensorDict that ``cache`` built from it (if it did)."""
        if self._cache_mirrors_store and self._cache is not None:
            for key, value in self._store.items():
                self._cache.set(key, value)

    def __enter__(self) -> HookedModuleRun:
        if self._thread != threading.get_ident():
            raise ConcurrencyError(
                "A run must be entered in the thread that created it; call hooked.run(...) in this thread."
            )
        check_no_foreign_exclusive(self._module.root)
        self._active = True
        return self

    def _forward_state(self) -> ForwardState:
        """The run's per-forward bookkeeping, made with its first hook (a run without hooks needs none)."""
        calls = self._calls
        if calls is None:
            inplace = self._module.inplace_modules()
            calls = self._calls = ForwardState(track_storage=bool(inplace))
            for module in inplace:  # copy held values just before an in-place module modifies them
                self._handles.append(register(module, calls.before_inplace, HookDirection.FWD_PRE))
        return calls

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        calls = self._calls  # None when nothing hooked the model: no per-forward bookkeeping
        finished = False
        if calls is not None:
            calls.begin()
        try:
            self._call()
            finished = True
        except EarlyStoppingException:
            finished = True
        finally:
            self._active = False
            try:
                if calls is not None:
                    calls.end(check=finished)  # raises InPlaceModificationError for a modified stored value
            finally:
                self._handles.remove()
        self._mirror_store()  # ``cache`` read inside the body: bring it up to date

    def _call(self) -> None:
        if torch.is_grad_enabled() == self._grad_enabled:  # skip the grad-mode switch when it is a no-op
            self._callback(self._module, self._data)
        else:
            with torch.set_grad_enabled(self._grad_enabled):
                self._callback(self._module, self._data)

    def _check(self, name: str) -> None:
        if not self._active:
            raise ContextStateError(
                f"Not in context, method {name} must be called in context or directly on the module"
            )

    def get(
        self,
        key: str,
        *,
        cache_key: Any = None,
        callback: Callable[..., Any] | None = None,
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> CacheProxy:
        """Cache ``key``'s value in ``run.cache`` under ``cache_key or f"{key}_{type}"``."""
        if not self._active:
            self._check("get")
        direction = (_PARSED.get(direction) if type(direction) is str else None) or HookDirection.parse(
            direction
        )
        if self._cache is None:
            cache_key = cache_key or f"{key}_{direction.value_type}"
        return self._cache_into(self._cache, key, cache_key, callback, direction, prepend, relative)

    def save(
        self,
        key: str,
        *,
        cache_key: Any = None,
        callback: Callable[..., Any] | None = None,
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> CacheProxy:
        """Like :meth:`get`, into the outer cache, under ``f"{run_name}{run_sep}{key}_{type}"``."""
        if not self._active:
            self._check("save")
        direction = (_PARSED.get(direction) if type(direction) is str else None) or HookDirection.parse(
            direction
        )
        cache = self._outer_cache if self._outer_cache is not None else self._cache
        cache_key = cache_key or f"{self._name}{self._sep}{key}_{direction.value_type}"
        return self._cache_into(cache, key, cache_key, callback, direction, prepend, relative)

    def _cache_into(
        self,
        cache: TensorDictBase | None,
        key: str,
        cache_key: Any,
        callback: Callable[..., Any] | None,
        direction: HookDirection,
        prepend: bool,
        relative: bool,
    ) -> CacheProxy:
        """Hook ``key`` to write into ``cache`` (the run's own dict when ``None``); what get/save share.

        Without a cache this is the hot path of a run (once per saved module per call): the
        value goes to the run's dict through a :class:`StoringHook`.
        """
        if cache is None:
            if callback is not None:
                check_callback(callback, direction, ("key", "direction"))
            thread = None if direction in _BACKWARD else self._thread
            module = self._module._hook_target(key, relative)
            hook = StoringHook(cache_key, self._store, direction, callback, self._forward_state(), thread)
            self._handles.append(register(module, hook, direction, prepend=prepend))
            ref = self._store_ref
            if ref is None:
                ref = self._store_ref = MutableWeakRef(self._store)
            return CacheProxy(cache_key, ref)
        handle, proxy = self._module._get(
            cache, key, cache_key, callback, direction, prepend, relative, self._forward_state(), self._thread
        )
        self._handles.append(handle)
        return proxy

    def set(
        self,
        key: str,
        value: Any,
        *,
        callback: Callable[..., Any] | None = None,
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> None:
        """Replace ``key``'s value by ``value`` (a tensor or a :class:`CacheProxy`) or a callback's."""
        self._check("set")
        self._handles.append(
            self._module._set(
                key, value, callback, direction, prepend, relative, self._forward_state(), self._thread
            )
        )

    def stop(self, key: str) -> None:
        """End the forward pass after ``key`` ran."""
        self._check("stop")
        hook = ThreadGate(StoppingHook(key), self._thread)
        self._handles.append(register(self._module._hook_target(key, True), hook, HookDirection.FWD))

    def get_input(self, key: str, **kw: Any) -> CacheProxy:
        return self.get(key, direction=HookDirection.FWD_PRE, **kw)

    def save_input(self, key: str, **kw: Any) -> CacheProxy:
        return self.save(key, direction=HookDirection.FWD_PRE, **kw)

    def set_input(self, key: str, value: Any, **kw: Any) -> None:
        self.set(key, value, direction=HookDirection.FWD_PRE, **kw)

    def get_grad(self, key: str, **kw: Any) -> CacheProxy:
        self._grad_enabled = True
        return self.get(key, direction=HookDirection.BWD, **kw)

    def save_grad(self, key: str, **kw: Any) -> CacheProxy:
        self._grad_enabled = True
        return self.save(key, direction=HookDirection.BWD, **kw)

    def set_grad(self, key: str, value: Any, **kw: Any) -> None:
        self._grad_enabled = True
        self.set(key, value, direction=HookDirection.BWD, **kw)

    def get_grad_output(self, key: str, **kw: Any) -> CacheProxy:
        return self.get(key, direction=HookDirection.BWD_PRE, **kw)

    def save_grad_output(self, key: str, **kw: Any) -> CacheProxy:
        return self.save(key, direction=HookDirection.BWD_PRE, **kw)

    def set_grad_output(self, key: str, value: Any, **kw: Any) -> None:
        self.set(key, value, direction=HookDirection.BWD_PRE, **kw)


class _Deferred:
    """Adapt a legacy ``_hook_module(hooked) -> handle`` override to the plan protocol."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def install(self) -> Any:
        return self.fn()

"""Factory → context → hooked module: the one lifecycle every method shares.

``Method(...).prepare(model)`` returns a :class:`HookingContext`. Entering it builds a
:class:`~tdhook._core.hooked.HookedModule` around the TensorDict-level model, asks the factory
for its *plan* (hook specs and reversible edits), installs it, and returns the hooked module.
Leaving it (also when the body raised) removes everything in reverse order.

A factory customises two things only:

* ``_plan(hooked)``: what to hook or edit (a list of :class:`~tdhook._core.directions.Installable`);
* ``_call(hooked, td, call_next)``: how a call runs, around ``call_next`` (the model, or the next
  method of a composition). Hook-only methods keep the default, which calls the model once.

Because the model is never wrapped in a pipeline, module names are the same for every method:
relative names are paths inside the user's model, absolute names are ``td_module.`` + the path
inside the TensorDict-level module.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from ..errors import (
    ContextStateError,
    InvalidInputError,
)
from .claims import (
    _claim_factories,
    _claim_model,
    _edits_or_backward,
    _gate,
    _release_factories,
    _release_model,
)
from .directions import HandleGroup, HookDirection, HookSpec, Installable, install
from .forward_state import CallTracker, RootHooks
from .hooked import ROOT_NAME, HookedModule
from .paths import join_paths

if TYPE_CHECKING:
    from .factory import HookingContextFactory

__all__ = ["HookingContext", "HookingContextWithCache"]


class HookingContext:
    """The lifecycle of one method bound to one model (see the module docstring).

    Errors: entering twice raises ``RuntimeError("Cannot enter context twice")``; the hooked
    module refuses calls after exit.
    """

    def __init__(
        self,
        factory: HookingContextFactory,
        module: TensorDictModuleBase,
        extra_relative_path: str = "",
        in_keys: Sequence[Any] | None = None,
        out_keys: Sequence[Any] | None = None,
    ) -> None:
        self.factory = factory
        self.module = module
        self.extra_relative_path = extra_relative_path
        self.in_keys = list(in_keys) if in_keys is not None else list(module.in_keys)
        self.out_keys = list(out_keys) if out_keys is not None else list(module.out_keys)
        self._hooked: HookedModule | None = None
        self._plan: list[Installable] = []
        self._handles: HandleGroup | None = None
        self._managed = True
        self._hooks_disabled = False
        self._thread: int | None = None
        self._root: nn.Module | None = None

    @property
    def is_active(self) -> bool:
        return self._hooked is not None

    @property
    def thread(self) -> int | None:
        """The id of the thread that entered the context (None when it is not active)."""
        return self._thread if self.is_active else None

    @property
    def managed(self) -> bool:
        """False for a context entered by ``prepare(..., return_context=False)`` (left with ``restore()``)."""
        return self._managed

    def enter_unmanaged(self) -> HookedModule:
        """Enter without a ``with`` block (``prepare(..., return_context=False)``); leave with ``hooked.restore()``."""
        hooked = self.__enter__()
        self._managed = False
        return hooked

    def _inplace_modules(self, hooked: HookedModule) -> list[nn.Module]:
        """The model's in-place modules, found at the first enter (a new hooked module is built each time)."""
        found = self.__dict__.get("_inplace")
        if found is None:
            found = self.__dict__["_inplace"] = hooked.inplace_modules()
        else:
            hooked.__dict__["_inplace"] = found
        return found

    @property
    def hooked_module(self) -> HookedModule | None:
        return self._hooked

    def _factories(self) -> tuple[HookingContextFactory, ...]:
        return self.factory.components

    def __enter__(self) -> HookedModule:
        if self.is_active:
            raise ContextStateError("Cannot enter context twice")
        factory = self.factory
        hooked = factory.hooked_module_class(
            self.module,
            hooking_context=self,
            relative_path=join_paths(ROOT_NAME, self.extra_relative_path),
            in_keys=self.in_keys,
            out_keys=self.out_keys,
        )
        thread = threading.get_ident()
        root = hooked.root
        _claim_factories(self._factories(), thread)
        entered: list[HookingContextFactory] = []
        claimed = False
        try:
            inplace = self._inplace_modules(hooked)
            tracker = CallTracker(track_storage=bool(inplace))
            hooked.__dict__["_tracker"] = tracker
            for f in self._factories():
                f._enter(self)
                entered.append(f)
            plan: list[Installable] = []
            for f in self._factories():
                plan.extend(f._plan(hooked))
            exclusive = any(_edits_or_backward(item) for item in plan)
            _claim_model(self, root, thread, exclusive)
            claimed = True
            # The tracker's hooks come first: root hooks delimit each forward (call counting, checks
            # of stored values), pre-hooks of in-place modules copy stored values just in time.
            core: list[Installable] = [RootHooks(root, tracker)]
            core.extend(
                HookSpec(m, tracker.before_inplace, HookDirection.FWD_PRE, prepend=True) for m in inplace
            )
            self._plan = core + [_gate(item, thread, tracker) for item in plan]
            self._thread = thread
            self._handles = install(self._plan)
            hooked.__dict__["_call_chain"] = self._build_chain(hooked)
        except BaseException:
            for f in reversed(entered):
                f._exit(self)
            self._plan = []
            if claimed:
                _release_model(self, root)
            _release_factories(self._factories(), thread)
            raise
        self._hooked = hooked
        self._root = root
        self._managed = True
        return hooked

    def _build_chain(self, hooked: HookedModule) -> Callable[..., Any]:
        """Each factory's ``_call`` around the next one's; the last one's ``call_next`` runs the model."""
        chain: Callable[..., Any] = hooked._call_model
        for f in reversed(self._factories()):
            chain = functools.partial(f._call, hooked, call_next=chain)
        return chain

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        hooked = self._hooked
        try:
            if self._handles is not None:
                self._handles.remove()
        finally:
            self._handles = None
            self._plan = []
            self._hooked = None
            self._hooks_disabled = False
            if hooked is not None:
                hooked.__dict__["_call_chain"] = None
            try:
                for f in reversed(self._factories()):
                    f._exit(self)
            finally:
                if hooked is not None:
                    _release_model(self, self._root)
                    _release_factories(self._factories(), self._thread)
                self._root = None

    @contextlib.contextmanager
    def disable_hooks(self) -> Iterator[None]:
        """Remove the method's hooks for the ``with`` body and put the same ones back after.

        The plan is not rebuilt, so probes and other state created at enter survive.
        """
        if not self.is_active:
            raise ContextStateError("Cannot disable hooks outside of context")
        if self._handles is not None:
            self._handles.remove()
        self._hooks_disabled = True
        try:
            yield
        finally:
            self._handles = install(self._plan)
            self._hooks_disabled = False

    @contextlib.contextmanager
    def disable(self) -> Iterator[nn.Module]:
        """Remove the method for the ``with`` body and yield the user's own (unhooked) model."""
        if not self.is_active:
            raise ContextStateError("Cannot disable context outside of context")
        with self.disable_hooks():
            assert self._hooked is not None
            yield self._hooked.root


class HookingContextWithCache(HookingContext):
    """A context with a ``.cache`` TensorDict, cleared at enter (when ``clear_cache``) and kept after exit."""

    def __init__(
        self,
        factory: HookingContextFactory,
        module: TensorDictModuleBase,
        extra_relative_path: str = "",
        in_keys: Sequence[Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        cache: TensorDictBase | None = None,
        clear_cache: bool = True,
    ) -> None:
        super().__init__(factory, module, extra_relative_path, in_keys, out_keys)
        cache = factory.context_cache if cache is None else cache
        if factory.clears_cache is not None:
            clear_cache = factory.clears_cache
        if cache is not None and not isinstance(cache, TensorDictBase):
            raise InvalidInputError(f"cache must be a TensorDict, got {type(cache).__name__}.")
        self._cache: TensorDictBase = TensorDict() if cache is None else cache
        self._clear_cache = clear_cache

    @property
    def cache(self) -> TensorDictBase:
        return self._cache

    def clear(self) -> None:
        """Delete every entry of the cache (in place, so a user-provided cache stays the same object)."""
        for key in list(self._cache.keys()):
            del self._cache[key]

    def __enter__(self) -> HookedModule:
        if self.is_active:
            raise ContextStateError("Cannot enter context twice")
        if self._clear_cache:
            self.clear()
        return super().__enter__()

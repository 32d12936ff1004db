"""The hooked module: the model as seen inside a hooking context.

It knows the hook core (to register low-level hooks) and the call boundary; it refers to the
context that owns it only through its attributes (``is_active``, ``disable_hooks()``...).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictModuleWrapper
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import (
    ConcurrencyError,
    ContextStateError,
    ExtensionConflictError,
    InvalidInputError,
    TdhookWarning,
)
from . import keys as _keys
from .boundary import (
    _check_dtype,
    _direct_call,
    _direct_module,
    _unhooked,
    raise_explained,
    td_direct_module,
    wrap_module,
    write_outputs,
)
from .cache import CacheProxy, check_cache
from .directions import HookDirection, register
from .extensions import Extension
from .forward_state import CallTracker, ForwardState, ThreadGate, inplace_modules
from .hook_types import CachingHook, SettingHook, StoppingHook
from .paths import chain_holds, resolution_chain, resolve_path
from .run import HookedModuleRun
from .signatures import check_callback, check_hook_signature

if TYPE_CHECKING:
    from .lifecycle import HookingContext

__all__ = ["ROOT_NAME", "HookedModule"]

ROOT_NAME = "td_module"
_S = TypeVar("_S")
_E = TypeVar("_E", bound=Extension)


class HookedModule(TensorDictModuleWrapper):
    """The model as seen inside a hooking context (or built with :meth:`from_module`).

    Attribute look-ups fall through to ``td_module``. Calling it with a TensorDict runs the
    method (``td = hooked(td)``); positional tensors use ``TensorDictModule``'s tensor call.

    Args:
        td_module: The TensorDict-level model.
        hooking_context: The context that owns it, if any.
        relative_path: Path (from this module) of the user model's root.
    """

    def __init__(
        self,
        td_module: TensorDictModuleBase,
        hooking_context: HookingContext | None = None,
        relative_path: str = ROOT_NAME,
        in_keys: Sequence[Any] | None = None,
        out_keys: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(td_module)
        # TensorDictModuleWrapper copies td_module's forward hooks onto the wrapper, so they would fire
        # twice per call (and select_out_keys' hook, which needs TensorDictModule's arguments, fails)
        for table in (
            self._forward_hooks,
            self._forward_hooks_with_kwargs,
            self._forward_hooks_always_called,
        ):
            table.clear()
        self.in_keys = list(in_keys) if in_keys is not None else list(td_module.in_keys)
        self.__dict__["_hooked_out_keys"] = (
            list(out_keys) if out_keys is not None else list(td_module.out_keys)
        )
        self.__dict__["_hooking_context"] = hooking_context
        self.__dict__["_relative_path"] = relative_path
        self.__dict__["_call_chain"] = None
        self.__dict__["_direct"] = _direct_module(td_module)
        self.__dict__["_extensions"] = {}
        self.__dict__["_exposed"] = {}
        self.__dict__["_td"] = td_module  # the call path reads it without nn.Module.__getattr__
        self.__dict__["_targets"] = {}  # (path, relative) -> resolution_chain, for _hook_target

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        hooking_context: HookingContext | None = None,
        **kwargs: Any,
    ) -> HookedModule:
        """Wrap a model for the low-level API without a method (no context needed).

        Keys are resolved relative to the ``TensorDictModule``, so ``"linear2"`` (forwarded to
        the inner module) and ``"module.linear2"`` both work.
        """
        td_module, _, ins, outs = wrap_module(module, in_keys, out_keys)
        return cls(td_module, hooking_context=hooking_context, in_keys=ins, out_keys=outs, **kwargs)

    # -- properties ----------------------------------------------------------------------------
    @property  # type: ignore[override]
    def out_keys(self) -> list[Any]:
        """The out-keys this hooked module reports (a subset of the model's, or all of them).

        Kept on the hooked module itself: tensordict 0.14's ``TensorDictModuleWrapper`` forwards
        an ``out_keys`` assignment to the wrapped module, which would edit the user's model (a
        subset passed to :meth:`from_module` would make it drop outputs).
        """
        return self.__dict__["_hooked_out_keys"]

    @out_keys.setter
    def out_keys(self, value: Sequence[Any]) -> None:
        self.__dict__["_hooked_out_keys"] = list(value)

    @property
    def hooking_context(self) -> HookingContext | None:
        return self.__dict__["_hooking_context"]

    @property
    def relative_path(self) -> str:
        return self.__dict__["_relative_path"]

    @property
    def root(self) -> nn.Module:
        """The user's model (the module relative names start from)."""
        root = self.__dict__.get("_root")
        if root is None:
            root = resolve_path(self, self.relative_path)
            self.__dict__["_root"] = root
        return root

    def resolve(self, key: str, *, relative: bool = True) -> nn.Module:
        """Return the submodule at ``key`` (relative to the user model, or absolute from here)."""
        return resolve_path(self.root if relative else self, key)

    @property
    def calls(self) -> CallTracker | None:
        """The per-forward tracker of the active context (repeated calls, in-place protection)."""
        return self.__dict__.get("_tracker")

    def method_state(self, owner: object, make: Callable[[], _S]) -> _S:
        """Per-context state of a method: ``make()`` on first use, then the same object.

        A hooked module is built at every enter, so the state lives as long as one context and
        two contexts of one method instance (e.g. in two threads) never share it.
        """
        states = self.__dict__.setdefault("_method_states", {})
        state = states.get(id(owner))
        if state is None:
            state = states[id(owner)] = make()
        return state

    # -- extensions (see tdhook._core.extensions) ------------------------------------------------
    def use_extension(self, kind: type[_E]) -> _E:
        """This module's extension of type ``kind``, created (``kind(self)``) on first use.

        Methods call it while they plan; two methods of one kind share the extension.

        Raises:
            ExtensionConflictError: If ``kind`` exposes a name that another attached extension,
                or the hooked module itself, already provides.
        """
        extensions: dict[type[Extension], Extension] = self.__dict__["_extensions"]
        found = extensions.get(kind)
        if found is not None:
            return found  # type: ignore[return-value]
        exposed: dict[str, Extension] = self.__dict__["_exposed"]
        for name in kind.exposes:
            owner = exposed.get(name)
            if owner is not None or hasattr(HookedModule, name):
                by = f"the {type(owner).__name__} extension" if owner is not None else "HookedModule itself"
                raise ExtensionConflictError(
                    f"Cannot attach {kind.__name__}: the name {name!r} it exposes is already provided by {by}. "
                    "Use the two methods in nested `with` blocks, or expose another name."
                )
        extension = kind(self)
        extensions[kind] = extension
        for name in kind.exposes:
            exposed[name] = extension
        return extension

    def extension(self, kind: type[_E]) -> _E:
        """This module's extension of type ``kind`` (attached by the method that uses it).

        Raises:
            ContextStateError: If no method attached one; the message lists the attached ones.
        """
        found = self.__dict__["_extensions"].get(kind)
        if found is None:
            attached = [k.__name__ for k in self.__dict__["_extensions"]]
            raise ContextStateError(
                f"This hooked module has no {kind.__name__} extension (attached: {attached}). It is added by the "
                f"method that uses it: prepare the model with that method, alone or in a composite."
            )
        return found

    @property
    def extensions(self) -> tuple[Extension, ...]:
        """The attached extensions, in attachment order."""
        return tuple(self.__dict__["_extensions"].values())

    def __getattr__(self, name: str) -> Any:
        exposed = self.__dict__.get("_exposed")
        if exposed:
            owner = exposed.get(name)
            if owner is not None:
                return getattr(owner, name)
        return super().__getattr__(name)

    def inplace_modules(self) -> list[nn.Module]:
        """Submodules of the user model that modify their input in place (``inplace=True``), found once."""
        found = self.__dict__.get("_inplace")
        if found is None:
            found = inplace_modules(self.root)
            self.__dict__["_inplace"] = found
        return found

    # -- call ----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.__dict__["_hooking_context"]
        if ctx is not None:
            if not ctx.is_active:
                raise ContextStateError(
                    "Contextual HookedModule must be called in context: this module's `with` block has "
                    "exited. Call it inside `with ...prepare(model) as hooked:`."
                )
            if ctx.thread != threading.get_ident():
                raise ConcurrencyError(
                    f"This hooked module's context was entered in thread {ctx.thread}, but it is called from "
                    f"thread {threading.get_ident()}. A context's hooks act only in the thread that entered "
                    "it: enter a context (prepare(model)) in each thread instead of sharing the hooked module."
                )
        chain = self.__dict__["_call_chain"]
        td = args[0] if args and isinstance(args[0], TensorDictBase) else None
        if td is None and isinstance(kwargs.get("tensordict"), TensorDictBase):
            td = kwargs.pop("tensordict")
            args = (td,)
        if td is not None:
            try:
                return chain(*args, **kwargs) if chain is not None else self._call_model(*args, **kwargs)
            except Exception as error:  # a bad input (a string, integers) explains it more clearly
                raise_explained(self, self._inputs_of(td), error)
        if ctx is not None and ctx.factory.needs_tensordict:
            raise InvalidInputError(
                f"{type(ctx.factory).__name__} needs a TensorDict input, got "
                f"{', '.join(type(a).__name__ for a in args) or 'keyword arguments'}. "
                f"Build one: TensorDict({{{self.in_keys[0]!r}: x}}, batch_size=x.shape[:1])."
            )
        for i, arg in enumerate(args):
            _check_dtype(self, i, arg)
        try:
            direct = self.__dict__["_direct"]
            if direct is not None and len(args) == 1 and not kwargs and _unhooked(direct[0]):
                return _direct_call(direct[1], args[0], direct[0].out_keys[0])
            return self.td_module(*args, **kwargs)
        except Exception as error:
            raise_explained(self, enumerate(args), error)

    def _inputs_of(self, td: TensorDictBase) -> list[tuple[Any, Any]]:
        """``(in_key, value)`` for each model input present in ``td``."""
        return [(key, td.get(key, None)) for key in self.td_module.in_keys]

    def _call_model(self, td: TensorDictBase, *args: Any, **kwargs: Any) -> TensorDictBase:
        """Run the TensorDict-level model on ``td`` after checking its input keys and dtypes."""
        td_module = self.__dict__["_td"]
        values = []
        direct = not args and not kwargs
        for key in td_module.in_keys:  # one look-up per key (a keys view costs ~3 µs per call)
            value = td.get(key, None)
            if value is None:
                _keys.check_keys(td, td_module.in_keys)
            _check_dtype(self, key, value)
            values.append(value)
            direct = direct and isinstance(value, torch.Tensor)
        try:
            inner = td_direct_module(td_module) if direct else None
            if inner is not None:  # what td_module(td) does, without its call machinery
                return write_outputs(td, td_module.out_keys, inner(*values))
            return td_module(td, *args, **kwargs)
        except Exception as error:  # the TensorDict the model saw (a method may have built it)
            raise_explained(self, self._inputs_of(td), error)

    # -- context delegation ---------------------------------------------------------------------
    def _require_context(self) -> HookingContext:
        ctx = self.hooking_context
        if ctx is None:
            raise ContextStateError("No hooking context provided to this module")
        return ctx

    def disable_context_hooks(self) -> contextlib.AbstractContextManager[None]:
        """Temporarily remove the method's hooks (see :meth:`HookingContext.disable_hooks`)."""
        return self._require_context().disable_hooks()

    def disable_context(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Temporarily remove the method entirely (see :meth:`HookingContext.disable`)."""
        return self._require_context().disable()

    def restore(self) -> None:
        """Exit a context entered with ``prepare(..., return_context=False)``."""
        ctx = self._require_context()
        if not ctx.is_active:
            raise ContextStateError("Context is not active")
        if ctx.managed:
            raise ContextStateError(
                "Cannot call restore() when context is managed by a context manager. "
                "Leave the `with` block instead."
            )
        ctx.__exit__(None, None, None)

    # -- low-level persistent hooks -------------------------------------------------------------
    def register_submodule_hook(
        self,
        key: str,
        hook: Callable[..., Any],
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> RemovableHandle:
        """Register ``hook`` on the submodule at ``key`` and return torch's handle.

        Raises:
            HookSignatureError: If torch cannot call ``hook`` with the direction's arguments (checked
                now, not when it fires).
        """
        direction = HookDirection.parse(direction)
        check_hook_signature(hook, direction)
        return register(self._hook_target(key, relative), hook, direction, prepend=prepend)

    def _hook_target(self, key: str, relative: bool) -> nn.Module:
        """The submodule at ``key``, with a warning when it is a ModuleList (never called itself).

        A path that names children is resolved once per hooked module and re-checked at each use
        (:func:`~tdhook._core.paths.chain_holds`), so a swapped submodule is always seen.
        """
        targets: dict[tuple[str, bool], Any] = self.__dict__["_targets"]
        found = targets.get((key, relative))
        if found is not None and chain_holds(found):  # the same module as when first resolved
            return found[-1][2]
        module = self.resolve(key, relative=relative)
        chain = resolution_chain(self.root if relative else self, key)
        if (
            chain is not None
            and chain[-1][2] is module
            and type(module) is not nn.ModuleList
            and len(targets) < 1024
        ):
            targets[(key, relative)] = chain
        if isinstance(module, nn.ModuleList):
            warnings.warn(
                f"You are hooking a ModuleList ({key}), which will never be executed.",
                TdhookWarning,
                stacklevel=3,
            )
        return module

    def set(
        self,
        module_key: str,
        value: Any,
        callback: Callable[..., Any] | None = None,
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> RemovableHandle:
        """Replace a module's value (output by default) by ``value`` or ``callback(..., value=...)``."""
        return self._set(module_key, value, callback, direction, prepend, relative, self.calls)

    def _set(
        self,
        module_key: str,
        value: Any,
        callback: Callable[..., Any] | None,
        direction: str | HookDirection,
        prepend: bool,
        relative: bool,
        calls: CallTracker | ForwardState | None,
        thread: int | None = None,
    ) -> Any:
        direction = HookDirection.parse(direction)
        check_callback(callback, direction, ("value", "direction"))
        hook: Callable[..., Any] = SettingHook(
            value, direction, callback, None if direction.is_backward else calls
        )
        if thread is not None and not direction.is_backward:
            hook = ThreadGate(hook, thread)
        return register(self._hook_target(module_key, relative), hook, direction, prepend=prepend)

    def get(
        self,
        cache: TensorDictBase,
        module_key: str,
        cache_key: Any = None,
        callback: Callable[..., Any] | None = None,
        direction: str | HookDirection = "fwd",
        prepend: bool = False,
        relative: bool = True,
    ) -> tuple[Any, CacheProxy]:
        """Store a module's value in ``cache`` under ``cache_key or f"{module_key}_{type}"``.

        Inside an active context, call ``k > 0`` of the module within one forward is stored under
        ``f"{cache_key}#{k}"`` (see :func:`~tdhook._core.forward_state.call_key`).

        Raises:
            InvalidInputError: If ``cache`` is not a TensorDict (checked before anything is hooked).
        """
        return self._get(cache, module_key, cache_key, callback, direction, prepend, relative, self.calls)

    def _get(
        self,
        cache: Any,
        module_key: str,
        cache_key: Any,
        callback: Callable[..., Any] | None,
        direction: str | HookDirection,
        prepend: bool,
        relative: bool,
        calls: CallTracker | ForwardState | None,
        thread: int | None = None,
    ) -> tuple[Any, CacheProxy]:
        check_cache(cache)
        direction = HookDirection.parse(direction)
        check_callback(callback, direction, ("key", "direction"))
        cache_key = cache_key or f"{module_key}_{direction.value_type}"
        proxy = CacheProxy(cache_key, cache)
        hook: Callable[..., Any] = CachingHook(cache_key, cache, direction, callback, calls=calls)
        if thread is not None and not direction.is_backward:
            hook = ThreadGate(hook, thread)
        handle = register(self._hook_target(module_key, relative), hook, direction, prepend=prepend)
        return handle, proxy

    def stop(self, key: str) -> RemovableHandle:
        """Stop the forward pass after ``key`` ran (raises :class:`EarlyStoppingException`)."""
        return self.register_submodule_hook(key, StoppingHook(key), HookDirection.FWD)

    def set_input(self, module_key: str, value: Any, **kwargs: Any) -> RemovableHandle:
        return self.set(module_key, value, direction=HookDirection.FWD_PRE, **kwargs)

    def get_input(self, cache: TensorDictBase, module_key: str, **kwargs: Any) -> tuple[Any, CacheProxy]:
        return self.get(cache, module_key, direction=HookDirection.FWD_PRE, **kwargs)

    def set_grad(self, module_key: str, value: Any, **kwargs: Any) -> RemovableHandle:
        return self.set(module_key, value, direction=HookDirection.BWD, **kwargs)

    def get_grad(self, cache: TensorDictBase, module_key: str, **kwargs: Any) -> tuple[Any, CacheProxy]:
        return self.get(cache, module_key, direction=HookDirection.BWD, **kwargs)

    def set_grad_output(self, module_key: str, value: Any, **kwargs: Any) -> RemovableHandle:
        return self.set(module_key, value, direction=HookDirection.BWD_PRE, **kwargs)

    def get_grad_output(
        self, cache: TensorDictBase, module_key: str, **kwargs: Any
    ) -> tuple[Any, CacheProxy]:
        return self.get(cache, module_key, direction=HookDirection.BWD_PRE, **kwargs)

    def run(
        self,
        data: Any,
        cache: TensorDictBase | None = None,
        run_name: str | None = None,
        run_sep: str | None = None,
        run_cache: TensorDictBase | None = None,
        grad_enabled: bool = False,
        run_callback: Callable[[HookedModule, Any], Any] | None = None,
    ) -> HookedModuleRun:
        """Deferred run (nnsight-like): register hooks in the ``with`` body, run at its exit.

        Raises:
            InvalidInputError: If ``cache`` or ``run_cache`` is given and is not a TensorDict
                (checked here, before any hook is installed).
        """
        if cache is not None:
            check_cache(cache, "cache")
        if run_cache is not None:
            check_cache(run_cache, "run_cache")
        return HookedModuleRun(self, data, cache, run_name, run_sep, run_cache, grad_enabled, run_callback)

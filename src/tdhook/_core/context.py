"""Factory → context → hooked module: the one lifecycle every method shares.

``Method(...).prepare(model)`` returns a :class:`HookingContext`. Entering it builds a
:class:`HookedModule` around the TensorDict-level model, asks the factory for its *plan*
(hook specs and reversible edits), installs it, and returns the hooked module. Leaving it (also
when the body raised) removes everything in reverse order.

A factory customises two things only:

* ``_plan(hooked)``: what to hook or edit (a list of :class:`~tdhook._core.hooks.Installable`);
* ``_call(hooked, td, call_next)``: how a call runs, around ``call_next`` (the model, or the next
  method of a composition). Hook-only methods keep the default, which calls the model once.

Because the model is never wrapped in a pipeline, module names are the same for every method:
relative names are paths inside the user's model, absolute names are ``td_module.`` + the path
inside the TensorDict-level module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictModuleWrapper
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from ..errors import (
    CompiledModelError,
    ConcurrencyError,
    ContextStateError,
    DtypeMismatchError,
    InvalidInputError,
    TdhookWarning,
)
from . import keys as _keys
from .hooks import (
    CacheProxy,
    CachingHook,
    CallTracker,
    EarlyStoppingException,
    ForwardState,
    HandleGroup,
    HookDirection,
    HookSpec,
    Installable,
    MutableWeakRef,
    RootHooks,
    SettingHook,
    StoppingHook,
    StoringHook,
    ThreadGate,
    check_cache,
    check_callback,
    check_hook_signature,
    install,
    register,
)
from .paths import join_paths, resolve_path

__all__ = [
    "CompositeHookingContextFactory",
    "HookedModule",
    "HookedModuleRun",
    "HookingContext",
    "HookingContextFactory",
    "HookingContextWithCache",
    "wrap_module",
]

ROOT_NAME = "td_module"
_S = TypeVar("_S")


def wrap_module(
    module: nn.Module,
    in_keys: Sequence[Any] | dict[str, Any] | None = None,
    out_keys: Sequence[Any] | None = None,
) -> tuple[TensorDictModuleBase, str, list[Any], list[Any]]:
    """Return ``(td_module, extra_path, in_keys, out_keys)`` for any model.

    A ``TensorDictModuleBase`` is used as it is; ``in_keys``/``out_keys`` may name a subset of
    its keys, which methods then honour (e.g. attribution only to those inputs). A plain
    ``nn.Module`` is wrapped in a ``TensorDictModule`` reading ``"input"`` and writing
    ``"output"`` by default; dict-like outputs become nested TensorDicts.

    Raises:
        InvalidInputError: If ``module`` is not an ``nn.Module``.
        ValueError: If a key is malformed or not one of the module's keys.
    """
    if not isinstance(module, nn.Module):
        raise InvalidInputError(
            f"prepare() expects an nn.Module or a TensorDictModuleBase, got {type(module).__name__}."
        )
    check_not_compiled(module)
    if isinstance(module, TensorDictModuleBase):
        selected_in = _check_subset(in_keys, module.in_keys, "in_keys")
        selected_out = _check_subset(out_keys, module.out_keys, "out_keys")
        return module, "", selected_in, selected_out
    if isinstance(in_keys, dict):
        td_module = TensorDictModule(module, in_keys=in_keys, out_keys=out_keys or [_keys.DEFAULT_OUT_KEY])
    else:
        td_module = TensorDictModule(
            module,
            in_keys=_keys.normalize_keys(in_keys) or [_keys.DEFAULT_IN_KEY],
            out_keys=_keys.normalize_keys(out_keys) or [_keys.DEFAULT_OUT_KEY],
        )
    return td_module, "module", list(td_module.in_keys), list(td_module.out_keys)


def _compiled_part(module: nn.Module) -> tuple[str, str] | None:
    """``(name, how)`` of the first ``torch.compile``d part of ``module``, or None."""
    for name, sub in module.named_modules():
        label = name or "<root>"
        if type(sub).__name__ == "OptimizedModule" and hasattr(sub, "_orig_mod"):
            return label, "is a torch.compile OptimizedModule; pass its `._orig_mod` (same parameters)"
        if getattr(sub, "_compiled_call_impl", None) is not None:
            return label, "was compiled with `module.compile()`; use an uncompiled copy of the model"
        for forward in (sub.__dict__.get("forward"), getattr(type(sub), "forward", None)):
            if forward is not None and hasattr(forward, "_torchdynamo_orig_callable"):
                return label, "has a torch.compile'd forward; keep an uncompiled forward for hooking"
    return None


def check_not_compiled(module: nn.Module) -> None:
    """Refuse a ``torch.compile``d model or submodule.

    Compiled code does not run hooks registered after compilation: caching would cache nothing
    and steering would steer nothing, silently.

    Raises:
        CompiledModelError: Naming the compiled module and the fix.
    """
    found = _compiled_part(module)
    if found is not None:
        name, how = found
        raise CompiledModelError(
            f"Module {name!r} {how}. Compiled code ignores hooks added after compilation, so tdhook "
            "cannot hook it (caches would stay empty, interventions would do nothing). Hook the eager "
            "model, e.g. prepare(compiled._orig_mod), and compile afterwards if needed."
        )


def _first_float_param(module: nn.Module) -> torch.Tensor | None:
    for param in module.parameters():
        if param.is_floating_point():
            return param
    return None


def _check_dtype(hooked: HookedModule, key: Any, value: Any) -> None:
    """Refuse a floating input whose dtype differs from the model's first floating parameter.

    ``key`` is the input's TensorDict key, or its position (an int) for a positional tensor.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return
    ref = hooked.__dict__.get("_ref_param", False)
    if ref is False:
        ref = hooked.__dict__["_ref_param"] = _first_float_param(hooked.td_module)
    if ref is None or ref.dtype == value.dtype:
        return
    if torch.is_autocast_enabled(value.device.type):  # autocast casts inputs itself
        return
    name = f"positional argument {key}" if isinstance(key, int) else repr(key)
    raise DtypeMismatchError(
        f"Input {name} has dtype {value.dtype} but the model's parameters are {ref.dtype}. Cast the input "
        f"(e.g. `x.to({ref.dtype})`) or the model (e.g. `model.to({value.dtype})`) so that they match."
    )


def _check_subset(keys: Any, available: Sequence[Any], name: str) -> list[Any]:
    if keys is None:
        return list(available)
    if isinstance(keys, (str, tuple)):
        keys = [keys]
    out = []
    for key in keys:
        if not _keys.is_unraveled(key):
            raise ValueError(
                f"{name} must be unraveled (a str or a tuple of str), got {type(key).__name__} {key!r}."
            )
        key = key if isinstance(key, str) or len(key) > 1 else key[0]
        if key not in available:
            raise ValueError(
                f"Key {key!r} not in module.{name}: {list(available)}. Pass a subset of the module's {name}."
            )
        out.append(key)
    return out


def _direct_module(td_module: TensorDictModuleBase) -> tuple[TensorDictModule, nn.Module] | None:
    """The inner module, when calling it on one tensor is what ``td_module(tensor)`` does.

    That is a plain ``TensorDictModule`` with one positional in-key and one out-key (what
    :func:`wrap_module` builds around a plain model). Its tensor call packs the tensor into a
    TensorDict, runs the module and unpacks the output (~17 µs on a CPU); :func:`_direct_call`
    does the same with the module's output alone.
    """
    if type(td_module) is not TensorDictModule or td_module._kwargs is not None:
        return None
    if len(td_module.in_keys) != 1 or len(td_module.out_keys) != 1 or td_module.out_keys[0] == "_":
        return None
    return td_module, td_module.module


def _unhooked(module: nn.Module) -> bool:
    """No hook on ``module`` itself nor global module hooks: skipping its ``__call__`` changes nothing."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _direct_call(module: nn.Module, x: Any, out_key: Any) -> Any:
    """``module(x)`` with ``TensorDictModule``'s one-out-key tensor-call conventions on the output."""
    out = module(x)
    if isinstance(out, torch.Tensor):
        return out
    if out is None:
        out = ()
    if isinstance(out, (dict, TensorDictBase)) and out_key in out:
        out = out[out_key]
    if isinstance(out, tuple):
        if len(out) > 1:
            raise RuntimeError(
                f"There are more tensors (len(tensors)={len(out)}) than out_keys (out_keys=[{out_key!r}])."
            )
        if not out:
            raise RuntimeError("There are more out_keys than tensors.")
        out = out[0]
    return TensorDict.from_any(out)


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
        self.in_keys = list(in_keys) if in_keys is not None else list(td_module.in_keys)
        self.out_keys = list(out_keys) if out_keys is not None else list(td_module.out_keys)
        self.__dict__["_hooking_context"] = hooking_context
        self.__dict__["_relative_path"] = relative_path
        self.__dict__["_call_chain"] = None
        self.__dict__["_direct"] = _direct_module(td_module)

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

    def inplace_modules(self) -> list[nn.Module]:
        """Submodules of the user model that modify their input in place (``inplace=True``), found once."""
        found = self.__dict__.get("_inplace")
        if found is None:
            found = [
                m
                for m in self.root.modules()
                # TensorDictModule's `inplace` means "write outputs into the input TensorDict"
                if getattr(m, "inplace", False) is True and not isinstance(m, TensorDictModuleBase)
            ]
            self.__dict__["_inplace"] = found
        return found

    # -- call ----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.hooking_context
        if ctx is not None:
            if not ctx.is_active:
                raise ContextStateError(
                    "Contextual HookedModule must be called in context: this module's `with` block has "
                    "exited. Call it inside `with ...prepare(model) as hooked:`."
                )
            if ctx._thread != threading.get_ident():
                raise ConcurrencyError(
                    f"This hooked module's context was entered in thread {ctx._thread}, but it is called from "
                    f"thread {threading.get_ident()}. A context's hooks act only in the thread that entered "
                    "it: enter a context (prepare(model)) in each thread instead of sharing the hooked module."
                )
        chain = self.__dict__["_call_chain"]
        if args and isinstance(args[0], TensorDictBase):
            if chain is not None:
                return chain(args[0], *args[1:], **kwargs)
            return self._call_model(args[0], *args[1:], **kwargs)
        if "tensordict" in kwargs and isinstance(kwargs["tensordict"], TensorDictBase):
            td = kwargs.pop("tensordict")
            return chain(td, **kwargs) if chain is not None else self._call_model(td, **kwargs)
        if chain is not None and ctx is not None and ctx.factory._needs_tensordict:
            raise InvalidInputError(
                f"{type(ctx.factory).__name__} needs a TensorDict input, got "
                f"{', '.join(type(a).__name__ for a in args) or 'keyword arguments'}. "
                f"Build one: TensorDict({{{self.in_keys[0]!r}: x}}, batch_size=x.shape[:1])."
            )
        for i, arg in enumerate(args):
            _check_dtype(self, i, arg)
        direct = self.__dict__["_direct"]
        if direct is not None and len(args) == 1 and not kwargs and _unhooked(direct[0]):
            return _direct_call(direct[1], args[0], direct[0].out_keys[0])
        return self.td_module(*args, **kwargs)

    def _call_model(self, td: TensorDictBase, *args: Any, **kwargs: Any) -> TensorDictBase:
        """Run the TensorDict-level model on ``td`` after checking its input keys and dtypes."""
        td_module = self.td_module
        needed = td_module.in_keys
        present = td.keys(include_nested=True)
        if any(k not in present for k in needed):
            _keys.check_keys(td, needed)
        for key in needed:
            _check_dtype(self, key, td.get(key))
        return td_module(td, *args, **kwargs)

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
        if ctx._managed:
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
        """The submodule at ``key``, with a warning when it is a ModuleList (never called itself)."""
        module = self.resolve(key, relative=relative)
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
        ``f"{cache_key}#{k}"`` (see :func:`~tdhook._core.hooks.call_key`).

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
        self._store_ref = MutableWeakRef(self._store)  # one weak reference shared by the run's proxies
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
        inplace = self._module.inplace_modules()
        self._calls = ForwardState(track_storage=bool(inplace))
        for module in inplace:  # copy held values just before an in-place module modifies them
            self._handles.append(register(module, self._calls.before_inplace, HookDirection.FWD_PRE))
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        calls = self._calls
        assert calls is not None
        finished = False
        calls.begin()
        try:
            if torch.is_grad_enabled() == self._grad_enabled:  # skip the grad-mode switch when it is a no-op
                self._callback(self._module, self._data)
            else:
                with torch.set_grad_enabled(self._grad_enabled):
                    self._callback(self._module, self._data)
            finished = True
        except EarlyStoppingException:
            finished = True
        finally:
            self._active = False
            try:
                calls.end(check=finished)  # raises InPlaceModificationError for a modified stored value
            finally:
                self._handles.remove()
        self._mirror_store()  # ``cache`` read inside the body: bring it up to date

    def _store_hook(
        self,
        key: str,
        cache_key: Any,
        callback: Callable[..., Any] | None,
        direction: HookDirection,
        prepend: bool,
        relative: bool,
    ) -> CacheProxy:
        """Register a hook writing ``key``'s value to the run's dict; the hot path of ``get``/``save``."""
        if callback is not None:
            check_callback(callback, direction, ("key", "direction"))
        thread = None if direction.is_backward else self._thread
        hook = StoringHook(cache_key, self._store, direction, callback, self._calls, thread)
        module = self._module._hook_target(key, relative)
        self._handles.append(register(module, hook, direction, prepend=prepend))
        return CacheProxy(cache_key, self._store_ref)

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
        self._check("get")
        direction = HookDirection.parse(direction)
        if self._cache is None:
            cache_key = cache_key or f"{key}_{direction.value_type}"
            return self._store_hook(key, cache_key, callback, direction, prepend, relative)
        handle, proxy = self._module._get(
            self._cache, key, cache_key, callback, direction, prepend, relative, self._calls, self._thread
        )
        self._handles.append(handle)
        return proxy

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
        self._check("save")
        direction = HookDirection.parse(direction)
        cache = self._outer_cache if self._outer_cache is not None else self._cache
        cache_key = cache_key or f"{self._name}{self._sep}{key}_{direction.value_type}"
        if cache is None:
            return self._store_hook(key, cache_key, callback, direction, prepend, relative)
        handle, proxy = self._module._get(
            cache, key, cache_key, callback, direction, prepend, relative, self._calls, self._thread
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
            self._module._set(key, value, callback, direction, prepend, relative, self._calls, self._thread)
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


class HookingContextFactory:
    """Base class of every method: configure in ``__init__``, bind with :meth:`prepare`.

    Subclasses override :meth:`_plan` (what to hook or edit) and, for methods that run the model
    in a particular way (several passes, gradients...), :meth:`_call`.
    """

    _hooking_context_class: type[HookingContext]
    _hooked_module_class: type[HookedModule] = HookedModule
    #: True for methods whose ``_call`` needs a TensorDict (tensor calls are refused).
    _needs_tensordict = False
    #: True for methods that keep no per-call state on the instance, so that one instance may be
    #: active in contexts of several threads at once; others refuse a second thread.
    _thread_safe = False

    def prepare(
        self,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        return_context: bool = True,
    ) -> Any:
        """Bind this method to ``module``.

        Args:
            module: A plain ``nn.Module`` (read from ``"input"``, written to ``"output"`` unless
                ``in_keys``/``out_keys`` say otherwise) or a ``TensorDictModuleBase`` (its keys;
                ``in_keys``/``out_keys`` may select a subset).
            in_keys: Input keys (or a ``{kwarg: key}`` dict for a plain module).
            out_keys: Output keys.
            return_context: When False, enter immediately and return the hooked module; call
                ``hooked.restore()`` to undo.

        Returns:
            A lazy :class:`HookingContext`, or the :class:`HookedModule` when
            ``return_context=False``.
        """
        td_module, extra, ins, outs = wrap_module(module, in_keys, out_keys)
        context = self._hooking_context_class(self, td_module, extra, ins, outs)
        if return_context:
            return context
        hooked = context.__enter__()
        context._managed = False
        return hooked

    # -- extension points ------------------------------------------------------------------------
    def _plan(self, hooked: HookedModule) -> Iterable[Installable]:
        """Return what to install on the model (hooks, reversible edits). Called once per enter."""
        if type(self)._hook_module is not HookingContextFactory._hook_module:
            return [_Deferred(functools.partial(self._hook_module, hooked))]
        return ()

    def _hook_module(self, hooked: HookedModule) -> Any:
        """Legacy extension point (tdhook 0.1): register hooks and return a removable handle."""
        return HandleGroup()

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        """Run one call. The default runs the model once on ``td``."""
        return call_next(td, **kwargs)

    def _enter(self, context: HookingContext) -> None:
        """Per-enter state set-up (before the plan is built)."""

    def _exit(self, context: HookingContext) -> None:
        """Per-exit state tear-down (after the plan is undone)."""


# --------------------------------------------------------------------------------------------
# Threads: which contexts are active on which model, from which thread
# --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
#: id(model root) -> [(context, thread, exclusive)] for every active context on that model.
_ACTIVE: dict[int, list[tuple[HookingContext, int, bool]]] = {}
#: id(factory) -> {thread: number of active contexts of that factory in the thread}.
_FACTORY_THREADS: dict[int, dict[int, int]] = {}


def _edits_or_backward(item: Installable) -> bool:
    """True for what cannot be confined to one thread: backward hooks (autograd's threads).

    Weight edits are not confined either, but compose across threads by themselves (their
    owners keep a stack of edits, or refuse a second thread, as LRP does).
    """
    return isinstance(item, HookSpec) and item.direction.is_backward


def _gate(item: Installable, thread: int, tracker: CallTracker) -> Installable:
    """A forward hook that acts only in ``thread`` (and runs once per forward if ``once``); others unchanged."""
    if isinstance(item, HookSpec) and not item.direction.is_backward:
        hook = ThreadGate(item.hook, thread, tracker if item.once else None)
        if type(item) is HookSpec:  # dataclasses.replace costs ~5 µs a spec
            return HookSpec(item.module, hook, item.direction, item.prepend, item.once)
        return dataclasses.replace(item, hook=hook)
    return item


def _claim_factories(factories: Sequence[HookingContextFactory], thread: int) -> None:
    with _LOCK:
        for f in factories:
            others = [t for t in _FACTORY_THREADS.get(id(f), {}) if t != thread]
            if others and not f._thread_safe:
                raise ConcurrencyError(
                    f"This {type(f).__name__} instance is already active in a context of another thread "
                    f"({others[0]}); it keeps per-call state, which two threads would mix. Create one "
                    f"{type(f).__name__}(...) per thread."
                )
        for f in factories:
            counts = _FACTORY_THREADS.setdefault(id(f), {})
            counts[thread] = counts.get(thread, 0) + 1


def _release_factories(factories: Sequence[HookingContextFactory], thread: int | None) -> None:
    with _LOCK:
        for f in factories:
            counts = _FACTORY_THREADS.get(id(f))
            if counts is None or thread not in counts:
                continue
            counts[thread] -= 1
            if counts[thread] <= 0:
                del counts[thread]
            if not counts:
                del _FACTORY_THREADS[id(f)]


def _model_id(root: nn.Module) -> int:
    """The registry key of a model: the module a plain ``TensorDictModule`` wraps, else the module."""
    return id(root.module) if type(root) is TensorDictModule else id(root)


def _claim_model(context: HookingContext, root: nn.Module, thread: int, exclusive: bool) -> None:
    with _LOCK:
        entries = _ACTIVE.setdefault(_model_id(root), [])
        for other, other_thread, other_exclusive in entries:
            if other_thread != thread and (exclusive or other_exclusive):
                editing = context if exclusive else other
                raise ConcurrencyError(
                    f"{type(root).__name__} already has an active {type(other.factory).__name__} context "
                    f"from another thread ({other_thread}), and {type(editing.factory).__name__} uses backward "
                    "hooks, which autograd may run in any thread. Use one model copy "
                    "per thread (copy.deepcopy(model)), or run the two contexts one after the other."
                )
        entries.append((context, thread, exclusive))


def _release_model(context: HookingContext, root: nn.Module | None) -> None:
    if root is None:
        return
    with _LOCK:
        entries = _ACTIVE.get(_model_id(root))
        if entries is None:
            return
        entries[:] = [e for e in entries if e[0] is not context]
        if not entries:
            del _ACTIVE[_model_id(root)]


def check_no_foreign_exclusive(root: nn.Module) -> None:
    """Refuse to run ``root`` while another thread holds a context with backward hooks on it."""
    if not _ACTIVE:
        return
    thread = threading.get_ident()
    with _LOCK:
        entries = list(_ACTIVE.get(_model_id(root), ()))
    for other, other_thread, exclusive in entries:
        if exclusive and other_thread != thread:
            raise ConcurrencyError(
                f"{type(root).__name__} has backward hooks of a {type(other.factory).__name__} context of another "
                f"thread ({other_thread}); a run now could trigger them. Wait for that context to exit, or use "
                "one model copy per thread."
            )


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

    def _factories(self) -> list[HookingContextFactory]:
        return [self.factory]

    def __enter__(self) -> HookedModule:
        if self.is_active:
            raise ContextStateError("Cannot enter context twice")
        factory = self.factory
        hooked = factory._hooked_module_class(
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

    def _build_chain(self, hooked: HookedModule) -> Callable[..., Any] | None:
        chain: Callable[..., Any] = hooked._call_model
        custom = False
        for f in reversed(self._factories()):
            if type(f)._call is not HookingContextFactory._call:
                custom = True
            chain = functools.partial(f._call, hooked, call_next=chain)
        return chain if custom else None

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
        cache = getattr(factory, "_cache", None) if cache is None else cache
        clear_cache = getattr(factory, "_clear_cache", clear_cache)
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


HookingContextFactory._hooking_context_class = HookingContext


class _CompositeContext(HookingContextWithCache):
    """The context of a :class:`CompositeHookingContextFactory`: every component, one cache."""

    def _factories(self) -> list[HookingContextFactory]:
        return list(self.factory.factories)  # type: ignore[attr-defined]


def _flatten_factories(factories: Iterable[Any]) -> list[HookingContextFactory]:
    flat: list[HookingContextFactory] = []
    for f in factories:
        if isinstance(f, CompositeHookingContextFactory):
            flat.extend(f.factories)
        elif isinstance(f, HookingContextFactory):
            flat.append(f)
        else:
            raise InvalidInputError(
                f"CompositeHookingContextFactory takes method instances, got {type(f).__name__}. "
                "Pass configured methods, e.g. CompositeHookingContextFactory(SteeringVectors(...), ActivationCaching(...))."
            )
    return flat


def _most_derived_module_class(factories: Sequence[HookingContextFactory]) -> type[HookedModule]:
    """The one hooked-module class that is a subclass of every component's class."""
    chosen: type[HookedModule] = HookedModule
    for f in factories:
        cls = f._hooked_module_class
        if issubclass(cls, chosen):
            chosen = cls
        elif not issubclass(chosen, cls):
            names = sorted({type(g).__name__ + " -> " + g._hooked_module_class.__name__ for g in factories})
            raise ValueError(
                f"Cannot compose methods that need unrelated hooked-module classes ({', '.join(names)}). "
                "Use them in nested `with` blocks instead, or subclass one hooked-module class from the other."
            )
    return chosen


class CompositeHookingContextFactory(HookingContextFactory):
    """Several methods in one context: hook-only and pipeline methods, in one forward pass.

    Order, deterministic and documented:

    1. **Calls.** Every component's ``_call`` wraps the next one's: the *first* factory is the
       outermost, the last one's ``call_next`` runs the model. A pipeline method that runs the
       model several times (patching: clean then patched run; ActivationAddition: positive then
       negative run) runs everything after it in the list that many times.
    2. **Hooks.** Plans are built and installed in the given order, so hooks on the same module
       fire in that order, each seeing the value left by the previous ones (a cache listed after
       a steering method on the same module stores the steered output). Reversible edits
       (pruning, task vectors) are undone in reverse order at exit, also after an exception.
    3. **Runs.** The hooks of every component fire in every model run, including the extra
       runs of a pipeline method: steering applies to the clean and the patched runs, and a
       cache holds the values of the last run (the patched one).

    The context has a ``.cache`` shared with caching components. Nested composites are
    flattened. The hooked module is the most derived class the components need (e.g.
    ``HookedModuleWithAdapters`` when ``Adapters`` is one of them).

    Args:
        *factories: The methods to compose (configured instances).

    Raises:
        ValueError: With no factory, or with components needing unrelated hooked-module classes.
        InvalidInputError: If an argument is not a method instance.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> composite = CompositeHookingContextFactory(
        ...     SteeringVectors(["0"], vectors={"0": torch.ones(4)}), ActivationPatching(["1"]), ActivationCaching("2")
        ... )
        >>> td = TensorDict({"input": torch.randn(2, 3), ("patched", "input"): torch.randn(2, 3)}, batch_size=[2])
        >>> with composite.prepare(model) as hooked:
        ...     td = hooked(td)
        >>> sorted(hooked.hooking_context.cache.keys())
        ['2']
    """

    _hooking_context_class = _CompositeContext

    def __init__(self, *factories: HookingContextFactory) -> None:
        if not factories:
            raise ValueError(
                "CompositeHookingContextFactory needs at least one factory, e.g. "
                "CompositeHookingContextFactory(SteeringVectors(...), ActivationCaching(...))."
            )
        flat = _flatten_factories(factories)
        self._factories = tuple(flat)
        self._needs_tensordict = any(f._needs_tensordict for f in flat)
        self._hooked_module_class = _most_derived_module_class(flat)

    @property
    def factories(self) -> tuple[HookingContextFactory, ...]:
        """The components, in call and installation order (nested composites flattened)."""
        return self._factories

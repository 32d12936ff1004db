"""The hook core: hook points, registration, handle groups and the hook values methods build.

This is the only module that calls torch's ``register_*_hook`` APIs. Methods *describe* what to
hook with :class:`HookSpec` values (or any :class:`Installable`); :func:`install` registers them
and returns one :class:`HandleGroup` that removes everything in reverse order, idempotently.

Hooks are small frozen callables (no closures over loop variables), so the module key a hook
reports is the key it was built for.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import FunctionType
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import (
    ContextStateError,
    DeadReferenceError,
    HookSignatureError,
    InPlaceModificationError,
    InvalidDirectionError,
    InvalidInputError,
    MultipleCallError,
)

__all__ = [
    "CacheProxy",
    "CachingHook",
    "CallTracker",
    "EarlyStoppingException",
    "HandleGroup",
    "HookDirection",
    "HookSpec",
    "HookValueError",
    "Installable",
    "MutableWeakRef",
    "ReadingHook",
    "SettingHook",
    "StoppingHook",
    "StoringHook",
    "TensorDictRef",
    "ThreadGate",
    "call_key",
    "check_cache",
    "check_callback",
    "check_hook_signature",
    "check_keywords",
    "declared_keywords",
    "install",
    "nested_storable",
    "register",
]


class HookDirection(str, Enum):
    """Where a hook fires. The values are the reference's strings (``"fwd"``, ``"bwd"``...)."""

    FWD = "fwd"
    FWD_KWARGS = "fwd_kwargs"
    FWD_PRE = "fwd_pre"
    FWD_PRE_KWARGS = "fwd_pre_kwargs"
    BWD = "bwd"
    BWD_PRE = "bwd_pre"

    @classmethod
    def parse(cls, value: str | HookDirection) -> HookDirection:
        """Convert a user-facing string (or a member) to a member.

        Raises:
            InvalidDirectionError: For an unknown value; the message lists the valid ones.
        """
        if isinstance(value, cls):
            return value
        try:
            return _BY_VALUE[value]  # a dict look-up: Enum's own cls(value) costs ~0.4 µs a call
        except (KeyError, TypeError):
            raise InvalidDirectionError(
                f"Invalid direction: {value!r}. Expected one of {[d.value for d in cls]}."
            ) from None

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the torch hook's positional parameters."""
        return _PARAMS[self]

    @property
    def value_param(self) -> str:
        """Name of the hook parameter holding the value a hook reads or replaces (``output``...)."""
        return _PARAMS[self][_VALUE_INDEX[self]]

    @property
    def value_type(self) -> str:
        """Suffix of default cache keys: ``output``, ``input``, ``grad_input`` or ``grad_output``."""
        return _TYPE[self]

    @property
    def is_backward(self) -> bool:
        return self in (HookDirection.BWD, HookDirection.BWD_PRE)


_PARAMS = {
    HookDirection.FWD: ("module", "args", "output"),
    HookDirection.FWD_KWARGS: ("module", "args", "kwargs", "output"),
    HookDirection.FWD_PRE: ("module", "args"),
    HookDirection.FWD_PRE_KWARGS: ("module", "args", "kwargs"),
    HookDirection.BWD: ("module", "grad_input", "grad_output"),
    HookDirection.BWD_PRE: ("module", "grad_output"),
}
# Index (in the hook's positional arguments) of the value a hook reads or replaces.
_VALUE_INDEX = {
    HookDirection.FWD: 2,
    HookDirection.FWD_KWARGS: 3,
    HookDirection.FWD_PRE: 1,
    HookDirection.FWD_PRE_KWARGS: 1,
    HookDirection.BWD: 1,  # grad_input (tdhook 0.1 read grad_output here, against its own key suffix)
    HookDirection.BWD_PRE: 1,
}
_FWD = HookDirection.FWD
_BY_VALUE: dict[str, HookDirection] = {d.value: d for d in HookDirection}
_TYPE = {
    HookDirection.FWD: "output",
    HookDirection.FWD_KWARGS: "output",
    HookDirection.FWD_PRE: "input",
    HookDirection.FWD_PRE_KWARGS: "input",
    HookDirection.BWD: "grad_input",
    HookDirection.BWD_PRE: "grad_output",
}


class HookValueError(ContextStateError):
    """A hook produced a value that cannot replace the original one."""


class EarlyStoppingException(Exception):
    """Raised by a stopping hook to end a forward pass early (swallowed by ``run``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Early stopping triggered for key {key}")
        self.key = key


def register(
    module: nn.Module, hook: Callable[..., Any], direction: HookDirection, *, prepend: bool = False
) -> RemovableHandle:
    """Register ``hook`` on ``module`` at ``direction`` and return torch's removable handle."""
    if direction is _FWD:  # the common case first, without enum attribute look-ups
        return module.register_forward_hook(hook, prepend=prepend)
    if direction is HookDirection.FWD_KWARGS:
        return module.register_forward_hook(hook, prepend=prepend, with_kwargs=True)
    if direction is HookDirection.FWD_PRE:
        return module.register_forward_pre_hook(hook, prepend=prepend)
    if direction is HookDirection.FWD_PRE_KWARGS:
        return module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=True)
    if direction is HookDirection.BWD:
        return module.register_full_backward_hook(hook, prepend=prepend)
    if direction is HookDirection.BWD_PRE:
        return module.register_full_backward_pre_hook(hook, prepend=prepend)
    raise InvalidDirectionError(f"Invalid direction: {direction!r}")


@runtime_checkable
class Installable(Protocol):
    """Anything a method does to a model: ``install()`` does it and returns an undo handle."""

    def install(self) -> Any: ...


@dataclass(frozen=True)
class HookSpec:
    """A description of one hook: which module, which hook point, which callable.

    ``once=True`` (forward directions, inside a hooking context) declares that the hook needs
    the module to run at most once per forward pass: a second call of the module in the same
    forward raises :class:`~tdhook.errors.MultipleCallError` instead of silently mixing calls
    (e.g. layer attribution to a module that is applied twice).
    """

    module: nn.Module
    hook: Callable[..., Any]
    direction: HookDirection = HookDirection.FWD
    prepend: bool = False
    once: bool = False

    def install(self) -> RemovableHandle:
        return register(self.module, self.hook, self.direction, prepend=self.prepend)


class HandleGroup:
    """Removable handles (hooks and edits), removed in reverse order, idempotently.

    Also a context manager, and ``a + b`` concatenates two groups (tdhook 0.1's
    ``MultiHookHandle``).
    """

    __slots__ = ("_handles",)

    def __init__(self, handles: Iterable[Any] | None = None) -> None:
        self._handles: list[Any] = list(handles or [])

    def append(self, handle: Any) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        """Remove every handle, last installed first. Errors are re-raised after all ran."""
        first_error: BaseException | None = None
        while self._handles:
            handle = self._handles.pop()
            try:
                handle.remove()
            except BaseException as err:  # keep undoing the rest
                first_error = first_error or err
        if first_error is not None:
            raise first_error

    def __len__(self) -> int:
        return len(self._handles)

    def __add__(self, other: HandleGroup) -> HandleGroup:
        if not isinstance(other, HandleGroup):
            raise TypeError(f"Can only add a HandleGroup to a HandleGroup, got {type(other).__name__}")
        return HandleGroup(self._handles + other._handles)

    def __enter__(self) -> HandleGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install(items: Iterable[Installable]) -> HandleGroup:
    """Install every item in order; if one fails, undo those already installed and re-raise."""
    group = HandleGroup()
    try:
        for item in items:
            group.append(item.install())
    except BaseException:
        group.remove()
        raise
    return group


# --------------------------------------------------------------------------------------------
# Hook signatures (spec §4.1), checked when a user hook is registered
# --------------------------------------------------------------------------------------------


def check_hook_signature(hook: Callable[..., Any], direction: HookDirection) -> None:
    """Check at registration that torch can call ``hook`` with the direction's positional arguments.

    torch calls a hook with ``len(direction.params)`` positional arguments (e.g. ``module, args,
    output`` for ``"fwd"``). A hook without ``*args`` must have exactly that many positional
    parameters without a default (parameters with a default and ``**kwargs`` are not counted);
    one with ``*args`` must not require more. Keyword-only parameters must have a default.

    Raises:
        HookSignatureError: With the expected signature, when the hook cannot be called so.
    """
    if not callable(hook):
        raise HookSignatureError(
            f"Hook ({direction.value}) must be callable, got {type(hook).__name__} {hook!r}."
        )
    if type(hook) in _INTERNAL_HOOKS:
        return
    memo = (hook.__code__, direction) if type(hook) is FunctionType and not hook.__dict__ else None
    if memo is not None and memo in _CHECKED:
        return
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    n = len(direction.params)
    expected = f"({', '.join(direction.params)})"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    var_args = any(p.kind is p.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if kw_required:
        raise HookSignatureError(
            f"Hook ({direction.value}) must have the signature {expected}; {hook!r} also requires the "
            f"keyword-only parameters {kw_required}, which torch never passes. Give them defaults."
        )
    if var_args:
        if len(required) > n:
            raise HookSignatureError(
                f"Hook ({direction.value}) must have at most {n} positional parameters without a default, "
                f"got {len(required)} ({[p.name for p in required]}) in {hook!r}. Expected {expected}."
            )
    elif len(required) != n:
        raise HookSignatureError(
            f"Hook ({direction.value}) must have the signature {expected}: {n} positional parameters, got "
            f"{len(required)} ({[p.name for p in required]}) in {hook!r}. Example: "
            f"`def hook{expected}: ...`, or `def hook(*args): ...`."
        )
    _remember(memo)


# --------------------------------------------------------------------------------------------
# Per-forward bookkeeping: repeated calls, in-place protection, threads
# --------------------------------------------------------------------------------------------


def call_key(key: Any, index: int) -> Any:
    """The key under which call ``index`` (from 0) of a module within one forward is stored.

    The first call keeps ``key``; later calls get ``#<index>`` appended to the key's last part:
    ``"fc"``, ``"fc#1"``, ``"fc#2"``... and ``("fwd", "fc#1")`` for tuple keys.
    """
    if index == 0:
        return key
    if isinstance(key, tuple):
        return (*key[:-1], f"{key[-1]}#{index}")
    return f"{key}#{index}"


def _storage_id(tensor: torch.Tensor) -> int | None:
    """Where the tensor's data starts (a tenth of the cost of ``untyped_storage().data_ptr()``).

    A stored view at another offset of the modified tensor is not matched: it is then caught by
    the version check at the end of the forward instead (a clear error, never a silent change).
    """
    try:
        return tensor.data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, meta, functional tensors...
        return None


class _Held:
    """A stored tensor that aliases an activation, with its version when it was stored."""

    __slots__ = ("container", "key", "label", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int, container: Any, key: Any, label: Any) -> None:
        self.tensor = tensor
        self.version = version
        self.container = container
        self.key = key
        self.label = label


class ForwardState:
    """What one forward pass (or one deferred run) of one thread has stored and counted.

    * ``index(hook)`` counts the calls of a hook within the forward (0 for the first), so that
      a module called twice is stored twice (see :func:`call_key`).
    * ``hold(...)`` remembers a stored tensor that aliases an activation, with its version
      counter. Before an in-place module (``nn.ReLU(inplace=True)``...) modifies a held tensor,
      :meth:`before_inplace` copies it (only then: the copy costs nothing when no in-place module
      touches the value); at the end of the forward, :meth:`end` checks that no other in-place
      operation (``x += 1``, ``x.relu_()`` in a ``forward``) modified a held tensor, and raises
      :class:`~tdhook.errors.InPlaceModificationError` if one did.
    """

    __slots__ = ("counts", "depth", "held", "pending", "track_storage")

    def __init__(self, track_storage: bool = False) -> None:
        self.depth = 0
        self.counts: dict[int, int] = {}
        self.held: list[_Held] = []
        self.pending: dict[int, list[_Held]] = {}
        #: True when in-place modules are hooked to copy held values just in time.
        self.track_storage = track_storage

    def state(self) -> ForwardState:
        return self

    def begin(self) -> None:
        self.depth += 1
        if self.depth == 1 and (self.counts or self.held):  # left over from an interrupted forward
            self.counts, self.held, self.pending = {}, [], {}

    def end(self, check: bool = True) -> None:
        if self.depth > 1:
            self.depth -= 1
            return
        self.depth = 0
        if self.counts or self.held:
            held, self.held, self.pending, self.counts = self.held, [], {}, {}
            if check:
                _check_versions(held)

    def index(self, hook: Any) -> int:
        """The number of earlier calls of ``hook`` in the current forward (0 outside a forward)."""
        if self.depth == 0:
            return 0
        counts = self.counts
        n = counts.get(id(hook), 0)
        counts[id(hook)] = n + 1
        return n

    def hold(self, tensor: Any, container: Any, key: Any, label: Any) -> None:
        """Remember that ``container[key]`` holds ``tensor``, an activation the model may still modify."""
        if self.depth == 0 or not isinstance(tensor, torch.Tensor) or tensor.is_inference():
            return
        held = _Held(tensor, tensor._version, container, key, label)
        self.held.append(held)
        if self.track_storage:
            sid = _storage_id(tensor)
            if sid is not None:
                self.pending.setdefault(sid, []).append(held)

    def before_inplace(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of an in-place module: copy the held tensors it is about to modify."""
        if not self.pending:
            return
        for arg in args if isinstance(args, tuple) else (args,):
            if not isinstance(arg, torch.Tensor):
                continue
            sid = _storage_id(arg)
            for held in self.pending.pop(sid, ()) if sid is not None else ():
                if held.tensor._version == held.version:
                    copy = held.tensor.clone()
                    held.container[held.key] = copy
                    held.tensor, held.version = copy, copy._version


def _check_versions(held: list[_Held]) -> None:
    changed = [h.label for h in held if h.tensor._version != h.version]
    if changed:
        raise InPlaceModificationError(
            f"The stored activation(s) {changed} were modified in place after their hook stored them (an "
            "in-place operation later in the forward, such as `x += ...` or `x.relu_()`), so the stored "
            "values are not the modules' outputs. Store a copy with a callback, e.g. "
            "`callback=lambda output, **_: output.clone()`, or make the later operation out of place."
        )


class CallTracker:
    """A :class:`ForwardState` per thread, for the hooks of one hooking context.

    The context installs :meth:`forward_pre_hook` and :meth:`forward_hook` on the model's root,
    so every forward (through the hooked module or a plain ``model(x)`` inside the context)
    starts and ends one state.
    """

    __slots__ = ("__weakref__", "_local", "track_storage")

    def __init__(self, track_storage: bool = False) -> None:
        self._local = threading.local()
        self.track_storage = track_storage

    def state(self) -> ForwardState:
        local = self._local
        try:
            return local.state
        except AttributeError:
            local.state = ForwardState(self.track_storage)
            return local.state

    def forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        self.state().begin()

    def forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # An always-call hook: on an exception (or an early stop) the output is None; stored values
        # then come from modules that had finished, so only the counters are reset.
        self.state().end(check=output is not None)

    def before_inplace(self, module: nn.Module, args: Any) -> None:
        self.state().before_inplace(module, args)


@dataclass(frozen=True)
class RootHooks:
    """Installable: the tracker's hooks on the model root (first pre-hook, last always-call hook)."""

    root: nn.Module
    tracker: CallTracker

    def install(self) -> HandleGroup:
        group = HandleGroup()
        group.append(self.root.register_forward_pre_hook(self.tracker.forward_pre_hook, prepend=True))
        group.append(self.root.register_forward_hook(self.tracker.forward_hook, always_call=True))
        return group


@dataclass(slots=True)
class ThreadGate:
    """A forward hook that acts only in the thread that installed it (a no-op in other threads).

    With ``calls`` (a :class:`CallTracker`), the wrapped hook refuses a second call of its module
    within one forward (see :attr:`HookSpec.once`).
    """

    hook: Callable[..., Any]
    thread: int
    calls: CallTracker | None = None

    def __call__(self, *args: Any) -> Any:
        if threading.get_ident() != self.thread:
            return None
        if self.calls is not None and self.calls.state().index(self):
            label = getattr(self.hook, "key", None) or getattr(self.hook, "module_key", None)
            label = label if label is not None else type(args[0]).__name__
            raise MultipleCallError(
                f"Module {label!r} ran more than once in one forward pass, but {type(self.hook).__name__} needs "
                "one activation per forward (e.g. layer attribution). Hook a module that runs once (e.g. a "
                "wrapper applied once), or split the repeated use into distinct modules."
            )
        return self.hook(*args)


def check_cache(cache: Any, name: str = "cache") -> None:
    """Refuse a cache that hooks cannot write to (before any hook is installed).

    Raises:
        InvalidInputError: Unless ``cache`` is a TensorDict, a :class:`MutableWeakRef` or a
            :class:`TensorDictRef`.
    """
    if not isinstance(cache, (TensorDictBase, MutableWeakRef, TensorDictRef)):
        raise InvalidInputError(
            f"{name} must be a TensorDict (or a MutableWeakRef/TensorDictRef to one), got "
            f"{type(cache).__name__} {cache!r}. Pass e.g. {name}=TensorDict()."
        )


# --------------------------------------------------------------------------------------------
# References and proxies
# --------------------------------------------------------------------------------------------


class MutableWeakRef:
    """A weak reference whose target can be changed (``resolve()``/``set()``)."""

    __slots__ = ("__weakref__", "_ref")

    def __init__(self, obj: Any) -> None:
        self._ref = weakref.ref(obj)

    def resolve(self) -> Any:
        return self._ref()

    def set(self, obj: Any) -> None:
        self._ref = weakref.ref(obj)


class TensorDictRef:
    """A strong reference with the same interface as :class:`MutableWeakRef`."""

    __slots__ = ("__weakref__", "_obj")

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def resolve(self) -> Any:
        return self._obj

    def set(self, obj: Any) -> None:
        self._obj = obj


def _resolve_cache(cache: Any) -> TensorDictBase:
    if isinstance(cache, TensorDictBase):
        return cache
    resolved = cache.resolve()
    if resolved is None:
        raise DeadReferenceError(
            "Dead reference to cache: the TensorDict it pointed to was garbage-collected. Keep the cache "
            "TensorDict alive (hold a variable to it) while hooks write to it."
        )
    return resolved


class CacheProxy:
    """A lazy handle on ``cache[key]``: ``resolve()`` returns the value once a hook wrote it.

    The cache is held weakly (keep it alive yourself); ``resolve()`` returns ``None`` before the
    value is written.
    """

    __slots__ = ("_cache", "key")

    def __init__(self, key: Any, cache: Any) -> None:
        self.key = key
        self._cache = cache if isinstance(cache, (MutableWeakRef, TensorDictRef)) else MutableWeakRef(cache)

    def resolve(self) -> Any:
        cache = self._cache.resolve()
        if cache is None:
            raise DeadReferenceError(
                "Dead reference to cache: keep the cache TensorDict alive while using proxies."
            )
        return cache.get(self.key, None)

    def __repr__(self) -> str:
        return f"CacheProxy(key={self.key!r})"


# --------------------------------------------------------------------------------------------
# Callback validation and the hook values
# --------------------------------------------------------------------------------------------


def check_callback(
    callback: Callable[..., Any] | None, direction: HookDirection, extra: Iterable[str] = ()
) -> None:
    """Check at registration that ``callback`` can receive the hook's arguments by keyword.

    Raises:
        HookSignatureError: For positional-only parameters, or when a hook parameter (or one of
            ``extra``) is neither named nor absorbed by ``**kwargs``.
    """
    if callback is None:
        return
    # inspect.signature costs ~5 µs, on every set(callback=...) of a run. A plain function's
    # parameters are fixed by its code object (lambdas re-created at one place share it), so a
    # passed check is remembered per code object; decorated functions (``__wrapped__`` or
    # ``__signature__`` in their ``__dict__``) are checked every time.
    memo = (
        (callback.__code__, direction, tuple(extra))
        if type(callback) is FunctionType and not callback.__dict__
        else None
    )
    if memo is not None and memo in _CHECKED:
        return
    params = _parameters(callback)
    if params is None:  # builtins without signature: trust them
        return
    if any(p.kind is p.POSITIONAL_ONLY for p in params):
        raise HookSignatureError(
            f"Callback {callback!r} cannot have positional-only parameters since we only pass named arguments "
            f"({', '.join(direction.params)}, ...). Example: `lambda output, **_: output[0]`."
        )
    passed = (*direction.params, *extra)
    missing, unknown = _mismatch(params, direction.params, passed)
    if missing or unknown:
        raise HookSignatureError(
            f"Callback missing required parameters: {sorted(missing)}"
            + (f" and requires unknown parameters {sorted(unknown)}" if unknown else "")
            + f". A {direction.value!r} callback receives the keywords {sorted(set(passed))}; add `**_` to ignore the rest."
        )
    _remember(memo)


def check_keywords(fn: Callable[..., Any] | None, names: Sequence[str], what: str) -> None:
    """Check that ``fn`` can be called with exactly the keywords ``names`` (user functions such as
    ``patch_fn`` and ``steer_fn``; the same rule as :func:`check_callback`).

    Raises:
        HookSignatureError: If ``fn`` is not callable, has positional-only parameters, requires a
            parameter not in ``names`` or cannot receive one of ``names``.
    """
    if fn is None:
        return
    if not callable(fn):
        raise HookSignatureError(f"{what} must be callable, got {type(fn).__name__}.")
    params = _parameters(fn)
    if params is None:  # builtins without a signature: trust them
        return
    example = f"`def {what}({', '.join(names)}): ...` (or add `**_` to ignore some)"
    if any(p.kind is p.POSITIONAL_ONLY for p in params):
        raise HookSignatureError(f"{what} cannot have positional-only parameters; it is called as {example}.")
    missing, unknown = _mismatch(params, names, names)
    if unknown or missing:
        detail = []
        if missing:
            detail.append(f"does not accept {[n for n in names if n in missing]}")
        if unknown:
            detail.append(f"requires unknown parameters {sorted(unknown)}")
        raise HookSignatureError(
            f"{what} {' and '.join(detail)}; it receives the keywords {list(names)}. Define it as {example}."
        )


def declared_keywords(fn: Callable[..., Any], available: Sequence[str]) -> tuple[str, ...]:
    """Those of ``available`` that ``fn`` (a module: its ``forward``) declares or absorbs with ``**kwargs``.

    ``fn``'s first positional parameter receives a value positionally, so it is never a keyword.
    """
    params = _parameters(fn.forward if isinstance(fn, nn.Module) else fn)
    if params is None:
        return ()
    first = next((p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    candidates = [name for name in available if name != first]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return tuple(candidates)
    declared = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(name for name in candidates if name in declared)


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """``fn``'s parameters, or None where Python cannot tell (builtins)."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _mismatch(
    params: Iterable[inspect.Parameter], must_accept: Iterable[str], passed: Iterable[str]
) -> tuple[set[str], set[str]]:
    """``(missing, unknown)``: names of ``must_accept`` the parameters cannot receive, and required
    parameters that are not among ``passed``. ``**kwargs`` receives every name."""
    params = list(params)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        missing: set[str] = set()
    else:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        missing = set(must_accept) - names
    required = {
        p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return missing, required - set(passed)


#: Code objects (with direction and extra names) whose callbacks passed :func:`check_callback`.
_CHECKED: set[tuple[Any, ...]] = set()


def _remember(memo: tuple[Any, ...] | None) -> None:
    if memo is None:
        return
    if len(_CHECKED) >= 4096:  # bounded: a program has few callback definitions
        _CHECKED.clear()
    _CHECKED.add(memo)


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
        key = self.key
        n = calls.index(self)
        if n:
            key = call_key(key, n)
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


#: tdhook's own hook classes: their signatures are right by construction (not inspected).
_INTERNAL_HOOKS = frozenset({StoringHook, CachingHook, SettingHook, ReadingHook, StoppingHook, ThreadGate})

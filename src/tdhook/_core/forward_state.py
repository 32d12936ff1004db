"""Per-forward bookkeeping: repeated calls of a module, in-place protection, thread gates.

A :class:`ForwardState` counts the calls of each hook within one forward pass and protects the
values hooks stored from later in-place operations; a :class:`CallTracker` keeps one per thread
for a hooking context; a :class:`ThreadGate` confines a forward hook to one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase
from torch import nn

from ..errors import (
    InPlaceModificationError,
    MultipleCallError,
)
from .directions import HandleGroup, HookDirection, register

__all__ = ["CallTracker", "ForwardState", "RootHooks", "ThreadGate", "call_key", "inplace_modules"]


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


def _modifies_input(module: nn.Module) -> bool:
    """``module.inplace is True`` without ``nn.Module.__getattr__``'s exception for modules that lack it."""
    flag = module.__dict__.get("inplace", _MISSING)
    if flag is _MISSING:
        flag = getattr(type(module), "inplace", False)
        if isinstance(flag, property):  # a computed flag: ask the module
            flag = getattr(module, "inplace", False)
    return flag is True


_MISSING = object()


def inplace_modules(root: nn.Module) -> list[nn.Module]:
    """Submodules of ``root`` that modify their input in place (``nn.ReLU(inplace=True)``...).

    ``TensorDictModule``'s own ``inplace`` (write outputs into the input TensorDict) is not one.
    A look-up per module in its ``__dict__`` (a missing attribute through ``nn.Module.__getattr__``
    raises, which costs ~3 µs a module).
    """
    return [m for m in root.modules() if _modifies_input(m) and not isinstance(m, TensorDictModuleBase)]


def _storage_id(tensor: torch.Tensor) -> int | None:
    """Where the tensor's data starts (a tenth of the cost of ``untyped_storage().data_ptr()``).

    A stored view at another offset of the modified tensor is not matched: it is then caught by
    the version check at the end of the forward instead (a clear error, never a silent change).
    """
    try:
        return tensor.data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, meta, functional tensors...
        return None


# A held value is a list ``[tensor, version, container, key, label]`` (building a list costs a
# third of a Python object with an ``__init__``; this runs once per stored activation).
_TENSOR, _VERSION, _CONTAINER, _KEY, _LABEL = range(5)


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
        self.held: list[list[Any]] = []
        self.pending: dict[int, list[list[Any]]] = {}
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
        if not self.depth or (type(tensor) is not torch.Tensor and not isinstance(tensor, torch.Tensor)):
            return
        if tensor.is_inference():  # no version counter to check
            return
        held = [tensor, tensor._version, container, key, label]
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
                if held[_TENSOR]._version == held[_VERSION]:
                    copy = held[_TENSOR].clone()
                    held[_CONTAINER][held[_KEY]] = copy
                    held[_TENSOR], held[_VERSION] = copy, copy._version


def _check_versions(held: list[list[Any]]) -> None:
    changed = [h[_LABEL] for h in held if h[_TENSOR]._version != h[_VERSION]]
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
        group.append(register(self.root, self.tracker.forward_pre_hook, HookDirection.FWD_PRE, prepend=True))
        group.append(register(self.root, self.tracker.forward_hook, HookDirection.FWD, always_call=True))
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

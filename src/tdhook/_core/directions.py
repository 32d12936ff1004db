"""Hook points and installation: the only place that calls torch's ``register_*_hook`` APIs.

Methods *describe* what to hook with :class:`HookSpec` values (or any :class:`Installable`);
:func:`install` registers them and returns one :class:`HandleGroup` that removes everything in
reverse order, idempotently. :class:`HookDirection` is the one table of hook points.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import (
    InvalidDirectionError,
    InvalidInputError,
)

__all__ = ["HandleGroup", "HookDirection", "HookSpec", "Installable", "install", "register"]


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
_FWD_PRE = HookDirection.FWD_PRE
_BY_VALUE: dict[str, HookDirection] = {d.value: d for d in HookDirection}
_TYPE = {
    HookDirection.FWD: "output",
    HookDirection.FWD_KWARGS: "output",
    HookDirection.FWD_PRE: "input",
    HookDirection.FWD_PRE_KWARGS: "input",
    HookDirection.BWD: "grad_input",
    HookDirection.BWD_PRE: "grad_output",
}


_MODULE_FORWARD_HOOK = nn.Module.register_forward_hook
_MODULE_FORWARD_PRE_HOOK = nn.Module.register_forward_pre_hook


#: The ids of the hooks :func:`_add_hook` puts in a module's table: negative, so that they never
#: meet an id of torch's own counter (``RemovableHandle.next_id``, counting up from 0) in one
#: table, and ``next()`` is one atomic step. Advancing torch's counter instead means writing a
#: class attribute, which also invalidates CPython's attribute caches for the class: about half
#: of a registration's cost.
_HOOK_IDS = itertools.count(-1, -1)


def _add_hook(hooks: Any, hook: Callable[..., Any], prepend: bool) -> RemovableHandle:
    """What ``nn.Module.register_forward(_pre)_hook`` does without keyword hooks, for a sixth of its cost.

    torch's registration and removal cost ~5 µs per hook on a CPU (most of it building the
    handle's weak references to the keyword and always-call tables, which a plain hook never
    enters); a run that saves twelve activations pays that twelve times per call. The handle is
    still torch's :class:`RemovableHandle`, so it removes the hook exactly as torch's would, and
    ``hooks`` is held weakly; its id comes from :data:`_HOOK_IDS`.
    """
    handle = RemovableHandle.__new__(RemovableHandle)
    handle.hooks_dict_ref = weakref.ref(hooks)
    hook_id = handle.id = next(_HOOK_IDS)
    handle.extra_dict_ref = ()
    hooks[hook_id] = hook
    if prepend and len(hooks) > 1:  # alone in the table, a hook is first either way
        hooks.move_to_end(hook_id, last=False)
    return handle


def register(
    module: nn.Module,
    hook: Callable[..., Any],
    direction: HookDirection,
    *,
    prepend: bool = False,
    always_call: bool = False,
) -> RemovableHandle:
    """Register ``hook`` on ``module`` at ``direction`` and return torch's removable handle.

    Plain forward and forward-pre hooks on a module whose class keeps ``nn.Module``'s
    registration go straight into the module's hook table (:func:`_add_hook`); every other case
    calls the module's own ``register_*_hook``. ``always_call`` (forward hooks only) makes the
    hook run also when the forward raised (torch's ``always_call``).
    """
    if always_call:
        if direction is not _FWD:
            raise InvalidDirectionError(f"always_call applies to forward hooks only, not {direction.value!r}")
        return module.register_forward_hook(hook, prepend=prepend, always_call=True)
    if direction is _FWD:  # the common cases first, without enum attribute look-ups
        if type(module).register_forward_hook is _MODULE_FORWARD_HOOK:
            return _add_hook(module._forward_hooks, hook, prepend)
        return module.register_forward_hook(hook, prepend=prepend)
    if direction is _FWD_PRE and type(module).register_forward_pre_hook is _MODULE_FORWARD_PRE_HOOK:
        return _add_hook(module._forward_pre_hooks, hook, prepend)
    if direction is HookDirection.FWD_KWARGS:
        return module.register_forward_hook(hook, prepend=prepend, with_kwargs=True)
    if direction is HookDirection.FWD_PRE:
        if type(module).register_forward_pre_hook is _MODULE_FORWARD_PRE_HOOK:
            return _add_hook(module._forward_pre_hooks, hook, prepend)
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
        self._handles: list[Any] = [] if handles is None else list(handles)

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
            raise InvalidInputError(
                f"Can only add a HandleGroup to a HandleGroup, got {type(other).__name__}. "
                "Wrap torch handles first: HandleGroup([handle])."
            )
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

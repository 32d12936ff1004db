"""Threads: which contexts are active on which model, from which thread.

Entering a context *claims* its factories (a stateful method instance refuses a second thread)
and its model (backward hooks, which autograd may run in any thread, make a context exclusive);
leaving it releases both.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tensordict.nn import TensorDictModule
from torch import nn

from ..errors import (
    ConcurrencyError,
)
from .directions import HookSpec, Installable
from .forward_state import CallTracker, ThreadGate

if TYPE_CHECKING:
    from .factory import HookingContextFactory
    from .lifecycle import HookingContext

__all__ = ["check_no_foreign_exclusive"]

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
            if others and not f.thread_safe:
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


def _owner_name(owner: Any) -> str:
    """Who holds a claim: a context's method (``ActivationCaching``), or the claimant itself (``HookSession``)."""
    factory = getattr(owner, "factory", None)
    return type(owner if factory is None else factory).__name__


def _refuse_conflicts(
    context: HookingContext | Any,
    root: nn.Module,
    thread: int,
    exclusive: bool,
    entries: list[tuple[HookingContext, int, bool]],
) -> None:
    for other, other_thread, other_exclusive in entries:
        if other_thread != thread and (exclusive or other_exclusive):
            editing = context if exclusive else other
            raise ConcurrencyError(
                f"{type(root).__name__} already has an active {_owner_name(other)} context "
                f"from another thread ({other_thread}), and {_owner_name(editing)} uses backward "
                "hooks, which autograd may run in any thread. Use one model copy "
                "per thread (copy.deepcopy(model)), or run the two contexts one after the other."
            )


def _claim_model(context: HookingContext | Any, root: nn.Module, thread: int, exclusive: bool) -> int:
    """Claim ``root`` for ``context`` (refused on a conflict, see the module docstring); returns its key."""
    key = id(root.module) if type(root) is TensorDictModule else id(root)  # _model_id, inlined
    with _LOCK:
        entries = _ACTIVE.get(key)
        if entries is None:  # the common case: nothing else active on the model
            _ACTIVE[key] = [(context, thread, exclusive)]
            return key
        _refuse_conflicts(context, root, thread, exclusive, entries)
        entries.append((context, thread, exclusive))
    return key


def _check_claimable(context: Any, root: nn.Module, thread: int, exclusive: bool) -> None:
    """Raise what :func:`_claim_model` would raise now, without claiming (a session claims later).

    The session calls it only when ``_ACTIVE`` is not empty (its entry's common case skips the call).
    """
    with _LOCK:
        entries = _ACTIVE.get(_model_id(root))
        if entries:
            _refuse_conflicts(context, root, thread, exclusive, entries)


def _release_model(context: HookingContext | Any, root: nn.Module | None) -> None:
    """Drop ``context``'s claim on ``root``; with ``root=None`` (e.g. a model already collected), on any model."""
    with _LOCK:
        for key in list(_ACTIVE) if root is None else (_model_id(root),):
            _drop(context, key)


def _release_claim(context: Any, key: int) -> None:
    """Drop ``context``'s claim under ``key`` (what :func:`_claim_model` returned; the model may be gone)."""
    with _LOCK:
        entries = _ACTIVE.get(key)
        if entries is not None and len(entries) == 1 and entries[0][0] is context:
            del _ACTIVE[key]  # the common case: this context alone on the model
        else:
            _drop(context, key)


def _drop(context: Any, key: int) -> None:
    entries = _ACTIVE.get(key)
    if entries is None:
        return
    if len(entries) == 1:  # the common case: this context alone on the model
        if entries[0][0] is context:
            del _ACTIVE[key]
        return
    entries[:] = [e for e in entries if e[0] is not context]
    if not entries:
        del _ACTIVE[key]


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
                f"{type(root).__name__} has backward hooks of a {_owner_name(other)} context of another "
                f"thread ({other_thread}); a run now could trigger them. Wait for that context to exit, or use "
                "one model copy per thread."
            )

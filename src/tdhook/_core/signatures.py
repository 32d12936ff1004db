"""Signature checks of user hooks and callbacks, done when they are registered (spec §4.1).

One rule for every user function tdhook calls: hooks are called positionally by torch
(:func:`check_hook_signature`), callbacks and user functions by keyword (:func:`check_callback`,
:func:`check_keywords`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from types import FunctionType
from typing import Any

from torch import nn

from ..errors import (
    HookSignatureError,
)
from .directions import HookDirection
from .forward_state import ThreadGate
from .hook_types import CachingHook, ReadingHook, SettingHook, StoppingHook, StoringHook

__all__ = ["check_callback", "check_hook_signature", "check_keywords", "declared_keywords"]


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


#: tdhook's own hook classes: their signatures are right by construction (not inspected).
_INTERNAL_HOOKS = frozenset({StoringHook, CachingHook, SettingHook, ReadingHook, StoppingHook, ThreadGate})

"""Compatibility path (tdhook 0.1): ``tdhook._types.UnraveledKey``.

``isinstance(x, UnraveledKey)`` is true for a ``str`` or a non-empty tuple of ``str`` (a
TensorDict key, nested or not). The class exists only for that check: it cannot be
instantiated. The ``isinstance`` test needs ``__instancecheck__``, which only a metaclass can
define; it is the one metaclass of the package, kept because 0.1 code calls ``isinstance`` on it.
"""

from __future__ import annotations

from typing import Any, NoReturn

from .errors import InvalidInputError

__all__ = ["UnraveledKey"]


class _UnraveledKeyMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        if isinstance(obj, str):
            return True
        return isinstance(obj, tuple) and len(obj) > 0 and all(isinstance(part, str) for part in obj)


class UnraveledKey(metaclass=_UnraveledKeyMeta):
    """A TensorDict key: a ``str`` or a non-empty tuple of ``str`` (use with ``isinstance`` only).

    Examples:
        >>> isinstance("a", UnraveledKey), isinstance(("a", "b"), UnraveledKey)
        (True, True)
        >>> isinstance((), UnraveledKey), isinstance(("a", 1), UnraveledKey)
        (False, False)
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise InvalidInputError(
            f"UnraveledKey is a type for isinstance checks, not a constructor (called with {args!r:.60}); use a "
            "str or a tuple of str as the key itself."
        )

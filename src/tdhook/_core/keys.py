"""TensorDict key helpers and the key names tdhook declares once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tensordict import TensorDictBase
from tensordict.utils import NestedKey, unravel_key

from ..errors import MissingKeyError

__all__ = ["DEFAULT_IN_KEY", "DEFAULT_OUT_KEY", "check_keys", "is_unraveled", "normalize_keys"]

DEFAULT_IN_KEY = "input"
DEFAULT_OUT_KEY = "output"


def is_unraveled(key: Any) -> bool:
    """True for a ``str`` or a non-empty tuple of ``str`` (tdhook 0.1's ``UnraveledKey``)."""
    return isinstance(key, str) or (
        isinstance(key, tuple) and len(key) > 0 and all(isinstance(k, str) for k in key)
    )


def normalize_keys(keys: NestedKey | Sequence[NestedKey] | None) -> list[NestedKey] | None:
    """Return a list of unravelled keys (a single key becomes a one-element list)."""
    if keys is None:
        return None
    if isinstance(keys, (str, tuple)):
        keys = [keys]
    return [unravel_key(k) for k in keys]


def check_keys(td: TensorDictBase, keys: Iterable[NestedKey], *, what: str = "model input") -> None:
    """Raise :class:`MissingKeyError` naming the missing keys and listing those present."""
    missing = [k for k in keys if k not in td.keys(include_nested=True)]
    if missing:
        present = list(td.keys(include_nested=True, leaves_only=True))
        raise MissingKeyError(
            f"Missing {what} key(s) {missing} in the TensorDict; keys present: {present}. "
            f"Add them, or pass in_keys=... to prepare() to read other keys."
        )

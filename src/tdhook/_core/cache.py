"""Caches that hooks write to: the cache check, (weak) references and :class:`CacheProxy`."""

from __future__ import annotations

import weakref
from typing import Any

from tensordict import TensorDictBase

from ..errors import (
    DeadReferenceError,
    InvalidInputError,
)

__all__ = ["CacheProxy", "MutableWeakRef", "TensorDictRef", "check_cache"]


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

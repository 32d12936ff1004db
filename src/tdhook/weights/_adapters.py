"""Adapters: route a module's value through an extra module (SAE, transcoder, LoRA-like block).

An adapter ``(adapter, in_module, out_module)`` replaces ``out_module``'s value (its output, for
the default ``"fwd"`` direction) by ``adapter(value_of_in_module, **declared_keywords)``. The
adapters live in ``hooked.adapters`` (an ``nn.ModuleDict`` on the hooked module, not on the
user's model, held by the :class:`AdapterSet` extension), so their parameters appear in
``hooked.parameters()`` and can be trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDictBase
from torch import nn

from .._core.cache import CacheProxy, TensorDictRef
from .._core.directions import HookDirection, HookSpec
from .._core.extensions import Extension
from .._core.factory import HookingContextFactory
from .._core.hook_types import CachingHook, SettingHook
from .._core.hooked import HookedModule
from .._core.lifecycle import HookingContextWithCache
from .._core.paths import resolve_path
from .._core.signatures import check_callback, declared_keywords
from ..errors import ContextStateError, InvalidInputError, MissingKeyError, TdhookError, nearest
from ._standalone import StandaloneHookedModule

__all__ = ["AdapterError", "AdapterSet", "Adapters", "HookedModuleWithAdapters"]


class AdapterError(TdhookError, RuntimeError):
    """An adapter could not run (its input module did not run first...)."""


def _module_dict_key(name: str) -> str:
    """An ``nn.ModuleDict`` key for an adapter name: ``%`` and ``.`` are percent-encoded.

    A name that clashes with a ``ModuleDict`` attribute (``"keys"``, ``"forward"``...) or is
    empty gets a trailing ``%``, which no encoded name ends with.
    """
    key = name.replace("%", "%25").replace(".", "%2E")
    if not key or hasattr(nn.ModuleDict, key):
        key += "%"
    return key


class AdapterSet(Extension):
    """The adapters of one context: an ``nn.ModuleDict`` registered on the hooked module as
    ``hooked.adapters`` (so ``hooked.parameters()`` includes them and they can be trained).

    Adapter names may contain dots; ``hooked.adapters`` uses escaped keys, and :meth:`adapter`,
    :meth:`named_adapters` and :attr:`adapter_names` use the names you gave. The hooked module
    forwards these names (``hooked.adapter("sae")``); ``hooked.extension(AdapterSet)`` is the
    typed way to reach them.
    """

    exposes = ("add_adapter", "adapter", "adapter_names", "named_adapters")

    def __init__(self, hooked: HookedModule) -> None:
        super().__init__(hooked)
        self.modules = nn.ModuleDict()
        hooked.add_module("adapters", self.modules)
        self._keys: dict[str, str] = {}

    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        """Register ``adapter`` under ``name`` (any string, dots included)."""
        key = _module_dict_key(name)
        self.modules[key] = adapter
        self._keys[name] = key

    @property
    def adapter_names(self) -> list[str]:
        return list(self._keys)

    def adapter(self, name: str) -> nn.Module:
        """The adapter registered under ``name``.

        Raises:
            MissingKeyError: For an unknown name; the message lists the nearest names.
        """
        if name not in self._keys:
            raise MissingKeyError(
                f"No adapter named {name!r}; adapters: {nearest(name, list(self._keys))}. Use a name given to Adapters."
            )
        return self.modules[self._keys[name]]

    def named_adapters(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, adapter)`` pairs, with the names you gave."""
        for name, key in self._keys.items():
            yield name, self.modules[key]


class HookedModuleWithAdapters(StandaloneHookedModule):
    """A hooked module with an :class:`AdapterSet`, for use without a context (tdhook 0.1 name).

    Inside ``with Adapters(...).prepare(model) as hooked:``, ``hooked`` is a plain
    :class:`~tdhook.core.HookedModule` carrying the :class:`AdapterSet` extension, so that
    Adapters composes with every other method; the names below work on both.
    """

    extension_kind = AdapterSet

    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        """Register ``adapter`` under ``name`` (see :meth:`AdapterSet.add_adapter`)."""
        self.extension(AdapterSet).add_adapter(name, adapter)

    @property
    def adapter_names(self) -> list[str]:
        return self.extension(AdapterSet).adapter_names

    def adapter(self, name: str) -> nn.Module:
        """The adapter registered under ``name`` (see :meth:`AdapterSet.adapter`)."""
        return self.extension(AdapterSet).adapter(name)

    def named_adapters(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, adapter)`` pairs, with the names you gave."""
        return self.extension(AdapterSet).named_adapters()


def _keywords(adapter: Callable[..., Any], direction: HookDirection) -> tuple[str, ...]:
    """The hook parameters ``adapter`` declares (besides its first, positional, value parameter)."""
    return declared_keywords(adapter, (*direction.params, "direction"))


def _unwrap(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) and len(value) == 1 else value


@dataclass(frozen=True)
class AdapterCall:
    """The callback of an adapter's setting hook: ``adapter(value, **declared_keywords)``.

    ``value`` is the hooked value itself (same in/out module) or, for a cross-layer adapter,
    the in-module's cached value (``SettingHook`` resolves the cache proxy).
    """

    name: str
    adapter: Callable[..., Any]
    value_param: str
    keywords: tuple[str, ...]
    in_module: str | None = None

    def __call__(self, *, value: Any, direction: str, **hook: Any) -> Any:
        if self.in_module is None:
            value = _unwrap(hook[self.value_param])
        elif value is None:
            raise AdapterError(
                f"Adapter {self.name!r} reads the value of {self.in_module!r}, which has not run yet in this call. "
                "The in-module must run before the out-module in the forward pass."
            )
        hook["direction"] = direction
        return self.adapter(value, **{k: hook[k] for k in self.keywords})


@dataclass(frozen=True)
class _ForgetValues:
    """Forward pre-hook of the model root: a cross-layer value of an earlier forward must not feed this one.

    A root hook (not the method's ``_call``) so that a tensor call and a direct call of the user's
    model inside the context behave like a TensorDict call.
    """

    cache: TensorDictBase
    keys: tuple[str, ...]

    def __call__(self, module: nn.Module, args: Any) -> None:
        for key in self.keys:
            self.cache.pop(key, None)


class Adapters(HookingContextFactory[HookingContextWithCache]):
    """Replace module values by adapter outputs (same-layer or cross-layer).

    For every direction and every ``name: (adapter, in_module_key, out_module_key)``:

    * ``in == out``: ``out``'s value becomes ``adapter(value, ...)``;
    * otherwise ``in``'s value is cached in the context cache under ``f"{in}_{type}"``
      (e.g. ``"linear1_output"``, through ``cache_callback`` if given) and ``out``'s value
      becomes ``adapter(cached, ...)``; ``in`` must run before ``out``.

    The adapter's ``forward`` (or the callable itself) receives, by keyword, only the hook
    parameters it declares (``module``, ``args``, ``output``, ``direction``...), or all of
    them if it takes ``**kwargs``. It must return the same kind of value it replaces.

    Args:
        adapters: ``{name: (adapter, in_module_key, out_module_key)}``; names may contain dots.
            ``nn.Module`` adapters are registered in ``hooked.adapters``.
        cache_callback: ``callback(module, args, output, key, direction)`` returning the value
            of a cross-layer in-module to cache.
        relative: Module keys relative to the model (True) or absolute (``td_module.…``).
        directions: Hook points, default ``["fwd"]``.
        cache: TensorDict for cross-layer values (default: the context's cache).
        clear_cache: Clear the cache at every enter.

    Raises:
        InvalidInputError: If an entry is not an ``(adapter, in_key, out_key)`` tuple.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> sae = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> with Adapters({"sae.layer0": (sae, "0", "0")}).prepare(model) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(5, 3), batch_size=[5]))
        ...     n_trainable = sum(p.numel() for p in hooked.adapter("sae.layer0").parameters())
        >>> n_trainable
        148
    """

    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        adapters: Mapping[str, tuple[Callable[..., Any], str, str]],
        cache_callback: Callable[..., Any] | None = None,
        relative: bool = True,
        directions: Sequence[str] | None = None,
        cache: TensorDictBase | None = None,
        clear_cache: bool = True,
    ) -> None:
        if not isinstance(adapters, Mapping) or not adapters:
            raise InvalidInputError(
                f"adapters must be a non-empty dict {{name: (adapter, in_module_key, out_module_key)}}, got {adapters!r}."
            )
        self._adapters: dict[str, tuple[Callable[..., Any], str, str]] = {}
        for name, spec in adapters.items():
            if not (
                isinstance(name, str)
                and isinstance(spec, tuple)
                and len(spec) == 3
                and callable(spec[0])
                and isinstance(spec[1], str)
                and isinstance(spec[2], str)
            ):
                raise InvalidInputError(
                    f"adapters[{name!r}] must be an (adapter, in_module_key, out_module_key) tuple with a callable "
                    f"adapter and string keys, got {spec!r}."
                )
            self._adapters[name] = spec
        self._directions = [HookDirection.parse(d) for d in (directions or ["fwd"])]
        for d in self._directions:
            check_callback(cache_callback, d, ("key", "direction"))
        self._cache_callback = cache_callback
        self._relative = relative
        self._cache = cache
        self._clear_cache = clear_cache

    @property
    def adapters(self) -> dict[str, tuple[Callable[..., Any], str, str]]:
        return dict(self._adapters)

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        adapter_set = hooked.use_extension(AdapterSet)
        context = hooked.hooking_context
        cache = self._cache
        if cache is None:
            if not isinstance(context, HookingContextWithCache):
                raise ContextStateError("Adapters needs a context with a cache: use it through prepare().")
            cache = context.cache
        root = hooked.root if self._relative else hooked
        specs: list[HookSpec] = []
        cross: list[str] = []
        for name, (adapter, in_key, out_key) in self._adapters.items():
            if isinstance(adapter, nn.Module):
                adapter_set.add_adapter(name, adapter)
            in_module, out_module = resolve_path(root, in_key), resolve_path(root, out_key)
            for d in self._directions:
                value_param = d.value_param
                if in_key == out_key:
                    call = AdapterCall(name, adapter, value_param, _keywords(adapter, d))
                    specs.append(HookSpec(out_module, SettingHook(None, d, call), d))
                    continue
                cache_key = f"{in_key}_{d.value_type}"
                cross.append(cache_key)
                specs.append(HookSpec(in_module, CachingHook(cache_key, cache, d, self._cache_callback), d))
                proxy = CacheProxy(cache_key, TensorDictRef(cache))
                call = AdapterCall(name, adapter, value_param, _keywords(adapter, d), in_key)
                specs.append(HookSpec(out_module, SettingHook(proxy, d, call), d))
        if cross:  # first hook of every forward of the model, whichever way it is called
            specs.insert(
                0, HookSpec(hooked.root, _ForgetValues(cache, tuple(cross)), HookDirection.FWD_PRE, True)
            )
        return specs

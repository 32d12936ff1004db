"""Hook helpers (public names of tdhook 0.1's ``tdhook.hooks``), built on the hook core."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._core.cache import CacheProxy, MutableWeakRef, TensorDictRef
from ._core.directions import HandleGroup, HookDirection, register
from ._core.hook_types import CachingHook, EarlyStoppingException, ReadingHook, SettingHook, StoppingHook
from ._core.paths import compile_pattern, join_paths, parse_path, resolve_path, select_modules
from ._core.signatures import check_callback, check_hook_signature
from .errors import TdhookWarning

__all__ = [
    "DIRECTION_TO_PARAMS",
    "DIRECTION_TO_RETURN",
    "DIRECTION_TO_RETURN_INDEX",
    "DIRECTION_TO_TYPE",
    "CacheProxy",
    "EarlyStoppingException",
    "HookDirection",
    "HookFactory",
    "MultiHookHandle",
    "MultiHookManager",
    "MutableWeakRef",
    "TensorDictRef",
    "merge_paths",
    "register_hook_to_module",
    "resolve_submodule_path",
    "submodule_path_to_name",
]

HookDirectionLiteral = Literal["fwd", "bwd", "fwd_pre", "bwd_pre", "fwd_kwargs", "fwd_pre_kwargs"]
DIRECTION_TO_PARAMS = {d.value: d.params for d in HookDirection}
DIRECTION_TO_TYPE = {d.value: d.value_type for d in HookDirection}
#: Name of the hook parameter whose value a hook may replace, per direction.
DIRECTION_TO_RETURN = {d.value: d.value_param for d in HookDirection}
#: Position of :data:`DIRECTION_TO_RETURN`'s name in the direction's parameters (:data:`DIRECTION_TO_PARAMS`).
DIRECTION_TO_RETURN_INDEX = {d: DIRECTION_TO_PARAMS[d].index(name) for d, name in DIRECTION_TO_RETURN.items()}

MultiHookHandle = HandleGroup
merge_paths = join_paths


def resolve_submodule_path(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``root`` at ``path`` (declarative grammar, no eval)."""
    return resolve_path(root, path)


def submodule_path_to_name(path: str) -> str:
    """Normalise a path to a dotted ``named_modules()``-style name (``items[0]`` → ``items.0``)."""
    return ".".join(str(s) for s in parse_path(path))


def register_hook_to_module(
    module: nn.Module, hook: Callable[..., Any], direction: str = "fwd", prepend: bool = False
) -> RemovableHandle:
    """Register ``hook`` (torch signature for ``direction``) and return torch's handle.

    Raises:
        InvalidDirectionError: For an unknown direction.
        HookSignatureError: If torch cannot call ``hook`` with the direction's positional
            arguments (spec §4.1), checked now rather than when the hook first fires.
    """
    d = HookDirection.parse(direction)
    check_hook_signature(hook, d)
    return register(module, hook, d, prepend=prepend)


class HookFactory:
    """Builders for the hooks of the low-level API (tdhook 0.1 compatible)."""

    @staticmethod
    def make_caching_hook(
        key: Any, cache: Any, *, callback: Callable[..., Any] | None = None, direction: str = "fwd"
    ) -> CachingHook:
        d = HookDirection.parse(direction)
        check_callback(callback, d, ("key", "direction"))
        return CachingHook(key, cache, d, callback)

    @staticmethod
    def make_setting_hook(
        value: Any, *, callback: Callable[..., Any] | None = None, direction: str = "fwd"
    ) -> SettingHook:
        d = HookDirection.parse(direction)
        check_callback(callback, d, ("value", "direction"))
        return SettingHook(value, d, callback)

    @staticmethod
    def make_reading_hook(*, callback: Callable[..., Any], direction: str = "fwd") -> ReadingHook:
        d = HookDirection.parse(direction)
        check_callback(callback, d, ("direction",))
        return ReadingHook(callback, d)

    @staticmethod
    def make_stopping_hook(key: str) -> StoppingHook:
        return StoppingHook(key)


class MultiHookManager:
    """Register one hook per submodule whose name matches a pattern (``re.match``)."""

    def __init__(
        self,
        pattern: str | Sequence[str] | None = None,
        classes_to_hook: Sequence[type] = (nn.Module,),
        classes_to_skip: Sequence[type] = (),
    ) -> None:
        self.pattern = pattern
        self._classes_to_hook = tuple(classes_to_hook)
        self._classes_to_skip = tuple(classes_to_skip)

    @property
    def pattern(self) -> str:
        return self._pattern.pattern

    @pattern.setter
    def pattern(self, value: str | Sequence[str] | None) -> None:
        self._pattern = compile_pattern(value if value is not None else r"a^")

    def register_hook(
        self,
        module: nn.Module,
        hook_factory: Callable[[str], Callable[..., Any]],
        *,
        direction: str = "fwd",
        prepend: bool = False,
        relative_path: str | None = None,
    ) -> HandleGroup:
        d = HookDirection.parse(direction)
        root = resolve_path(module, relative_path) if relative_path else module
        handles = HandleGroup()
        for name, sub in select_modules(
            root,
            self._pattern,
            classes_to_hook=self._classes_to_hook,
            classes_to_skip=self._classes_to_skip,
            strict=False,
        ):
            if isinstance(sub, nn.ModuleList):
                warnings.warn(
                    f"You are hooking a ModuleList ({name}), which will never be executed.",
                    TdhookWarning,
                    stacklevel=2,
                )
            hook = hook_factory(name)
            try:
                check_hook_signature(hook, d)
            except BaseException:
                handles.remove()
                raise
            handles.append(register(sub, hook, d, prepend=prepend))
        return handles

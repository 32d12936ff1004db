"""Targets in the activation methods: module lists that mix paths and :class:`~tdhook.targets.Target`.

A :class:`Target` given to ``ActivationCaching``, ``ActivationPatching``, ``SteeringVectors`` or
``ActivationAddition`` narrows what the method reads or writes at that module to the target's
selected sub-tensor (units on a feature axis, a leaf of a tuple or dict output), and replaces
it inside the output with the rest of the structure kept. The adapters here turn a target into
the callbacks those methods already take, so each method keeps one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import nn

from ..errors import IncompatibleInputsError, InvalidInputError, InvalidParameterError, TargetError
from ..targets import Target, TargetKind

__all__ = [
    "CallbackByModule",
    "PatchByKey",
    "TargetCallback",
    "TargetPatch",
    "TargetSteer",
    "check_cache_key",
    "check_method_target",
    "method_modules",
    "publish_cache",
    "split_targets",
    "target_list",
]


def method_modules(items: Any, method: str) -> tuple[Any, dict[str, Target]]:
    """``modules_to_patch``/``modules_to_steer`` as a list of module keys (targets replaced by their
    ``module_path``; the caller checks the keys) and the targets by key."""
    if isinstance(items, (str, Target)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        return items, {}  # left to the caller's check, which names the bad value
    return split_targets(list(items), method)


def check_method_target(target: Target, method: str) -> Target:
    """Refuse what a method cannot honour: non-activation kinds and ``occurrences``."""
    if target.kind is not TargetKind.ACTIVATION:
        raise TargetError(
            f"{method} acts on forward activations; {target} is a {target.kind_value} target. Use "
            "tdhook.session.HookSession for gradients and parameters."
        )
    if target.occurrences is not None:
        raise TargetError(
            f"{method} acts on every call of a module; {target} selects calls {target.occurrences}. Drop "
            "occurrences, or use tdhook.session.HookSession, which honours them."
        )
    return target


def split_targets(items: Sequence[str | Target], method: str) -> tuple[list[str], dict[str, Target]]:
    """Module keys in order, and the target of each key given as a :class:`Target`.

    Raises:
        TargetError: If a target cannot be used by the method, or two targets name one module.
    """
    keys: list[str] = []
    targets: dict[str, Target] = {}
    for item in items:
        if isinstance(item, Target):
            check_method_target(item, method)
            if item.module_path in targets or item.module_path in keys:
                raise TargetError(
                    f"{method}: module {item.module_path!r} is given twice; give one Target per module "
                    "(indices select several units at once)."
                )
            targets[item.module_path] = item
            keys.append(item.module_path)
        else:
            keys.append(item)
    return keys, targets


@dataclass(frozen=True)
class TargetCallback:
    """A caching callback ``(output, **_) -> selected`` (after an optional user callback)."""

    target: Target
    callback: Callable[..., Any] | None = None

    def __call__(self, *, module: Any, args: Any, output: Any, key: Any, direction: Any) -> Any:
        if self.callback is not None:
            output = self.callback(module=module, args=args, output=output, key=key, direction=direction)
        return self.target.select_output(output)


@dataclass(frozen=True)
class TargetPatch:
    """A ``patch_fn`` acting on the selection: the user's ``patch_fn`` (or the clean selection)
    replaces the selected entries of the patched run's output."""

    target: Target
    patch_fn: Callable[..., Any] | None = None

    def __call__(self, module_key: str, output: Any, output_to_patch: Any) -> Any:
        new = output_to_patch
        if self.patch_fn is not None:
            chosen = self.patch_fn(
                module_key=module_key,
                output=self.target.select_output(output),
                output_to_patch=output_to_patch,
            )
            if chosen is not None:
                new = chosen
        return self.target.replace_output(output, new)


@dataclass(frozen=True)
class TargetSteer:
    """A ``steer_fn`` acting on the selection (``None`` from the user's function keeps the output)."""

    target: Target
    steer_fn: Callable[..., Any]

    def __call__(self, module_key: str, output: Any) -> Any:
        new = self.steer_fn(module_key=module_key, output=self.target.select_output(output))
        if new is None:
            return None
        return self.target.replace_output(output, new)


@dataclass(frozen=True)
class CallbackByModule:
    """A recording callback routed by the module that fired: a target's module records its selection."""

    by_module: Mapping[int, TargetCallback]
    default: Callable[..., Any] | None = None

    @classmethod
    def build(
        cls,
        resolve: Callable[[str], nn.Module],
        targets: Mapping[str, Target],
        default: Callable[..., Any] | None,
    ) -> Callable[..., Any] | None:
        """The callback for ``targets`` (module keys resolved by ``resolve``), or ``default`` without targets."""
        if not targets:
            return default
        return cls({id(resolve(k)): TargetCallback(t, default) for k, t in targets.items()}, default)

    def __call__(self, *, module: Any, args: Any, output: Any, key: Any, direction: Any) -> Any:
        callback = self.by_module.get(id(module), self.default)
        if callback is None:
            return output
        return callback(module=module, args=args, output=output, key=key, direction=direction)


@dataclass(frozen=True)
class PatchByKey:
    """A ``patch_fn`` routed by module key: a target's module is patched on its selection only."""

    by_key: Mapping[str, TargetPatch]
    default: Callable[..., Any] | None = None

    @classmethod
    def build(
        cls, targets: Mapping[str, Target], default: Callable[..., Any] | None
    ) -> Callable[..., Any] | None:
        if not targets:
            return default
        return cls({k: TargetPatch(t, default) for k, t in targets.items()}, default)

    def __call__(self, module_key: str, output: Any, output_to_patch: Any) -> Any:
        patch = self.by_key.get(module_key)
        if patch is not None:
            return patch(module_key, output, output_to_patch)
        if self.default is None:
            return None
        return self.default(module_key=module_key, output=output, output_to_patch=output_to_patch)


def target_list(value: Any) -> list[Target] | None:
    """``ActivationCaching``'s ``key_pattern`` as targets, or ``None`` for patterns (strings)."""
    if isinstance(value, Target):
        check_method_target(value, "ActivationCaching")
        return [value]
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, Target) for v in value):
        if not all(isinstance(v, Target) for v in value):
            raise InvalidInputError(
                f"key_pattern must be either patterns (str) or Targets, not a mix: got {value!r}. Use one "
                "ActivationCaching per kind, or Targets for every module."
            )
        keys, targets = split_targets(list(value), "ActivationCaching")
        return [targets[k] for k in keys]
    return None


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def check_cache_key(cache_key: NestedKey, model_keys: Sequence[NestedKey]) -> None:
    """Refuse a publication key equal to, inside, or containing one of the model's keys."""
    mine = _as_tuple(cache_key)
    for key in model_keys:
        other = _as_tuple(key)
        n = min(len(mine), len(other))
        if mine[:n] == other[:n]:
            raise InvalidParameterError(
                f"cache_key {cache_key!r} overlaps the model's keys ({key!r}); the published cache would "
                "overwrite (or sit inside) a model input or output. Pick another key, e.g. 'cache'."
            )


def publish_cache(result: Any, cache_key: NestedKey, cache: TensorDictBase) -> None:
    """Write a snapshot of ``cache`` (its current entries) into ``result`` under ``cache_key``."""
    if not isinstance(result, TensorDictBase):
        return
    snapshot = cache.clone() if cache.is_locked else cache.copy()  # locked caches are written in place
    try:
        snapshot.batch_size = result.batch_size
    except RuntimeError as err:
        raise IncompatibleInputsError(
            f"Cannot publish the cache under {cache_key!r}: an entry does not start with the TensorDict's batch "
            f"shape {tuple(result.batch_size)} ({err}). Read context.cache instead (cache_key=None)."
        ) from None
    result.set(cache_key, snapshot)

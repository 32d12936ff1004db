"""What patching and steering share: record module outputs in one run, replace them in another.

A method that runs the model more than once per call (:class:`~tdhook.latent.ActivationPatching`,
:class:`~tdhook.latent.ActivationAddition`) records activations with one :class:`RecordingHook`
per module, switched by a :class:`RunState` phase, builds each run's inputs with :func:`branch`,
and checks replacements with :func:`fit_replacement`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey, unravel_key

from .._core.directions import HookDirection, HookSpec
from .._core.forward_state import CallTracker, call_key
from .._core.hook_types import _fit_replacement
from .._core.hooked import HookedModule
from ..errors import InterventionError, InterventionShapeError, InvalidInputError, MultipleCallError

__all__ = [
    "Phase",
    "RecordingHook",
    "RunState",
    "branch",
    "fit_replacement",
    "join_key",
    "normalize_module_keys",
    "recording_plan",
]


def normalize_module_keys(keys: str | Iterable[str], what: str) -> list[str]:
    """Return ``keys`` as a non-empty list of module paths (a single string is one path)."""
    if isinstance(keys, str):
        keys = [keys]
    out = list(keys)
    if not out or not all(isinstance(k, str) for k in out):
        raise InvalidInputError(
            f"{what} must be a module path or a non-empty list of module paths (str), got {keys!r}. "
            "Example: ['layers[0]', 'layers.2.mlp']."
        )
    return out


def join_key(prefix: NestedKey, key: NestedKey) -> NestedKey:
    """``("patched", "input")`` from ``"patched"`` and ``"input"`` (nested keys are flattened)."""
    return unravel_key((prefix, key))


def fit_replacement(new: Any, original: Any, module_key: str, what: str) -> Any:
    """Check that ``new`` can replace ``original`` (same kind of value, same tensor shape)."""
    value = _fit_replacement(new, original, HookDirection.FWD)
    if (
        isinstance(value, torch.Tensor)
        and isinstance(original, torch.Tensor)
        and value.shape != original.shape
    ):
        raise InterventionShapeError(
            f"{what} for module {module_key!r} has shape {tuple(value.shape)} but the module's output has "
            f"shape {tuple(original.shape)}. Return a tensor of the output's shape (e.g. make the patched "
            "inputs the same shape as the clean ones, or broadcast a vector over the batch)."
        )
    return value


def branch(
    td: TensorDictBase, source: NestedKey, in_keys: Sequence[NestedKey], drop: Iterable[NestedKey]
) -> TensorDictBase:
    """A shallow copy of ``td`` whose model inputs are read from ``td[source]``.

    Entries other than the inputs (labels, step types...) are kept so that composed methods
    still find them; ``drop`` (outputs and the other branches) is left out.
    """
    present = set(td.keys(include_nested=True))
    out = td.exclude(*[k for k in drop if k in present])
    for key in in_keys:
        out.set(key, td.get(join_key(source, key)))
    return out


class Phase(Enum):
    """What the recording hooks do during the current model run."""

    IDLE = "idle"  # outside a call of the method (e.g. the raw model called inside the context)
    RECORD = "record"  # store the module outputs
    PATCH = "patch"  # replace the module outputs by the recorded ones


@dataclass
class RunState:
    """State shared by a method's hooks for the duration of one call."""

    phase: Phase = Phase.IDLE
    recorded: dict[str, Any] = field(default_factory=dict)

    def take(self) -> dict[str, Any]:
        """Return and forget the recorded values."""
        recorded, self.recorded = self.recorded, {}
        return recorded


@dataclass(frozen=True)
class RecordingHook:
    """Forward hook of one module: records (``RECORD``) or patches (``PATCH``) its output.

    Built once per module, so ``module_key`` is the key of the module that fired. With ``calls``
    (the context's tracker), call ``k`` of the module within one forward is recorded under
    ``call_key(module_key, k)`` and patched with the clean run's call ``k`` (``per_call``), or
    refused with :class:`~tdhook.errors.MultipleCallError` (``per_call=False``). Recorded and
    patched-in values are protected from later in-place operations of the model.
    """

    module_key: str
    state: RunState
    cache_callback: Callable[..., Any] | None = None
    patch_fn: Callable[..., Any] | None = None
    calls: CallTracker | None = None
    per_call: bool = False

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        phase = self.state.phase
        if phase is Phase.IDLE:
            return None
        forward = self.calls.state() if self.calls is not None else None
        n = forward.index(self) if forward is not None else 0
        if n and not self.per_call:
            raise MultipleCallError(
                f"Module {self.module_key!r} ran {n + 1} times in one forward pass; this method needs one "
                "activation per module and forward. Use a module that runs once."
            )
        key = call_key(self.module_key, n)
        recorded = self.state.recorded
        if phase is Phase.RECORD:
            value = output
            if self.cache_callback is not None:
                value = self.cache_callback(module=module, args=args, output=output, key=key, direction="fwd")
            recorded[key] = value
            if forward is not None:
                forward.hold(value, recorded, key, key)
            return None
        if key not in recorded:
            call = f" (call {n})" if n else ""
            raise InterventionError(
                f"Module {self.module_key!r}{call} ran in the patched run but not in the clean run, so there is "
                "no clean activation to patch in. Patch modules that run on both inputs, as often."
            )
        clean = recorded[key]
        new = clean
        if self.patch_fn is not None:
            new = self.patch_fn(module_key=self.module_key, output=output, output_to_patch=clean)
            if new is None:
                new = clean
        result = fit_replacement(new, output, self.module_key, "The patched activation")
        if forward is not None and result is clean:  # the model may modify it in place from now on
            forward.hold(clean, recorded, key, key)
        return result


def recording_plan(
    hooked: HookedModule,
    module_keys: Sequence[str],
    state: RunState,
    cache_callback: Callable[..., Any] | None,
    patch_fn: Callable[..., Any] | None = None,
    *,
    per_call: bool = False,
) -> list[HookSpec]:
    """One :class:`RecordingHook` per module (paths relative to the user's model).

    With ``per_call``, a module that runs several times per forward is recorded (and patched)
    once per call; otherwise a second call raises :class:`~tdhook.errors.MultipleCallError`.
    """
    return [
        HookSpec(
            hooked.resolve(key),
            RecordingHook(key, state, cache_callback, patch_fn, hooked.calls, per_call),
            HookDirection.FWD,
        )
        for key in module_keys
    ]

"""Activation patching: run the model twice and patch clean activations into the second run.

``ActivationPatching`` is a *pipeline* method (it overrides ``_call``): one call runs the model on
the TensorDict's inputs (the *clean* run, whose activations are recorded), then on the inputs
stored under ``patch_key`` (the *patched* run, where the recorded activations replace, or are
combined with, the module outputs). Intermediates live in Python objects for the duration of the
call, never in the TensorDict, and the model sees the batch exactly as given (``()``, 1-D or N-D).

This module also holds the small pieces shared with steering (:mod:`._steering`): the recording
hook, the branch builder and the replacement checks.
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
from .._core.factory import HookingContextFactory
from .._core.forward_state import CallTracker, call_key
from .._core.hook_types import _fit_replacement
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.signatures import check_callback, check_keywords
from ..errors import MultipleCallError, TdhookError
from ..targets import Target
from ._targeted import CallbackByModule, PatchByKey, method_modules

__all__ = ["ActivationPatching", "InterventionError", "InterventionShapeError"]

#: Where ``clean_intermediate_keys=False`` exposes the clean activations: ``(_CACHE_KEY, module)``.
_CACHE_KEY = "_cache"


class InterventionError(TdhookError, RuntimeError):
    """An intervention hook could not run (a module did not fire, a callback failed...)."""


class InterventionShapeError(TdhookError, ValueError, RuntimeError):
    """A replacement (patched activation, steered output) does not fit the activation's shape.

    Subclasses ``RuntimeError`` too, the error torch raises for a broadcasting failure.
    """


# ------------------------------------------------------------------------------------------------
# Shared helpers (also used by _steering.py)
# ------------------------------------------------------------------------------------------------


def normalize_module_keys(keys: str | Iterable[str], what: str) -> list[str]:
    """Return ``keys`` as a non-empty list of module paths (a single string is one path)."""
    if isinstance(keys, str):
        keys = [keys]
    out = list(keys)
    if not out or not all(isinstance(k, str) for k in out):
        raise TypeError(
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


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


class ActivationPatching(HookingContextFactory):
    """Patch the activations of a clean run into a second (patched) run.

    One call runs the model twice:

    1. the *clean* run on the TensorDict's model inputs writes the usual outputs and records the
       output of every module in ``modules_to_patch`` (through ``cache_callback`` if given);
    2. the *patched* run on the inputs under ``patch_key`` (e.g. ``("patched", "input")``) writes
       its outputs under ``patch_key`` (e.g. ``("patched", "output")``); there each module's
       output is replaced by ``patch_fn(module_key=..., output=<patched-run output>,
       output_to_patch=<clean activation>)``, or by the clean activation when ``patch_fn`` is
       None or returns None.

    The model sees the batch as given: ``()``, 1-D or N-D batches all work. The caller's
    TensorDict is returned with both outputs and no intermediate key. ``patch_fn`` receives the
    key of the module that fired.

    A module that runs several times in one forward is patched call by call: its ``k``-th call
    in the patched run receives the ``k``-th clean activation (recorded, with
    ``clean_intermediate_keys=False``, under ``("_cache", f"{module_key}#{k}")`` for ``k > 0``).
    Recorded activations are the modules' outputs as produced, even if the model later modifies
    them in place (``nn.ReLU(inplace=True)``).

    Args:
        modules_to_patch: Module paths, relative to the model (``"layers[0].mlp"``), or
            :class:`~tdhook.targets.Target` values: only the selected sub-tensor (units, a leaf
            of a tuple output) is recorded and patched, the rest of the output is kept, and
            ``patch_fn`` receives the selections.
        patch_key: Key of the patched branch: its inputs are read from ``(patch_key, in_key)``
            and its outputs written to ``(patch_key, out_key)``.
        clean_intermediate_keys: When False, the clean activations are also written to the
            returned TensorDict under ``("_cache", module_key)`` (for inspection).
        patch_fn: ``patch_fn(module_key, output, output_to_patch)`` returning the value to use;
            None keeps the clean activation.
        cache_callback: ``cache_callback(module, args, output, key, direction)`` returning what
            to record in the clean run (e.g. ``output[0]`` for tuple outputs).

    Raises:
        HookSignatureError: If a callback cannot receive its keywords.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({"input": torch.randn(2, 3), ("patched", "input"): torch.randn(2, 3)}, batch_size=[2])
        >>> with ActivationPatching(["1"]).prepare(model) as hooked:
        ...     td = hooked(td)
        >>> torch.equal(td["patched", "output"], td["output"])  # layer 1 carries everything
        True
    """

    _needs_tensordict = True
    _thread_safe = True  # per-call state lives in the context (HookedModule.method_state)

    def __init__(
        self,
        modules_to_patch: str | Target | Sequence[str | Target],
        patch_key: str = "patched",
        clean_intermediate_keys: bool = True,
        patch_fn: Callable[..., Any] | None = None,
        cache_callback: Callable[..., Any] | None = None,
    ) -> None:
        keys, self._targets = method_modules(modules_to_patch, "ActivationPatching")
        self._modules = normalize_module_keys(keys, "modules_to_patch")
        self._patch_key = patch_key
        self._clean_intermediate_keys = clean_intermediate_keys
        check_keywords(patch_fn, ("module_key", "output", "output_to_patch"), "patch_fn")
        check_callback(cache_callback, HookDirection.FWD, ("key", "direction"))
        self._patch_fn = patch_fn
        self._cache_callback = cache_callback

    @property
    def modules_to_patch(self) -> list[str]:
        return list(self._modules)

    @property
    def patch_key(self) -> str:
        return self._patch_key

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        record = CallbackByModule.build(hooked.resolve, self._targets, self._cache_callback)
        patch = PatchByKey.build(self._targets, self._patch_fn)
        state = hooked.method_state(self, RunState)  # per context: one instance serves several threads
        return recording_plan(hooked, self._modules, state, record, patch, per_call=True)

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        in_keys, out_keys = hooked.in_keys, hooked.out_keys
        check_keys(
            td,
            [join_key(self._patch_key, k) for k in in_keys],
            what=f"patch source (the patched run reads its inputs under {self._patch_key!r})",
        )
        state = hooked.method_state(self, RunState)
        patched_td = branch(td, self._patch_key, in_keys, [self._patch_key, *hooked.td_module.out_keys])
        try:
            state.phase = Phase.RECORD
            result = call_next(td, **kwargs)
            state.phase = Phase.PATCH
            patched = call_next(patched_td, **kwargs)
        finally:
            state.phase = Phase.IDLE
            clean = state.take()
        if result is not td:
            td.update(result)
        for key in out_keys:
            td.set(join_key(self._patch_key, key), patched.get(key))
        if not self._clean_intermediate_keys:
            for module_key, value in clean.items():
                if isinstance(value, (torch.Tensor, TensorDictBase)):
                    td.set((_CACHE_KEY, module_key), value)
        return td

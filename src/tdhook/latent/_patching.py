"""Activation patching: run the model twice and patch clean activations into the second run.

``ActivationPatching`` is a *pipeline* method (it overrides ``_call``): one call runs the model on
the TensorDict's inputs (the *clean* run, whose activations are recorded), then on the inputs
stored under ``patch_key`` (the *patched* run, where the recorded activations replace, or are
combined with, the module outputs). Intermediates live in Python objects for the duration of the
call, never in the TensorDict, and the model sees the batch exactly as given (``()``, 1-D or N-D).

The recording hook, the branch builder and the replacement checks, shared with steering, live in
:mod:`._recording`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.lifecycle import HookingContext
from .._core.signatures import check_callback, check_keywords
from ..errors import InterventionError, InterventionShapeError
from ..targets import Target
from ._recording import Phase, RunState, branch, join_key, normalize_module_keys, recording_plan
from ._targeted import CallbackByModule, PatchByKey, method_modules

__all__ = ["ActivationPatching", "InterventionError", "InterventionShapeError"]

#: Where ``clean_intermediate_keys=False`` exposes the clean activations: ``(_CACHE_KEY, module)``.
_CACHE_KEY = "_cache"


class ActivationPatching(HookingContextFactory[HookingContext]):
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

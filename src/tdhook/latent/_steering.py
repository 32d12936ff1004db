"""Steering: edit module outputs (``SteeringVectors``) and compute steering vectors (``ActivationAddition``).

``SteeringVectors`` is hook-only: every call of the model inside the context is steered.
``ActivationAddition`` is a pipeline method: one call runs the model on a positive and a negative
input and writes the mean activation difference of each module to ``("steer", module_key)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import is_non_tensor

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.lifecycle import HookingContext
from .._core.signatures import check_callback, check_keywords
from ..errors import (
    InsufficientSamplesError,
    InterventionError,
    InterventionShapeError,
    InvalidInputError,
    InvalidParameterError,
)
from ..targets import Target
from ._recording import (
    Phase,
    RunState,
    branch,
    fit_replacement,
    join_key,
    normalize_module_keys,
    recording_plan,
)
from ._targeted import CallbackByModule, TargetSteer, method_modules

__all__ = ["ActivationAddition", "SteeringVectors"]

#: Intermediate keys written only with ``clean_intermediate_keys=False`` (tdhook 0.1's names).
_POSITIVE_CACHE_KEY = "_positive_cache"
_NEGATIVE_CACHE_KEY = "_negative_cache"
_POSITIVE_OUT_KEY = "_positive_out"
_NEGATIVE_OUT_KEY = "_negative_out"


@dataclass(frozen=True)
class AddVector:
    """A ``steer_fn`` that adds ``scale * vectors[module_key]`` to the module's output.

    The vector must broadcast to the output's shape without changing it (e.g. ``[D]`` or
    ``[T, D]`` for an output ``[B, T, D]``).
    """

    vectors: Mapping[str, torch.Tensor]
    scale: float = 1.0

    def __call__(self, module_key: str, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise InterventionError(
                f"Module {module_key!r} returns a {type(output).__name__}, not a tensor, so a vector cannot be "
                "added to it. Pass a steer_fn instead, e.g. `lambda module_key, output: (output[0] + v, *output[1:])`."
            )
        vector = self.vectors[module_key]
        try:
            shape = torch.broadcast_shapes(vector.shape, output.shape)
        except RuntimeError:
            shape = None
        if shape != output.shape:
            raise InterventionShapeError(
                f"The steering vector of module {module_key!r} has shape {tuple(vector.shape)}, which does not "
                f"broadcast to the module's output shape {tuple(output.shape)}. Use a vector whose shape is a "
                f"suffix of the output's, e.g. {tuple(output.shape[-1:])} or {tuple(output.shape[1:])}."
            )
        return output + self.scale * vector.to(device=output.device, dtype=output.dtype)


@dataclass(frozen=True)
class SteeringHook:
    """Forward hook replacing a module's output by ``steer_fn(module_key=..., output=...)``."""

    module_key: str
    steer_fn: Callable[..., Any]

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        new = self.steer_fn(module_key=self.module_key, output=output)
        if new is None:
            return None
        return fit_replacement(new, output, self.module_key, "The steered output")


class SteeringVectors(HookingContextFactory[HookingContext]):
    """Replace the output of each module in ``modules_to_steer`` by ``steer_fn(module_key, output)``.

    Thread rule: a context steers only the forwards of the thread that entered it.

    Hook-only: every model call inside the context is steered, and the caller's TensorDict is
    returned. ``steer_fn`` receives the key of the module that fired; returning None keeps the
    output. Instead of ``steer_fn``, ``vectors={module_key: v}`` adds ``scale * v`` to each
    output (``v`` must broadcast to the output's shape, e.g. ``td["steer"]`` returned by
    :class:`ActivationAddition`).

    Args:
        modules_to_steer: Module paths, relative to the model, or
            :class:`~tdhook.targets.Target` values: ``steer_fn`` (or the vector, keyed by the
            target's ``module_path``) then acts on the selected sub-tensor only, and the rest of
            the output (other units, other items of a tuple) is kept.
        steer_fn: ``steer_fn(module_key, output)`` returning the new output (same type and shape),
            or None to keep it.
        vectors: Steering vectors by module key (a dict or a TensorDict), used when ``steer_fn``
            is None.
        scale: Multiplier of ``vectors``.

    Raises:
        InvalidParameterError: If neither or both of ``steer_fn`` and ``vectors`` are given, or a
            module has no vector (a ``ValueError``).
        InvalidInputError: If a vector is not a tensor (a ``TypeError``).
        HookSignatureError: If ``steer_fn`` cannot receive ``module_key`` and ``output``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> steering = SteeringVectors(["0"], vectors={"0": torch.ones(4)}, scale=2.0)
        >>> with steering.prepare(model) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(5, 3), batch_size=[5]))
        >>> td["output"].shape
        torch.Size([5, 2])
    """

    _thread_safe = True  # no per-call state on the instance

    def __init__(
        self,
        modules_to_steer: str | Target | Sequence[str | Target],
        steer_fn: Callable[..., Any] | None = None,
        *,
        vectors: Mapping[str, torch.Tensor] | TensorDictBase | None = None,
        scale: float = 1.0,
    ) -> None:
        keys, self._targets = method_modules(modules_to_steer, "SteeringVectors")
        self._modules = normalize_module_keys(keys, "modules_to_steer")
        if (steer_fn is None) == (vectors is None):
            raise InvalidParameterError(
                "SteeringVectors needs exactly one of steer_fn and vectors, got "
                f"{'both' if steer_fn is not None else 'neither'}. Pass steer_fn=lambda module_key, output: "
                "output + v, or vectors={module_key: v}."
            )
        if steer_fn is None:
            steer_fn = AddVector(self._vector_table(vectors), float(scale))
        check_keywords(steer_fn, ("module_key", "output"), "steer_fn")
        self._steer_fn = steer_fn

    @property
    def modules_to_steer(self) -> list[str]:
        return list(self._modules)

    def _vector_table(self, vectors: Any) -> dict[str, torch.Tensor]:
        available = [k for k in vectors.keys() if isinstance(k, str)]  # noqa: SIM118 - TensorDict too
        missing = [m for m in self._modules if m not in available]
        if missing:
            raise InvalidParameterError(
                f"No steering vector for module(s) {missing}; vectors has keys {available}. "
                "Give one vector per module in modules_to_steer."
            )
        table = {m: vectors[m] for m in self._modules}
        for key, value in table.items():
            if not isinstance(value, torch.Tensor):
                raise InvalidInputError(
                    f"The steering vector of {key!r} must be a tensor, got {type(value).__name__} {value!r:.40}. "
                    "Convert it, e.g. vectors={key: torch.as_tensor(v)}."
                )
        return table

    def _steer_for(self, key: str) -> Callable[..., Any]:
        target = self._targets.get(key)
        return self._steer_fn if target is None else TargetSteer(target, self._steer_fn)

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        return [
            HookSpec(hooked.resolve(key), SteeringHook(key, self._steer_for(key)), HookDirection.FWD)
            for key in self._modules
        ]


class ActivationAddition(HookingContextFactory[HookingContext]):
    """Compute steering vectors: the mean activation difference between positive and negative inputs.

    One call runs the model on the inputs under ``positive_key`` (e.g. ``("positive", "input")``)
    and under ``negative_key``, records the output of each module in ``modules_to_steer``, and
    returns a **new** TensorDict with an empty batch size holding, at ``(steer_key, module_key)``,
    one vector per module: ``mean(positive - negative)`` over all of the caller's batch
    dimensions, with the activation's shape without them (``[D]`` for activations ``[B, D]``,
    ``[T, D]`` for ``[B, T, D]``), as in tdhook 0.1. The returned TensorDict also holds the
    caller's entries (unlike 0.1); the caller's TensorDict is left untouched. With a ``()`` batch
    the vector is the difference itself, unreduced (0.1 collapsed it to a scalar).

    Args:
        modules_to_steer: Module paths, relative to the model, or
            :class:`~tdhook.targets.Target` values (the vector of the target's selected units,
            under its ``module_path``).
        positive_key: Branch holding the positive inputs.
        negative_key: Branch holding the negative inputs.
        steer_key: Where the vectors are written.
        clean_intermediate_keys: When False, the positive and negative activations and outputs
            are also written into the returned TensorDict, under ``("_positive_cache", m)``,
            ``("_positive_out", out_key)`` and their negative counterparts (batch dimensions
            kept).
        cache_callback: ``cache_callback(module, args, output, key, direction)`` returning the
            tensor to record (e.g. ``output[0]`` for tuple outputs).

    Raises:
        HookSignatureError: If ``cache_callback`` cannot receive its keywords.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> td = TensorDict({("positive", "input"): torch.randn(8, 3), ("negative", "input"): torch.randn(8, 3)},
        ...                 batch_size=[8])
        >>> with ActivationAddition(["0"]).prepare(model) as hooked:
        ...     out = hooked(td)
        >>> out.batch_size, out["steer", "0"].shape
        (torch.Size([]), torch.Size([4]))
    """

    _needs_tensordict = True

    def __init__(
        self,
        modules_to_steer: str | Target | Sequence[str | Target],
        positive_key: str = "positive",
        negative_key: str = "negative",
        steer_key: str = "steer",
        clean_intermediate_keys: bool = True,
        cache_callback: Callable[..., Any] | None = None,
    ) -> None:
        keys, self._targets = method_modules(modules_to_steer, "ActivationAddition")
        self._modules = normalize_module_keys(keys, "modules_to_steer")
        self._positive_key = positive_key
        self._negative_key = negative_key
        self._steer_key = steer_key
        self._clean_intermediate_keys = clean_intermediate_keys
        check_callback(cache_callback, HookDirection.FWD, ("key", "direction"))
        self._cache_callback = cache_callback
        self._state = RunState()

    @property
    def modules_to_steer(self) -> list[str]:
        return list(self._modules)

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        record = CallbackByModule.build(hooked.resolve, self._targets, self._cache_callback)
        return recording_plan(hooked, self._modules, self._state, record)

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        in_keys, out_keys = hooked.in_keys, hooked.out_keys
        sources = (self._positive_key, self._negative_key)
        _check_sources(td, sources, in_keys)
        check_keys(
            td,
            [join_key(s, k) for s in sources for k in in_keys],
            what="steering source (ActivationAddition reads positive and negative inputs)",
        )
        drop = [*sources, self._steer_key, *hooked.td_module.out_keys]
        state = self._state
        recorded, outputs = [], []
        try:
            for source in sources:
                state.phase = Phase.RECORD
                outputs.append(call_next(branch(td, source, in_keys, drop), **kwargs))
                state.phase = Phase.IDLE
                recorded.append(state.take())
        finally:
            state.phase = Phase.IDLE
            state.take()
        positive, negative = recorded
        vectors = {m: self._vector(m, positive.get(m), negative.get(m), td) for m in self._modules}
        result = _unbatched_copy(td)
        for module_key, vector in vectors.items():
            result.set(join_key(self._steer_key, module_key), vector)
        if not self._clean_intermediate_keys:
            for cache_key, out_key, acts, out in (
                (_POSITIVE_CACHE_KEY, _POSITIVE_OUT_KEY, positive, outputs[0]),
                (_NEGATIVE_CACHE_KEY, _NEGATIVE_OUT_KEY, negative, outputs[1]),
            ):
                for module_key, value in acts.items():
                    result.set((cache_key, module_key), value)
                for key in out_keys:
                    result.set(join_key(out_key, key), out.get(key))
        return result

    def _vector(self, module_key: str, positive: Any, negative: Any, td: TensorDictBase) -> torch.Tensor:
        for name, value in (("positive", positive), ("negative", negative)):
            if value is None:
                raise InterventionError(
                    f"Module {module_key!r} did not run on the {name} inputs, so it has no activation. "
                    "Steer modules that run in the model's forward pass."
                )
            if not isinstance(value, torch.Tensor):
                raise InterventionError(
                    f"Module {module_key!r} returns a {type(value).__name__}, not a tensor. Pass a cache_callback "
                    "returning a tensor, e.g. `cache_callback=lambda output, **_: output[0]`."
                )
        if positive.shape != negative.shape:
            raise InterventionShapeError(
                f"Module {module_key!r} has activations of shape {tuple(positive.shape)} on the positive inputs "
                f"but {tuple(negative.shape)} on the negative inputs. Give inputs that produce the same "
                "activation shapes (e.g. pad to the same sequence length)."
            )
        batch = tuple(td.batch_size)
        if tuple(positive.shape[: len(batch)]) != batch:
            raise InterventionShapeError(
                f"Module {module_key!r} has activations of shape {tuple(positive.shape)}, which do not start with "
                f"the TensorDict's batch shape {batch}. Give the TensorDict the model's batch dimensions."
            )
        diff = positive - negative
        return diff.mean(dim=tuple(range(len(batch)))) if batch else diff


def _check_sources(td: TensorDictBase, sources: tuple[Any, ...], in_keys: Sequence[Any]) -> None:
    """Refuse a branch that is not a TensorDict (e.g. a string stored under ``"positive"``) and an
    empty batch (its mean difference would be NaN), before the model runs."""
    for name, source in zip(("positive", "negative"), sources, strict=True):
        value = td.get(source, None)
        if value is not None and not isinstance(value, TensorDictBase):
            shown = value.data if is_non_tensor(value) else value
            raise InvalidInputError(
                f"ActivationAddition reads its {name} inputs under {source!r}, but that entry is a "
                f"{type(shown).__name__} ({shown!r:.60}), not a TensorDict of input tensors. Store the {name} "
                f"inputs as tensors, e.g. td[{join_key(source, in_keys[0])!r}] = x."
            )
    if 0 in td.batch_size:
        raise InsufficientSamplesError(
            f"ActivationAddition got an empty batch (batch size {tuple(td.batch_size)}, 0 samples): the mean "
            "activation difference of no samples is undefined (NaN). Give at least one positive and one "
            "negative input."
        )


def _unbatched_copy(td: TensorDictBase) -> TensorDictBase:
    """A new TensorDict with an empty batch size holding ``td``'s entries (tensors shared, not copied).

    Only a batch-free TensorDict can hold the batch-reduced steering vectors next to the caller's
    entries. Nested TensorDicts are new objects too, so writing to the result never touches ``td``.
    """
    result = td.copy() if type(td) is TensorDict else td.to_tensordict()
    result.batch_size = torch.Size([])
    return result

"""Attention heads as targets: cache, patch and ablate single heads.

Every method here hooks the *input* of each layer's attention output projection (see
:mod:`._spec`), viewed as ``(..., n_heads, d_head)``: head ``h``'s output before the projection
mixes the heads. A hook returns a new tensor (never writes into the model's), so autograd and
the other hooks see a consistent graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.utils import unravel_key

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hook_types import CachingHook
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.lifecycle import HookingContext, HookingContextWithCache
from ..errors import InvalidInputError
from ..latent.activation_patching import InterventionError, InterventionShapeError
from ._spec import TransformerSpec, normalize_heads

__all__ = ["AblationMode", "HeadAblation", "HeadCaching", "HeadPatching", "split_heads"]

#: Cache key of the per-head outputs of layer ``i``: ``(HEADS_KEY, str(i))``.
HEADS_KEY = "heads"


def split_heads(value: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(..., n_heads * d_head)`` viewed as ``(..., n_heads, d_head)`` (no copy).

    Raises:
        InterventionShapeError: If the last dimension is not a multiple of ``n_heads``.
    """
    if value.shape[-1] % n_heads:
        raise InterventionShapeError(
            f"The attention output projection's input has last dimension {value.shape[-1]}, not a multiple of "
            f"n_heads={n_heads}; check the TransformerSpec's n_heads and head_input path."
        )
    return value.unflatten(-1, (n_heads, value.shape[-1] // n_heads))


def _spec_for(hooked: HookedModule, spec: TransformerSpec | None) -> TransformerSpec:
    return spec if spec is not None else TransformerSpec.from_model(hooked.root)


@dataclass(frozen=True)
class _SplitHeads:
    """A caching callback: the projection's input as ``(..., n_heads, d_head)``."""

    n_heads: int

    def __call__(self, args: tuple[Any, ...], **_: Any) -> torch.Tensor:
        return split_heads(args[0], self.n_heads)


class HeadCaching(HookingContextFactory[HookingContextWithCache]):
    """Cache the per-head attention outputs ``z`` of some layers: ``cache["heads", str(layer)]``.

    Each entry has shape ``(batch, seq, n_heads, d_head)``, in the layer's attention before the
    output projection. Results live in ``hooked.hooking_context.cache`` and stay readable after
    the ``with`` block.

    Args:
        layers: Layer indices (negative from the end); None for all layers.
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.
        detach: Store detached tensors.
        accumulate: Concatenate across calls along ``accumulate_dim`` (1: the steps of
            ``model.generate`` with a key-value cache).
        accumulate_dim: See ``accumulate``.

    Examples:
        >>> from tensordict import TensorDict
        >>> with HeadCaching([0]).prepare(model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]) as hooked:  # doctest: +SKIP
        ...     hooked(TensorDict(input_ids=ids, batch_size=ids.shape[:1]))
        >>> hooked.hooking_context.cache["heads", "0"].shape  # doctest: +SKIP
        torch.Size([2, 6, 4, 8])
    """

    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        layers: int | Iterable[int] | None = None,
        *,
        spec: TransformerSpec | None = None,
        detach: bool = True,
        accumulate: bool = False,
        accumulate_dim: int = 0,
    ) -> None:
        self._layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        self._spec = spec
        self._detach = detach
        self._accumulate = accumulate
        self._accumulate_dim = accumulate_dim

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        context = hooked.hooking_context
        if not isinstance(context, HookingContextWithCache):
            raise InvalidInputError("HeadCaching needs a context with a cache: use it through prepare().")
        spec = _spec_for(hooked, self._spec)
        callback = _SplitHeads(spec.n_heads)
        return [
            HookSpec(
                spec.resolve(hooked.root, spec.head_input_path(layer), "head_input"),
                CachingHook(
                    (HEADS_KEY, str(layer)),
                    context.cache,
                    HookDirection.FWD_PRE,
                    callback,
                    self._detach,
                    self._accumulate,
                    accumulate_dim=self._accumulate_dim,
                ),
                HookDirection.FWD_PRE,
            )
            for layer in spec.layers(self._layers)
        ]


class _Phase(Enum):
    IDLE = "idle"
    RECORD = "record"
    PATCH = "patch"


@dataclass
class _HeadState:
    phase: _Phase = _Phase.IDLE
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _HeadPatchHook:
    """Forward pre-hook of one projection: records its input (clean run) or patches heads (patched run)."""

    layer: int
    heads: tuple[int, ...]
    n_heads: int
    state: _HeadState

    def __call__(self, module: Any, args: tuple[Any, ...]) -> Any:
        phase = self.state.phase
        if phase is _Phase.RECORD:
            self.state.recorded[self.layer] = args[0]
            return None
        if phase is not _Phase.PATCH:
            return None
        clean = self.state.recorded.get(self.layer)
        if clean is None:
            raise InterventionError(
                f"The attention of layer {self.layer} ran in the patched run but not in the clean run; patch heads "
                "of layers that run on both inputs."
            )
        value = args[0]
        if clean.shape != value.shape:
            raise InterventionShapeError(
                f"Head patching of layer {self.layer}: the clean run's heads have shape {tuple(clean.shape)} but the "
                f"patched run's have {tuple(value.shape)}; give both prompts the same length (pad them)."
            )
        new = split_heads(value, self.n_heads).clone()
        index = list(self.heads)
        new[..., index, :] = split_heads(clean, self.n_heads)[..., index, :].to(new.dtype)
        return (new.flatten(-2), *args[1:])


class HeadPatching(HookingContextFactory[HookingContext]):
    """Patch single heads' outputs from a clean run into a second (patched) run.

    One call runs the model twice, as :class:`~tdhook.latent.ActivationPatching` does: the
    *clean* run on the TensorDict's inputs records each involved layer's per-head outputs; the
    *patched* run on ``(patch_key, in_key)`` replaces the listed heads' outputs by the clean
    ones (every position) and writes its outputs to ``(patch_key, out_key)``.

    Args:
        heads: ``(layer, head)`` pairs (negative indices count from the end).
        patch_key: Key of the patched branch.
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.

    Raises:
        HeadIndexError: At enter (before any hook is installed), for a head out of range.
    """

    _needs_tensordict = True

    def __init__(
        self,
        heads: Sequence[tuple[int, int]] | tuple[int, int],
        *,
        patch_key: str = "patched",
        spec: TransformerSpec | None = None,
    ) -> None:
        self._heads = heads
        self._patch_key = patch_key
        self._spec = spec
        self._state = _HeadState()

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        spec = _spec_for(hooked, self._spec)
        by_layer = normalize_heads(self._heads, spec)
        return [
            HookSpec(
                spec.resolve(hooked.root, spec.head_input_path(layer), "head_input"),
                _HeadPatchHook(layer, heads, spec.n_heads, self._state),
                HookDirection.FWD_PRE,
            )
            for layer, heads in by_layer.items()
        ]

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        key = self._patch_key
        check_keys(td, [unravel_key((key, k)) for k in hooked.in_keys], what=f"patch source (under {key!r})")
        present = set(td.keys(include_nested=True))
        patched_td = td.exclude(*[k for k in (key, *hooked.td_module.out_keys) if k in present])
        for k in hooked.in_keys:
            patched_td.set(k, td.get(unravel_key((key, k))))
        state = self._state
        try:
            state.phase = _Phase.RECORD
            result = call_next(td, **kwargs)
            state.phase = _Phase.PATCH
            patched = call_next(patched_td, **kwargs)
        finally:
            state.phase = _Phase.IDLE
            state.recorded = {}
        if result is not td:
            td.update(result)
        for k in hooked.out_keys:
            td.set(unravel_key((key, k)), patched.get(k))
        return td


class AblationMode(str, Enum):
    """What an ablated head's output becomes."""

    ZERO = "zero"  # zeros
    MEAN = "mean"  # its mean over the batch (per position) in the same call


@dataclass(frozen=True)
class _HeadAblationHook:
    heads: tuple[int, ...]
    n_heads: int
    mode: AblationMode

    def __call__(self, module: Any, args: tuple[Any, ...]) -> Any:
        new = split_heads(args[0], self.n_heads).clone()
        index = list(self.heads)
        if self.mode is AblationMode.ZERO:
            new[..., index, :] = 0
        else:
            new[..., index, :] = new[..., index, :].mean(0, keepdim=True)
        return (new.flatten(-2), *args[1:])


class HeadAblation(HookingContextFactory[HookingContext]):
    """Ablate single heads in every call inside the context (hook-only; ``generate`` included).

    Args:
        heads: ``(layer, head)`` pairs (negative indices count from the end).
        mode: ``"zero"`` (zero ablation) or ``"mean"`` (the head's mean over the batch, per
            position, in the same call).
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.

    Raises:
        HeadIndexError: At enter (before any hook is installed), for a head out of range.
        ValueError: For an unknown mode.
    """

    def __init__(
        self,
        heads: Sequence[tuple[int, int]] | tuple[int, int],
        *,
        mode: str | AblationMode = AblationMode.ZERO,
        spec: TransformerSpec | None = None,
    ) -> None:
        try:
            self._mode = AblationMode(mode)
        except ValueError:
            raise InvalidAblationModeError(
                f"Unknown ablation mode {mode!r}; expected one of {[m.value for m in AblationMode]}."
            ) from None
        self._heads = heads
        self._spec = spec

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        spec = _spec_for(hooked, self._spec)
        return [
            HookSpec(
                spec.resolve(hooked.root, spec.head_input_path(layer), "head_input"),
                _HeadAblationHook(heads, spec.n_heads, self._mode),
                HookDirection.FWD_PRE,
            )
            for layer, heads in normalize_heads(self._heads, spec).items()
        ]


class InvalidAblationModeError(InvalidInputError, ValueError):
    """An ablation mode that is not one of :class:`AblationMode`."""

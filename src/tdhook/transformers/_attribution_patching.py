"""Attribution patching: the gradient approximation of activation patching, every site in one call.

Activation patching runs the corrupted input once per site, with the clean activation patched
in, and reads a metric. Attribution patching estimates all those effects at once from one clean
run, one corrupted run and one backward pass of the metric (Nanda, 2023):

    effect(site) ≈ (a_clean(site) − a_corrupted(site)) · ∂metric/∂a (at the corrupted run)

summed over the activation's feature dimension. Sites are the residual stream after each layer
(per position) and each head's output before the attention output projection (per position);
summing over positions gives the estimate for patching a layer's (or a head's) output at every
position at once, by linearity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.utils import unravel_key

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.lifecycle import HookingContext
from ..errors import InvalidInputError
from ..latent.activation_patching import InterventionError, InterventionShapeError
from ._heads import split_heads
from ._lens import _resid
from ._spec import TransformerSpec

__all__ = ["AttributionPatching"]


class _Phase(Enum):
    IDLE = "idle"
    CLEAN = "clean"
    CORRUPTED = "corrupted"


@dataclass
class _State:
    phase: _Phase = _Phase.IDLE
    clean: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    corrupted: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        self.phase, self.clean, self.corrupted = _Phase.IDLE, {}, {}


@dataclass(frozen=True)
class _RecordHook:
    """Records a layer's output (``"resid"``) or a projection's input (``"z"``) in the current run."""

    site: tuple[str, int]
    state: _State

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any = None) -> None:
        phase = self.state.phase
        if phase is _Phase.IDLE:
            return
        value = _resid(output) if self.site[0] == "resid" else args[0]
        if phase is _Phase.CLEAN:
            self.state.clean[self.site] = value.detach()
        else:
            self.state.corrupted[self.site] = value


@dataclass(frozen=True)
class _RequireGrad:
    """Forward hook of the embedding in the corrupted run: a leaf that requires grad.

    So the backward reaches every site even when the model's parameters are frozen, and stops
    at the embedding (no gradient is computed for it).
    """

    state: _State

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        if self.state.phase is _Phase.CORRUPTED and isinstance(output, torch.Tensor):
            return output.detach().requires_grad_(True)
        return None


class AttributionPatching(HookingContextFactory[HookingContext]):
    """Attribution patching for every layer, position and head, in one call.

    One call runs the model on the TensorDict's inputs (the *clean* run, no gradient) and on
    ``(patch_key, in_key)`` (the *corrupted* run), then one backward of ``metric`` on the
    corrupted run. It estimates, for every site, the change of ``metric`` when the clean
    activation is patched into the corrupted run (the direction of
    :class:`~tdhook.latent.ActivationPatching`), and writes, for a batch ``B``, ``L`` layers,
    ``H`` heads and ``T`` positions:

    * ``(attribution_key, "layer")``, ``(B, L)``: a layer's output at every position;
    * ``(attribution_key, "layer_position")``, ``(B, L, T)``: a layer's output at one position;
    * ``(attribution_key, "head")``, ``(B, L, H)``: a head's output at every position;
    * ``(attribution_key, "head_position")``, ``(B, L, H, T)``;
    * ``(attribution_key, "clean_metric")`` and ``(attribution_key, "corrupted_metric")``, ``(B,)``;

    plus the clean outputs and the corrupted outputs under ``(patch_key, out_key)``.

    Args:
        metric: ``metric(output) -> (B,)``: one value per sample of the model's first output
            (e.g. ``lambda logits: logits[:, -1, a] - logits[:, -1, b]``, a logit difference).
        patch_key: Key of the corrupted inputs and outputs.
        attribution_key: Key of the results.
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.

    Raises:
        InvalidInputError: If ``metric`` is not callable, or returns anything but ``(B,)``.
        InterventionShapeError: If the clean and corrupted inputs give activations of different shapes.
    """

    _needs_tensordict = True

    def __init__(
        self,
        metric: Callable[[torch.Tensor], torch.Tensor],
        *,
        patch_key: str = "patched",
        attribution_key: str = "attr_patching",
        spec: TransformerSpec | None = None,
    ) -> None:
        if not callable(metric):
            raise InvalidInputError(
                f"metric must be callable as metric(output) -> (B,), got {type(metric).__name__}; e.g. "
                "`lambda logits: logits[:, -1, correct] - logits[:, -1, wrong]`."
            )
        self._metric = metric
        self._patch_key = patch_key
        self._key = attribution_key
        self._spec = spec
        self._state = _State()
        self._shape: tuple[int, int] = (0, 0)

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        root = hooked.root
        spec = self._spec if self._spec is not None else TransformerSpec.from_model(root)
        self._shape = (spec.n_layers, spec.n_heads)
        specs = [
            HookSpec(spec.resolve(root, spec.embed, "embed"), _RequireGrad(self._state), HookDirection.FWD)
        ]
        for layer in range(spec.n_layers):
            specs.append(
                HookSpec(
                    spec.resolve(root, spec.layer_path(layer), "layer"),
                    _RecordHook(("resid", layer), self._state),
                    HookDirection.FWD,
                )
            )
            specs.append(
                HookSpec(
                    spec.resolve(root, spec.head_input_path(layer), "head_input"),
                    _RecordHook(("z", layer), self._state),
                    HookDirection.FWD_PRE,
                )
            )
        return specs

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        key = self._patch_key
        check_keys(
            td, [unravel_key((key, k)) for k in hooked.in_keys], what=f"corrupted inputs (under {key!r})"
        )
        present = set(td.keys(include_nested=True))
        corrupted_td = td.exclude(*[k for k in (key, self._key, *hooked.td_module.out_keys) if k in present])
        for k in hooked.in_keys:
            corrupted_td.set(k, td.get(unravel_key((key, k))))
        out_key = hooked.out_keys[0]
        state = self._state
        try:
            state.phase = _Phase.CLEAN
            with torch.no_grad():
                result = call_next(td, **kwargs)
                clean_metric = self._checked_metric(result.get(out_key), td.batch_size)
            state.phase = _Phase.CORRUPTED
            with torch.enable_grad():
                corrupted = call_next(corrupted_td, **kwargs)
                metric = self._checked_metric(corrupted.get(out_key), td.batch_size)
                state.phase = _Phase.IDLE
                sites = self._sites(state)
                grads = torch.autograd.grad(
                    metric.sum(), [state.corrupted[s] for s in sites], allow_unused=True
                )
            attributions = self._attributions(state, sites, grads)
        finally:
            state.reset()
        if result is not td:
            td.update(result)
        for k in hooked.out_keys:
            td.set(unravel_key((key, k)), corrupted.get(k).detach())
        for name, value in attributions.items():
            td.set((self._key, name), value)
        td.set((self._key, "clean_metric"), clean_metric.detach())
        td.set((self._key, "corrupted_metric"), metric.detach())
        return td

    def _checked_metric(self, output: Any, batch_size: torch.Size) -> torch.Tensor:
        value = self._metric(output)
        if not isinstance(value, torch.Tensor) or value.shape != batch_size:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidInputError(
                f"metric must return one value per sample, shape {tuple(batch_size)}, got {shape}; e.g. "
                "`lambda logits: logits[:, -1, correct] - logits[:, -1, wrong]` (no mean over the batch)."
            )
        return value

    def _sites(self, state: _State) -> list[tuple[str, int]]:
        n_layers = self._shape[0]
        sites = [(kind, layer) for layer in range(n_layers) for kind in ("resid", "z")]
        missing = [s for s in sites if s not in state.clean or s not in state.corrupted]
        if missing:
            raise InterventionError(
                f"Sites {missing} did not run in both the clean and the corrupted run; check the TransformerSpec."
            )
        for site in sites:
            if state.clean[site].shape != state.corrupted[site].shape:
                raise InterventionShapeError(
                    f"Attribution patching: the clean and corrupted activations of {site[0]} in layer {site[1]} have "
                    f"shapes {tuple(state.clean[site].shape)} and {tuple(state.corrupted[site].shape)}; give both "
                    "inputs the same length (pad them)."
                )
        return sites

    def _attributions(
        self, state: _State, sites: list[tuple[str, int]], grads: tuple[torch.Tensor | None, ...]
    ) -> dict[str, torch.Tensor]:
        n_heads = self._shape[1]
        per_site = {}
        for site, grad in zip(sites, grads, strict=True):
            clean, corrupted = state.clean[site], state.corrupted[site].detach()
            grad = torch.zeros_like(corrupted) if grad is None else grad
            delta = (clean - corrupted) * grad
            if site[0] == "z":  # (B, T, H, d) -> (B, H, T)
                per_site[site] = split_heads(delta, n_heads).sum(-1).transpose(-1, -2)
            else:  # (B, T, D) -> (B, T)
                per_site[site] = delta.sum(-1)
        n_layers = self._shape[0]
        layer_position = torch.stack([per_site["resid", i] for i in range(n_layers)], dim=1)
        head_position = torch.stack([per_site["z", i] for i in range(n_layers)], dim=1)
        return {
            "layer": layer_position.sum(-1),
            "layer_position": layer_position,
            "head": head_position.sum(-1),
            "head_position": head_position,
        }

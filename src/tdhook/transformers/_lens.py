"""Logit lens: the residual stream after each layer, read through the final norm and the unembedding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.lifecycle import HookingContextWithCache
from ..errors import InvalidInputError
from ._spec import TransformerSpec

__all__ = ["LogitLens", "logit_lens"]

#: Cache key of layer ``i``'s lens logits: ``(LENS_KEY, str(i))``.
LENS_KEY = "lens"


def _project(norm: nn.Module | None, unembed: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    # ``forward`` rather than ``__call__``: the projection must not fire the hooks of other methods
    # (a cache of ``.*`` would record ln_f once per layer).
    x = norm.forward(resid) if norm is not None else resid
    return unembed.forward(x)


def _resid(output: Any) -> torch.Tensor:
    """A layer's residual-stream output: the tensor, or the first entry of a tuple output."""
    if isinstance(output, tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise InvalidInputError(
            f"A layer returned {type(output).__name__}, not a tensor or a tuple starting with one; pass a "
            "TransformerSpec whose `layer` path names the module that outputs the residual stream."
        )
    return output


def logit_lens(model: nn.Module, resid: torch.Tensor, *, spec: TransformerSpec | None = None) -> torch.Tensor:
    """Project residual-stream activations (e.g. cached layer outputs) through the final norm and unembedding.

    Args:
        model: The model the activations come from.
        resid: Activations of shape ``(..., d_model)``.
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.

    Returns:
        Logits of shape ``(..., vocab)``. The last layer's lens equals the model's logits.
    """
    spec = spec if spec is not None else TransformerSpec.from_model(model)
    norm = spec.resolve(model, spec.final_norm, "final_norm") if spec.final_norm is not None else None
    return _project(norm, spec.resolve(model, spec.unembed, "unembed"), resid)


@dataclass(frozen=True)
class _LensHook:
    key: tuple[str, str]
    cache: TensorDictBase
    norm: nn.Module | None
    unembed: nn.Module
    position: int | None
    detach: bool

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        resid = _resid(output)
        if self.position is not None:
            resid = resid[..., self.position : self.position + 1 or None, :]
        if self.detach:
            resid = resid.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            logits = _project(self.norm, self.unembed, resid)
        self.cache.set(self.key, logits)


class LogitLens(HookingContextFactory[HookingContextWithCache]):
    """Logit lens on every call: ``cache["lens", str(layer)]`` = unembed(final_norm(resid after layer)).

    Hook-only, so it composes with any method and runs on every forward of the context,
    ``model.generate`` steps included (the cache holds the last call's values).

    Args:
        layers: Layer indices (negative from the end); None for all layers.
        position: Keep one sequence position (e.g. -1), as a length-1 dimension, to save the
            ``(batch, seq, vocab)`` projection; None keeps every position.
        spec: The model's layout; None recognises Hugging Face GPT-2 and Llama-style models.
        detach: Project detached activations, without a graph (the default).

    The last layer's lens equals the model's logits (tested); earlier layers show what the
    residual stream "predicts" so far.
    """

    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        layers: int | Iterable[int] | None = None,
        *,
        position: int | None = None,
        spec: TransformerSpec | None = None,
        detach: bool = True,
    ) -> None:
        if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
            raise InvalidInputError(f"position must be an int or None, got {position!r}.")
        self._layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        self._position = position
        self._spec = spec
        self._detach = detach

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        context = hooked.hooking_context
        if not isinstance(context, HookingContextWithCache):
            raise InvalidInputError("LogitLens needs a context with a cache: use it through prepare().")
        root = hooked.root
        spec = self._spec if self._spec is not None else TransformerSpec.from_model(root)
        norm = spec.resolve(root, spec.final_norm, "final_norm") if spec.final_norm is not None else None
        unembed = spec.resolve(root, spec.unembed, "unembed")
        return [
            HookSpec(
                spec.resolve(root, spec.layer_path(layer), "layer"),
                _LensHook((LENS_KEY, str(layer)), context.cache, norm, unembed, self._position, self._detach),
                HookDirection.FWD,
            )
            for layer in spec.layers(self._layers)
        ]

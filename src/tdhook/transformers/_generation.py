"""Patching that stays active through ``model.generate``: replace the prompt's positions, every step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidInputError
from ..latent.activation_patching import InterventionShapeError

__all__ = ["PromptPatch"]


class PromptPatch:
    """A ``steer_fn`` for :class:`~tdhook.latent.SteeringVectors`: patch recorded activations into the prompt.

    ``values[module_key]`` (e.g. a cache of the clean prompt from ``ActivationCaching``) has
    shape ``(batch, prompt_len, ...)``. In every call, each module's output (or the first entry
    of a tuple output) gets positions ``[0, prompt_len)`` replaced by it, when the call covers
    them, that is when its sequence length is at least ``prompt_len``:

    * with a key-value cache, ``generate``'s first step (the prompt) is patched, and the
      following one-token steps are left alone: they read the patched prompt through the cache;
    * without one (``use_cache=False``), every step re-runs the prompt, and it is patched each
      time. Both give the same tokens (tested).

    A one-token prompt is refused: a one-token step could not be told from it.

    Args:
        values: ``{module_key: activation}``, activations of shape ``(batch, prompt_len, ...)``.

    Raises:
        InvalidInputError: For a non-tensor value or a prompt shorter than two tokens.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        checked = {}
        for key in values.keys():  # noqa: SIM118 (iterating a TensorDict walks its batch, not its keys)
            value = values[key]
            if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[1] < 2:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidInputError(
                    f"PromptPatch needs an activation of shape (batch, prompt_len >= 2, ...) for {key!r}, got {shape}; "
                    "cache the clean prompt's module outputs (a tensor each) and pass them."
                )
            checked[key] = value.detach()
        self._values = checked

    def __call__(self, module_key: str, output: Any) -> Any:
        clean = self._values[module_key]
        out = output[0] if isinstance(output, tuple) else output
        length = clean.shape[1]
        if out.shape[1] < length:
            return None  # a step after the prompt (key-value cache): left alone
        if out.shape[0] != clean.shape[0] or out.shape[2:] != clean.shape[2:]:
            raise InterventionShapeError(
                f"PromptPatch for {module_key!r}: the recorded activation has shape {tuple(clean.shape)}, the "
                f"module's output {tuple(out.shape)}; record the prompt with the same batch and model."
            )
        new = out.clone()
        new[:, :length] = clean.to(device=new.device, dtype=new.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

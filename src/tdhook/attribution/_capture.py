"""The gradient engine's capture hooks and the per-call state they share (``tdhook.attribution``).

Hooks are frozen values holding a reference to one :class:`CallState` per method instance:
``input_modules`` outputs are captured (or replaced by leaves, or by a sampler's transform),
``target_modules`` outputs are recorded as targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import AttributionError

__all__ = ["CallState", "InputModuleHook", "TargetModuleHook"]


@dataclass
class CallState:
    """What the capture hooks of one context share with the running call.

    ``active`` is False outside the differentiated forward, so extra passes (outputs at the real
    input, baselines) run the plain model; ``record`` (a dict) makes a pass record activations.
    """

    active: bool = False
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    def reset(self) -> None:
        self.active = False
        self.inputs = {}
        self.targets = {}
        self.transforms = {}
        self.record = None


@dataclass(frozen=True)
class InputModuleHook:
    """Forward hook on an ``input_modules`` entry: capture (or replace) its output.

    The output is captured as it is when it is part of the graph; otherwise (frozen weights, an
    embedding of integer ids) it is replaced by a leaf that requires grad. A sampler may
    register a transform (e.g. IG's interpolation in activation space) that replaces it.
    """

    key: str
    state: CallState
    callback: Callable[..., Any] | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        state = self.state
        value = output
        if self.callback is not None:
            value = self.callback(module=module, args=args, output=output, key=self.key, direction="fwd")
        if state.record is not None:
            state.record[self.key] = value.detach() if isinstance(value, torch.Tensor) else value
            return None
        if not state.active:
            return None
        if not isinstance(value, torch.Tensor):
            raise AttributionError(
                f"input module {self.key!r} returned a {type(value).__name__}, expected a tensor. "
                "Pass cache_callback=lambda output, **_: output[0] to select the tensor to attribute to."
            )
        transform = state.transforms.get(self.key)
        replaced = False
        if transform is not None:
            value = transform(value)
            replaced = True
        elif not value.requires_grad:
            value = value.detach().requires_grad_(True)
            replaced = True
        if replaced and self.callback is not None:
            raise AttributionError(
                f"input module {self.key!r}: the value selected by cache_callback must be part of the "
                "autograd graph to be replaced. Attribute to a module whose whole output is a tensor."
            )
        state.inputs[self.key] = value
        return value if replaced else None


@dataclass(frozen=True)
class TargetModuleHook:
    """Forward hook on a ``target_modules`` entry: capture its output as a target."""

    key: str
    state: CallState

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.state.active or self.state.record is not None:
            if not isinstance(output, torch.Tensor):
                raise AttributionError(
                    f"target module {self.key!r} returned a {type(output).__name__}, expected a tensor. "
                    "Target a submodule whose output is a tensor."
                )
            self.state.targets[self.key] = output

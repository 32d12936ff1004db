"""Reversible weight edits that restore exactly, whatever order the edits are undone in.

Weight methods (pruning, task vectors) never write into the user's tensors. An edit replaces
``param.data`` with a new tensor. Every edited tensor has a *stack* of edits (a module-level
registry, guarded by one lock, so edits made and undone from several threads compose):

* each edit (a layer) records the tensor beneath it, the tensor it put in, and how to recompute
  itself from a new tensor beneath (a pruning mask multiplies it; a task-vector swap ignores it);
* undoing the top edit puts back the exact tensor beneath (same storage, bit-identical);
* undoing an edit below others removes it from the stack and recomputes the edits above it from
  the tensor beneath, as if it had never been made (a pruning entered after it is applied again
  to the tensor beneath; a swapped-in value stays as it is);
* when the last edit of a tensor is undone, the original tensor object is back, bit-identical,
  whatever the order.

The ``Parameter`` objects themselves never change, so optimizers holding them keep working.
``requires_grad`` flags and ``.grad`` values (the same gradient tensor, with its values at the
time of the edit) come back with the tensor beneath. In-place changes made to an edited tensor
(training in the body) are discarded when the edit is undone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TdhookError

__all__ = ["ParameterSnapshot", "WeightEditError", "WeightMask", "WeightSwap", "named_tensors", "swap_tensor"]


class WeightEditError(TdhookError, ValueError):
    """A weight edit does not fit the tensor it edits (shape, non-finite values)."""


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers of ``module`` by dotted name (the editable state)."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            out[name] = buffer
    return out


Reapply = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class _Layer:
    """One edit of one tensor; ``below``/grad state are what undoing it (at the top) puts back."""

    tensor: torch.Tensor
    below: torch.Tensor
    data: torch.Tensor
    reapply: Reapply | None  # None: the value does not depend on the tensor beneath
    requires_grad: bool
    grad: torch.Tensor | None
    grad_values: torch.Tensor | None


_LOCK = threading.RLock()
#: id(tensor) -> its edit stack (bottom first); an entry exists only while an edit is active,
#: and its layers hold the tensor, so the id cannot be reused meanwhile.
_STACKS: dict[int, list[_Layer]] = {}


def _push(tensor: torch.Tensor, compute: Reapply, reapply: Reapply | None) -> _Layer:
    with _LOCK:
        below = tensor.data
        grad = tensor.grad if tensor.is_leaf else None
        data = compute(below).detach().to(dtype=below.dtype, device=below.device)
        layer = _Layer(
            tensor,
            below,
            data,
            reapply,
            tensor.requires_grad,
            grad,
            None if grad is None else grad.detach().clone(),
        )
        tensor.data = data
        _STACKS.setdefault(id(tensor), []).append(layer)
        return layer


def _restore_flags(layer: _Layer) -> None:
    tensor = layer.tensor
    if tensor.is_leaf:
        tensor.requires_grad_(layer.requires_grad)
        if layer.grad is not None and layer.grad_values is not None:
            layer.grad.data = layer.grad_values
        tensor.grad = layer.grad


def _pop(layer: _Layer) -> None:
    with _LOCK:
        stack = _STACKS.get(id(layer.tensor), [])
        index = next((i for i, item in enumerate(stack) if item is layer), None)
        if index is None:  # already undone
            return
        del stack[index]
        tensor = layer.tensor
        if index == len(stack):  # it was the top: put back exactly what was beneath
            tensor.data = layer.below
            _restore_flags(layer)
        else:  # edits above it now sit on what was beneath it
            upper = stack[index]
            upper.requires_grad, upper.grad, upper.grad_values = (
                layer.requires_grad,
                layer.grad,
                layer.grad_values,
            )
            below = layer.below
            for item in stack[index:]:
                item.below = below
                if item.reapply is not None:
                    item.data = item.reapply(below).detach().to(dtype=below.dtype, device=below.device)
                below = item.data
            tensor.data = stack[-1].data
        if not stack:
            _STACKS.pop(id(tensor), None)


class _Restorer:
    """Handle undoing the layers of one install (idempotent, in reverse install order)."""

    __slots__ = ("_layers",)

    def __init__(self, layers: list[_Layer]) -> None:
        self._layers = layers

    def remove(self) -> None:
        layers, self._layers = self._layers, []
        for layer in reversed(layers):
            _pop(layer)


def _install(edits: list[tuple[torch.Tensor, Reapply, Reapply | None]]) -> _Restorer:
    layers: list[_Layer] = []
    try:
        for tensor, compute, reapply in edits:
            layers.append(_push(tensor, compute, reapply))
    except BaseException:
        _Restorer(layers).remove()
        raise
    return _Restorer(layers)


def _identity(below: torch.Tensor) -> torch.Tensor:
    return below


class ParameterSnapshot:
    """An installable that changes no value and, undone, puts back every tensor's grad state.

    Each tensor of ``module`` gets an identity edit: undone at the top it restores the tensor
    (and its ``requires_grad``/``.grad``) as it was at install; undone below other edits it
    just leaves the stack.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def install(self) -> _Restorer:
        return _install([(t, _identity, _identity) for t in named_tensors(self.module).values()])


@dataclass(frozen=True)
class _Constant:
    value: torch.Tensor

    def __call__(self, below: torch.Tensor) -> torch.Tensor:
        return self.value


@dataclass(frozen=True)
class _Multiply:
    mask: torch.Tensor

    def __call__(self, below: torch.Tensor) -> torch.Tensor:
        return below * self.mask


def _checked(
    module: nn.Module, new: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair each named value with its tensor; every check happens before any edit."""
    tensors = named_tensors(module)
    out = []
    for name, value in _items(new):
        if name not in tensors:
            raise WeightEditError(f"{what} names {name!r}, which is not a parameter or buffer of the model.")
        tensor = tensors[name]
        if not isinstance(value, torch.Tensor):
            raise WeightEditError(f"{what} for {name!r} must be a tensor, got {type(value).__name__}.")
        if value.shape != tensor.shape:
            raise WeightEditError(
                f"{what} for {name!r} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)} "
                "(the parameter's shape)."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightEditError(
                f"{what} for {name!r} has NaN or infinite entries; nothing was edited. Check the vectors "
                "and alpha."
            )
        out.append((tensor, value.detach()))
    return out


def swap_tensor(tensor: torch.Tensor, value: torch.Tensor) -> _Restorer:
    """Put ``value`` on ``tensor``'s edit stack (an absolute value, e.g. a canonizer's edit).

    Returns the handle whose ``remove()`` undoes it, in any order with the other edits of the
    tensor (the same rules as :class:`WeightSwap`).
    """
    return _install([(tensor, _Constant(value.detach()), None)])


class WeightSwap:
    """An installable that loads new values into some tensors of a module (absolute values).

    Args:
        module: The module whose tensors are edited.
        new_data: New values by dotted tensor name (``named_parameters()`` names), or a callable
            returning them, called at :meth:`install`.

    Raises (at install, before any edit):
        WeightEditError: For an unknown name, a shape other than the tensor's, or NaN/Inf.
    """

    def __init__(self, module: nn.Module, new_data: Mapping[str, torch.Tensor] | Any) -> None:
        self.module = module
        self.new_data = new_data

    def install(self) -> _Restorer:
        new = self.new_data() if callable(self.new_data) else self.new_data
        pairs = _checked(self.module, new, "New value")
        return _install([(tensor, _Constant(value), None) for tensor, value in pairs])


class WeightMask:
    """An installable that multiplies some tensors of a module by masks (1 kept, 0 pruned).

    Undone below other edits, a mask entered later is applied again to the tensor beneath.

    Args:
        module: The module whose tensors are edited.
        masks: Masks by dotted tensor name, or a callable returning them, called at
            :meth:`install`.
    """

    def __init__(self, module: nn.Module, masks: Mapping[str, torch.Tensor] | Any) -> None:
        self.module = module
        self.masks = masks

    def install(self) -> _Restorer:
        new = self.masks() if callable(self.masks) else self.masks
        pairs = _checked(self.module, new, "Mask")
        edits: list[tuple[torch.Tensor, Reapply, Reapply | None]] = []
        for tensor, mask in pairs:
            multiply = _Multiply(mask.to(tensor.device))
            edits.append((tensor, multiply, multiply))
        return _install(edits)


def _items(new: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Iterable[Any]:
    return new.items() if isinstance(new, Mapping) else new

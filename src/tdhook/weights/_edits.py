"""Reversible weight edits: swap parameter data in, restore the exact original tensors on exit.

Weight methods (pruning, task vectors) never write into the user's tensors. An edit replaces
``param.data`` with a new tensor and keeps the original one; undoing it puts the original tensor
object back, so the parameters are bit-identical afterwards (same storage, even if the body
trained the edited weights in place). The ``Parameter`` objects themselves never change, so
optimizers holding them keep working. ``requires_grad`` flags and ``.grad`` values (the same
gradient tensor, with its values at install time) are restored too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ParameterSnapshot", "WeightSwap", "named_tensors"]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers of ``module`` by dotted name (the editable state)."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            out[name] = buffer
    return out


@dataclass(frozen=True)
class _Saved:
    tensor: torch.Tensor
    data: torch.Tensor
    requires_grad: bool
    grad: torch.Tensor | None
    grad_values: torch.Tensor | None

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Saved:
        grad = tensor.grad if tensor.is_leaf else None
        return cls(
            tensor,
            tensor.data,
            tensor.requires_grad,
            grad,
            None if grad is None else grad.detach().clone(),
        )

    def restore(self) -> None:
        tensor = self.tensor
        tensor.data = self.data
        if tensor.is_leaf:
            tensor.requires_grad_(self.requires_grad)
            if self.grad is not None and self.grad_values is not None:
                self.grad.data = self.grad_values
            tensor.grad = self.grad


class _Restorer:
    """Handle undoing a :class:`WeightSwap` / :class:`ParameterSnapshot` (idempotent)."""

    __slots__ = ("_saved",)

    def __init__(self, saved: list[_Saved]) -> None:
        self._saved = saved

    def remove(self) -> None:
        saved, self._saved = self._saved, []
        for item in reversed(saved):
            item.restore()


class ParameterSnapshot:
    """An installable that changes nothing and restores every tensor of ``module`` on removal.

    Methods whose edits happen *during* the context (task vectors applied on demand) install it
    first, so the model is restored even if an edit was interrupted.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def install(self) -> _Restorer:
        return _Restorer([_Saved.of(t) for t in named_tensors(self.module).values()])


class WeightSwap:
    """An installable that swaps new data into some tensors of a module.

    Args:
        module: The module whose tensors are edited.
        new_data: New values by dotted tensor name (``named_parameters()`` names); values are
            computed when :meth:`install` is called if given as a callable returning the mapping.
    """

    def __init__(self, module: nn.Module, new_data: Mapping[str, torch.Tensor] | Any) -> None:
        self.module = module
        self.new_data = new_data

    def install(self) -> _Restorer:
        new = self.new_data() if callable(self.new_data) else self.new_data
        tensors = named_tensors(self.module)
        saved: list[_Saved] = []
        try:
            for name, value in _items(new):
                tensor = tensors[name]
                if value.shape != tensor.shape:
                    raise ValueError(
                        f"New value of {name!r} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}."
                    )
                saved.append(_Saved.of(tensor))
                tensor.data = value.detach().to(dtype=tensor.dtype, device=tensor.device)
        except BaseException:
            _Restorer(saved).remove()
            raise
        return _Restorer(saved)


def _items(new: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Iterable[Any]:
    return new.items() if isinstance(new, Mapping) else new

"""Reversible model edits for LRP: parameter swaps and canonizers (part of :mod:`tdhook.attribution.lrp`).

Every edit is an :class:`~tdhook.core.Installable`: ``install()`` changes the model and
returns a handle whose ``remove()`` restores it bit for bit. Tensor edits (weights, biases,
BatchNorm statistics) go on the weights' edit stack (:func:`tdhook.weights.swap_tensor`): the
``nn.Parameter`` objects stay the same, and LRP, Pruning, TaskVectors... contexts on one model
may exit in any order (also after an exception) and still restore the original tensors. A
missing bias is added as a new parameter and removed again; plain attributes (``eps``,
``inplace``) are set and reset.

:class:`MergeBatchNorm` folds every BatchNorm into the linear layer or convolution before it and
turns the BatchNorm into an exact identity, so that LRP rules see one affine layer (the
canonical form the rules are defined for).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ...core import HandleGroup, Installable, install, resolve_path
from ...weights import swap_tensor
from ._errors import CanonizerError, RuleDefinitionError
from ._types import BatchNorm, ConvolutionStandard, Dense

__all__ = ["Canonizer", "MergeBatchNorm", "ParamModifier"]


# ------------------------------------------------------------------------------------------
# One reversible assignment
# ------------------------------------------------------------------------------------------


class _How(Enum):
    STACK = "stack"  # a tensor: on the weights' edit stack (composes with Pruning, TaskVectors...)
    UNREGISTER = "unregister"
    SETATTR = "setattr"


@dataclass(eq=False)
class _Edit:
    """One attribute under edit: the original (restored by the last holder) and the edited value."""

    saved: Any
    how: _How
    value: Any
    holders: int = 1


#: module -> {attribute name -> its active edit}. Every edit of the same attribute, from any
#: context or thread, shares one entry: the first saves the original, the last restores it, so
#: contexts may exit in any order. A second edit to a *different* value is refused.
_EDITS: weakref.WeakKeyDictionary[nn.Module, dict[str, _Edit]] = weakref.WeakKeyDictionary()
#: Re-entrant: a canonizer or ParamModifier computes its edits from the model and installs them
#: while holding it (see :func:`_planned_install`), so no thread computes from a half-edited model.
_EDITS_LOCK = threading.RLock()


def _planned_install(plan: Callable[[], list[Installable]]) -> HandleGroup:
    """Compute edits from the model and install them as one step, atomic with every other edit.

    Edits are values computed from the model's current state (a merged BatchNorm's weight). If
    another thread could install or remove its edits while they are computed, the values computed
    from that half-edited model would be wrong (or refused as a conflict); so computing, installing
    and removing a group all hold one lock.
    """
    with _EDITS_LOCK:
        return HandleGroup([_Undo(install(plan()))])


class _Undo:
    """Remove a whole group of edits under the lock, so no thread computes from a half-restored model."""

    __slots__ = ("group",)

    def __init__(self, group: HandleGroup) -> None:
        self.group = group

    def remove(self) -> None:
        with _EDITS_LOCK:
            self.group.remove()


@dataclass(frozen=True, eq=False)
class _Canonize:
    """Installable: apply ``canonizer`` to ``root`` at install time (planned and installed atomically)."""

    canonizer: Canonizer
    root: nn.Module

    def install(self) -> HandleGroup:
        return _planned_install(lambda: self.canonizer.plan(self.root))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach().to(b.device), b.detach()))
        )
    return bool(a == b) and type(a) is type(b)


@dataclass(frozen=True, eq=False)
class _Assign:
    """Set ``module.<name>`` (a parameter, buffer or plain attribute) to ``value`` reversibly.

    Restoration is exact whatever the order in which overlapping edits end: edits of one
    attribute to the same value share the saved original (the last one out restores it); an
    edit to a different value while another is active raises :class:`CanonizerError` before
    anything changes.
    """

    module: nn.Module
    name: str
    value: Any

    def install(self) -> _Restore:
        module, name = self.module, self.name
        with _EDITS_LOCK:
            edits = _EDITS.setdefault(module, {})
            active = edits.get(name)
            if active is not None:
                current = getattr(module, name)
                if not _same_value(self.value, active.value) or not _same_value(current, active.value):
                    raise CanonizerError(
                        f"{type(module).__name__}.{name} is already edited by another active LRP context or "
                        "canonizer (to a different value), whose restore would then be wrong. Exit that context "
                        "first, or use one model copy per context (copy.deepcopy(model))."
                    )
                active.holders += 1
                return _Restore(module, name, active)
            current = getattr(module, name)
            if isinstance(current, torch.Tensor) and isinstance(self.value, torch.Tensor):
                value = self.value.detach().to(dtype=current.dtype, device=current.device).expand_as(current)
                edit = _Edit(swap_tensor(current, value.clone()), _How.STACK, value.clone())
            elif current is None and isinstance(self.value, torch.Tensor):  # e.g. a layer without bias
                module.register_parameter(
                    name, nn.Parameter(self.value.detach().clone(), requires_grad=False)
                )
                edit = _Edit(None, _How.UNREGISTER, getattr(module, name).detach().clone())
            else:
                setattr(module, name, self.value)
                edit = _Edit(current, _How.SETATTR, self.value)
            edits[name] = edit
            return _Restore(module, name, edit)


class _Restore:
    __slots__ = ("edit", "module", "name")

    def __init__(self, module: nn.Module, name: str, edit: _Edit | None) -> None:
        self.module, self.name, self.edit = module, name, edit

    def remove(self) -> None:
        edit, self.edit = self.edit, None  # idempotent
        if edit is None:
            return
        with _EDITS_LOCK:
            edit.holders -= 1
            if edit.holders > 0:
                return
            edits = _EDITS.get(self.module)
            if edits is not None and edits.get(self.name) is edit:
                del edits[self.name]
                if not edits:
                    del _EDITS[self.module]
            if edit.how is _How.STACK:
                edit.saved.remove()
            elif edit.how is _How.UNREGISTER:
                self.module.register_parameter(self.name, None)
            elif edit.how is _How.SETATTR:
                setattr(self.module, self.name, edit.saved)


# ------------------------------------------------------------------------------------------
# ParamModifier (tdhook 0.1 compatibility)
# ------------------------------------------------------------------------------------------


def _select_all(param: torch.Tensor, name: str) -> bool:
    return True


class ParamModifier:
    """Temporarily replace selected parameters of a module by modified values.

    Args:
        modify_fn: ``f(param, name) -> tensor`` giving the new value (default: unchanged). It
            runs under the lock every canonizer edit shares, like :meth:`Canonizer.plan`.
        select_fn: ``f(param, name) -> bool`` choosing the parameters to modify (default: all).

    Examples:
        >>> lin = torch.nn.Linear(2, 2)
        >>> before = lin.weight.detach().clone()
        >>> with ParamModifier(lambda p, name: p.clamp(min=0))(lin):
        ...     bool((lin.weight >= 0).all())
        True
        >>> torch.equal(lin.weight, before)
        True
    """

    select_all = staticmethod(_select_all)

    def __init__(
        self,
        modify_fn: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
        select_fn: Callable[[torch.Tensor, str], bool] | None = None,
    ) -> None:
        self.modify_fn = modify_fn
        self.select_fn = select_fn or _select_all

    @classmethod
    def from_modifiers(cls, modifiers: Sequence[ParamModifier]) -> ParamModifier:
        """One modifier applying ``modifiers`` in order (each on its own selection)."""
        return cls(_Chain(tuple(modifiers)))

    def modify(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The new value of ``param`` (itself when not selected)."""
        if self.modify_fn is None or not self.select_fn(param, name):
            return param
        return self.modify_fn(param, name)

    def bind(self, module: nn.Module) -> list[Installable]:
        """Installables applying the modification to ``module``'s own parameters."""
        edits: list[Installable] = []
        for name, param in module.named_parameters(recurse=False):
            new = self.modify(param.detach(), name)
            if new is not param:
                edits.append(_Assign(module, name, new))
        return edits

    def __call__(self, module: nn.Module) -> HandleGroup:
        """Apply to ``module`` now; the returned group (a context manager) restores it."""
        return _planned_install(lambda: self.bind(module))


@dataclass(frozen=True)
class _Chain:
    modifiers: tuple[ParamModifier, ...]

    def __call__(self, param: torch.Tensor, name: str) -> torch.Tensor:
        for modifier in self.modifiers:
            param = modifier.modify(param, name)
        return param


# ------------------------------------------------------------------------------------------
# Canonizers
# ------------------------------------------------------------------------------------------


class Canonizer:
    """Base of canonizers: :meth:`plan` lists the reversible edits for a model."""

    def plan(self, root: nn.Module) -> list[Installable]:
        """The edits to install on ``root`` (the user's model).

        :meth:`apply` and LRP call it while holding the lock shared by every canonizer and
        ``ParamModifier`` edit, so that it never reads a model another thread is editing; it
        must therefore not wait for another thread that applies a canonizer.

        Raises:
            RuleDefinitionError: When a subclass does not define it (a ``NotImplementedError``).
        """
        raise RuleDefinitionError(
            f"{type(self).__name__} does not implement plan(root) -> list of installables; define it, "
            "e.g. returning MergeBatchNorm().plan(root)."
        )

    def apply(self, root: nn.Module) -> HandleGroup:
        """Apply to ``root`` now; the returned group (a context manager) undoes it."""
        return _planned_install(lambda: self.plan(root))


class MergeBatchNorm(Canonizer):
    """Fold each BatchNorm into the preceding linear layer or convolution.

    For ``y = γ (W x + b − μ) / √(σ² + ε) + β`` the layer gets ``W' = s W`` and
    ``b' = s (b − μ) + β`` with ``s = γ / √(σ² + ε)``, and the BatchNorm is set to an exact
    identity (``γ = 1, β = 0, μ = 0, σ² = 1, ε = 0``). Everything is restored bit for bit at exit.

    Args:
        pairs: ``[(layer_path, batchnorm_path), ...]`` relative to the model. ``None``: every
            ``nn.Linear``/``ConvNd`` immediately followed by a BatchNorm inside an
            ``nn.Sequential``.

    Raises:
        CanonizerError: (a ``ValueError``) when a BatchNorm is in training mode or has no running
            statistics, or does not match its layer's number of features.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
        >>> x = torch.randn(5, 3)
        >>> with MergeBatchNorm().apply(model):
        ...     merged = model(x)
        >>> torch.allclose(merged, model(x), atol=1e-6)
        True
    """

    def __init__(self, pairs: Sequence[tuple[str, str]] | None = None) -> None:
        self.pairs = None if pairs is None else [(str(a), str(b)) for a, b in pairs]

    def _find(self, root: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
        if self.pairs is not None:
            return [(a, resolve_path(root, a), b, resolve_path(root, b)) for a, b in self.pairs]
        found = []
        for prefix, module in root.named_modules():
            if not isinstance(module, nn.Sequential):
                continue
            children = list(module.named_children())
            for (na, a), (nb, b) in itertools.pairwise(children):
                if _mergeable(a) and isinstance(b, BatchNorm):
                    join = f"{prefix}." if prefix else ""
                    found.append((join + na, a, join + nb, b))
        return found

    def plan(self, root: nn.Module) -> list[Installable]:
        edits: list[Installable] = []
        for layer_name, layer, bn_name, bn in self._find(root):
            edits.extend(_merge(layer_name, layer, bn_name, bn))
        return edits

    def __repr__(self) -> str:
        return f"MergeBatchNorm(pairs={self.pairs!r})"


def _mergeable(layer: nn.Module) -> bool:
    return isinstance(layer, (*Dense, *ConvolutionStandard))


def _merge(layer_name: str, layer: Any, bn_name: str, bn: Any) -> list[Installable]:
    if not _mergeable(layer):
        raise CanonizerError(
            f"MergeBatchNorm: {layer_name!r} is a {type(layer).__name__}, expected nn.Linear or a ConvNd. Pass pairs=[(layer_path, batchnorm_path)] naming such a layer."
        )
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None:
        raise CanonizerError(
            f"MergeBatchNorm: {bn_name!r} ({type(bn).__name__}) has no running statistics "
            "(track_running_stats=False), so it cannot be folded. Leave it out of `pairs`."
        )
    if getattr(bn, "training", False):
        raise CanonizerError(
            f"MergeBatchNorm: {bn_name!r} is in training mode, where it normalises with batch statistics "
            "and cannot be folded. Call model.eval() before prepare()."
        )
    weight: torch.Tensor = layer.weight
    if weight.shape[0] != mean.shape[0]:
        raise CanonizerError(
            f"MergeBatchNorm: {layer_name!r} has {weight.shape[0]} output features but {bn_name!r} normalises "
            f"{mean.shape[0]}. Pass the right `pairs`."
        )
    with torch.no_grad():
        dtype = torch.float64
        gamma = bn.weight.to(dtype) if getattr(bn, "weight", None) is not None else 1.0
        beta = bn.bias.to(dtype) if getattr(bn, "bias", None) is not None else 0.0
        scale = gamma / torch.sqrt(var.to(dtype) + float(bn.eps))
        bias = layer.bias.to(dtype) if layer.bias is not None else torch.zeros_like(mean, dtype=dtype)
        new_weight = (weight.to(dtype) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
        new_bias = ((bias - mean.to(dtype)) * scale + beta).to(weight.dtype)
    edits: list[Installable] = [_Assign(layer, "weight", new_weight), _Assign(layer, "bias", new_bias)]
    if getattr(bn, "weight", None) is not None:
        edits.append(_Assign(bn, "weight", torch.ones_like(bn.weight)))
    if getattr(bn, "bias", None) is not None:
        edits.append(_Assign(bn, "bias", torch.zeros_like(bn.bias)))
    edits += [
        _Assign(bn, "running_mean", torch.zeros_like(mean)),
        _Assign(bn, "running_var", torch.ones_like(var)),
        _Assign(bn, "eps", 0.0),
    ]
    return edits

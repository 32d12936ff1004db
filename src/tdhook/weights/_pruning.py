"""Pruning: zero the least important weights for the duration of a context.

Global mode removes a fraction (or a count) of the entries with the smallest ``|score|`` across
every scored parameter, as ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
does; structured mode removes whole slices along one dimension of the parameters of chosen
modules, as ``torch.nn.utils.prune.ln_structured(n=1)`` does. The edit is a
:class:`~tdhook.weights._edits.WeightMask`: on exit (also after an exception, and in any order
relative to other weight edits) the original tensors are put back, bit-identical, with their
``requires_grad`` flags and gradients.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from .._core.directions import Installable
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.lifecycle import HookingContext
from .._core.paths import resolve_path
from ..errors import InvalidInputError, TdhookError
from ._edits import WeightMask

__all__ = ["Pruning", "PruningAmountError", "PruningContext", "PruningSpecError"]

#: Module names that are the wrappers around the user's model, never pruned by default_skip.
_WRAPPER_NAMES = frozenset({"", "td_module", "module"})

Amount = float | int
Score = Callable[..., Any]


class PruningAmountError(TdhookError, ValueError):
    """A pruning amount is not a fraction in [0, 1] or a count within the number of weights."""


class PruningSpecError(TdhookError, ValueError):
    """A pruning specification or score does not fit the model (dim out of range, NaN scores...)."""


def _check_amount(amount: Any, what: str) -> Amount | None:
    if amount is None:
        return None
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise PruningAmountError(
            f"{what} must be a fraction in [0, 1] (float) or a number of weights (int), got {amount!r}."
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise PruningAmountError(f"{what} must be a non-negative number of weights, got {amount}.")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise PruningAmountError(
            f"{what} must be a fraction in [0, 1], got {amount}. Pass e.g. 0.3 to prune 30% of the weights, "
            "or an int to prune that many."
        )
    return float(amount)


def _count(amount: Amount, total: int, what: str) -> int:
    """Number of entries to prune (torch's rounding: ``round(amount * total)`` for fractions)."""
    if isinstance(amount, int):
        if amount > total:
            raise PruningAmountError(
                f"{what} asks to prune {amount} weights but only {total} are scored. "
                f"Pass at most {total}, or a fraction in [0, 1]."
            )
        return amount
    return round(amount * total)


def magnitude_importance(module_key: str, parameter_name: str, parameter: torch.Tensor) -> torch.Tensor:
    """Score every parameter by its own value (magnitude pruning)."""
    return parameter


def default_skip(name: str, module: nn.Module) -> bool:
    """Skip the wrapper names (``""``, ``"td_module"``, ``"module"``) and containers."""
    return name in _WRAPPER_NAMES or isinstance(module, (nn.ModuleList, nn.Sequential, TensorDictModule))


class PruningContext(HookingContext):
    """The context of :class:`Pruning` (the edit itself is part of the factory's plan)."""


class Pruning(HookingContextFactory[PruningContext]):
    """Prune weights for the duration of the context; the original weights come back at exit.

    **Global mode** (``modules_to_prune=None``): every direct parameter of every module of the
    root that ``skip_modules`` does not skip is scored with ``importance_callback(module_key=...,
    parameter_name=..., parameter=...)`` (None leaves the parameter out); the ``amount_to_prune``
    entries with the smallest ``|score|`` across all of them are set to zero.

    **Structured mode** (``modules_to_prune={path: (dim, amount)}``): each scored parameter of the
    module at ``path`` with at least two and more than ``dim`` dimensions loses the fraction
    ``amount`` (or ``amount_to_prune`` when ``amount`` is None) of its slices along ``dim`` with
    the smallest L1 norm of the score. Other parameters (biases) are left as is.

    Args:
        importance_callback: ``(module_key, parameter_name, parameter) -> score or None``; None
            means magnitude pruning (the score is the parameter).
        amount_to_prune: Fraction in [0, 1] or number of entries (global) / slices (structured).
        modules_to_prune: ``{module_path: (dim, amount_or_None)}`` for structured pruning.
        skip_modules: ``(name, module) -> bool``; True excludes the module in global mode. Use
            :meth:`Pruning.default_skip` to leave out wrappers and containers.
        relative_path: Path, inside the model, of the sub-module to prune (default: the whole
            model). Module names are relative to it.

    Raises:
        PruningSpecError: If neither ``amount_to_prune`` nor ``modules_to_prune`` is given, or a
            structured entry has no amount.
        PruningAmountError: If an amount is outside [0, 1] (fractions) or negative (counts).
        PruningSpecError: At enter, before any edit: a structured ``dim`` outside a weight's
            dimensions, or scores that are not finite real tensors of the parameter's shape.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> with Pruning(None, amount_to_prune=0.5).prepare(model) as hooked:
        ...     zeros = sum(int((p == 0).sum()) for p in model.parameters())
        >>> zeros == round(0.5 * sum(p.numel() for p in model.parameters()))
        True
        >>> int((model[0].weight == 0).sum())  # restored
        0
    """

    _hooking_context_class = PruningContext
    _thread_safe = True  # the masks of each context live in that context (see masks_for)
    default_skip = staticmethod(default_skip)
    magnitude_importance = staticmethod(magnitude_importance)

    def __init__(
        self,
        importance_callback: Score | None,
        amount_to_prune: Amount | None = None,
        modules_to_prune: Mapping[str, tuple[int, Amount | None]] | None = None,
        skip_modules: Callable[[str, nn.Module], bool] | None = None,
        relative_path: str | None = None,
    ) -> None:
        if importance_callback is not None and not callable(importance_callback):
            raise InvalidInputError(
                "importance_callback must be callable as (module_key, parameter_name, parameter) -> score, "
                f"got {type(importance_callback).__name__}. Pass None for magnitude pruning."
            )
        self._importance = importance_callback or magnitude_importance
        self._amount = _check_amount(amount_to_prune, "amount_to_prune")
        if self._amount is None and modules_to_prune is None:
            raise PruningSpecError(
                "`amount_to_prune` is required for global pruning: pass e.g. amount_to_prune=0.3, "
                "or modules_to_prune={'layer': (dim, amount)} for structured pruning."
            )
        self._structured: dict[str, tuple[int, Amount]] | None = None
        if modules_to_prune is not None:
            self._structured = {}
            for path, spec in modules_to_prune.items():
                if not (
                    isinstance(spec, tuple)
                    and len(spec) == 2
                    and isinstance(spec[0], int)
                    and not isinstance(spec[0], bool)
                ):
                    raise PruningSpecError(
                        f"modules_to_prune[{path!r}] must be a (dim, amount_or_None) tuple, got {spec!r}."
                    )
                amount = _check_amount(spec[1], f"modules_to_prune[{path!r}] amount")
                amount = amount if amount is not None else self._amount
                if amount is None:
                    raise PruningSpecError(
                        f"modules_to_prune[{path!r}] has no amount and amount_to_prune is None. "
                        "Give one of them."
                    )
                self._structured[path] = (spec[0], amount)
        self._skip = skip_modules
        self._relative_path = relative_path or ""
        #: The masks of the context most recently entered (in any thread).
        self._last_masks: dict[str, torch.Tensor] = {}

    @property
    def modules_to_prune(self) -> dict[str, tuple[int, Amount]] | None:
        return None if self._structured is None else dict(self._structured)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks (1 kept, 0 pruned) of the context most recently entered, in any thread, by
        parameter name relative to the root (empty before any).

        Each context keeps its own masks: with contexts of one instance in several threads, read
        a context's masks with :meth:`masks_for`.
        """
        return dict(self._last_masks)

    def masks_for(self, hooked: HookedModule) -> dict[str, torch.Tensor]:
        """The masks of the context whose hooked module is ``hooked`` (empty if it did not prune)."""
        return dict(hooked.method_state(self, dict))

    def _plan(self, hooked: HookedModule) -> list[Installable]:
        root = resolve_path(hooked.root, self._relative_path) if self._relative_path else hooked.root
        return [WeightMask(root, functools.partial(self._masks, root, hooked.method_state(self, dict)))]

    # -- mask computation (called at install time) --------------------------------------------
    def _masks(self, root: nn.Module, store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the masks into ``store`` (the context's own dict) and return them."""
        names = {id(p): n for n, p in root.named_parameters()}
        masks = (
            self._global_masks(root, names)
            if self._structured is None
            else self._structured_masks(root, names)
        )
        store.clear()
        store.update(masks)
        self._last_masks = store
        return masks

    def _score(self, module_key: str, name: str, parameter: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            score = self._importance(module_key=module_key, parameter_name=name, parameter=parameter)
        if score is None:
            return None
        if not isinstance(score, torch.Tensor):
            raise PruningSpecError(
                f"importance_callback returned {type(score).__name__} for {module_key}.{name}; return a tensor "
                "of the parameter's shape (or None to skip it)."
            )
        score = score.detach()
        if score.shape != parameter.shape:
            raise PruningSpecError(
                f"importance_callback returned a score of shape {tuple(score.shape)} for {module_key}.{name} "
                f"of shape {tuple(parameter.shape)}. Return one score per entry (or None to skip it)."
            )
        if score.is_complex() or score.dtype == torch.bool:
            raise PruningSpecError(
                f"importance_callback returned a {score.dtype} score for {module_key}.{name}; return real "
                "(integer or floating-point) scores."
            )
        if score.is_floating_point() and not bool(torch.isfinite(score).all()):
            bad = int((~torch.isfinite(score)).sum())
            raise PruningSpecError(
                f"importance_callback returned {bad} NaN or infinite score(s) for {module_key}.{name}; nothing "
                "was pruned. Return finite scores (e.g. torch.nan_to_num(score))."
            )
        return score

    def _global_masks(self, root: nn.Module, param_names: dict[int, str]) -> dict[str, torch.Tensor]:
        names, scores, seen = [], [], set()
        for module_key, module in root.named_modules():
            if self._skip is not None and self._skip(module_key, module):
                continue
            for name, parameter in module.named_parameters(recurse=False):
                full = param_names[id(parameter)]
                if full in seen:  # a tied parameter is scored once
                    continue
                seen.add(full)
                score = self._score(module_key, name, parameter)
                if score is not None:
                    names.append(full)
                    scores.append(score)
        if not scores:
            raise PruningSpecError(
                "Nothing to prune: importance_callback returned None for every parameter (or skip_modules "
                "skipped every module). Return a score for the parameters to prune."
            )
        flat = torch.cat([s.reshape(-1).to(scores[0]) for s in scores]).abs()
        assert self._amount is not None  # checked in __init__ for global mode
        k = _count(self._amount, flat.numel(), "amount_to_prune")
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k:
            keep[torch.topk(flat, k=k, largest=False).indices] = False
        masks, start = {}, 0
        for name, score in zip(names, scores):
            n = score.numel()
            masks[name] = keep[start : start + n].view(score.shape).to(score.device)
            start += n
        return masks

    def _structured_masks(self, root: nn.Module, param_names: dict[int, str]) -> dict[str, torch.Tensor]:
        assert self._structured is not None
        masks = {}
        for path, (dim, amount) in self._structured.items():
            module = resolve_path(root, path)
            for name, parameter in module.named_parameters(recurse=False):
                score = self._score(path, name, parameter)
                if score is None or score.dim() < 2:  # biases are left as is, as torch's ln_structured
                    continue
                if not -score.dim() <= dim < score.dim():
                    raise PruningSpecError(
                        f"modules_to_prune[{path!r}] prunes along dim={dim}, but {path}.{name} has shape "
                        f"{tuple(score.shape)} (dims {-score.dim()}..{score.dim() - 1}); nothing was pruned. "
                        "Use dim=0 for output units or dim=1 for input features."
                    )
                axis = dim % score.dim()
                others = [d for d in range(score.dim()) if d != axis]
                norm = score.abs().sum(dim=others) if others else score.abs()  # sum(dim=[]) sums everything
                size = norm.numel()
                kept = size - _count(amount, size, f"modules_to_prune[{path!r}] amount")
                mask_1d = torch.zeros(size, dtype=torch.bool, device=norm.device)
                if kept:
                    mask_1d[torch.topk(norm, k=kept, largest=True).indices] = True
                shape = [1] * score.dim()
                shape[axis] = size
                masks[param_names[id(parameter)]] = mask_1d.view(shape).expand_as(score)
        return masks

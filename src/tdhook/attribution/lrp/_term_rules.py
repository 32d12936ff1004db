"""The LRP rules built from terms: modified inputs × modified parameters (:mod:`tdhook.attribution.lrp`).

z⁺, α-β, γ, w², flat and z^B are *terms*: each term runs the layer on a modified input with
modified parameters; terms are summed into a denominator ``z_g`` per group, and
``R_in = Σ_g c_g Σ_t x_t ⊙ J_tᵀ (R / stab(z_g))``. Linear layers and convolutions run through
``torch.nn.functional`` (no hook fires); other modules run through
:func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import RuleDefinitionError, RuleParameterError, UnsupportedModuleError
from ._rule import Rule, stabilize
from ._rules import single_input

__all__ = ["AlphaBetaRule", "FlatRule", "GammaRule", "WSquareRule", "ZBoxRule", "ZPlusRule"]

Tensors = Sequence[torch.Tensor]

ParamFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]
InputFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


def _negative(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(max=0)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x)


@dataclass(frozen=True)
class _Bound:
    """Input modifier of z^B: ``-bound`` broadcast to the input."""

    bound: torch.Tensor | float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bound = torch.as_tensor(self.bound, dtype=x.dtype, device=x.device)
        return (-bound).expand_as(x).clone()


def _no_bias(p: torch.Tensor, name: str) -> torch.Tensor | None:
    return None if name == "bias" else p


def _square(p: torch.Tensor, name: str) -> torch.Tensor | None:
    return p * p


def _flat(p: torch.Tensor, name: str) -> torch.Tensor | None:
    return None if name == "bias" else torch.ones_like(p)


@dataclass(frozen=True)
class _Clamp:
    """Parameter modifier: the positive (``positive=True``) or negative part; bias optionally dropped."""

    positive: bool
    keep_bias: bool = True

    def __call__(self, p: torch.Tensor, name: str) -> torch.Tensor | None:
        if name == "bias" and not self.keep_bias:
            return None
        return p.clamp(min=0) if self.positive else p.clamp(max=0)


@dataclass(frozen=True)
class _Gamma:
    """Parameter modifier of LRP-γ: ``p + γ p⁺`` (bias included)."""

    gamma: float

    def __call__(self, p: torch.Tensor, name: str) -> torch.Tensor | None:
        return p + self.gamma * p.clamp(min=0)


@dataclass(frozen=True)
class _Term:
    input_fn: InputFn
    param_fn: ParamFn


@dataclass(frozen=True)
class _Group:
    coefficient: float
    terms: tuple[_Term, ...]


_CONV_FUNCS: dict[type, Callable[..., torch.Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
_CONV_T_FUNCS: dict[type, Callable[..., torch.Tensor]] = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _own_params(module: nn.Module) -> dict[str, torch.Tensor | None]:
    params: dict[str, torch.Tensor | None] = {
        name: p.detach() for name, p in module.named_parameters(recurse=False)
    }
    if isinstance(module, (nn.Linear, *_CONV_FUNCS, *_CONV_T_FUNCS)) and module.bias is None:
        params["bias"] = None
    return params


def _forward_with(module: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Run ``module`` on ``x`` with ``params`` in place of its own (no hook of ``module`` fires)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, params["weight"], params["bias"])  # type: ignore[arg-type]
    conv = _CONV_FUNCS.get(type(module))
    if conv is not None and module.padding_mode == "zeros":  # type: ignore[union-attr]
        m: Any = module
        return conv(x, params["weight"], params["bias"], m.stride, m.padding, m.dilation, m.groups)
    conv_t = _CONV_T_FUNCS.get(type(module))
    if conv_t is not None:
        m = module
        return conv_t(
            x, params["weight"], params["bias"], m.stride, m.padding, m.output_padding, m.groups, m.dilation
        )
    filled = {
        name: (torch.zeros_like(dict(module.named_parameters(recurse=False))[name]) if p is None else p)
        for name, p in params.items()
    }
    out = torch.func.functional_call(module, filled, (x,))  # rule hooks are bypassed by the caller
    return out[0] if isinstance(out, tuple) else out


class _TermRule(Rule):
    """A rule given as groups of terms (see the module docstring)."""

    uses_outputs = False

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = stabilizer

    def _groups(self) -> tuple[_Group, ...]:
        """The groups of terms of the rule."""
        raise RuleDefinitionError(f"{type(self).__name__} does not define its groups of terms (_groups()).")

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        single_input(self, module, inputs)

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        x = inputs[0].detach()
        params = _own_params(module)
        total: torch.Tensor | None = None
        for group in self._groups():
            if group.coefficient == 0:
                continue
            xs = [term.input_fn(x).detach().requires_grad_(True) for term in group.terms]
            z: torch.Tensor = sum(  # type: ignore[assignment]
                _forward_with(
                    module, xt, {n: term.param_fn(p, n) if p is not None else None for n, p in params.items()}
                )
                for term, xt in zip(group.terms, xs)
            )
            weight = relevance[0] / stabilize(z.detach(), self.stabilizer)
            grads = torch.autograd.grad(z, xs, weight, allow_unused=True)
            part = sum(xt.detach() * g for xt, g in zip(xs, grads) if g is not None)
            if isinstance(part, torch.Tensor):
                part = part * group.coefficient
                total = part if total is None else total + part
        return [total]


class AlphaBetaRule(_TermRule):
    """LRP-αβ: positive and negative contributions weighted by α and β (α − β = 1).

    ``R_in = α ⋅ Σ (x⊙w)⁺ / (Σ (x⊙w)⁺ + b⁺) ⋅ R − β ⋅ Σ (x⊙w)⁻ / (Σ (x⊙w)⁻ + b⁻) ⋅ R``,
    computed with ``x⁺w⁺ + x⁻w⁻`` (positive part) and ``x⁺w⁻ + x⁻w⁺`` (negative part); the bias
    enters each part once. ``AlphaBetaRule(1, 0)`` is z⁺ (zennit's ``ZPlus``).

    Args:
        alpha: Weight of the positive contributions (≥ 0).
        beta: Weight of the negative contributions (≥ 0, ``alpha - beta == 1``).
        stabilizer: Stabiliser of the denominators.

    Raises:
        RuleParameterError: (a ``ValueError``) for negative α or β, or α − β ≠ 1.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        if alpha < 0 or beta < 0:
            raise RuleParameterError(
                f"Both alpha and beta parameters must be non-negative! Got alpha={alpha}, beta={beta}; "
                "e.g. AlphaBetaRule(alpha=2.0, beta=1.0) or AlphaBetaRule(1.0, 0.0) (z+)."
            )
        if not math.isclose(alpha - beta, 1.0, rel_tol=0.0, abs_tol=1e-9):
            raise RuleParameterError(
                f"The difference of parameters alpha - beta must equal 1! Got alpha={alpha}, beta={beta} "
                f"(alpha - beta = {alpha - beta}); use beta = alpha - 1, e.g. alpha={beta + 1}."
            )
        self.alpha = alpha
        self.beta = beta

    def _groups(self) -> tuple[_Group, ...]:
        return _alpha_beta_groups(self.alpha, self.beta)

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _alpha_beta_check(module, inputs)


def _alpha_beta_groups(alpha: float, beta: float) -> tuple[_Group, ...]:
    positive = _Group(
        alpha, (_Term(_positive, _Clamp(True)), _Term(_negative, _Clamp(False, keep_bias=False)))
    )
    negative = _Group(
        -beta, (_Term(_positive, _Clamp(False)), _Term(_negative, _Clamp(True, keep_bias=False)))
    )
    return (positive, negative)


def _alpha_beta_check(module: nn.Module, inputs: Tensors) -> None:
    if len(inputs) != 1:
        raise UnsupportedModuleError(
            f"AlphaBetaRule does not support multiple inputs: {type(module).__name__} received "
            f"{len(inputs)} tensors. Use EpsilonRule for this module."
        )


class ZPlusRule(_TermRule):
    """LRP-z⁺: the α-β rule (:class:`AlphaBetaRule`) with α = 1, β = 0.

    Args:
        stabilizer: Stabiliser of the denominator.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        self.alpha = 1.0
        self.beta = 0.0

    def _groups(self) -> tuple[_Group, ...]:
        return _alpha_beta_groups(self.alpha, self.beta)

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _alpha_beta_check(module, inputs)


class GammaRule(_TermRule):
    """LRP-γ: ``R_in = x ⊙ ρ(W)ᵀ (R / stab(x ρ(W) + ρ(b)))`` with ``ρ(p) = p + γ p⁺``.

    The rule of Montavon et al. (2019) (captum's ``GammaRule``), meant for layers with
    non-negative inputs (after a ReLU).

    Args:
        gamma: How much positive contributions are favoured (≥ 0).
        stabilizer: Stabiliser of the denominator.
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        if gamma < 0:
            raise RuleParameterError(f"GammaRule needs gamma >= 0, got {gamma}; e.g. GammaRule(gamma=0.25).")
        self.gamma = gamma

    def _groups(self) -> tuple[_Group, ...]:
        return (_Group(1.0, (_Term(_identity, _Gamma(self.gamma)),)),)


class WSquareRule(_TermRule):
    """LRP-w²: relevance ∝ squared weights, independent of the input (zennit's ``WSquare``).

    The layer is re-run with every parameter squared (bias included) on an input of ones:
    ``R_in = (W²)ᵀ (R / stab(1 W² + b²))``.

    Args:
        stabilizer: Stabiliser of the denominator.
    """

    def _groups(self) -> tuple[_Group, ...]:
        return (_Group(1.0, (_Term(_ones, _square),)),)


class FlatRule(_TermRule):
    """LRP-flat: every connected input gets an equal share (zennit's ``Flat``).

    :class:`WSquareRule` with weights set to one and no bias.

    Args:
        stabilizer: Stabiliser of the denominator.
    """

    def _groups(self) -> tuple[_Group, ...]:
        return (_Group(1.0, (_Term(_ones, _flat),)),)


class ZBoxRule(_TermRule):
    """LRP-z^B for bounded inputs (first layer of an image model), Montavon et al. (2017).

    ``R_in = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs`` with ``s = R / stab(xW − lW⁺ − hW⁻)`` (no bias).

    Args:
        low: Lowest admissible input value (scalar or tensor broadcastable to the input).
        high: Highest admissible input value.
        stabilizer: Stabiliser of the denominator.
    """

    def __init__(
        self, low: torch.Tensor | float, high: torch.Tensor | float, stabilizer: float = 1e-6
    ) -> None:
        super().__init__(stabilizer)
        if bool(torch.any(torch.as_tensor(low) > torch.as_tensor(high))):
            raise RuleParameterError(
                f"ZBoxRule needs low <= high everywhere, got low={low!r}, high={high!r}; swap them."
            )
        self.low = low
        self.high = high

    def _groups(self) -> tuple[_Group, ...]:
        return (
            _Group(
                1.0,
                (
                    _Term(_identity, _no_bias),
                    _Term(_Bound(self.low), _Clamp(True, keep_bias=False)),
                    _Term(_Bound(self.high), _Clamp(False, keep_bias=False)),
                ),
            ),
        )

"""The LRP rules (part of :mod:`tdhook.attribution.lrp`).

Notation: ``x`` a module input, ``z`` its output, ``R`` the relevance of the output, ``J`` the
module's Jacobian, ``stab`` :func:`~tdhook.attribution.lrp.stabilize`.

* Rules that only re-weight the backward pass (ε, Pass, Uniform, Softmax, PseudoIdentity) use the
  module's own graph.
* Rules that modify inputs and parameters (z⁺, α-β, γ, w², flat, z^B) are *terms*: each term runs
  the layer on a modified input with modified parameters; terms are summed into a denominator
  ``z_g`` per group, and ``R_in = Σ_g c_g Σ_t x_t ⊙ J_tᵀ (R / stab(z_g))``.
  Linear layers and convolutions run through ``torch.nn.functional`` (no hook fires); other
  modules run through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import RuleInputError, RuleMappingError, RuleParameterError, UnsupportedModuleError
from ._rule import Rule, gradient_x_input, stabilize

__all__ = [
    "AHQKVInputRule",
    "AHQKVRule",
    "AlphaBetaRule",
    "EpsilonRule",
    "FlatRule",
    "GammaRule",
    "IgnoreRule",
    "LayerNormRule",
    "PassRule",
    "PseudoIdentityRule",
    "RuleName",
    "SoftmaxEpsilonRule",
    "StopRule",
    "UniformEpsilonRule",
    "UniformRule",
    "WSquareRule",
    "ZBoxRule",
    "ZPlusRule",
    "rule_from_name",
]

Tensors = Sequence[torch.Tensor]


# ------------------------------------------------------------------------------------------
# Rules on the module's own graph
# ------------------------------------------------------------------------------------------


class EpsilonRule(Rule):
    """LRP-ε: ``R_in = x ⊙ Jᵀ (R / stab(z, ε))`` for every input.

    Equals zennit's ``Epsilon`` and captum's ``EpsilonRule``; conserves relevance up to the bias
    and ε.

    Args:
        epsilon: The stabiliser added to the denominator (settable attribute).
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def _scale(self, n_inputs: int) -> float:
        return 1.0

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        scale = self._scale(len(inputs))
        weights = [r / (stabilize(z, self.epsilon) * scale) for r, z in zip(relevance, outputs)]
        return gradient_x_input(outputs, inputs, weights)


class UniformEpsilonRule(EpsilonRule):
    """LRP-ε with the output relevance split evenly over the inputs: ``R / n_inputs``."""

    def _scale(self, n_inputs: int) -> float:
        return float(max(n_inputs, 1))


class PassRule(Rule):
    """Hand the relevance of output ``i`` unchanged to input ``i`` (activations, BatchNorm).

    Raises:
        RuleInputError: (a ``ValueError``) at the forward call when the module's number of tensor
            inputs and outputs differ, or an input and its output have different shapes.
    """

    uses_outputs = False

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        if len(inputs) != len(outputs):
            raise RuleInputError(
                "PassRule requires the number of inputs and outputs to be the same: "
                f"{type(module).__name__} got {len(inputs)} tensor input(s) and returned {len(outputs)}. "
                "Use EpsilonRule or UniformRule for this module."
            )
        for i, (x, z) in enumerate(zip(inputs, outputs)):
            if x.shape != z.shape:
                raise RuleInputError(
                    f"Input (shape={tuple(x.shape)}) and output (shape={tuple(z.shape)}) have different "
                    f"shapes at index {i} ({type(module).__name__}). PassRule only suits shape-preserving "
                    "modules; use EpsilonRule here."
                )

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        return list(relevance)


class IgnoreRule(Rule):
    """Leave the module alone: its ordinary gradient carries the relevance (no hook installed)."""

    installs_hook = False

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        return gradient_x_input(outputs, inputs, relevance, multiply=False)


class StopRule(Rule):
    """No relevance flows to the module's inputs."""

    uses_outputs = False

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        return [None] * len(inputs)


class UniformRule(Rule):
    """Give each of the ``n`` inputs ``R / n`` (summed over broadcast dimensions)."""

    uses_outputs = False

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        if len(outputs) != 1:
            raise RuleInputError(
                f"UniformRule needs a module with one output, {type(module).__name__} returned {len(outputs)}."
            )

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        share = relevance[0] / len(inputs)
        result = []
        for x in inputs:
            try:
                result.append(share.sum_to_size(x.shape) if share.shape != x.shape else share)
            except RuntimeError as err:
                raise RuleInputError(
                    f"UniformRule cannot give an output relevance of shape {tuple(share.shape)} to an input of "
                    f"shape {tuple(x.shape)} ({type(module).__name__}): {err}. Use EpsilonRule here."
                ) from None
        return result


class SoftmaxEpsilonRule(Rule):
    """Softmax rule (AttnLRP): ``R_in = x ⊙ (R − y · Σ R)``, the sum along the softmax dim.

    Args:
        epsilon: Kept for compatibility with tdhook 0.1; the closed form needs no stabiliser.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _single_input(self, module, inputs)

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        x, y, r = inputs[0], outputs[0].detach(), relevance[0]
        dim = getattr(module, "dim", None)
        if dim is None:  # torch's legacy implicit softmax dimension
            dim = 0 if x.dim() in (0, 1, 3) else 1
        return [x.detach() * (r - y * r.sum(dim=dim, keepdim=True))]


class PseudoIdentityRule(Rule):
    """``R_in = (y / stab(x)) ⊙ R`` for an element-wise module with one input.

    Args:
        stabilizer: Added to ``|x|`` in the denominator.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = stabilizer

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _single_input(self, module, inputs)

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        x, y = inputs[0].detach(), outputs[0].detach()
        return [y / stabilize(x, self.stabilizer) * relevance[0]]


class LayerNormRule(Rule):
    """LayerNorm rule: relevance through the layer norm with its standard deviation held constant.

    By default (tdhook 0.1's rule, ``epsilon=None``) the module's output is recomputed as
    ``y = (x − mean(x)) / σ ⋅ w + b`` over the **last** dimension, with
    ``σ = sqrt(var(x) + module.eps)`` detached (biased variance), and the relevance of the input is
    the plain vector–Jacobian product ``R_in = (∂y/∂x)ᵀ R`` (mean subtraction kept in the
    derivative; no ε, no multiplication by the input). This map does not conserve relevance:
    the centring sends ``Σ R_in`` to 0.

    With ``epsilon`` set (AttnLRP's variant), the module's own output is kept and the ε-rule is
    applied to that linearised map, ``R_in = x ⊙ Jᵀ (R / stab(y, ε))``, normalising over
    ``module.normalized_shape``; it conserves relevance when the bias is zero.

    Args:
        epsilon: ``None`` for tdhook 0.1's plain VJP; a stabiliser for the ε variant.

    Raises:
        UnsupportedModuleError: (a ``NotImplementedError``) at the forward call for more than
            one positional input.
    """

    uses_outputs = False

    def __init__(self, *, epsilon: float | None = None) -> None:
        self.epsilon = epsilon

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _single_input(self, module, inputs)

    def _recompute(self, module: nn.Module, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        centred = x - x.mean(dim=dims, keepdim=True)
        var = centred.detach().pow(2).mean(dim=dims, keepdim=True)
        y = centred / torch.sqrt(var + getattr(module, "eps", 1e-5))
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None:
            y = y * weight.detach()
        if bias is not None:
            y = y + bias.detach()
        return y

    def forward_value(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> Tensors | None:
        if self.epsilon is not None:
            return None
        with torch.no_grad():
            return (self._recompute(module, inputs[0], (-1,)),)

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        x = inputs[0].detach().requires_grad_(True)
        if self.epsilon is None:
            y = self._recompute(module, x, (-1,))
            return gradient_x_input([y], [x], [relevance[0]], multiply=False)
        n_dims = len(getattr(module, "normalized_shape", (0,)))
        y = self._recompute(module, x, tuple(range(-n_dims, 0)))
        return gradient_x_input([y], [x], [relevance[0] / stabilize(y.detach(), self.epsilon)])


class AHQKVRule(Rule):
    """Attention-head rule (tdhook 0.1) on the module that **produces** a fused QKV tensor.

    Put it on the QKV projection. The forward value is the module's own output; its last
    dimension is split into three equal chunks ``q, k, v``. Relevance reaches the inputs only
    through ``v``: ``R_in = (∂v/∂x)ᵀ R_v`` for every input, where ``R_v`` is the ``v`` part of the
    output relevance (the ``q`` and ``k`` parts are dropped; no ε, no multiplication by the input).
    For AttnLRP's rule on the module that *receives* the fused tensor, see
    :class:`AHQKVInputRule`.

    Raises:
        RuleInputError: (a ``ValueError``) at the forward call when the output's last dimension
            is not a multiple of 3.
    """

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        for z in outputs:
            if z.dim() == 0 or z.shape[-1] % 3:
                raise RuleInputError(
                    f"AHQKVRule expects a fused QKV output whose last dimension is a multiple of 3, got shape "
                    f"{tuple(z.shape)} ({type(module).__name__}). Put the rule on the module that produces the "
                    "concatenated q, k, v (e.g. the QKV projection)."
                )

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        weights = []
        for r in relevance:
            q, k, v = r.chunk(3, dim=-1)
            weights.append(torch.cat([torch.zeros_like(q), torch.zeros_like(k), v], dim=-1))
        return gradient_x_input(outputs, inputs, weights, multiply=False)


class AHQKVInputRule(Rule):
    """Attention-head rule (AttnLRP) for a module that *takes* a fused QKV tensor.

    The input's last dimension is split into three equal chunks ``q, k, v``; the module is re-run
    with ``q`` and ``k`` detached (attention weights held constant), and the ε-rule gives
    ``R_v = v ⊙ J_vᵀ (R / stab(y, ε))``. ``q`` and ``k`` receive zero relevance. (Before the
    tdhook 0.1 compatibility work this was ``AHQKVRule``.)

    Args:
        epsilon: Stabiliser of the denominator.
    """

    uses_outputs = False

    def __init__(self, *, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _single_input(self, module, inputs)
        if inputs[0].shape[-1] % 3:
            raise RuleInputError(
                f"AHQKVInputRule expects a fused QKV input whose last dimension is a multiple of 3, got shape "
                f"{tuple(inputs[0].shape)} ({type(module).__name__}). Put the rule on the module that "
                "receives the concatenated q, k, v (or AHQKVRule on the module producing it)."
            )

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        q, k, v = inputs[0].detach().chunk(3, dim=-1)
        v = v.clone().requires_grad_(True)
        y = module.forward(torch.cat([q, k, v], dim=-1))
        y = y[0] if isinstance(y, tuple) else y
        (r_v,) = gradient_x_input([y], [v], [relevance[0] / stabilize(y.detach(), self.epsilon)])
        r_v = torch.zeros_like(v) if r_v is None else r_v
        return [torch.cat([torch.zeros_like(q), torch.zeros_like(k), r_v], dim=-1)]


def _single_input(rule: Rule, module: nn.Module, inputs: Tensors) -> None:
    if len(inputs) != 1:
        raise UnsupportedModuleError(
            f"{type(rule).__name__} does not support multiple inputs: {type(module).__name__} received "
            f"{len(inputs)} tensors. Use EpsilonRule for this module."
        )


# ------------------------------------------------------------------------------------------
# Rules built from terms (modified inputs × modified parameters)
# ------------------------------------------------------------------------------------------

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
        raise NotImplementedError

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        _single_input(self, module, inputs)

    def relevance(self, module: nn.Module, inputs: Tensors, outputs: Tensors, relevance: Tensors) -> list:
        x = inputs[0].detach()
        params = _own_params(module)
        total: torch.Tensor | None = None
        for group in self._groups():
            if group.coefficient == 0:
                continue
            xs = [term.input_fn(x).detach().requires_grad_(True) for term in group.terms]
            z = sum(
                _forward_with(
                    module, xt, {n: term.param_fn(p, n) if p is not None else None for n, p in params.items()}
                )
                for term, xt in zip(group.terms, xs)
            )
            assert isinstance(z, torch.Tensor)
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
        positive = _Group(
            self.alpha,
            (_Term(_positive, _Clamp(True)), _Term(_negative, _Clamp(False, keep_bias=False))),
        )
        negative = _Group(
            -self.beta,
            (_Term(_positive, _Clamp(False)), _Term(_negative, _Clamp(True, keep_bias=False))),
        )
        return (positive, negative)

    def check(self, module: nn.Module, inputs: Tensors, outputs: Tensors) -> None:
        if len(inputs) != 1:
            raise UnsupportedModuleError(
                f"AlphaBetaRule does not support multiple inputs: {type(module).__name__} received "
                f"{len(inputs)} tensors. Use EpsilonRule for this module."
            )


class ZPlusRule(AlphaBetaRule):
    """LRP-z⁺: :class:`AlphaBetaRule` with α = 1, β = 0.

    Args:
        stabilizer: Stabiliser of the denominator.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(1.0, 0.0, stabilizer)


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


# ------------------------------------------------------------------------------------------
# Rules by name
# ------------------------------------------------------------------------------------------


class RuleName(str, Enum):
    """Names accepted where a rule is expected (a rule mapper may return one)."""

    EPSILON = "epsilon"
    UNIFORM_EPSILON = "uniform_epsilon"
    PASS = "pass"
    IGNORE = "ignore"
    STOP = "stop"
    UNIFORM = "uniform"
    ZPLUS = "zplus"
    ALPHA2_BETA1 = "alpha2_beta1"
    GAMMA = "gamma"
    WSQUARE = "wsquare"
    FLAT = "flat"
    SOFTMAX_EPSILON = "softmax_epsilon"
    LAYER_NORM = "layer_norm"
    PSEUDO_IDENTITY = "pseudo_identity"
    AHQKV = "ahqkv"
    AHQKV_INPUT = "ahqkv_input"


_BY_NAME: dict[RuleName, Callable[[], Rule]] = {
    RuleName.EPSILON: EpsilonRule,
    RuleName.UNIFORM_EPSILON: UniformEpsilonRule,
    RuleName.PASS: PassRule,
    RuleName.IGNORE: IgnoreRule,
    RuleName.STOP: StopRule,
    RuleName.UNIFORM: UniformRule,
    RuleName.ZPLUS: ZPlusRule,
    RuleName.ALPHA2_BETA1: AlphaBetaRule,
    RuleName.GAMMA: GammaRule,
    RuleName.WSQUARE: WSquareRule,
    RuleName.FLAT: FlatRule,
    RuleName.SOFTMAX_EPSILON: SoftmaxEpsilonRule,
    RuleName.LAYER_NORM: LayerNormRule,
    RuleName.PSEUDO_IDENTITY: PseudoIdentityRule,
    RuleName.AHQKV: AHQKVRule,
    RuleName.AHQKV_INPUT: AHQKVInputRule,
}


def rule_from_name(name: str | RuleName) -> Rule:
    """Build the rule called ``name`` with its default parameters.

    Raises:
        RuleMappingError: For an unknown name; the message lists the valid ones.

    Examples:
        >>> rule_from_name("epsilon")
        EpsilonRule(epsilon=1e-06)
    """
    try:
        key = RuleName(name)
    except ValueError:
        raise RuleMappingError(
            f"Unknown LRP rule name {name!r}. Expected one of {[n.value for n in RuleName]}, or a Rule "
            "instance such as EpsilonRule(epsilon=1e-6)."
        ) from None
    factory = _BY_NAME.get(key)
    if factory is None:  # every member has a factory; keep dispatch total
        raise RuleMappingError(f"No factory for LRP rule name {key.value!r}.")
    return factory()

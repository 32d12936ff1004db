"""The LRP rules that re-weight the module's own backward pass (part of :mod:`tdhook.attribution.lrp`).

Notation: ``x`` a module input, ``z`` its output, ``R`` the relevance of the output, ``J`` the
module's Jacobian, ``stab`` :func:`~tdhook.attribution.lrp.stabilize`.

ε, Pass, Uniform, Softmax, PseudoIdentity, LayerNorm and the attention-head rules use the
module's own graph. Rules that modify inputs and parameters (z⁺, α-β, γ, w², flat, z^B) are in
:mod:`._term_rules`; rules by name in :mod:`._rule_names`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._errors import RuleInputError, UnsupportedModuleError
from ._rule import Rule, gradient_x_input, stabilize

__all__ = [
    "AHQKVInputRule",
    "AHQKVRule",
    "EpsilonRule",
    "IgnoreRule",
    "LayerNormRule",
    "PassRule",
    "PseudoIdentityRule",
    "SoftmaxEpsilonRule",
    "StopRule",
    "UniformEpsilonRule",
    "UniformRule",
]

Tensors = Sequence[torch.Tensor]


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
                f"UniformRule needs a module with one output, {type(module).__name__} returned {len(outputs)}. "
                "Use EpsilonRule for this module."
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
        single_input(self, module, inputs)

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
        single_input(self, module, inputs)

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
        single_input(self, module, inputs)

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
        single_input(self, module, inputs)
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


def single_input(rule: Rule, module: nn.Module, inputs: Tensors) -> None:
    if len(inputs) != 1:
        raise UnsupportedModuleError(
            f"{type(rule).__name__} does not support multiple inputs: {type(module).__name__} received "
            f"{len(inputs)} tensors. Use EpsilonRule for this module."
        )

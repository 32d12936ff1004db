"""LRP rules: tdhook 0.1's contract (addendum §3).

Validation on every call, autograd history through the inputs only, ``LayerNormRule()`` and
``AHQKVRule()`` against their equations, ``RemovableRuleHandle(rule, module)``, user rules written
to the 0.1 protocol, and mappers extended through ``_call``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution.lrp import (
    LRP,
    AHQKVRule,
    AlphaBetaRule,
    EpsilonPlus,
    EpsilonRule,
    IgnoreRule,
    LayerNormRule,
    PassRule,
    PseudoIdentityRule,
    RemovableRuleHandle,
    Rule,
    StopRule,
    stabilize,
)
from tdhook.attribution.lrp_helpers.rules import BaseRuleMapper


class _Two(nn.Module):
    def forward(self, u, v):
        return u + v


class _TwoOut(nn.Module):
    def forward(self, u):
        return u, u


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_validation_runs_on_every_call(grad_mode, requires_grad):
    x = torch.randn(2, 3, requires_grad=requires_grad)
    cases = [
        (
            PassRule(),
            nn.Linear(3, 4),
            (x,),
            ValueError,
            r"Input \(shape=\(2, 3\)\) and output \(shape=\(2, 4\)\)",
        ),
        (
            PassRule(),
            _TwoOut(),
            (x,),
            ValueError,
            "PassRule requires the number of inputs and outputs to be the same",
        ),
        (
            AlphaBetaRule(),
            _Two(),
            (x, x),
            NotImplementedError,
            "AlphaBetaRule does not support multiple inputs",
        ),
        (
            LayerNormRule(),
            _Two(),
            (x, x),
            NotImplementedError,
            "LayerNormRule does not support multiple inputs",
        ),
        (
            PseudoIdentityRule(),
            _Two(),
            (x, x),
            NotImplementedError,
            "PseudoIdentityRule does not support multiple inputs",
        ),
    ]
    for rule, module, args, exc, match in cases:
        with rule.register(module), torch.set_grad_enabled(grad_mode), pytest.raises(exc, match=match):
            module(*args)
        assert len(module._forward_hooks) == 0


def test_output_depends_on_the_graph_through_inputs_only():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    with EpsilonRule().register(lin):
        y = lin(torch.randn(4, 3))
        assert not y.requires_grad  # parameters require grad, inputs do not
        x = torch.randn(4, 3, requires_grad=True)
        lin(x).sum().backward()
    assert lin.weight.grad is None
    assert lin.bias.grad is None
    assert x.grad is not None
    with IgnoreRule().register(lin):  # IgnoreRule leaves the module untouched
        assert lin(torch.randn(4, 3)).requires_grad


def _layer_norm(d: int = 6, eps: float = 1e-5) -> nn.LayerNorm:
    torch.manual_seed(0)
    ln = nn.LayerNorm(d, eps=eps)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    return ln


def _layer_norm_oracle(ln: nn.LayerNorm, x: torch.Tensor, relevance: torch.Tensor):
    """The addendum's equations: y = (x − mean) / σ·w + b, σ detached; R_in = (∂y/∂x)ᵀ R."""
    x = x.detach().clone().requires_grad_(True)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    sigma = torch.sqrt(var + ln.eps).detach()
    y = (x - mean) / sigma * ln.weight.detach() + ln.bias.detach()
    (r_in,) = torch.autograd.grad(y, x, relevance)
    return y.detach(), r_in


def test_layer_norm_rule_is_the_vjp_with_sigma_detached():
    ln = _layer_norm()
    x = torch.randn(3, 4, 6, requires_grad=True)
    relevance = torch.randn(3, 4, 6)
    y_ref, r_ref = _layer_norm_oracle(ln, x, relevance)
    with LayerNormRule().register(ln):
        y = ln(x)
        (r_in,) = torch.autograd.grad(y, x, relevance)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(r_in, r_ref)
    # centring sends the sum to 0 (no conservation), unlike the ε variant
    torch.testing.assert_close(r_in.sum(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)


def test_layer_norm_rule_through_lrp_with_given_relevance():
    ln = _layer_norm()
    x = torch.randn(5, 6)
    relevance = torch.randn(5, 6)
    lrp = LRP(
        rule_mapper=lambda name, m: LayerNormRule() if isinstance(m, nn.LayerNorm) else None,
        skip_modules=LRP.default_skip,
        init_attr_grads=lambda targets, _: TensorDict(output=relevance, batch_size=targets.batch_size),
    )
    with lrp.prepare(ln) as hooked:
        td = hooked(TensorDict(input=x, batch_size=[5]))
    _, r_ref = _layer_norm_oracle(ln, x, relevance)
    torch.testing.assert_close(td["attr", "input"], r_ref)


def test_layer_norm_rule_takes_no_arguments_positionally():
    with pytest.raises(TypeError):
        LayerNormRule(1e-6)  # type: ignore[misc]


def test_ahqkv_rule_on_the_qkv_projection():
    torch.manual_seed(0)
    d = 4
    qkv = nn.Linear(d, 3 * d)
    x = torch.randn(2, 5, d, requires_grad=True)
    relevance = torch.randn(2, 5, 3 * d)
    expected_y = qkv(x).detach()
    with AHQKVRule().register(qkv):
        y = qkv(x)
        (r_in,) = torch.autograd.grad(y, x, relevance)
    torch.testing.assert_close(y, expected_y)
    # only v carries relevance: R_in = W_vᵀ R_v (plain VJP, no ε, no ×input)
    w_v = qkv.weight.detach()[2 * d :]
    torch.testing.assert_close(r_in, relevance[..., 2 * d :] @ w_v)
    # q and k parts of the relevance are dropped
    zeroed = relevance.clone()
    zeroed[..., : 2 * d] = 0
    with AHQKVRule().register(qkv):
        (r_same,) = torch.autograd.grad(qkv(x), x, zeroed)
    torch.testing.assert_close(r_same, r_in)


def test_removable_rule_handle_with_two_arguments():
    lin = nn.Linear(3, 2)
    rule = EpsilonRule()
    rule.register(lin)
    assert len(lin._forward_hooks) == 1
    handle = RemovableRuleHandle(rule, lin)
    handle.remove()
    assert len(lin._forward_hooks) == 0
    handle.remove()  # idempotent
    other = nn.Linear(3, 2)
    rule.register(other)
    late = RemovableRuleHandle(rule, other)
    del other
    gc.collect()
    late.remove()  # the module is gone: a no-op


class ProtocolEpsilon(Rule):
    """An ε-rule written to tdhook 0.1's protocol (static forward/backward on an instance)."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self._apply_kwargs = {"epsilon": epsilon}

    @staticmethod
    def forward(ctx, apply_kwargs, module, model_kwargs, *inputs):
        with torch.enable_grad():
            leaves = tuple(x.detach().requires_grad_(True) for x in inputs)
            out = module._prev_forward(*leaves, **model_kwargs)
        ctx.leaves, ctx.out, ctx.epsilon = leaves, out, apply_kwargs["epsilon"]
        return out.detach()

    @staticmethod
    def backward(ctx, *out_relevance):
        with torch.enable_grad():
            weight = out_relevance[0] / stabilize(ctx.out.detach(), ctx.epsilon)
            grads = torch.autograd.grad(ctx.out, ctx.leaves, weight)
        return (None, None, None, *(x.detach() * g for x, g in zip(ctx.leaves, grads)))


def test_user_rules_written_to_the_01_protocol_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    shared = ProtocolEpsilon(1e-9)  # one instance on two modules

    def run(rule):
        lrp = LRP(
            rule_mapper=lambda name, m: rule if isinstance(m, nn.Linear) else PassRule(),
            skip_modules=LRP.default_skip,
            init_relevance="outputs",
            targets=[1],
        )
        with lrp.prepare(model) as hooked:
            return hooked(TensorDict(input=x, batch_size=[2]))["attr", "input"]

    got = run(shared)
    torch.testing.assert_close(got, run(EpsilonRule(1e-9)))
    for module in model.modules():
        assert "_prev_forward" not in vars(module)
        assert len(module._forward_hooks_with_kwargs) == 0
        assert len(module._forward_hooks) == 0


def test_mapper_subclass_extends_through_call():
    class MyMapper(EpsilonPlus):
        def _call(self, name, module):
            if isinstance(module, nn.Tanh):
                return StopRule()
            return super()._call(name, module)

    mapper = MyMapper()
    assert isinstance(mapper("m.1", nn.Tanh()), StopRule)
    assert isinstance(mapper("m.0", nn.Linear(2, 2)), EpsilonRule)
    assert isinstance(mapper("m.2", nn.ReLU()), PassRule)
    user_first = MyMapper(rule_mapper=lambda name, m: IgnoreRule())
    assert isinstance(user_first("m.1", nn.Tanh()), IgnoreRule)
    assert BaseRuleMapper()._call("x", nn.ReLU()) is not None

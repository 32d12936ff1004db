"""LRP rules against the slow paper-equation oracles, conservation, registration and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdhook.attribution.lrp import (
    AHQKVInputRule,
    AHQKVRule,
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    IgnoreRule,
    LayerNormRule,
    PassRule,
    PseudoIdentityRule,
    RemovableRuleHandle,
    RuleInputError,
    RuleMappingError,
    RuleName,
    RuleParameterError,
    SoftmaxEpsilonRule,
    StopRule,
    Sum,
    UnconservedRelevanceError,
    UniformEpsilonRule,
    UniformRule,
    UnsupportedModuleError,
    WSquareRule,
    ZBoxRule,
    ZPlusRule,
    raise_for_unconserved_rel_factory,
    rule_from_name,
    stabilize,
)
from tests.reference.lrp_reference import layer_relevance


def relevance_of(rule, module, x, R=None):
    """Register ``rule``, run ``module`` and backpropagate ``R`` (default: the output)."""
    x = x.clone().requires_grad_(True)
    with rule.register(module):
        y = module(x)
        seed = y.detach() if R is None else R
        (rel,) = torch.autograd.grad(y, x, seed)
    return rel, y.detach()


def _linear(bias=True):
    torch.manual_seed(0)
    return nn.Linear(6, 4, bias=bias)


def _conv(bias=True):
    torch.manual_seed(0)
    return nn.Conv2d(2, 3, 3, padding=1, stride=1, bias=bias)


def _inputs(module, positive=False):
    torch.manual_seed(1)
    x = torch.randn(2, 6) if isinstance(module, nn.Linear) else torch.randn(2, 2, 4, 4)
    return x.abs() if positive else x


RULES = [
    ("epsilon", lambda: EpsilonRule(1e-3), {"eps": 1e-3}),
    ("alphabeta", lambda: AlphaBetaRule(2.0, 1.0), {"alpha": 2.0, "beta": 1.0}),
    ("alphabeta", lambda: ZPlusRule(), {"alpha": 1.0, "beta": 0.0}),
    ("alphabeta", lambda: AlphaBetaRule(3.0, 2.0), {"alpha": 3.0, "beta": 2.0}),
    ("gamma", lambda: GammaRule(0.25), {"gamma": 0.25}),
    ("wsquare", lambda: WSquareRule(), {}),
    ("flat", lambda: FlatRule(), {}),
    ("zbox", lambda: ZBoxRule(-3.0, 3.0), {"low": -3.0, "high": 3.0}),
]


@pytest.mark.parametrize("make_module", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize(
    ("ref", "make_rule", "params"), RULES, ids=[f"{r[0]}-{i}" for i, r in enumerate(RULES)]
)
def test_rule_matches_paper_equations(make_module, ref, make_rule, params):
    module = make_module()
    x = _inputs(module)
    torch.manual_seed(2)
    R = torch.randn_like(module(x))
    rel, _ = relevance_of(make_rule(), module, x, R)
    expected = layer_relevance(ref, module, x, R, **params)
    torch.testing.assert_close(rel.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make_rule",
    [lambda: EpsilonRule(1e-9), WSquareRule, FlatRule, lambda: ZBoxRule(-5.0, 5.0), lambda: GammaRule(0.5)],
    ids=["epsilon", "wsquare", "flat", "zbox", "gamma"],
)
@pytest.mark.parametrize("make_module", [_linear, _conv], ids=["linear", "conv"])
def test_conserving_rules_conserve_without_bias(make_rule, make_module):
    module = make_module(bias=False)
    x = _inputs(module, positive=True)
    rel, y = relevance_of(make_rule(), module, x)
    torch.testing.assert_close(rel.flatten(1).sum(1), y.flatten(1).sum(1), rtol=1e-4, atol=1e-5)


def test_alpha_beta_conserves_when_both_parts_exist():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    x = torch.randn(3, 64)  # 64 mixed-sign contributions per output: both parts are non-zero
    for rule in (AlphaBetaRule(2.0, 1.0), ZPlusRule(), AlphaBetaRule(1.5, 0.5)):
        rel, y = relevance_of(rule, lin, x)
        torch.testing.assert_close(rel.sum(1), y.sum(1), rtol=1e-4, atol=1e-5)


def test_epsilon_equals_gradient_times_input_for_linear_without_bias():
    lin = _linear(bias=False)
    x = _inputs(lin)
    R = torch.randn(2, 4)
    rel, y = relevance_of(EpsilonRule(0.0), lin, x, R)
    expected = x * ((R / y) @ lin.weight.detach())
    torch.testing.assert_close(rel, expected)


def test_uniform_epsilon_splits_relevance_over_inputs():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)

    class Add(nn.Module):
        def forward(self, u, v):
            return u + v

    add = Add()
    with UniformEpsilonRule(0.0).register(add):
        y = add(a, b)
        ra, rb = torch.autograd.grad(y, (a, b), y.detach())
    torch.testing.assert_close(ra, a.detach() / 2)
    torch.testing.assert_close(rb, b.detach() / 2)


def test_pass_rule_hands_relevance_through_and_checks_shapes():
    x = torch.randn(3, 5)
    R = torch.randn(3, 5)
    rel, _ = relevance_of(PassRule(), nn.Tanh(), x, R)
    torch.testing.assert_close(rel, R)
    with pytest.raises(ValueError, match=r"Input \(shape=\(3, 5\)\) and output \(shape=\(3, 2\)\)"):
        relevance_of(PassRule(), nn.Linear(5, 2), x)


def test_pass_rule_needs_as_many_inputs_as_outputs():
    class Two(nn.Module):
        def forward(self, u, v):
            return u + v

    module = Two()
    a = torch.randn(2, 3, requires_grad=True)
    with (
        PassRule().register(module),
        pytest.raises(
            RuleInputError, match="PassRule requires the number of inputs and outputs to be the same"
        ),
    ):
        module(a, a)


def test_stop_and_uniform_rules():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    with StopRule().register(lin):
        y = lin(x)
        (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    assert grad is None

    class Scale(nn.Module):
        def forward(self, u, v):
            return u * 2 + v

    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    module = Scale()
    R = torch.randn(2, 3)
    with UniformRule().register(module):
        ra, rb = torch.autograd.grad(module(a, b), (a, b), R)
    torch.testing.assert_close(ra, R / 2)
    torch.testing.assert_close(rb, (R / 2).sum(0, keepdim=True))


def test_ignore_rule_installs_nothing():
    lin = nn.Linear(3, 2)
    with IgnoreRule().register(lin):
        assert len(lin._forward_hooks) == 0


def test_softmax_rule_closed_form():
    torch.manual_seed(0)
    x = torch.randn(2, 5)
    R = torch.randn(2, 5)
    softmax = nn.Softmax(dim=-1)
    rel, y = relevance_of(SoftmaxEpsilonRule(), softmax, x, R)
    torch.testing.assert_close(rel, x * (R - y * R.sum(-1, keepdim=True)))
    rel0, y0 = relevance_of(SoftmaxEpsilonRule(), nn.Softmax(dim=0), x, R)
    torch.testing.assert_close(rel0, x * (R - y0 * R.sum(0, keepdim=True)))


def test_pseudo_identity_rule():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    R = torch.randn(4, 6)
    rel, y = relevance_of(PseudoIdentityRule(1e-6), nn.GELU(), x, R)
    torch.testing.assert_close(rel, y / stabilize(x, 1e-6) * R)


def test_layer_norm_epsilon_variant_is_epsilon_on_frozen_std_and_conserves_without_bias():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.zero_()
    x = torch.randn(3, 8)
    R = torch.randn(3, 8)
    rel, y = relevance_of(LayerNormRule(epsilon=1e-6), ln, x, R)
    # Linear map with σ constant: J = diag(w/σ)(I − 11ᵀ/n); R_in = x ⊙ Jᵀ(R / y)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    n = x.shape[-1]
    centring = torch.eye(n) - torch.ones(n, n) / n
    s = R / stabilize(y, 1e-6)
    expected = x * (((s * ln.weight.detach()) / sigma) @ centring)
    torch.testing.assert_close(rel, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rel.sum(-1), R.sum(-1), rtol=1e-3, atol=1e-4)


class _Heads(nn.Module):
    """Attention core on a fused QKV input (no parameters)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, qkv):
        q, k, v = qkv.chunk(3, dim=-1)
        b, t, d = q.shape
        h = self.n_heads

        def split(u):
            return u.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        attn = self.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5)
        return (attn @ v).transpose(1, 2).reshape(b, t, d)


def test_ahqkv_input_rule_gives_relevance_to_values_only_and_conserves():
    torch.manual_seed(0)
    heads = _Heads(2)
    qkv = torch.randn(2, 5, 12)
    R = torch.randn(2, 5, 4)
    rel, y = relevance_of(AHQKVInputRule(), heads, qkv, R)
    assert torch.all(rel[..., :8] == 0)
    # With attention weights A fixed, y = A v: R_v = v ⊙ Aᵀ (R / y)
    q, k, v = qkv.chunk(3, -1)
    qh = q.reshape(2, 5, 2, 2).transpose(1, 2)
    kh = k.reshape(2, 5, 2, 2).transpose(1, 2)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / 2**0.5, -1)
    s = (R / stabilize(y, 1e-6)).reshape(2, 5, 2, 2).transpose(1, 2)
    expected = v * (attn.transpose(-1, -2) @ s).transpose(1, 2).reshape(2, 5, 4)
    torch.testing.assert_close(rel[..., 8:], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rel.sum((1, 2)), R.sum((1, 2)), rtol=1e-3, atol=1e-4)


def test_sum_layer_with_epsilon_splits_proportionally():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    stacked = torch.stack([a, b], -1)
    rel, y = relevance_of(EpsilonRule(0.0), Sum(), stacked)
    torch.testing.assert_close(rel, stacked)  # R = y: each operand keeps its own value
    torch.testing.assert_close(rel.sum(-1), y)


# -- registration -------------------------------------------------------------------------------


def test_register_leaves_no_forward_attribute_and_unregister_restores():
    lin = nn.Linear(3, 2)
    rule = EpsilonRule()
    handle = rule.register(lin)
    assert isinstance(handle, RemovableRuleHandle)
    assert "forward" not in vars(lin)
    assert len(lin._forward_hooks) == 1
    rule.unregister(lin)
    assert len(lin._forward_hooks) == 0
    assert "forward" not in vars(lin)
    handle.remove()  # idempotent
    rule.unregister(lin)  # no-op without registration


def test_one_rule_instance_on_many_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    rule = EpsilonRule(1e-9)
    x = torch.randn(3, 4, requires_grad=True)
    with rule.register(model[0]), rule.register(model[1]):
        y = model(x)
        (rel,) = torch.autograd.grad(y, x, y.detach())
    torch.testing.assert_close(rel.sum(1), y.detach().sum(1), rtol=1e-4, atol=1e-5)
    assert all(len(m._forward_hooks) == 0 for m in model)


def test_rule_is_a_no_op_without_grad_and_with_inplace_code_after():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with EpsilonRule().register(lin):
        with torch.no_grad():
            assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
        xg = x.clone().requires_grad_(True)
        y = lin(xg)
        y.relu_()  # in-place after a ruled module is fine: the rule's output is a copy
        torch.autograd.grad(y.sum(), xg)


def test_conservation_check_hook():
    lin = nn.Linear(8, 4, bias=True)
    with torch.no_grad():
        lin.bias.fill_(3.0)
    x = torch.randn(2, 8, requires_grad=True)
    check = raise_for_unconserved_rel_factory(atol=1e-6, rtol=1e-6)
    handle = lin.register_full_backward_hook(check)
    try:
        with EpsilonRule().register(lin):
            y = lin(x)
            with pytest.raises(UnconservedRelevanceError, match="Unconserved relevance for module Linear"):
                torch.autograd.grad(y, x, y.detach())
        with torch.no_grad():
            lin.bias.zero_()
        with EpsilonRule(1e-9).register(lin):
            y = lin(x)
            torch.autograd.grad(y, x, y.detach())
    finally:
        handle.remove()
    assert issubclass(UnconservedRelevanceError, RuntimeError)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "beta", "message"),
    [
        (-1.0, -2.0, r"Both alpha and beta parameters must be non-negative! Got alpha=-1.0, beta=-2.0"),
        (2.0, 2.0, r"The difference of parameters alpha - beta must equal 1! Got alpha=2.0, beta=2.0"),
    ],
)
def test_alpha_beta_bad_parameters(alpha, beta, message):
    with pytest.raises(ValueError, match=message) as info:
        AlphaBetaRule(alpha, beta)
    assert isinstance(info.value, RuleParameterError)


def test_alpha_beta_refuses_several_inputs():
    class Two(nn.Module):
        def forward(self, u, v):
            return u + v

    module = Two()
    a = torch.randn(2, 3, requires_grad=True)
    with (
        AlphaBetaRule().register(module),
        pytest.raises(NotImplementedError, match="AlphaBetaRule does not support multiple inputs") as info,
    ):
        module(a, a)
    assert isinstance(info.value, UnsupportedModuleError)


def test_other_bad_parameters():
    with pytest.raises(RuleParameterError, match="GammaRule needs gamma >= 0, got -1"):
        GammaRule(-1)
    with pytest.raises(RuleParameterError, match="ZBoxRule needs low <= high"):
        ZBoxRule(1.0, -1.0)
    identity = nn.Identity()
    with AHQKVRule().register(identity), pytest.raises(RuleInputError, match="multiple of 3"):
        identity(torch.randn(1, 2, 4, requires_grad=True))


def test_rule_names():
    assert isinstance(rule_from_name("epsilon"), EpsilonRule)
    assert isinstance(rule_from_name(RuleName.ZPLUS), ZPlusRule)
    for name in RuleName:
        assert rule_from_name(name) is not None
    with pytest.raises(
        RuleMappingError, match=r"Unknown LRP rule name 'epsilom'. Expected one of \['epsilon'"
    ):
        rule_from_name("epsilom")

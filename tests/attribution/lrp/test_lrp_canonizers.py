"""MergeBatchNorm and ParamModifier: same function while applied, bit-identical model after."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution.lrp import LRP, CanonizerError, EpsilonPlus, MergeBatchNorm, ParamModifier


def _bn_net(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 5, bias=bias),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["eps"] = [m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    state["params"] = [id(p) for p in model.parameters()]
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("bias", [True, False])
def test_merge_keeps_the_function_and_restores_bit_exactly(bias):
    model = _bn_net(bias)
    x = torch.randn(4, 2, 4, 4)
    expected = model(x)
    before = _state(model)
    with MergeBatchNorm().apply(model):
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        bn = model[1]
        assert torch.equal(bn.running_var, torch.ones(3))
        assert bn.eps == 0.0
        assert model[0].bias is not None
        probe = torch.randn(4, 3, 4, 4)
        assert torch.equal(bn(probe), probe)  # an exact identity
    _assert_same(before, _state(model))
    assert (model[0].bias is None) == (not bias)


def test_lrp_with_canonizer_equals_lrp_on_the_merged_model():
    model = _bn_net()
    x = torch.randn(3, 2, 4, 4)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for layer, bn in ((merged[0], merged[1]), (merged[4], merged[5])):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.dim() - 1))))
            layer.bias.copy_((layer.bias - bn.running_mean) * scale + bn.bias)
    merged[1], merged[5] = nn.Identity(), nn.Identity()
    before = _state(model)

    def attr(m, **kwargs):
        with LRP(rule_mapper=EpsilonPlus(), init_relevance="outputs", **kwargs).prepare(m) as hooked:
            return hooked(TensorDict(input=x, batch_size=[3]))["attr", "input"]

    torch.testing.assert_close(attr(model, canonizers=[MergeBatchNorm()]), attr(merged), rtol=1e-4, atol=1e-6)
    _assert_same(before, _state(model))


def test_exception_inside_the_context_restores():
    model = _bn_net()
    before = _state(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        LRP(rule_mapper=EpsilonPlus(), canonizers=[MergeBatchNorm()]).prepare(model),
    ):
        raise RuntimeError("boom")
    _assert_same(before, _state(model))


def test_a_canonizer_refusing_the_model_at_entry_leaves_nothing_behind():
    """Canonizer edits are computed when the context is entered; a refusal there undoes the rest."""
    model = _bn_net()
    before = _state(model)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    model[5].train()  # a BatchNorm in training mode cannot be folded
    method = LRP(rule_mapper=EpsilonPlus(), canonizers=[MergeBatchNorm()])
    with pytest.raises(CanonizerError, match=r"'5' is in training mode"), method.prepare(model):
        pass
    _assert_same(before, _state(model))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    model.eval()
    with method.prepare(model):  # no claim or edit was left: the same model can be explained now
        assert torch.equal(model[5].running_var, torch.ones(5))
    _assert_same(before, _state(model))


def test_explicit_pairs_and_errors():
    model = _bn_net()
    before = _state(model)
    with MergeBatchNorm(pairs=[("4", "5")]).apply(model):
        assert torch.equal(model[1].running_var, before["1.running_var"])  # not listed: untouched
        assert torch.equal(model[5].running_var, torch.ones(5))
    _assert_same(before, _state(model))
    with pytest.raises(CanonizerError, match=r"'0' has 3 output features but '5' normalises 5"):
        MergeBatchNorm(pairs=[("0", "5")]).plan(model)
    with pytest.raises(ValueError, match=r"'2' is a ReLU, expected nn.Linear or a ConvNd"):
        MergeBatchNorm(pairs=[("2", "1")]).plan(model)
    model.train()
    with pytest.raises(CanonizerError, match=r"'1' is in training mode.*Call model.eval\(\)"):
        MergeBatchNorm().plan(model)
    _assert_same(before, _state(model))


def test_param_modifier():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    before = _state(lin)
    only_weight = ParamModifier(lambda p, name: p.clamp(min=0), lambda p, name: name == "weight")
    with only_weight(lin):
        assert (lin.weight >= 0).all()
        assert torch.equal(lin.bias, before["bias"])
    _assert_same(before, _state(lin))
    double = ParamModifier(lambda p, name: p * 2)
    chained = ParamModifier.from_modifiers([only_weight, double])
    with chained(lin):
        torch.testing.assert_close(lin.weight, before["weight"].clamp(min=0) * 2)
        torch.testing.assert_close(lin.bias, before["bias"] * 2)
    _assert_same(before, _state(lin))
    assert ParamModifier.select_all(lin.weight, "weight")

"""LRP (the method): composites vs the paper-equation oracle and captum, keys, skipping, seeds, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook.attribution.lrp import (
    LRP,
    AlphaBetaRule,
    BaseRuleMapper,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    EpsilonRule,
    FlatRule,
    GammaRule,
    IgnoreRule,
    MergeBatchNorm,
    MissingRuleWarning,
    PassRule,
    RuleMappingError,
    Sum,
    ZBoxRule,
    ZPlusRule,
)
from tests.reference.lrp_reference import sequential_relevance


def _td(x):
    return TensorDict(input=x, batch_size=x.shape[:1])


def run_lrp(model, x, **kwargs):
    kwargs.setdefault("init_relevance", "outputs")
    with LRP(**kwargs).prepare(model) as hooked:
        td = hooked(_td(x))
    return td


# -- composites vs the oracle ---------------------------------------------------------------------


def test_epsilon_plus_on_mlp_matches_oracle(mlp):
    torch.manual_seed(3)
    x = torch.randn(3, 4)
    td = run_lrp(mlp, x, rule_mapper=EpsilonPlus(epsilon=1e-3), targets=[1])
    R = torch.zeros(3, 3)
    R[:, 1] = mlp(x).detach()[:, 1]
    expected = sequential_relevance(mlp, x, lambda k, m: ("epsilon", {"eps": 1e-3}), R)
    torch.testing.assert_close(td["attr", "input"].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(td["output"], mlp(x).detach())


CNN_COMPOSITES = [
    (EpsilonPlus, {}, None, ("alphabeta", {"alpha": 1.0, "beta": 0.0})),
    (EpsilonPlusFlat, {}, ("flat", {}), ("alphabeta", {"alpha": 1.0, "beta": 0.0})),
    (EpsilonAlpha2Beta1, {}, None, ("alphabeta", {"alpha": 2.0, "beta": 1.0})),
    (EpsilonAlpha2Beta1Flat, {}, ("flat", {}), ("alphabeta", {"alpha": 2.0, "beta": 1.0})),
    (
        EpsilonGammaBox,
        {"low": -3.0, "high": 3.0, "gamma": 0.5},
        ("zbox", {"low": -3.0, "high": 3.0}),
        ("gamma", {"gamma": 0.5}),
    ),
]


@pytest.mark.parametrize(
    ("composite", "kwargs", "first", "conv"), CNN_COMPOSITES, ids=[c[0].__name__ for c in CNN_COMPOSITES]
)
def test_composites_on_cnn_match_oracle(cnn, composite, kwargs, first, conv):
    torch.manual_seed(4)
    x = torch.randn(2, 2, 4, 4)
    td = run_lrp(cnn, x, rule_mapper=composite(epsilon=1e-4, **kwargs), targets=[2])
    R = torch.zeros(2, 3)
    R[:, 2] = cnn(x).detach()[:, 2]

    def rules(k, module):
        if k == 0 and first is not None:
            return first
        if isinstance(module, nn.Conv2d):
            return conv
        return ("epsilon", {"eps": 1e-4})

    expected = sequential_relevance(cnn, x, rules, R)
    torch.testing.assert_close(td["attr", "input"].double(), expected, rtol=1e-4, atol=1e-6)


def test_max_pool_and_batch_norm_defaults():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    mapper = EpsilonPlus()
    names = {name: mapper(name, m) for name, m in model.named_modules() if name}
    assert isinstance(names["0"], ZPlusRule)
    assert isinstance(names["1"], PassRule)
    assert isinstance(names["2"], PassRule)
    assert isinstance(names["3"], IgnoreRule)
    assert isinstance(names["4"], IgnoreRule)
    assert isinstance(names["5"], EpsilonRule)
    assert isinstance(BaseRuleMapper()("s", Sum()), EpsilonRule)
    assert isinstance(BaseRuleMapper()("p", nn.AdaptiveAvgPool2d(1)), EpsilonRule)
    assert BaseRuleMapper()("l", nn.Linear(2, 2)) is None
    td = run_lrp(model, torch.randn(3, 1, 4, 4), rule_mapper=mapper)
    assert torch.isfinite(td["attr", "input"]).all()


def test_first_layer_rule_is_found_again_at_every_enter(cnn):
    mapper = EpsilonGammaBox(-1.0, 1.0)
    for _ in range(2):
        seen = {}
        mapper.reset()
        for name, module in cnn.named_modules():
            if name:
                seen[name] = mapper(name, module)
        assert isinstance(seen["0"], ZBoxRule)
        assert isinstance(seen["2"], GammaRule)
        assert isinstance(seen["6"], EpsilonRule)
    flat = EpsilonAlpha2Beta1Flat()
    assert isinstance(flat("0", cnn[0]), FlatRule)
    assert isinstance(flat("2", cnn[2]), AlphaBetaRule)


def test_user_mapper_is_tried_first(mlp):
    stop_first = EpsilonPlus(rule_mapper=lambda name, m: IgnoreRule() if name == "module.0" else None)
    assert isinstance(stop_first("module.0", mlp[0]), IgnoreRule)
    assert isinstance(stop_first("module.2", mlp[2]), EpsilonRule)


# -- captum oracle --------------------------------------------------------------------------------


def _captum_net(bias: bool):
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(5, 7, bias=bias),
        nn.ReLU(),
        nn.Linear(7, 6, bias=bias),
        nn.ReLU(),
        nn.Linear(6, 3, bias=bias),
    )
    return model.eval()


@pytest.mark.parametrize("rule_name", ["epsilon", "gamma", "zplus"])
def test_matches_captum(rule_name):
    captum_attr = pytest.importorskip("captum.attr")
    from captum.attr._utils import lrp_rules

    bias = rule_name == "epsilon"  # captum keeps the unmodified bias in γ and z⁺; compare bias-free
    model = _captum_net(bias)
    torch.manual_seed(6)
    x = torch.randn(4, 5)
    target = 1

    def captum_rule(k):
        if rule_name == "epsilon" or k == 0:
            return lrp_rules.EpsilonRule(epsilon=1e-3)
        if rule_name == "gamma":
            return lrp_rules.GammaRule(gamma=0.3, set_bias_to_zero=True)
        return lrp_rules.Alpha1_Beta0_Rule(set_bias_to_zero=True)

    theirs_model = copy.deepcopy(model)
    for k in (0, 2, 4):
        theirs_model[k].rule = captum_rule(k)
    theirs = captum_attr.LRP(theirs_model).attribute(x.clone(), target=target)

    ours_rules = {0: EpsilonRule(1e-3)}
    hidden = {
        "epsilon": EpsilonRule(1e-3),
        "gamma": GammaRule(0.3, stabilizer=1e-9),
        "zplus": ZPlusRule(1e-9),
    }

    def mapper(name, module):
        if isinstance(module, nn.Linear):
            index = int(name.split(".")[-1])
            return ours_rules.get(index, hidden[rule_name])
        return None

    td = run_lrp(model, x, rule_mapper=BaseRuleMapper(rule_mapper=mapper), targets=[target])
    torch.testing.assert_close(td["attr", "input"], theirs.detach(), rtol=1e-4, atol=1e-5)


# -- the method -----------------------------------------------------------------------------------


def test_no_forward_attribute_and_no_hook_left(mlp):
    before = {name: dict(vars(m)) for name, m in mlp.named_modules()}
    with LRP(rule_mapper=EpsilonPlus()).prepare(mlp) as hooked:
        assert all("forward" not in vars(m) for m in mlp.modules())
        assert len(mlp[0]._forward_hooks) == 1
        hooked(_td(torch.randn(2, 4)))
    for name, module in mlp.named_modules():
        assert "forward" not in vars(module)
        assert len(module._forward_hooks) == 0
        assert set(vars(module)) == set(before[name])


def test_default_skip_skips_containers_without_warning(mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_lrp(mlp, torch.randn(2, 4), rule_mapper=EpsilonPlus())
    assert LRP.default_skip("module", mlp)
    assert LRP.default_skip("module.0", nn.Sequential())
    assert LRP.default_skip("x", TensorDictModule(nn.Linear(1, 1), ["a"], ["b"]))
    assert not LRP.default_skip("module.0", mlp[0])
    assert not LRP.default_skip("module", nn.Linear(2, 2))  # a one-layer model keeps its rule


def test_single_layer_model_gets_its_rule():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2, bias=False)
    x = torch.randn(3, 4)
    td = run_lrp(lin, x, rule_mapper=EpsilonPlus(epsilon=1e-9))
    torch.testing.assert_close(td["attr", "input"].sum(1), lin(x).detach().sum(1), rtol=1e-4, atol=1e-5)


def test_missing_rules_warn_once_listing_leaves(mlp):
    with pytest.warns(
        MissingRuleWarning, match=r"No rule found for 5 module\(s\): `module.0` \(Linear\)"
    ) as rec:
        td = run_lrp(mlp, torch.randn(2, 4), init_relevance="ones")
    assert len(rec) == 1
    # No rules: the plain gradient of the summed outputs.
    x = td["input"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(td["attr", "input"], grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_lrp(mlp, torch.randn(2, 4), warn_on_missing_rule=False)


def test_seeds(mlp):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    mapper = EpsilonPlus()
    ones = run_lrp(mlp, x, rule_mapper=mapper, init_relevance="ones")["attr", "input"]
    outputs = run_lrp(mlp, x, rule_mapper=mapper, init_relevance="outputs")["attr", "input"]
    legacy = run_lrp(mlp, x, rule_mapper=mapper, init_attr_grads=lambda targets, _: targets)["attr", "input"]
    helper = run_lrp(mlp, x, rule_mapper=mapper, init_attr_grads=LRP.seed_with_outputs)["attr", "input"]
    torch.testing.assert_close(outputs, legacy)
    torch.testing.assert_close(outputs, helper)
    assert not torch.allclose(ones, outputs)
    with pytest.raises(ValueError, match="Unknown init_relevance 'logits'"):
        LRP(init_relevance="logits")


def test_separate_targets_equal_one_run_per_target(cnn):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 5)
    both = run_lrp(cnn, x, rule_mapper=EpsilonGammaBox(-3.0, 3.0), targets=[0, 2], separate_targets=True)
    for k, target in enumerate((0, 2)):
        one = run_lrp(cnn, x, rule_mapper=EpsilonGammaBox(-3.0, 3.0), targets=[target])
        torch.testing.assert_close(both["attr", "input"][:, k], one["attr", "input"], rtol=1e-4, atol=1e-6)


def test_input_modules_get_the_relevance_of_the_module_output(mlp):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    td = run_lrp(mlp, x, rule_mapper=EpsilonPlus(epsilon=1e-9), input_modules=["1"], targets=[0])
    # ε conserves relevance layer by layer up to the biases: compare with the oracle at layer 2's input.
    hidden = mlp[1](mlp[0](x)).detach()
    R = torch.zeros(3, 3)
    R[:, 0] = mlp(x).detach()[:, 0]
    expected = sequential_relevance(mlp[2:], hidden, lambda k, m: ("epsilon", {"eps": 1e-9}), R)
    torch.testing.assert_close(td["attr", "1"].double(), expected, rtol=1e-4, atol=1e-6)


class _Boom(Exception):
    pass


def test_exception_in_body_restores_model(mlp):
    with pytest.raises(_Boom), LRP(rule_mapper=EpsilonPlus()).prepare(mlp):
        raise _Boom
    assert all(len(m._forward_hooks) == 0 and "forward" not in vars(m) for m in mlp.modules())


# -- errors ---------------------------------------------------------------------------------------


def test_mapper_returning_a_non_rule(mlp):
    with pytest.raises(
        RuleMappingError, match=r"rule_mapper returned 3 \(int\) for module `module.0` \(Linear\)"
    ):
        run_lrp(mlp, torch.randn(2, 4), rule_mapper=lambda name, m: 3 if name == "module.0" else None)
    with pytest.raises(TypeError, match=r"return an instance, e.g. EpsilonRule\(\)"):
        run_lrp(mlp, torch.randn(2, 4), rule_mapper=lambda name, m: EpsilonRule)
    assert all(len(m._forward_hooks) == 0 for m in mlp.modules())


def test_mapper_returning_rule_names(mlp):
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    by_name = run_lrp(
        mlp,
        x,
        rule_mapper=BaseRuleMapper(rule_mapper=lambda n, m: "epsilon" if isinstance(m, nn.Linear) else None),
    )
    by_rule = run_lrp(mlp, x, rule_mapper=EpsilonPlus())
    torch.testing.assert_close(by_name["attr", "input"], by_rule["attr", "input"])
    with pytest.raises(ValueError, match=r"module `module.0` \(Linear\): Unknown LRP rule name 'epsilom'"):
        run_lrp(mlp, x, rule_mapper=lambda n, m: "epsilom")


def test_bad_constructor_arguments():
    with pytest.raises(RuleMappingError, match="rule_mapper must be callable"):
        LRP(rule_mapper="EpsilonPlus")
    with pytest.raises(ValueError, match="skip_modules must be callable"):
        LRP(skip_modules=True)
    with pytest.raises(ValueError, match="canonizers must be Canonizer instances"):
        LRP(canonizers=[object()])


def test_inplace_activations_give_the_same_relevance():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    inplace = copy.deepcopy(plain)
    inplace[1].inplace = True
    inplace[3].inplace = True
    x = torch.randn(5, 4)
    expected = run_lrp(plain, x, rule_mapper=EpsilonPlus(), targets=[1])["attr", "input"]
    with LRP(rule_mapper=EpsilonPlus(), targets=[1], init_relevance="outputs").prepare(inplace) as hooked:
        # Out of place while active: a LeakyReLU's backward would scale what PassRule hands it.
        assert not inplace[1].inplace
        got = hooked(_td(x))["attr", "input"]
    assert inplace[1].inplace
    assert inplace[3].inplace
    torch.testing.assert_close(got, expected)


def test_disable_removes_rules_and_canonizers_and_puts_them_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(5, 3)
    weight = model[0].weight.detach().clone()
    lrp = LRP(rule_mapper=EpsilonPlus(), canonizers=[MergeBatchNorm()], init_relevance="outputs")
    with lrp.prepare(model) as hooked:
        first = hooked(_td(x))["attr", "input"]
        assert not torch.equal(model[0].weight, weight)  # merged
        with hooked.disable_context() as plain:
            assert plain is model
            assert torch.equal(model[0].weight, weight)
            assert all(len(m._forward_hooks) == 0 for m in model)
        torch.testing.assert_close(hooked(_td(x))["attr", "input"], first)
    assert torch.equal(model[0].weight, weight)


def test_compat_import_paths():
    from tdhook.attribution import LRP as top_level
    from tdhook.attribution.lrp_helpers import layers, rules, types

    assert top_level is LRP
    assert rules.EpsilonPlus is EpsilonPlus
    assert rules.Rule.__name__ == "Rule"
    assert types.Linear == (*types.Convolution, nn.Linear)
    assert isinstance(nn.Conv2d(1, 1, 1), types.Convolution)
    assert layers.Sum is Sum
    for name in ("AHQKVRule", "ParamModifier", "RemovableRuleHandle", "raise_for_unconserved_rel_factory"):
        assert hasattr(rules, name)


def test_tensordict_sequential_models():
    from tensordict.nn import TensorDictSequential

    torch.manual_seed(0)
    seq = TensorDictSequential(
        TensorDictModule(nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU()), ["x"], ["h"]),
        TensorDictModule(nn.Linear(4, 2, bias=False), ["h"], ["y"]),
    )
    x = torch.randn(5, 3)
    options = [getattr(m, "inplace", None) for m in seq.modules()]
    lrp = LRP(rule_mapper=EpsilonPlus(epsilon=1e-9), init_relevance="outputs")
    with lrp.prepare(seq, out_keys=["y"]) as hooked:
        assert [getattr(m, "inplace", None) for m in seq.modules()] == options  # tensordict's option
        td = hooked(TensorDict(x=x, batch_size=[5]))
    torch.testing.assert_close(td["attr", "x"].sum(1), td["y"].sum(1), rtol=1e-4, atol=1e-5)

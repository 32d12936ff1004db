"""LRP's canonizer edits share the weights' edit stack (issue 11 §1): LRP + MergeBatchNorm and
Pruning on one model restore the original tensors whatever order they exit in, also after an
exception inside a ``with`` body.

Every check compares every parameter and buffer with ``torch.equal`` and the storage pointer
(the original tensor is back, not a copy), plus ``eps`` and the hooks.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import LRP
from tdhook.attribution.lrp import EpsilonPlus, MergeBatchNorm
from tdhook.weights import Pruning


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _snapshot(model: nn.Module) -> dict:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state: dict = {n: (t.detach().clone(), t.data_ptr()) for n, t in tensors.items()}
    state["eps"] = (model[1].eps, model[4].eps)
    return state


def _assert_restored(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name == "eps":
            assert after[name] == value
            continue
        assert torch.equal(after[name][0], value[0]), name
        assert after[name][1] == value[1], name  # the original storage is back
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            assert not hooks, module
        assert not module._backward_pre_hooks, module


def _lrp() -> LRP:
    return LRP(rule_mapper=EpsilonPlus(), canonizers=[MergeBatchNorm()], skip_modules=LRP.default_skip)


def _pruning() -> Pruning:
    return Pruning(None, amount_to_prune=0.5)


def _data() -> TensorDict:
    return TensorDict(input=torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), batch_size=[5])


@pytest.mark.parametrize(
    ("enter", "exit_"),
    list(
        itertools.product([("lrp", "pruning"), ("pruning", "lrp")], [("lrp", "pruning"), ("pruning", "lrp")])
    ),
    ids=lambda order: "-".join(order),
)
def test_lrp_and_pruning_exit_in_any_order(enter, exit_):
    model = _model()
    before = _snapshot(model)
    factories = {"lrp": _lrp(), "pruning": _pruning()}
    handles = {}
    for name in enter:
        handles[name] = factories[name].prepare(model, return_context=False)
    out = handles["lrp"](_data())
    assert bool(torch.isfinite(out["attr", "input"]).all())
    handles[exit_[0]].restore()
    if enter == ("lrp", "pruning") and exit_[0] == "lrp":
        # only the pruning remains, re-applied to the original weights
        pruning = factories["pruning"]
        for name, p in model.named_parameters():
            mask = pruning.masks.get(name)
            expected = before[name][0] if mask is None else before[name][0] * mask
            assert torch.equal(p, expected), name
    handles[exit_[1]].restore()
    _assert_restored(model, before)


def test_lrp_body_raising_while_pruning_is_active_restores_both():
    model = _model()
    before = _snapshot(model)
    pruned = _pruning().prepare(model, return_context=False)

    def body() -> None:
        with _lrp().prepare(model) as hooked:
            hooked(_data())
            raise RuntimeError("inside the LRP context")

    with pytest.raises(RuntimeError, match="inside"):
        body()
    pruned.restore()
    _assert_restored(model, before)


def test_pruning_body_raising_inside_lrp_restores_both_in_either_nesting():
    for outer, inner in ((_lrp, _pruning), (_pruning, _lrp)):
        model = _model()
        before = _snapshot(model)
        with pytest.raises(ValueError, match="boom"), outer().prepare(model), inner().prepare(model):
            raise ValueError("boom")
        _assert_restored(model, before)


def test_lrp_exited_first_from_an_exception_keeps_pruning_then_restores():
    model = _model()
    before = _snapshot(model)
    lrp_context = _lrp().prepare(model)
    hooked = lrp_context.__enter__()
    pruning = _pruning()
    pruned = pruning.prepare(model, return_context=False)
    hooked(_data())
    try:
        raise KeyError("in the body")
    except KeyError as err:
        lrp_context.__exit__(type(err), err, err.__traceback__)  # LRP out first, with the exception
    for name, p in model.named_parameters():
        mask = pruning.masks.get(name)
        expected = before[name][0] if mask is None else before[name][0] * mask
        assert torch.equal(p, expected), name
    pruned.restore()
    _assert_restored(model, before)

"""LRP never leaves the model edited, however contexts end (issue 11 §1).

* A second LRP context on a model that an active one explains is refused at entry (its rules
  would stack), whichever order the contexts are created, exited, or in which thread.
* Canonizer and ParamModifier edits of one attribute share the saved original: the last one out
  restores it, so they may end in any order (FIFO too); an edit to a different value while one
  is active is refused before anything changes.

Every check compares parameters, buffers and attributes bit for bit.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import LRP
from tdhook.attribution.lrp import (
    CanonizerError,
    ConcurrentLRPError,
    EpsilonPlus,
    MergeBatchNorm,
    ParamModifier,
)

TIMEOUT = 30  # seconds: a thread that fails must fail the test, not hang the run


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=True), nn.Linear(6, 3), nn.BatchNorm1d(3)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
        model[4].running_mean.uniform_(-1, 1)
    return model.eval()


def _state(model: nn.Module) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["inplace"] = model[2].inplace
    state["eps"] = (model[1].eps, model[4].eps)
    state["hooks"] = sum(len(m._forward_hooks) for m in model.modules())
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _lrp() -> LRP:
    return LRP(rule_mapper=EpsilonPlus(), canonizers=[MergeBatchNorm()], skip_modules=LRP.default_skip)


def _data() -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(5, 4), batch_size=[5])


def test_second_context_with_return_context_false_is_refused_and_first_restores():
    model = _model()
    before = _state(model)
    first = _lrp().prepare(model, return_context=False)
    attr = first(_data())["attr", "input"]
    with pytest.raises(ConcurrentLRPError, match="already explained by another active LRP context"):
        _lrp().prepare(model, return_context=False)
    # the refused entry changed nothing: the first context still computes the same relevance
    torch.testing.assert_close(first(_data())["attr", "input"], attr, rtol=0, atol=0)
    first.restore()
    _assert_same(before, _state(model))


def test_generators_closed_first_in_first_out():
    model = _model()
    before = _state(model)

    def explain():
        with _lrp().prepare(model) as hooked:
            yield hooked(_data())["attr", "input"]

    first = explain()
    next(first)
    second = explain()
    with pytest.raises(ConcurrentLRPError):
        next(second)
    first.close()
    second.close()
    _assert_same(before, _state(model))
    # after both, a fresh context works and restores again
    third = explain()
    next(third)
    third.close()
    _assert_same(before, _state(model))


def test_second_context_from_another_thread_is_refused():
    model = _model()
    before = _state(model)
    errors: list[BaseException] = []
    with _lrp().prepare(model) as hooked:
        hooked(_data())

        def other():
            try:
                with _lrp().prepare(model) as h:
                    h(_data())
            except Exception as err:
                errors.append(err)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    _assert_same(before, _state(model))


def test_sequential_contexts_in_two_threads_restore_exactly():
    model = _model()
    before = _state(model)
    results: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def work(i):
        # one at a time: sharing a model between concurrent LRP contexts is refused
        with lock, _lrp().prepare(model) as hooked:
            results[i] = hooked(_data())["attr", "input"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    _assert_same(before, _state(model))


def test_canonizers_applied_twice_restore_in_any_order():
    model = _model()
    before = _state(model)
    x = torch.randn(5, 4)
    expected = model(x)
    for order in ("fifo", "lifo"):
        a = MergeBatchNorm().apply(model)
        merged = _state(model)
        b = MergeBatchNorm().apply(model)  # same edits: shares the saved originals
        _assert_same(merged, _state(model))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        first, second = (a, b) if order == "fifo" else (b, a)
        first.remove()
        _assert_same(merged, _state(model))  # still merged for the other holder
        second.remove()
        _assert_same(before, _state(model))


def test_param_modifiers_in_any_order_and_conflicts():
    lin = nn.Linear(3, 2)
    before = lin.weight.detach().clone(), lin.bias.detach().clone()
    clamp = ParamModifier(lambda p, name: p.clamp(min=0))
    a = clamp(lin)
    b = clamp(lin)  # same value: shared
    a.remove()
    assert bool((lin.weight >= 0).all())
    b.remove()
    assert torch.equal(lin.weight, before[0])
    assert torch.equal(lin.bias, before[1])
    with clamp(lin):
        with pytest.raises(CanonizerError, match="already edited by another active"):
            ParamModifier(lambda p, name: p * 2)(lin)
        assert bool((lin.weight >= 0).all())  # the refused edit changed nothing
    assert torch.equal(lin.weight, before[0])
    assert torch.equal(lin.bias, before[1])


def test_canonizer_threads_restore_in_any_order():
    model = _model()
    before = _state(model)
    entered = threading.Barrier(2, timeout=TIMEOUT)
    release = [threading.Event(), threading.Event()]
    errors: list[BaseException] = []

    def work(i):
        try:
            group = MergeBatchNorm().apply(model)
        except BaseException as err:  # fail the test, never leave the other thread waiting
            errors.append(err)
            entered.abort()
            return
        try:
            entered.wait()
            assert release[i].wait(TIMEOUT)
        except BaseException as err:
            errors.append(err)
        finally:
            group.remove()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    release[0].set()  # the first to enter exits first
    threads[0].join(TIMEOUT)
    release[1].set()
    threads[1].join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    _assert_same(before, _state(model))


def test_canonizers_applied_concurrently_never_see_a_half_edited_model():
    """Each apply computes its edits and installs them as one step (regression: a thread that read
    the weights another thread had already merged, with the BatchNorm not yet reset, computed a
    different value, was refused, and the other thread waited for it forever)."""
    model = _model()
    before = _state(model)
    merged = MergeBatchNorm().plan(model)
    expected = [(e.module, e.name, e.value) for e in merged]  # type: ignore[attr-defined]
    start = threading.Barrier(4, timeout=TIMEOUT)
    errors: list[BaseException] = []
    seen: list[bool] = []

    def work():
        try:
            start.wait()
            for _ in range(50):
                with MergeBatchNorm().apply(model):
                    seen.append(all(_equal(getattr(m, name), v) for m, name, v in expected))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert len(seen) == 200
    assert all(seen)
    _assert_same(before, _state(model))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b

"""Weight edits restore exactly however contexts end: any exit order, generators, two threads.

Every edit of a tensor sits on one stack (``tdhook.weights._edits``). These tests exit Pruning,
TaskVectors and Adapters contexts out of order and check, with ``torch.equal`` on every
parameter and buffer, both the state while some edits remain (the remaining edits, applied in
their entry order to the original weights) and the final state (the original tensors, same
storage).
"""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import TdhookError
from tdhook.weights import Adapters, Pruning, TaskVectors


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.fixture
def finetuned(model) -> nn.Sequential:
    other = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    return other


def x() -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int, bool]]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: (t.detach().clone(), t.data_ptr(), t.requires_grad) for n, t in tensors.items()}


def assert_restored(model: nn.Module, before) -> None:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(tensors) == set(before)
    for name, t in tensors.items():
        value, ptr, flag = before[name]
        assert torch.equal(t, value), name
        assert t.data_ptr() == ptr, name  # the original storage is back
        assert t.requires_grad == flag, name
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            assert not hooks, module
        assert not module._backward_pre_hooks, module


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_two_contexts_restored_in_creation_order(model) -> None:
    before = snapshot(model)
    first = Pruning(None, amount_to_prune=0.5)
    second = Pruning(None, modules_to_prune={"0": (0, 0.5)})
    h1 = first.prepare(model, return_context=False)
    h2 = second.prepare(model, return_context=False)
    h1.restore()  # first in, first out
    # Only the second pruning remains, applied to the original weights.
    for name, p in model.named_parameters():
        mask = second.masks.get(name)
        expected = before[name][0] if mask is None else before[name][0] * mask
        assert torch.equal(p, expected), name
    h2.restore()
    assert_restored(model, before)


def test_generators_closed_first_in_first_out(model, finetuned) -> None:
    before = snapshot(model)

    def pruned(amount):
        with Pruning(None, amount_to_prune=amount).prepare(model):
            yield

    g1, g2 = pruned(0.3), pruned(0.6)
    next(g1)
    next(g2)
    g1.close()
    g2.close()
    assert_restored(model, before)

    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
        vector = hooked.get_task_vector(finetuned)
        a1 = hooked.with_applied_vectors(vector, alpha=1.0)
        a2 = hooked.with_applied_vectors(vector, alpha=0.5)
        a1.__enter__()
        a2.__enter__()
        a1.__exit__(None, None, None)  # the older swap goes first: alpha=0.5 stays applied
        for name, p in model.named_parameters():
            key = tuple(name.split("."))
            assert torch.equal(p, hooked.weights[key] + 0.5 * vector[key]), name
        a2.__exit__(None, None, None)
    assert_restored(model, before)


@pytest.mark.parametrize("tv_first", [False, True], ids=["pruning-then-tv", "tv-then-pruning"])
def test_pruning_and_task_vectors_exited_out_of_order(model, finetuned, tv_first) -> None:
    before = snapshot(model)
    pruning = Pruning(None, amount_to_prune=0.5)
    tv = TaskVectors([1.0], lambda h: 0.0, lambda h: True)
    if tv_first:
        tv_hooked = tv.prepare(model, return_context=False)
        vector = tv_hooked.get_task_vector(finetuned)
        swap = tv_hooked.with_applied_vectors(vector, alpha=1.0)
        swap.__enter__()
        applied = values(model)
        p_hooked = pruning.prepare(model, return_context=False)
        tv_hooked.restore()  # closes the swap below the pruning: pruning now applies to the originals
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name][0] * pruning.masks[name]), name
        swap.__exit__(None, None, None)  # already undone by the context: a no-op
        p_hooked.restore()
    else:
        p_hooked = pruning.prepare(model, return_context=False)
        tv_hooked = tv.prepare(model, return_context=False)
        vector = tv_hooked.get_task_vector(finetuned)
        swap = tv_hooked.with_applied_vectors(vector, alpha=1.0)
        swap.__enter__()
        applied = values(model)
        p_hooked.restore()  # below the swap: the swapped-in values stay as they are
        for name, p in model.named_parameters():
            assert torch.equal(p, applied[name]), name
        tv_hooked.restore()
    assert_restored(model, before)
    assert any(not torch.equal(applied[n], before[n][0]) for n in applied)  # the edits did edit


def _apply(base: dict[str, torch.Tensor], edit) -> dict[str, torch.Tensor]:
    kind, data = edit
    if kind == "mask":
        return {n: v * data[n] if n in data else v for n, v in base.items()}
    return {n: data.get(n, v) for n, v in base.items()}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_every_exit_order_leaves_the_remaining_edits_then_the_originals(model, finetuned, order) -> None:
    before = snapshot(model)
    base = {n: v for n, (v, _, _) in before.items() if n in dict(model.named_parameters())}
    global_pruning = Pruning(None, amount_to_prune=0.4)
    structured = Pruning(None, modules_to_prune={"3": (1, 0.5)})
    tv = TaskVectors([1.0], lambda h: 0.0, lambda h: True)
    handles, edits = [], []
    handles.append(global_pruning.prepare(model, return_context=False))
    edits.append(("mask", global_pruning.masks))
    tv_hooked = tv.prepare(model, return_context=False)
    swap = tv_hooked.with_applied_vectors(tv_hooked.get_task_vector(finetuned), alpha=0.7)
    swap.__enter__()
    handles.append(tv_hooked)
    edits.append(("swap", values(model)))
    handles.append(structured.prepare(model, return_context=False))
    edits.append(("mask", structured.masks))
    remaining = [0, 1, 2]
    for index in order:
        handles[index].restore()
        remaining.remove(index)
        expected = base
        for i in remaining:
            expected = _apply(expected, edits[i])
        for name, p in model.named_parameters():
            assert torch.equal(p, expected[name]), (order, index, name)
    assert_restored(model, before)


def test_adapters_exited_out_of_order(model) -> None:
    before = snapshot(model)
    td = TensorDict(input=x(), batch_size=[5])
    with torch.no_grad():
        plain = model(x())
    double = Adapters({"a": (lambda v: 2 * v, "0", "0")})
    shift = Adapters({"b": (lambda v: v + 1, "3", "3")})
    h1 = double.prepare(model, return_context=False)
    h2 = shift.prepare(model, return_context=False)
    pruned = Pruning(None, amount_to_prune=0.5).prepare(model, return_context=False)
    h1.restore()
    with torch.no_grad():
        assert not torch.equal(h2(td)["output"], plain)
    pruned.restore()
    with torch.no_grad():  # the original weights, only the shift adapter left
        torch.testing.assert_close(h2(td)["output"], plain + 1)
    h2.restore()
    assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(x()), plain)


def test_contexts_entered_and_exited_from_two_threads(model, finetuned) -> None:
    """Thread A enters first and exits first; thread B's edit stays until B exits."""
    before = snapshot(model)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    observed: dict[str, dict[str, torch.Tensor]] = {}
    pruning_b = Pruning(None, modules_to_prune={"0": (0, 0.5)})

    def thread_a() -> None:
        try:
            with Pruning(None, amount_to_prune=0.5).prepare(model):
                a_in.set()
                assert b_in.wait(10)
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            a_in.set()
            a_out.set()

    def thread_b() -> None:
        try:
            assert a_in.wait(10)
            try:
                context = pruning_b.prepare(model)
                context.__enter__()
            except TdhookError as refused:  # a concurrent context refused at entry is also fine
                observed["refused"] = {"message": refused}  # type: ignore[dict-item]
                return
            finally:
                b_in.set()
            assert a_out.wait(10)
            observed["after_a"] = values(model)
            context.__exit__(None, None, None)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    if "after_a" in observed:  # B's pruning alone, on the original weights
        for name, p in observed["after_a"].items():
            mask = pruning_b.masks.get(name)
            expected = before[name][0] if mask is None else before[name][0] * mask
            assert torch.equal(p, expected), name
    assert_restored(model, before)


def test_many_threads_editing_one_model_restore_it(model) -> None:
    """Eight threads enter and exit prunings in overlapping, arbitrary order."""
    before = snapshot(model)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            method = Pruning(None, amount_to_prune=0.1 * (i % 5))
            for _ in range(5):
                hooked = method.prepare(model, return_context=False)
                barrier.wait(10) if _ == 0 else None
                hooked.restore()
        except TdhookError:
            barrier.abort()  # a concurrent context refused at entry is fine
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not [e for e in errors if not isinstance(e, threading.BrokenBarrierError)], errors
    assert_restored(model, before)

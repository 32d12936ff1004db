"""Every pair of methods composes: weight methods (Adapters, TaskVectors, Pruning) with each other
and with latent methods (ActivationCaching, SteeringVectors), in both orders.

Methods attach extensions to the hooked module instead of subclassing it (``AdapterSet``,
``TaskVectorTools``), so one composite holds any two of them. Each pair is checked against the
edits applied by hand to a copy of the model (plain torch hooks, ``torch.nn.utils.prune`` for
pruning, task arithmetic on the weights), then the model must be restored exactly (same
values, same storage, no hook left): after a normal exit, after an exception in the ``with``
body, and when the two methods' separate contexts are exited out of order.

A composite of weight edits behaves like nested ``with`` blocks in list order: TaskVectors'
weights are those when its edits are installed (pruned when Pruning comes first), and applied
vectors are absolute values (``weights + alpha * vector`` replaces the edits beneath them).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.nn.utils import prune

from tdhook.contexts import CompositeHookingContextFactory, HookingContextFactory
from tdhook.latent import ActivationCaching, SteeringVectors
from tdhook.weights import Adapters, Pruning, TaskVectors
from tdhook.weights.adapters import AdapterSet
from tdhook.weights.task_vectors import TaskVectorTools

ALPHA = 0.5
METHODS = ("adapters", "task_vectors", "pruning", "caching", "steering")
PAIRS = list(itertools.permutations(METHODS, 2))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


class Fixed:
    """The same adapter, steering vector and fine-tuned weights for the method and the oracle."""

    def __init__(self, model: nn.Module) -> None:
        torch.manual_seed(1)
        self.adapter = nn.Linear(6, 6)
        self.vector = torch.randn(6)
        self.finetuned = copy.deepcopy(model)
        with torch.no_grad():
            for p in self.finetuned.parameters():
                p.add_(torch.randn_like(p))
        self.x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))


def build(name: str, fixed: Fixed) -> HookingContextFactory:
    if name == "adapters":
        return Adapters({"ad.2": (fixed.adapter, "2", "2")})
    if name == "task_vectors":
        return TaskVectors([ALPHA], lambda h: 0.0, lambda h: True)
    if name == "pruning":
        return Pruning(None, amount_to_prune=0.5)
    if name == "caching":
        return ActivationCaching("3")
    if name == "steering":
        return SteeringVectors(["0"], vectors={"0": fixed.vector})
    raise AssertionError(name)


def by_hand(
    model: nn.Module, fixed: Fixed, names: tuple[str, ...], *, applied: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output, cached "3")`` of a copy of ``model`` with the edits of ``names`` done by hand."""
    manual = copy.deepcopy(model)
    captured: dict[str, torch.Tensor] | None = None
    for name in names:  # weight edits, in list order
        if name == "pruning":
            params = [
                (m, n) for m in manual.modules() if isinstance(m, nn.Linear) for n in ("weight", "bias")
            ]
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
            for m, n in params:
                prune.remove(m, n)
        elif name == "task_vectors":
            captured = {n: p.detach().clone() for n, p in manual.named_parameters()}
    if applied:
        assert captured is not None
        finetuned = dict(fixed.finetuned.named_parameters())
        with torch.no_grad():
            for n, p in manual.named_parameters():
                p.copy_(captured[n] + ALPHA * (finetuned[n] - captured[n]))
    cached: dict[str, torch.Tensor] = {}
    if "adapters" in names:
        manual[2].register_forward_hook(lambda m, a, out: fixed.adapter(out))
    if "steering" in names:
        manual[0].register_forward_hook(lambda m, a, out: out + fixed.vector)
    manual[3].register_forward_hook(lambda m, a, out: cached.update(value=out))
    with torch.no_grad():
        output = manual(fixed.x)
    return output, cached["value"] if "caching" in names else None


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def assert_restored(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    for name, p in model.named_parameters():
        value, ptr = before[name]
        assert torch.equal(p, value), name
        assert p.data_ptr() == ptr, name  # the original tensor is back, not a copy
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            assert not hooks, module
        assert not module._backward_pre_hooks, module


def check_run(
    hooked: Any,
    model: nn.Module,
    fixed: Fixed,
    names: tuple[str, ...],
    cache: Callable[[], Any],
    extension: Callable[[type], Any],
) -> None:
    """The hooked module's output (and cache) match the edits by hand, before and with vectors.

    ``extension(kind)`` finds the extension of a method (on the composite's hooked module, or on
    the hooked module of the method's own context).
    """
    td = TensorDict(input=fixed.x, batch_size=[5])
    with torch.no_grad():
        out = hooked(td.clone())["output"]
    expected, cached = by_hand(model, fixed, names, applied=False)
    torch.testing.assert_close(out, expected)
    if cached is not None:
        torch.testing.assert_close(cache()["3"], cached)
    if "task_vectors" in names:
        tools = extension(TaskVectorTools)
        vector = tools.get_task_vector(fixed.finetuned)
        with tools.with_applied_vectors(vector, alpha=ALPHA), torch.no_grad():
            out = hooked(td.clone())["output"]
        expected, cached = by_hand(model, fixed, names, applied=True)
        torch.testing.assert_close(out, expected)
        if cached is not None:
            torch.testing.assert_close(cache()["3"], cached)
    if "adapters" in names:
        assert extension(AdapterSet).adapter("ad.2") is fixed.adapter


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_pair_composes_and_matches_the_edits_by_hand(first: str, second: str) -> None:
    model = make_model()
    fixed = Fixed(model)
    before = snapshot(model)
    reference = copy.deepcopy(model)  # the oracle starts from the original weights
    composite = CompositeHookingContextFactory(build(first, fixed), build(second, fixed))
    with composite.prepare(model) as hooked:
        check_run(
            hooked, reference, fixed, (first, second), lambda: hooked.hooking_context.cache, hooked.extension
        )
        if "adapters" in (first, second):
            assert hooked.adapter("ad.2") is fixed.adapter  # the exposed (tdhook 0.1) spelling
    assert_restored(model, before)


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_pair_restores_the_model_after_an_exception_in_the_body(first: str, second: str) -> None:
    model = make_model()
    fixed = Fixed(model)
    before = snapshot(model)
    composite = CompositeHookingContextFactory(build(first, fixed), build(second, fixed))

    def body() -> None:
        with composite.prepare(model) as hooked:
            hooked(TensorDict(input=fixed.x, batch_size=[5]))
            if "task_vectors" in (first, second):
                tools = hooked.extension(TaskVectorTools)
                # left open by the exception: the context closes it
                tools.with_applied_vectors(tools.get_task_vector(fixed.finetuned), alpha=ALPHA).__enter__()
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        body()
    assert_restored(model, before)


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_pair_of_separate_contexts_exited_out_of_order(first: str, second: str) -> None:
    model = make_model()
    fixed = Fixed(model)
    before = snapshot(model)
    reference = copy.deepcopy(model)
    outer, inner = build(first, fixed).prepare(model), build(second, fixed).prepare(model)
    outer_hooked = outer.__enter__()
    try:
        hooked = inner.__enter__()

        def extension(kind: type) -> Any:
            owner = next(h for h in (outer_hooked, hooked) if kind in {type(e) for e in h.extensions})
            return owner.extension(kind)

        try:
            check_run(hooked, reference, fixed, (first, second), lambda: cache_of(outer, inner), extension)
        finally:
            outer.__exit__(None, None, None)  # the first one entered leaves first
        # Only the second method remains, as if it had been entered alone.
        with torch.no_grad():
            out = hooked(TensorDict(input=fixed.x, batch_size=[5]))["output"]
        torch.testing.assert_close(out, by_hand(reference, fixed, (second,), applied=False)[0])
    finally:
        inner.__exit__(None, None, None)
    assert_restored(model, before)


def cache_of(*contexts: Any) -> Any:
    return next(c.cache for c in contexts if isinstance(c.factory, ActivationCaching))


def test_adapters_and_task_vectors_compose_in_one_context() -> None:
    """tdhook 0.1 refused this pair (two hooked-module subclasses); both extensions now coexist."""
    model = make_model()
    fixed = Fixed(model)
    composite = CompositeHookingContextFactory(build("adapters", fixed), build("task_vectors", fixed))
    with composite.prepare(model) as hooked:
        assert {type(e) for e in hooked.extensions} == {AdapterSet, TaskVectorTools}
        vector = hooked.get_task_vector(fixed.finetuned)
        torch.testing.assert_close(vector["0", "weight"], fixed.finetuned[0].weight - model[0].weight)

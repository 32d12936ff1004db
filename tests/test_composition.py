"""CompositeHookingContextFactory (spec §2.2): hook-only and pipeline methods in one forward, in a documented order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from tdhook.contexts import CompositeHookingContextFactory, HookingContextFactory
from tdhook.core import HookedModule
from tdhook.errors import InvalidInputError
from tdhook.latent import ActivationAddition, ActivationCaching, ActivationPatching, SteeringVectors
from tdhook.weights import Adapters, Pruning
from tdhook.weights.adapters import AdapterSet


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture
def td() -> TensorDict:
    torch.manual_seed(1)
    return TensorDict({"input": torch.randn(5, 4), ("patched", "input"): torch.randn(5, 4)}, batch_size=[5])


def blend(module_key: str, output: torch.Tensor, output_to_patch: torch.Tensor) -> torch.Tensor:
    return 0.25 * output + 0.75 * output_to_patch


def test_steer_patch_and_cache_in_one_forward_match_plain_hooks(model, td) -> None:
    vector = torch.linspace(-1, 1, 8)
    composite = CompositeHookingContextFactory(
        SteeringVectors(["0"], vectors={"0": vector}),
        ActivationPatching(["2"], patch_fn=blend),
        ActivationCaching(r"4$"),
    )
    with composite.prepare(model) as hooked:
        out = hooked(td)
    cache = hooked.hooking_context.cache

    # Oracle: the same three interventions written with plain torch hooks.
    recorded: dict[str, torch.Tensor] = {}
    steer = model[0].register_forward_hook(lambda m, a, o: o + vector)
    record = model[2].register_forward_hook(lambda m, a, o: recorded.__setitem__("clean", o))
    clean = model(td["input"])
    record.remove()
    patch = model[2].register_forward_hook(lambda m, a, o: blend("2", o, recorded["clean"]))
    cache_hook = model[4].register_forward_hook(lambda m, a, o: recorded.__setitem__("last", o))
    patched = model(td["patched", "input"])
    for handle in (steer, patch, cache_hook):
        handle.remove()

    assert out is td
    torch.testing.assert_close(out["output"], clean)
    torch.testing.assert_close(out["patched", "output"], patched)
    # Hook-only components fire in every run of a pipeline method: the cache holds the last (patched) run.
    torch.testing.assert_close(cache["4"], recorded["last"])
    assert set(out.keys(include_nested=True, leaves_only=True)) == {
        "input",
        "output",
        ("patched", "input"),
        ("patched", "output"),
    }


def test_hooks_on_the_same_module_fire_in_the_given_order(model, td) -> None:
    minus = SteeringVectors(["2"], lambda module_key, output: -output)
    for factories, sign in (((minus, ActivationCaching(r"2$")), -1), ((ActivationCaching(r"2$"), minus), 1)):
        with CompositeHookingContextFactory(*factories).prepare(model) as hooked:
            hooked(td)
        expected = sign * model[2](model[1](model[0](td["input"])))
        torch.testing.assert_close(hooked.hooking_context.cache["2"], expected)


class CallLog(HookingContextFactory):
    """A pipeline method that only logs its calls (to observe the call order)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def _call(
        self, hooked: Any, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> TensorDictBase:
        self.log.append(f"{self.name}>")
        try:
            return call_next(td, **kwargs)
        finally:
            self.log.append(f"<{self.name}")


def test_first_factory_is_the_outermost_call_and_pipelines_rerun_inner_ones(model, td) -> None:
    log: list[str] = []
    composite = CompositeHookingContextFactory(
        CallLog("a", log), ActivationPatching(["2"]), CallLog("b", log)
    )
    with composite.prepare(model) as hooked:
        hooked(td)
    assert log == ["a>", "b>", "<b", "b>", "<b", "<a"]  # patching runs b for the clean and the patched run


def test_nested_composites_are_flattened(model, td) -> None:
    log: list[str] = []
    inner = CompositeHookingContextFactory(CallLog("b", log), CallLog("c", log))
    outer = CompositeHookingContextFactory(CallLog("a", log), inner)
    assert [f.name for f in outer.factories] == ["a", "b", "c"]
    with outer.prepare(model) as hooked:
        hooked(td)
    assert log == ["a>", "b>", "c>", "<c", "<b", "<a"]


def test_pipeline_inside_pipeline_keeps_the_other_entries(model) -> None:
    """ActivationAddition's positive/negative runs go through patching, which still finds its branch."""
    torch.manual_seed(2)
    keys = ("positive", "negative", "patched")
    td = TensorDict({(k, "input"): torch.randn(6, 4) for k in keys}, batch_size=[6])
    composite = CompositeHookingContextFactory(ActivationAddition(["4"]), ActivationPatching(["0"]))
    with composite.prepare(model) as hooked:
        out = hooked(td)
    # Patching layer 0 with the clean activation makes the output independent of the patched input,
    # while the addition vector is taken from the clean runs, so it equals the plain difference.
    expected = (model(td["positive", "input"]) - model(td["negative", "input"])).mean(0)
    torch.testing.assert_close(out["steer", "4"], expected)


def test_attribution_composes_with_steering(model) -> None:
    from tdhook.attribution import Saliency

    x = torch.randn(5, 4)
    vector = torch.linspace(-2, 2, 8)
    composite = CompositeHookingContextFactory(
        SteeringVectors(["2"], vectors={"2": vector}), Saliency(targets=[1])
    )
    with composite.prepare(model) as hooked:
        out = hooked(TensorDict(input=x, batch_size=[5]))
    xg = x.clone().requires_grad_(True)
    handle = model[2].register_forward_hook(lambda m, a, o: o + vector)
    try:
        (grad,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    finally:
        handle.remove()
    torch.testing.assert_close(out["attr", "input"], grad)


def test_weight_edits_compose_with_extensions(model, td) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    adapter = nn.Linear(8, 8)
    composite = CompositeHookingContextFactory(
        Pruning(None, amount_to_prune=0.5),
        Adapters({"block.2": (adapter, "2", "2")}),
        ActivationCaching(r"2$"),
    )
    with composite.prepare(model) as hooked:
        out = hooked(td)
        assert hooked.extension(AdapterSet).adapter("block.2") is adapter
        assert hooked.adapter("block.2") is adapter
        pruned = [p.detach().clone() for p in model.parameters()]
    assert sum(int((p == 0).sum()) for p in pruned) == round(0.5 * sum(p.numel() for p in pruned))
    # The cache (after the adapter in the list) sees the adapter's output, computed with pruned weights.
    h = torch.relu(nn.functional.linear(td["input"], pruned[0], pruned[1]))
    torch.testing.assert_close(
        hooked.hooking_context.cache["2"], adapter(nn.functional.linear(h, pruned[2], pruned[3]))
    )
    assert out["output"].shape == (5, 3)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_bad_compositions(model) -> None:
    with pytest.raises(ValueError, match="at least one factory"):
        CompositeHookingContextFactory()
    with pytest.raises(InvalidInputError, match="method instances"):
        CompositeHookingContextFactory(ActivationCaching)  # type: ignore[arg-type]
    # Methods attach extensions, but a (legacy) method may still declare its own hooked-module
    # class; two unrelated ones cannot be combined.

    class ModuleA(HookedModule):
        pass

    class ModuleB(HookedModule):
        pass

    class MethodA(HookingContextFactory):
        _hooked_module_class = ModuleA

    class MethodB(HookingContextFactory):
        _hooked_module_class = ModuleB

    with pytest.raises(ValueError, match="unrelated hooked-module classes"):
        CompositeHookingContextFactory(MethodA(), MethodB())
    with CompositeHookingContextFactory(MethodA(), ActivationCaching("0")).prepare(model) as hooked:
        assert type(hooked) is ModuleA

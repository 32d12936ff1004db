"""Targets in ActivationCaching, ActivationPatching, SteeringVectors, ActivationAddition; cache publication."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import TargetError
from tdhook.latent import ActivationAddition, ActivationCaching, ActivationPatching, SteeringVectors
from tdhook.targets import Target


class PairOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, h.sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0 = nn.Linear(4, 4)
        self.block = PairOut()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, aux = self.block(torch.tanh(self.l0(x)))
        return self.head(h) + aux


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 4)


def td_of(x: torch.Tensor, **branches: torch.Tensor) -> TensorDict:
    td = TensorDict(input=x, batch_size=x.shape[:1])
    for name, value in branches.items():
        td[name, "input"] = value
    return td


def manual(net: nn.Module, module: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    handle = module.register_forward_hook(lambda m, a, o: fn(o))
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------
# ActivationCaching
# ------------------------------------------------------------------------------------------------


def test_caching_targets_stores_the_selection(net, x) -> None:
    targets = [Target("l0", indices=(1, 3)), Target("block", output_path=(0,), indices=(2,))]
    with ActivationCaching(targets).prepare(net) as hooked:
        hooked(td_of(x))
    cache = hooked.hooking_context.cache
    with torch.no_grad():
        h0 = net.l0(x)
        h1 = net.block.lin(torch.tanh(h0))
    assert set(cache.keys()) == {"l0", "block"}
    assert torch.equal(cache["l0"], h0[:, [1, 3]])
    assert torch.equal(cache["block"], h1[:, [2]])
    with ActivationCaching(Target("l0")).prepare(net) as hooked:  # one Target
        hooked(td_of(x))
    assert torch.equal(hooked.hooking_context.cache["l0"], h0)


def test_caching_targets_refusals(net) -> None:
    with pytest.raises(ValueError, match="relative=True"):
        ActivationCaching([Target("l0")], relative=False)
    with pytest.raises(ValueError, match="forward-only"):
        ActivationCaching([Target("l0")], directions=["fwd_pre"])
    with pytest.raises(TargetError, match="is a gradient target"):
        ActivationCaching([Target("l0", "gradient")])
    with pytest.raises(TargetError, match="acts on every call"):
        ActivationCaching([Target("l0", occurrences=(0,))])
    with pytest.raises(TargetError, match="module 'l0' is given twice"):
        ActivationCaching([Target("l0", indices=(0,)), Target("l0", indices=(1,))])
    with pytest.raises(TypeError, match="either patterns .str. or Targets"):
        ActivationCaching(["l0", Target("block")])


def test_cache_publication_is_opt_in(net, x) -> None:
    with ActivationCaching(r"l0|head").prepare(net) as hooked:
        out = hooked(td_of(x))
    assert "cache" not in out  # 0.1: the cache lives in the context only
    with ActivationCaching(r"l0|head", cache_key="cache").prepare(net) as hooked:
        out = hooked(td_of(x))
    cache = hooked.hooking_context.cache
    assert set(out["cache"].keys()) == {"l0", "head"}
    assert torch.equal(out["cache", "l0"], cache["l0"])
    with torch.no_grad():
        torch.testing.assert_close(out["cache", "head"], net.head(net.block(torch.tanh(net.l0(x)))[0]))
    with ActivationCaching(Target("l0", indices=(0,)), cache_key=("acts", "mine")).prepare(net) as hooked:
        out = hooked(td_of(x))
    assert out["acts", "mine", "l0"].shape == (6, 1)


def test_cache_publication_refusals(net, x) -> None:
    with (
        pytest.raises(ValueError, match=r"cache_key 'output' overlaps the model's keys"),
        ActivationCaching("l0", cache_key="output").prepare(net),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"cache_key \('input', 'cache'\) overlaps"),
        ActivationCaching("l0", cache_key=("input", "cache")).prepare(net),
    ):
        pass
    with pytest.raises(ValueError, match="accumulate"):
        ActivationCaching("l0", cache_key="cache", accumulate=True)


# ------------------------------------------------------------------------------------------------
# ActivationPatching
# ------------------------------------------------------------------------------------------------


def test_patching_a_target_patches_only_the_selection(net, x) -> None:
    torch.manual_seed(2)
    corrupted = torch.randn(6, 4)
    with torch.no_grad():
        clean_h = net.l0(x)

    def only_unit_1(o):
        o = o.clone()
        o[:, 1] = clean_h[:, 1]
        return o

    expected = manual(net, net.l0, only_unit_1, corrupted)
    with ActivationPatching([Target("l0", indices=(1,))]).prepare(net) as hooked:
        td = hooked(td_of(x, patched=corrupted))
    assert torch.equal(td["patched", "output"], expected)
    with torch.no_grad():
        assert torch.equal(td["output"], net(x))


def test_patching_a_tuple_leaf_and_patch_fn_on_the_selection(net, x) -> None:
    torch.manual_seed(2)
    corrupted = torch.randn(6, 4)
    seen = {}

    def patch_fn(module_key, output, output_to_patch):
        seen["shapes"] = (tuple(output.shape), tuple(output_to_patch.shape))
        return (output + output_to_patch) / 2

    with torch.no_grad():
        clean_h = net.block(torch.tanh(net.l0(x)))[0]

    def mix(o):
        h = o[0].clone()
        h[:, 0] = (h[:, 0] + clean_h[:, 0]) / 2
        return h, o[1]

    expected = manual(net, net.block, mix, corrupted)
    target = Target("block", output_path=(0,), indices=(0,))
    with ActivationPatching([target], patch_fn=patch_fn).prepare(net) as hooked:
        td = hooked(td_of(x, patched=corrupted))
    assert seen["shapes"] == ((6, 1), (6, 1))
    torch.testing.assert_close(td["patched", "output"], expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Steering
# ------------------------------------------------------------------------------------------------


def test_steering_vectors_on_selected_units(net, x) -> None:
    def add(o):
        o = o.clone()
        o[:, 2] += 5.0
        return o

    expected = manual(net, net.l0, add, x)
    steering = SteeringVectors([Target("l0", indices=(2,))], vectors={"l0": torch.tensor([5.0])})
    with steering.prepare(net) as hooked:
        td = hooked(td_of(x))
    torch.testing.assert_close(td["output"], expected, rtol=0, atol=1e-6)


def test_steer_fn_on_a_tuple_leaf(net, x) -> None:
    expected = manual(net, net.block, lambda o: (o[0] * 0, o[1]), x)
    steering = SteeringVectors(
        [Target("block", output_path=(0,))], steer_fn=lambda module_key, output: output * 0
    )
    with steering.prepare(net) as hooked:
        td = hooked(td_of(x))
    assert torch.equal(td["output"], expected)


def test_activation_addition_on_selected_units(net, x) -> None:
    torch.manual_seed(3)
    positive, negative = torch.randn(6, 4), torch.randn(6, 4)
    with torch.no_grad():
        diff = (net.l0(positive) - net.l0(negative))[:, [0, 3]].mean(0)
    with ActivationAddition([Target("l0", indices=(0, 3))]).prepare(net) as hooked:
        out = hooked(td_of(x, positive=positive, negative=negative))
    vector = out["steer", "l0"]
    vector = vector if vector.ndim == 1 else vector[0]
    torch.testing.assert_close(vector, diff, rtol=0, atol=1e-6)

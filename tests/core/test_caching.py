"""ActivationCaching (spec §8.1): values equal plain torch hooks; accumulation; user caches."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tdhook.errors import NoMatchError
from tdhook.latent import ActivationCaching


def test_values_match_manual_forward(net, td) -> None:
    with ActivationCaching(r"linear\d$").prepare(net) as hooked:
        hooked(td)
    cache = hooked.hooking_context.cache
    x = td["input"]
    h1 = net.linear1(x)
    h2 = net.linear2(torch.relu(h1))
    torch.testing.assert_close(cache["linear1"], h1)
    torch.testing.assert_close(cache["linear2"], h2)
    torch.testing.assert_close(cache["linear3"], net.linear3(torch.relu(h2)))
    assert set(cache.keys()) == {"linear1", "linear2", "linear3"}


def test_directions_and_nested_keys(net, td) -> None:
    with ActivationCaching("linear2", directions=["fwd", "fwd_pre"]).prepare(net) as hooked:
        hooked(td)
    cache = hooked.hooking_context.cache
    torch.testing.assert_close(cache["fwd_pre", "linear2"], torch.relu(net.linear1(td["input"])))
    assert ("fwd", "linear2") in cache.keys(include_nested=True)


def test_backward_direction(net, td) -> None:
    td["input"].requires_grad_(True)
    with ActivationCaching("linear3", directions=["bwd"], use_nested_keys=True).prepare(net) as hooked:
        hooked(td)["output"].sum().backward()
    grad_in = hooked.hooking_context.cache["bwd", "linear3"]
    assert torch.equal(grad_in, torch.ones(5, 2) @ net.linear3.weight)


def test_absolute_names(net, td) -> None:
    with ActivationCaching(r"td_module\.module\.linear1", relative=False).prepare(net) as hooked:
        hooked(td)
    assert list(hooked.hooking_context.cache.keys()) == ["td_module.module.linear1"]


def test_overwrite_by_default_and_accumulate(net, td) -> None:
    with ActivationCaching("linear1").prepare(net) as hooked:
        hooked(td)
        hooked(td[:2])
    assert hooked.hooking_context.cache["linear1"].shape == (2, 6)
    with ActivationCaching("linear1", accumulate=True, detach=True).prepare(net) as hooked:
        for chunk in td.split(2):
            hooked(chunk)
    acc = hooked.hooking_context.cache["linear1"]
    torch.testing.assert_close(acc, net.linear1(td["input"]))
    assert not acc.requires_grad


def test_user_cache_memmap(net, td, tmp_path) -> None:
    cache = TensorDict({"linear1": torch.zeros(5, 6)}, batch_size=[5]).memmap_(tmp_path)
    with ActivationCaching("linear1$", cache=cache, clear_cache=False).prepare(net) as hooked:
        hooked(td)
    assert hooked.hooking_context.cache is cache
    reloaded = TensorDict.load_memmap(tmp_path)
    torch.testing.assert_close(reloaded["linear1"], net.linear1(td["input"]))


def test_cache_cleared_at_enter_kept_after_exit(net, td) -> None:
    caching = ActivationCaching("linear1")
    ctx = caching.prepare(net)
    with ctx as hooked:
        hooked(td)
    assert "linear1" in ctx.cache
    with ctx:
        assert "linear1" not in ctx.cache


def test_pattern_matching_nothing_raises(net) -> None:
    with pytest.raises(NoMatchError, match=r"Pattern 'transformer' matched no module.*'linear1'"):
        ActivationCaching("transformer").prepare(net).__enter__()
    assert not net.linear1._forward_hooks


def test_tuple_output_stored_as_nested_entries() -> None:
    class Block(torch.nn.Module):
        def forward(self, x):
            return x, x + 1

    model = torch.nn.Sequential(Block())
    td = TensorDict(input=torch.ones(2, 3), batch_size=[2])
    with ActivationCaching("0").prepare(model, out_keys=["a", "b"]) as hooked:
        hooked(td)
    cache = hooked.hooking_context.cache
    assert torch.equal(cache["0", "0"], torch.ones(2, 3))
    assert torch.equal(cache["0", "1"], torch.full((2, 3), 2.0))
    with ActivationCaching("0", callback=lambda output, **_: output[1]).prepare(
        model, out_keys=["a", "b"]
    ) as hooked:
        hooked(td)
    assert torch.equal(hooked.hooking_context.cache["0"], torch.full((2, 3), 2.0))


def test_structured_values_rule() -> None:
    """None and non-tensor leaves are left out; a value with no tensor is not stored; mappings nest."""

    class Structured(torch.nn.Module):
        def forward(self, x):
            return {"a": x, "b": (None, x * 2, "text"), "c": None}

    class Nothing(torch.nn.Module):
        def forward(self, x):
            return None, 3

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = Structured()
            self.n = Nothing()

        def forward(self, x):
            self.n(x)
            return self.s(x)["a"]

    x = torch.randn(2, 3)
    with ActivationCaching(".*", accumulate=True).prepare(Model()) as hooked:
        hooked(TensorDict(input=x, batch_size=[2]))
        hooked(TensorDict(input=x, batch_size=[2]))
    cache = hooked.hooking_context.cache
    assert set(cache.keys(True, True)) == {("s", "a"), ("s", "b", "1")}
    torch.testing.assert_close(cache["s", "b", "1"], torch.cat([x, x]) * 2)


def test_accumulate_along_sequence(net) -> None:
    seq = torch.randn(2, 5, 4)
    with ActivationCaching("linear1$", accumulate=True, accumulate_dim=1).prepare(net) as hooked:
        for t in range(5):
            hooked(TensorDict(input=seq[:, t : t + 1], batch_size=[2]))
    torch.testing.assert_close(hooked.hooking_context.cache["linear1"], net.linear1(seq))
    with pytest.raises(TypeError, match="accumulate_dim must be an int"):
        ActivationCaching("linear1", accumulate_dim=True)

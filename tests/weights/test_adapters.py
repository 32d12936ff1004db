"""Adapters (spec §9.1, §13.10): declared keywords only, dotted names, cross-layer, trainable, restored."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import InvalidInputError, MissingKeyError, ModulePathError
from tdhook.weights import Adapters
from tdhook.weights.adapters import AdapterError, AdapterSet


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int = 5) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(n, 4), batch_size=[n])


class Plain(nn.Module):
    """An adapter whose forward declares only its input (tdhook 0.1 passed it ``args=`` and failed)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Declares(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, object] = {}

    def forward(self, x, module, direction):
        self.seen = {"module": module, "direction": direction}
        return x


class Greedy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def forward(self, x, **kwargs):
        self.seen = set(kwargs)
        return x


def test_same_layer_adapter_matches_a_plain_hook(model) -> None:
    adapter = Plain()
    x = data()["input"]
    handle = model[2].register_forward_hook(lambda m, a, o: adapter(o))
    expected = model(x)
    handle.remove()
    with Adapters({"sae.layer.2": (adapter, "2", "2")}).prepare(model) as hooked:
        out = hooked(data())
        assert hooked.extension(AdapterSet).adapter("sae.layer.2") is adapter
        assert hooked.adapter("sae.layer.2") is adapter
        assert hooked.adapter_names == ["sae.layer.2"]
        assert dict(hooked.named_adapters()) == {"sae.layer.2": adapter}
        names = {n for n, _ in hooked.named_parameters()}
    torch.testing.assert_close(out["output"], expected)
    assert any(n.startswith("adapters.") and n.endswith("linear.weight") for n in names)
    torch.testing.assert_close(model(x), hooked.td_module.module(x))  # model unchanged after exit


def test_adapter_gets_only_the_keywords_it_declares(model) -> None:
    declares, greedy = Declares(), Greedy()
    with Adapters({"a": (declares, "0", "0"), "b": (greedy, "2", "2")}).prepare(model) as hooked:
        hooked(data())
    assert declares.seen["module"] is model[0]
    assert declares.seen["direction"] == "fwd"
    assert greedy.seen == {"module", "args", "output", "direction"}
    calls = []
    with Adapters({"f": (lambda x: calls.append(x.shape) or x, "4", "4")}).prepare(model) as hooked:
        hooked(data(3))
    assert calls == [torch.Size([3, 3])]


def test_names_with_dots_and_reserved_words(model) -> None:
    names = ["layer.0", "layer%2E0", "keys", "forward", "", "a.b.c"]
    adapters = {name: (nn.Identity(), "2", "2") for name in names}
    with Adapters(adapters).prepare(model) as hooked:
        hooked(data())
        assert hooked.adapter_names == names
        for name in names:
            assert hooked.adapter(name) is adapters[name][0]
        assert len(hooked.adapters) == len(names)
        with pytest.raises(KeyError, match=r"No adapter named 'layer\.9'") as info:
            hooked.adapter("layer.9")
    assert isinstance(info.value, MissingKeyError)


def test_cross_layer_adapter(model) -> None:
    """A transcoder: the output of layer 0 replaces the output of layer 2."""
    torch.manual_seed(3)
    transcoder = nn.Linear(6, 6)
    x = data()["input"]
    expected = model[4](torch.tanh(transcoder(model[0](x))))
    with Adapters({"transcoder": (transcoder, "0", "2")}).prepare(model) as hooked:
        out = hooked(data())
    torch.testing.assert_close(out["output"], expected)
    torch.testing.assert_close(hooked.hooking_context.cache["0_output"], model[0](x))


def test_cross_layer_in_module_must_run_first(model) -> None:
    with Adapters({"backwards": (nn.Identity(), "4", "2")}).prepare(model) as hooked:
        for _ in range(2):  # also on a second call: a stale value from a previous call is not used
            with pytest.raises(AdapterError, match="'4', which has not run yet"):
                hooked(data())


def test_forward_pre_direction(model) -> None:
    with Adapters({"scale": (lambda x: 2 * x, "2", "2")}, directions=["fwd_pre"]).prepare(model) as hooked:
        out = hooked(data())
    x = data()["input"]
    expected = model[4](torch.tanh(model[2](2 * torch.relu(model[0](x)))))
    torch.testing.assert_close(out["output"], expected)


def test_training_an_adapter_leaves_the_model_untouched(model) -> None:
    torch.manual_seed(4)
    adapter = Plain()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_before = adapter.linear.weight.detach().clone()
    with Adapters({"sae": (adapter, "2", "2")}).prepare(model) as hooked:
        optimizer = torch.optim.SGD(hooked.adapters.parameters(), lr=0.1)
        loss = hooked(data())["output"].pow(2).sum()
        loss.backward()
        optimizer.step()
    assert not torch.equal(adapter.linear.weight, adapter_before)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_bad_inputs(model) -> None:
    with pytest.raises(InvalidInputError, match="non-empty dict"):
        Adapters({})
    with pytest.raises(
        InvalidInputError, match=r"adapters\['a'\] must be an \(adapter, in_module_key, out_module_key\)"
    ):
        Adapters({"a": (nn.Identity(), "0")})  # type: ignore[dict-item]
    with (
        pytest.raises(ModulePathError, match="Nearest existing module names"),
        Adapters({"a": (nn.Identity(), "0", "9")}).prepare(model),
    ):
        pass
    wrong = Adapters({"a": (lambda x: (x, x), "0", "0")})
    with wrong.prepare(model) as hooked, pytest.raises(RuntimeError, match="type tuple"):
        hooked(data())


def test_hooked_module_with_adapters_works_without_a_context(model) -> None:
    from tdhook.weights.adapters import HookedModuleWithAdapters

    hooked = HookedModuleWithAdapters.from_module(model)
    adapter = Plain()
    hooked.add_adapter("a.b", adapter)
    assert hooked.adapter("a.b") is adapter
    assert hooked.adapter_names == ["a.b"]
    assert hooked.extension(AdapterSet).adapter("a.b") is adapter
    assert any(n.startswith("adapters.") for n, _ in hooked.named_parameters())


class Routed(nn.Module):
    """``b(a(x))``; ``skip_a`` leaves ``a`` out, ``reverse`` runs ``a(b(x))`` (``b`` before ``a``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.skip_a = False
        self.reverse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reverse:
            return self.a(self.b(x))
        return self.b(x if self.skip_a else self.a(x))


def _call(hooked, model: nn.Module, x: torch.Tensor, style: str) -> torch.Tensor:
    if style == "tensordict":
        return hooked(TensorDict(input=x, batch_size=[len(x)]))["output"]
    if style == "tensor":
        return hooked(x)
    return model(x)  # the user's model called directly inside the context


@pytest.mark.parametrize("style", ["tensordict", "tensor", "model"])
def test_cross_layer_matches_hand_written_hooks_on_every_call_path(style) -> None:
    torch.manual_seed(4)
    model, transcoder = Routed(), nn.Linear(4, 4)
    xs = [torch.randn(3, 4), torch.randn(3, 4)]
    stored: dict[str, torch.Tensor] = {}
    handles = [
        model.a.register_forward_hook(lambda m, args, out: stored.__setitem__("a", out)),
        model.b.register_forward_hook(lambda m, args, out: transcoder(stored["a"])),
    ]
    expected = [model(x) for x in xs]
    for h in handles:
        h.remove()
    with Adapters({"t": (transcoder, "a", "b")}).prepare(model) as hooked:
        got = [_call(hooked, model, x, style) for x in xs]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("change", ["skip_a", "reverse"])
@pytest.mark.parametrize("style", ["tensordict", "tensor", "model"])
def test_cross_layer_value_of_an_earlier_call_never_feeds_a_later_one(style, change) -> None:
    """A call where the in-module does not run before the out-module is refused on every call
    path: the previous call's value is cleared at the start of every forward of the model."""
    torch.manual_seed(5)
    model, transcoder = Routed(), nn.Linear(4, 4)
    with Adapters({"t": (transcoder, "a", "b")}).prepare(model) as hooked:
        _call(hooked, model, torch.randn(3, 4), style)  # fills the cross-layer value
        setattr(model, change, True)
        with pytest.raises(AdapterError, match="'a', which has not run yet"):
            _call(hooked, model, torch.randn(3, 4), style)
        assert hooked.hooking_context.cache.get("a_output", None) is None
        setattr(model, change, False)
        x = torch.randn(3, 4)
        torch.testing.assert_close(_call(hooked, model, x, style), transcoder(model.a(x)))

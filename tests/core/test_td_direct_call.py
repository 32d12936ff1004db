"""The direct TensorDict call: ``hooked(td)`` runs a plain ``TensorDictModule``'s inner module itself.

It must write exactly what ``td_module(td)`` writes (same keys, same values, same errors), and
take the ``TensorDictModule``'s own call whenever that call would do more (subclasses, ``method``,
``inplace=False``, hooks on the wrapper, ``select_out_keys``, ``skip_existing``...).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, set_skip_existing
from torch import nn

from tdhook._core.boundary import td_direct_module
from tdhook.modules import HookedModule


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


class Named(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": x + y, "diff": x - y, "extra": x}


class Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class Nested(nn.Module):
    def forward(self, x: torch.Tensor) -> TensorDict:
        return TensorDict({"a": x + 1}, batch_size=x.shape[:1])


def _td() -> TensorDict:
    torch.manual_seed(0)
    return TensorDict(
        {"x": torch.randn(3, 4), "y": torch.randn(3, 4), ("n", "x"): torch.randn(3, 4)}, batch_size=[3]
    )


CASES: dict[str, Any] = {
    "one_tensor": lambda: TensorDictModule(nn.Linear(4, 2), ["x"], ["out"]),
    "tuple_two_keys": lambda: TensorDictModule(Pair(), ["x"], ["a", "b"]),
    "underscore_key": lambda: TensorDictModule(Pair(), ["x"], ["_", "b"]),
    "dict_by_key": lambda: TensorDictModule(Named(), ["x", "y"], ["diff", "sum"]),
    "nested_keys": lambda: TensorDictModule(nn.Linear(4, 2), [("n", "x")], [("deep", "out")]),
    "tensordict_output": lambda: TensorDictModule(Nested(), ["x"], ["sub"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_writes_what_the_tensordict_module_writes(name: str) -> None:
    td_module = CASES[name]()
    assert td_direct_module(td_module) is td_module.module  # these cases take the direct call
    expected = td_module(_td())
    hooked = HookedModule.from_module(td_module)
    got = hooked(_td())
    assert set(got.keys(True, True)) == set(expected.keys(True, True))
    for key in expected.keys(True, True):
        torch.testing.assert_close(got.get(key), expected.get(key), rtol=0, atol=0)


def test_the_input_tensordict_is_written_in_place_and_returned() -> None:
    td = _td()
    hooked = HookedModule.from_module(CASES["one_tensor"]())
    assert hooked(td) is td
    assert "out" in td


def test_output_count_errors_match() -> None:
    for out_keys in (["a"], ["a", "b", "c"]):
        td_module = TensorDictModule(Pair(), ["x"], out_keys)
        with pytest.raises(RuntimeError) as theirs:
            td_module(_td())
        with pytest.raises(RuntimeError) as ours:
            HookedModule.from_module(td_module)(_td())
        assert str(ours.value) == str(theirs.value)


def test_none_output_with_out_keys_fails_like_the_module() -> None:
    td_module = TensorDictModule(Nothing(), ["x"], ["out"])
    with pytest.raises(RuntimeError, match="more out_keys than tensors"):
        HookedModule.from_module(td_module)(_td())


def test_a_batch_mismatch_is_refused_by_tensordict() -> None:
    td_module = TensorDictModule(lambda x: x.sum(0), ["x"], ["out"])  # drops the batch dimension
    with pytest.raises(RuntimeError) as theirs:
        td_module(_td())
    with pytest.raises(RuntimeError) as ours:
        HookedModule.from_module(td_module)(_td())
    assert type(ours.value) is type(theirs.value)


def test_model_hooks_fire_on_the_direct_call() -> None:
    td_module = CASES["one_tensor"]()
    seen: list[torch.Size] = []
    handle = td_module.module.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    HookedModule.from_module(td_module)(_td())
    handle.remove()
    assert seen == [torch.Size([3, 2])]


def _probabilistic_like() -> TensorDictModule:
    class Sub(TensorDictModule):  # a subclass may do anything in its call
        def forward(self, tensordict, *args, **kwargs):
            out = super().forward(tensordict, *args, **kwargs)
            out.set("marked", torch.ones(3))
            return out

    return Sub(nn.Linear(4, 2), ["x"], ["out"])


FALLBACKS: dict[str, Any] = {
    "subclass": _probabilistic_like,
    "method": lambda: TensorDictModule(nn.Linear(4, 2), ["x"], ["out"], method="forward"),
    "not_inplace": lambda: TensorDictModule(nn.Linear(4, 2), ["x"], ["out"], inplace=False),
    "kwargs_in_keys": lambda: TensorDictModule(Named(), {"x": "x", "y": "y"}, ["sum"]),
    "selected_out_keys": lambda: TensorDictModule(Pair(), ["x"], ["a", "b"]).select_out_keys("b"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_anything_more_takes_the_modules_own_call(name: str) -> None:
    td_module = FALLBACKS[name]()
    assert td_direct_module(td_module) is None
    expected = td_module(_td())
    got = HookedModule.from_module(td_module)(_td())
    assert set(got.keys(True, True)) == set(expected.keys(True, True))
    for key in expected.keys(True, True):
        torch.testing.assert_close(got.get(key), expected.get(key), rtol=0, atol=0)


def test_a_hook_on_the_wrapper_takes_the_modules_own_call() -> None:
    td_module = CASES["one_tensor"]()
    fired: list[bool] = []
    handle = td_module.register_forward_hook(lambda m, a, o: fired.append(True))
    assert td_direct_module(td_module) is None
    HookedModule.from_module(td_module)(_td())
    handle.remove()
    assert fired == [True]
    assert td_direct_module(td_module) is td_module.module  # checked per call


def test_skip_existing_is_honoured() -> None:
    td_module = CASES["one_tensor"]()
    hooked = HookedModule.from_module(td_module)
    td = _td()
    td["out"] = torch.zeros(3, 2)
    with set_skip_existing(True):
        assert td_direct_module(td_module) is None
        hooked(td)
    assert (td["out"] == 0).all()  # the module was skipped, as td_module(td) skips it


def test_a_non_tensor_input_takes_the_modules_own_call() -> None:
    calls: list[Any] = []

    class Texts(nn.Module):
        def forward(self, text: Any) -> torch.Tensor:
            calls.append(text)
            return torch.zeros(2, 1)

    td = TensorDict({"text": ["a", "b"]}, batch_size=[2])
    td_module = TensorDictModule(Texts(), ["text"], ["out"])
    expected_td = TensorDict({"text": ["a", "b"]}, batch_size=[2])
    td_module(expected_td)
    HookedModule.from_module(td_module)(td)
    assert calls[0] == calls[1]  # the module saw what TensorDictModule passes for a non-tensor entry
    assert td["out"].shape == (2, 1)


def test_wrapping_never_edits_the_models_out_keys() -> None:
    td_module = TensorDictModule(Pair(), ["x"], ["a", "b"])
    hooked = HookedModule.from_module(td_module, out_keys=["a"])  # a subset, which methods honour
    assert hooked.out_keys == ["a"]
    assert td_module.out_keys == ["a", "b"]
    assert td_module.out_keys_source == ["a", "b"]
    out = td_module(_td())  # the model still writes both of its outputs
    assert "a" in out
    assert "b" in out
    hooked.out_keys = ["b"]
    assert td_module.out_keys == ["a", "b"]

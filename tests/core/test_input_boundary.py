"""The hooked module's call boundary explains calls that fail on a bad input (issue 11 §4, §5).

A string (non-tensor) where the model reads an input tensor, and integers fed to a floating-point
model without an embedding, used to reach torch's raw ``TypeError``/``RuntimeError`` deep inside
the model or the method. The boundary now raises an :class:`InvalidInputError` /
:class:`DtypeMismatchError` naming the key, the value, the expectation, the fix and torch's own
message, chained to torch's error. Inputs that are valid for the model (text read by a module
that takes text, integer ids into an embedding or an indexed table) are never refused.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorStack, TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook.attribution import IntegratedGradients, Saliency
from tdhook.errors import DtypeMismatchError, InvalidInputError, TdhookError
from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors
from tdhook.modules import HookedModule


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


def _with_string(text: str = "fc1") -> TensorDict:
    td = TensorDict(batch_size=[3])
    td.set_non_tensor("input", text)
    return td


FACTORIES = {
    "caching": lambda: ActivationCaching(r"\d$"),
    "steering": lambda: SteeringVectors(["0"], vectors={"0": torch.ones(6)}),
    "saliency": lambda: Saliency(),
    "integrated-gradients": lambda: IntegratedGradients(n_steps=4),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_string_input_is_refused_naming_key_value_and_fix(name: str) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        pytest.raises(
            InvalidInputError, match=r"Input 'input' holds a str \('fc1'\), not a tensor.*torch\.as_tensor"
        ),
        FACTORIES[name]().prepare(model) as hooked,
    ):
        hooked(_with_string())
    assert _no_hooks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_clear_error_is_chained_to_torchs_and_quotes_it() -> None:
    with pytest.raises(InvalidInputError) as info, ActivationCaching("0").prepare(_mlp()) as hooked:
        hooked(_with_string("12"))
    assert isinstance(info.value, TypeError)  # the built-in users caught before
    assert isinstance(info.value.__cause__, TypeError)
    assert "must be Tensor, not str" in str(info.value)
    assert "'12'" in str(info.value)


def test_a_stack_of_strings_and_a_positional_string_are_refused() -> None:
    td = TensorDict(batch_size=[2])
    td.set("input", NonTensorStack("a", "b"))
    with (
        pytest.raises(InvalidInputError, match=r"Input 'input' holds a list \(\['a', 'b'\]\)"),
        ActivationCaching("0").prepare(_mlp()) as hooked,
    ):
        hooked(td)
    hooked = HookedModule.from_module(_mlp())
    with pytest.raises(InvalidInputError, match=r"positional argument 0 holds a str \('x'\)"):
        hooked("x")


def test_the_branch_a_method_builds_is_checked_too() -> None:
    """Patching reads its second run's inputs under ("patched", "input"): that value is named."""
    td = TensorDict({"input": torch.randn(3, 4)}, batch_size=[3])
    td.set_non_tensor(("patched", "input"), "fc1")
    with (
        pytest.raises(InvalidInputError, match=r"Input 'input' holds a str \('fc1'\)"),
        ActivationPatching(["0"]).prepare(_mlp()) as hooked,
    ):
        hooked(td)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integers_into_a_float_model_are_refused_naming_both_dtypes(dtype: torch.dtype) -> None:
    model = _mlp()
    td = TensorDict(input=torch.ones(3, 4, dtype=dtype), batch_size=[3])
    with (
        pytest.raises(
            DtypeMismatchError, match=rf"Input 'input' has dtype {dtype} .* are torch\.float32.*x\.to"
        ),
        ActivationCaching(r"\d$").prepare(model) as hooked,
    ):
        hooked(td)
    assert _no_hooks(model)
    with pytest.raises(DtypeMismatchError, match=r"positional argument 0 has dtype torch\.int64"):
        HookedModule.from_module(model)(torch.ones(3, 4, dtype=torch.int64))


class _Table(nn.Module):
    """Integer ids index a parameter directly (no nn.Embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table[ids])


class _Text(nn.Module):
    """Reads text: a valid non-tensor input."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, text: str) -> torch.Tensor:
        return self.head(torch.full((3, 1), float(len(text))))


def test_valid_integer_and_text_inputs_are_never_refused() -> None:
    ids = torch.tensor([1, 4, 9])
    embedded = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    table = _Table()
    for model in (embedded, table):
        with ActivationCaching(r"head$|1$").prepare(model) as hooked:
            out = hooked(TensorDict(input=ids, batch_size=[3]))
        torch.testing.assert_close(out["output"], model(ids))
    text = TensorDictModule(_Text(), in_keys=["text"], out_keys=["out"])
    td = TensorDict(batch_size=[3])
    td.set_non_tensor("text", "hello")
    with ActivationCaching("td_module.module.head", relative=False).prepare(text) as hooked:
        out = hooked(td)
    assert out["out"].shape == (3, 1)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom: the model's own bug")


def test_errors_a_valid_input_does_not_explain_pass_through_unchanged() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Broken())
    with (
        pytest.raises(ValueError, match="^boom: the model's own bug$") as info,
        ActivationCaching("0").prepare(model) as hooked,
    ):
        hooked(TensorDict(input=torch.randn(2, 3), batch_size=[2]))
    assert not isinstance(info.value, TdhookError)
    model = nn.Sequential(nn.Embedding(10, 2), _Broken())
    with (  # integer ids, then the model's own bug
        pytest.raises(ValueError, match="^boom") as info,
        ActivationCaching("0").prepare(model) as hooked,
    ):
        hooked(TensorDict(input=torch.ones(2, 3, dtype=torch.int64), batch_size=[2]))
    assert not isinstance(info.value, TdhookError)

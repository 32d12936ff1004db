"""SteeringVectors and ActivationAddition (spec §8.3, §13.1, §13.3): oracles, keys, shapes, errors."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import (
    HookSignatureError,
    InsufficientSamplesError,
    InvalidInputError,
    MissingKeyError,
    ModulePathError,
)
from tdhook.latent import ActivationAddition, SteeringVectors
from tdhook.latent.steering_vectors import ActivationAddition as CompatAddition
from tdhook.latent.steering_vectors import InterventionShapeError
from tdhook.latent.steering_vectors import SteeringVectors as CompatSteering


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))


def hand_steered(model: nn.Module, x: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, d=d: o + d)
        for name, d in deltas.items()
    ]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def test_steer_fn_matches_plain_hooks_and_gets_the_key_that_fired(model) -> None:
    deltas = {"0": torch.full((6,), 0.5), "2": torch.full((6,), -1.0)}
    seen = []

    def steer(module_key, output):
        seen.append(module_key)
        return output + deltas[module_key]

    x = torch.randn(5, 4)
    with SteeringVectors(["0", "2"], steer).prepare(model) as hooked:
        td = TensorDict(input=x, batch_size=[5])
        out = hooked(td)
    assert out is td
    assert seen == ["0", "2"]  # the reference passed "2" to both modules
    torch.testing.assert_close(out["output"], hand_steered(model, x, deltas))


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["scalar-batch", "1d", "2d"])
def test_vectors_argument_broadcasts_over_any_batch(model, batch) -> None:
    vector = torch.linspace(-1, 1, 6)
    x = torch.randn(*batch, 4)
    with SteeringVectors("2", vectors={"2": vector}, scale=3.0).prepare(model) as hooked:
        out = hooked(TensorDict(input=x, batch_size=batch))
    torch.testing.assert_close(out["output"], hand_steered(model, x, {"2": 3.0 * vector}))


def test_none_keeps_the_output_and_hooks_go_away(model) -> None:
    x = torch.randn(2, 4)
    expected = model(x)
    with SteeringVectors(["0"], lambda module_key, output: None).prepare(model) as hooked:
        torch.testing.assert_close(hooked(TensorDict(input=x, batch_size=[2]))["output"], expected)
    with SteeringVectors(["0"], lambda module_key, output: output * 0).prepare(model) as hooked:
        assert not torch.allclose(hooked(x), expected)  # tensor calls are steered too
    torch.testing.assert_close(model(x), expected)


def test_vector_that_does_not_fit_the_activation(model) -> None:
    steering = SteeringVectors(["0"], vectors={"0": torch.ones(5)})
    with (
        steering.prepare(model) as hooked,
        pytest.raises(ValueError, match=r"shape \(5,\).*\(2, 6\)") as info,
    ):
        hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
    assert isinstance(info.value, InterventionShapeError)
    assert isinstance(info.value, RuntimeError)  # torch's broadcasting error type still catches it
    # A vector that broadcasts but would change the output's shape is refused too.
    steering = SteeringVectors(["0"], vectors={"0": torch.ones(3, 1, 6)})
    with steering.prepare(model) as hooked, pytest.raises(InterventionShapeError, match="does not broadcast"):
        hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
    bad_fn = SteeringVectors(["0"], lambda module_key, output: output[:, :2])
    with bad_fn.prepare(model) as hooked, pytest.raises(InterventionShapeError, match="steered output"):
        hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))


def test_bad_steering_arguments(model) -> None:
    with pytest.raises(ValueError, match="exactly one of steer_fn and vectors"):
        SteeringVectors(["0"])
    with pytest.raises(ValueError, match=r"No steering vector for module\(s\) \['2'\]"):
        SteeringVectors(["0", "2"], vectors={"0": torch.ones(6)})
    with pytest.raises(HookSignatureError, match="steer_fn"):
        SteeringVectors(["0"], lambda output: output)
    with (
        pytest.raises(ModulePathError, match="Nearest existing module names"),
        SteeringVectors(["layer9"], lambda module_key, output: output).prepare(model),
    ):
        pass


def addition_td(batch: tuple[int, ...]) -> TensorDict:
    torch.manual_seed(3)
    return TensorDict(
        {("positive", "input"): torch.randn(*batch, 4), ("negative", "input"): torch.randn(*batch, 4)}, batch
    )


@pytest.mark.parametrize("batch", [(), (7,), (2, 3)], ids=["scalar-batch", "1d", "2d"])
def test_activation_addition_returns_one_vector_per_module(model, batch) -> None:
    td = addition_td(batch)
    before = td.clone()
    with ActivationAddition(["0", "2"]).prepare(model) as hooked:
        out = hooked(td)
    # A new, batch-free TensorDict with the vectors and the caller's entries; the caller's is untouched.
    assert out is not td
    assert out.batch_size == torch.Size([])
    keys = set(out.keys(include_nested=True, leaves_only=True))
    assert keys == {("positive", "input"), ("negative", "input"), ("steer", "0"), ("steer", "2")}
    assert td.batch_size == torch.Size(batch)
    assert set(td.keys(include_nested=True, leaves_only=True)) == {
        ("positive", "input"),
        ("negative", "input"),
    }
    assert (td == before).all()
    torch.testing.assert_close(out["positive", "input"], td["positive", "input"])
    dims = tuple(range(len(batch)))
    for name, layer in (("0", model[0]), ("2", nn.Sequential(*model[:3]))):
        diff = layer(td["positive", "input"]) - layer(td["negative", "input"])
        expected = diff.mean(dims) if dims else diff
        assert expected.shape == (6,)  # a () batch keeps the vector's shape (the reference gave a scalar)
        assert out["steer", name].shape == (6,)
        torch.testing.assert_close(out["steer", name], expected)


def test_activation_addition_result_can_be_written_without_touching_the_caller(model) -> None:
    td = addition_td((4,))
    with ActivationAddition(["0"]).prepare(model) as hooked:
        out = hooked(td)
    out["positive", "extra"] = torch.zeros(4)
    assert ("positive", "extra") not in td.keys(include_nested=True)


def test_activation_addition_then_steering_roundtrip(model) -> None:
    td = addition_td((8,))
    with ActivationAddition(["2"]).prepare(model) as hooked:
        vectors = hooked(td)["steer"]
    x = torch.randn(4, 4)
    with SteeringVectors(["2"], vectors=vectors, scale=2.0).prepare(model) as hooked:
        steered = hooked(TensorDict(input=x, batch_size=[4]))["output"]
    torch.testing.assert_close(steered, hand_steered(model, x, {"2": 2.0 * vectors["2"]}))


def test_activation_addition_sequence_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5))
    td = TensorDict(
        {("positive", "input"): torch.randn(3, 7, 4), ("negative", "input"): torch.randn(3, 7, 4)}, [3]
    )
    with ActivationAddition("0").prepare(model) as hooked:
        vector = hooked(td)["steer", "0"]
    assert vector.shape == (7, 5)  # [B, T, D] activations with batch B give [T, D]
    expected = (model(td["positive", "input"]) - model(td["negative", "input"])).mean(0)
    torch.testing.assert_close(vector, expected)


def test_activation_addition_lazy_stacked_input(model) -> None:
    from tensordict import LazyStackedTensorDict

    parts = [addition_td(()) for _ in range(3)]
    parts[1]["positive", "input"] = parts[1]["positive", "input"] + 1.0
    stacked = LazyStackedTensorDict.lazy_stack(parts)
    with ActivationAddition(["0"]).prepare(model) as hooked:
        out = hooked(stacked)
    assert out.batch_size == torch.Size([])
    expected = (model[0](stacked["positive", "input"]) - model[0](stacked["negative", "input"])).mean(0)
    torch.testing.assert_close(out["steer", "0"], expected)


def test_activation_addition_keeps_intermediates_on_request(model) -> None:
    td = addition_td((4,))
    with ActivationAddition(["0"], clean_intermediate_keys=False).prepare(model) as hooked:
        out = hooked(td)
    torch.testing.assert_close(out["_positive_cache", "0"], model[0](td["positive", "input"]))
    torch.testing.assert_close(out["_negative_out", "output"], model(td["negative", "input"]))
    assert "_positive_cache" not in set(td.keys())  # written into the returned TensorDict only


def test_activation_addition_errors(model) -> None:
    td = TensorDict({("positive", "input"): torch.randn(2, 4)}, [2])
    with ActivationAddition(["0"]).prepare(model) as hooked, pytest.raises(MissingKeyError) as info:
        hooked(td)
    assert "('negative', 'input')" in str(info.value)
    assert "('positive', 'input')" in str(info.value)  # listed among the present keys

    seq = nn.Sequential(nn.Linear(4, 5))
    td = TensorDict(
        {("positive", "input"): torch.randn(2, 3, 4), ("negative", "input"): torch.randn(2, 4, 4)}, [2]
    )
    with (
        ActivationAddition(["0"]).prepare(seq) as hooked,
        pytest.raises(InterventionShapeError, match="same"),
    ):
        hooked(td)


def test_activation_addition_refuses_an_empty_batch_and_a_non_tensor_branch(model) -> None:
    td = TensorDict(
        {("positive", "input"): torch.randn(0, 4), ("negative", "input"): torch.randn(0, 4)}, batch_size=[0]
    )
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    with (
        ActivationAddition(["0"]).prepare(model) as hooked,
        pytest.raises(InsufficientSamplesError, match=r"empty batch \(batch size \(0,\), 0 samples\)"),
    ):
        hooked(td)
    td = TensorDict({("negative", "input"): torch.randn(3, 4)}, batch_size=[3])
    td.set_non_tensor("positive", "fc1")
    with (
        ActivationAddition(["0"]).prepare(model) as hooked,
        pytest.raises(
            InvalidInputError,
            match=r"positive inputs under 'positive'.* str \('fc1'\).*\('positive', 'input'\)",
        ),
    ):
        hooked(td)
    assert not calls  # refused before the model ran


def test_compat_import_paths() -> None:
    assert CompatSteering is SteeringVectors
    assert CompatAddition is ActivationAddition

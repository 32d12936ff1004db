"""ActivationPatching (spec §8.2, §13.1-2): oracle vs plain torch hooks, any batch shape, per-module keys."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import HookSignatureError, InvalidInputError, MissingKeyError, ModulePathError
from tdhook.latent import ActivationPatching
from tdhook.latent.activation_patching import ActivationPatching as CompatPatching
from tdhook.latent.activation_patching import InterventionShapeError

# `net` (linear1 -> relu -> linear2 -> relu -> linear3, 4 -> 2) comes from tests/conftest.py.


def make_td(batch: tuple[int, ...]) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict({"input": torch.randn(*batch, 4), ("patched", "input"): torch.randn(*batch, 4)}, batch)


def oracle(model: nn.Module, clean: torch.Tensor, patched: torch.Tensor, names: list[str], fn=None):
    """Hand-written torch hooks: record the clean outputs, then replace them in the patched run."""
    recorded: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: recorded.__setitem__(n, o))
        for n in names
    ]
    clean_out = model(clean)
    for h in handles:
        h.remove()
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: recorded[n] if fn is None else fn(n, o, recorded[n])
        )
        for n in names
    ]
    patched_out = model(patched)
    for h in handles:
        h.remove()
    return clean_out, patched_out


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["scalar-batch", "1d", "2d"])
def test_matches_plain_torch_hooks_for_every_batch_shape(net, batch) -> None:
    td = make_td(batch)
    blend = lambda module_key, output, output_to_patch: 0.3 * output + 0.7 * output_to_patch  # noqa: E731
    with ActivationPatching(["linear1"], patch_fn=blend).prepare(net) as hooked:
        out = hooked(td)
    clean, patched = oracle(
        net, td["input"], td["patched", "input"], ["linear1"], lambda n, o, c: 0.3 * o + 0.7 * c
    )
    assert out is td
    assert out.batch_size == torch.Size(batch)
    torch.testing.assert_close(out["output"], clean)
    torch.testing.assert_close(out["patched", "output"], patched)
    assert not torch.allclose(out["patched", "output"], out["output"])


def test_full_patch_reproduces_clean_output_and_leaves_no_intermediates(net) -> None:
    td = make_td((5,))
    with ActivationPatching(["linear2"]).prepare(net) as hooked:
        out = hooked(td)
    torch.testing.assert_close(out["patched", "output"], out["output"])
    keys = set(out.keys(include_nested=True, leaves_only=True))
    assert keys == {"input", "output", ("patched", "input"), ("patched", "output")}


def test_patch_fn_receives_the_key_of_the_module_that_fired(net) -> None:
    seen: list[tuple[str, int]] = []

    def record(module_key, output, output_to_patch):
        seen.append((module_key, output.shape[-1]))

    with ActivationPatching(["linear1", "linear2", "linear3"], patch_fn=record).prepare(net) as hooked:
        out = hooked(make_td((3,)))
    # The reference passed the last key ("linear3") to every module.
    assert seen == [("linear1", 6), ("linear2", 6), ("linear3", 2)]
    # None means "use the clean activation": the last layer is patched, so outputs agree.
    torch.testing.assert_close(out["patched", "output"], out["output"])


def test_keep_intermediates_exposes_clean_activations(net) -> None:
    td = make_td((2, 3))
    with ActivationPatching(["linear1"], clean_intermediate_keys=False).prepare(net) as hooked:
        out = hooked(td)
    torch.testing.assert_close(out["_cache", "linear1"], net.linear1(td["input"]))


def test_custom_patch_key_and_cache_callback(net) -> None:
    td = TensorDict({"input": torch.randn(4, 4), ("corrupt", "input"): torch.randn(4, 4)}, [4])
    calls = []

    def cache_callback(module, args, output, key, direction):
        calls.append((key, direction))
        return output * 0

    with ActivationPatching("linear3", patch_key="corrupt", cache_callback=cache_callback).prepare(
        net
    ) as hooked:
        out = hooked(td)
    assert calls == [("linear3", "fwd")]
    assert torch.equal(out["corrupt", "output"], torch.zeros(4, 2))


def test_raw_model_calls_inside_the_context_are_not_patched(net) -> None:
    x = torch.randn(3, 4)
    expected = net(x)
    with ActivationPatching(["linear1"]).prepare(net) as hooked:
        hooked(make_td((3,)))
        torch.testing.assert_close(net(x), expected)


def test_missing_patch_source_lists_present_keys(net) -> None:
    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    with ActivationPatching(["linear1"]).prepare(net) as hooked, pytest.raises(KeyError) as info:
        hooked(td)
    assert isinstance(info.value, MissingKeyError)
    message = str(info.value)
    assert "('patched', 'input')" in message
    assert "keys present: ['input']" in message


def test_unknown_module_lists_nearest_names(net) -> None:
    context = ActivationPatching(["linear9"]).prepare(net)
    with pytest.raises(ValueError, match=r"linear9.*Nearest existing module names") as info, context:
        pass
    assert isinstance(info.value, ModulePathError)
    assert "linear1" in str(info.value)


def test_patch_of_the_wrong_shape_is_refused(net) -> None:
    bad = lambda module_key, output, output_to_patch: output_to_patch[:, :3]  # noqa: E731
    x = torch.randn(3, 4)
    expected = net(x)
    with ActivationPatching(["linear1"], patch_fn=bad).prepare(net) as hooked:
        with pytest.raises(InterventionShapeError, match=r"'linear1' has shape \(3, 3\).*\(3, 6\)"):
            hooked(make_td((3,)))
        torch.testing.assert_close(net(x), expected)  # the failed call left the hooks idle


def test_bad_arguments(net) -> None:
    with pytest.raises(HookSignatureError, match="patch_fn"):
        ActivationPatching(["linear1"], patch_fn=lambda a, b: a)
    with pytest.raises(TypeError, match="modules_to_patch"):
        ActivationPatching([])
    with (
        ActivationPatching(["linear1"]).prepare(net) as hooked,
        pytest.raises(InvalidInputError, match="TensorDict"),
    ):
        hooked(torch.randn(2, 4))


def test_tuple_outputs_with_a_cache_callback() -> None:
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b

    model = Model()
    td = TensorDict({"input": torch.zeros(2, 3), ("patched", "input"): torch.ones(2, 3)}, [2])
    # Patch only the first element of the pair with the clean one.
    patch = lambda module_key, output, output_to_patch: (output_to_patch, output[1])  # noqa: E731
    with ActivationPatching(["pair"], patch_fn=patch, cache_callback=lambda output, **_: output[0]).prepare(
        model
    ) as hooked:
        out = hooked(td)
    assert torch.equal(out["patched", "output"], torch.full((2, 3), 2.0))  # 0 (clean 2*0) + (1 + 1)


def test_compat_import_path() -> None:
    assert CompatPatching is ActivationPatching


def test_tensordict_module_with_a_subset_of_inputs() -> None:
    from tensordict.nn import TensorDictModule

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(2, 2)

        def forward(self, a, b):
            return self.mix(a) * b

    torch.manual_seed(0)
    module = TensorDictModule(Two(), in_keys=["a", "b"], out_keys=["y"])
    td = TensorDict(
        {"a": torch.randn(3, 2), "b": torch.randn(3, 2), ("patched", "a"): torch.randn(3, 2)}, [3]
    )
    # Only "a" is patched; "b" is shared by both runs. Names are relative to the TensorDictModule.
    with ActivationPatching(["module.mix"]).prepare(module, in_keys=["a"]) as hooked:
        out = hooked(td)
    torch.testing.assert_close(out["patched", "y"], out["y"])
    assert set(out["patched"].keys()) == {"a", "y"}

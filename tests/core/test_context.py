"""Context lifecycle (spec §2.2), prepare() wrapping and key handling."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn

from tdhook.contexts import HookingContextFactory
from tdhook.errors import ContextStateError, InvalidInputError, MissingKeyError
from tdhook.latent import ActivationCaching
from tdhook.modules import HookedModule


def test_plain_module_is_wrapped_with_default_keys(net, td) -> None:
    with HookingContextFactory().prepare(net) as hooked:
        assert isinstance(hooked, HookedModule)
        assert hooked.in_keys == ["input"]
        assert hooked.out_keys == ["output"]
        assert hooked.root is net
        assert hooked.relative_path == "td_module.module"
        out = hooked(td)
    assert out is td
    torch.testing.assert_close(td["output"], net(td["input"]))


def test_dict_outputs_become_nested(td) -> None:
    class DictOut(nn.Module):
        def forward(self, x):
            return {"logits": x * 2, "hidden": x + 1}

    with HookingContextFactory().prepare(DictOut()) as hooked:
        out = hooked(td)
    assert torch.equal(out["output", "logits"], td["input"] * 2)


def test_kwarg_in_keys(td) -> None:
    class Two(nn.Module):
        def forward(self, a, b):
            return a - b

    td["x1"] = torch.ones(5, 4)
    td["x2"] = torch.ones(5, 4)
    with HookingContextFactory().prepare(Two(), in_keys={"a": "x1", "b": "x2"}) as hooked:
        assert torch.equal(hooked(td)["output"], torch.zeros(5, 4))


def test_tensordict_module_subset_keys_honoured() -> None:
    m = TensorDictSequential(
        TensorDictModule(nn.Linear(2, 2), ["a"], ["h"]), TensorDictModule(nn.Linear(2, 1), ["h"], ["y"])
    )
    ctx = HookingContextFactory().prepare(m, in_keys=["a"], out_keys=["y"])
    with ctx as hooked:
        assert hooked.in_keys == ["a"]
        assert hooked.out_keys == ["y"]
        assert hooked.root is m
    with pytest.raises(ValueError, match=r"Key 'b' not in module.in_keys"):
        HookingContextFactory().prepare(m, in_keys=["b"])
    with pytest.raises(ValueError, match="in_keys must be unraveled"):
        HookingContextFactory().prepare(m, in_keys=[3])


def test_lifecycle_errors(net, td) -> None:
    ctx = HookingContextFactory().prepare(net)
    with ctx as hooked:
        with pytest.raises(RuntimeError, match="Cannot enter context twice"):
            ctx.__enter__()
        with pytest.raises(RuntimeError, match="Cannot call restore"):
            hooked.restore()
    with pytest.raises(RuntimeError, match="Contextual HookedModule must be called in context"):
        hooked(td)
    with pytest.raises(RuntimeError, match="Context is not active"):
        hooked.restore()
    with pytest.raises(RuntimeError, match="Cannot disable hooks outside of context"), ctx.disable_hooks():
        pass
    with pytest.raises(RuntimeError, match="Cannot disable context outside of context"), ctx.disable():
        pass
    with pytest.raises(RuntimeError, match="No hooking context provided"):
        HookedModule.from_module(net).restore()
    # re-entry after exit works
    with ctx as hooked:
        hooked(td)


def test_return_context_false_and_restore(net, td) -> None:
    hooked = ActivationCaching("linear1").prepare(net, return_context=False)
    hooked(td)
    assert net.linear1._forward_hooks
    hooked.restore()
    assert not net.linear1._forward_hooks
    assert "linear1" in hooked.hooking_context.cache


def test_disable_hooks_and_disable_keep_state(net, td) -> None:
    with ActivationCaching("linear1").prepare(net) as hooked:
        ctx = hooked.hooking_context
        with hooked.disable_context_hooks():
            assert not net.linear1._forward_hooks
        assert net.linear1._forward_hooks
        with hooked.disable_context() as raw:
            assert raw is net  # the user's model, not a pipeline (spec §13.7)
            assert not net.linear1._forward_hooks
        hooked(td)
    assert "linear1" in ctx.cache
    assert not net.linear1._forward_hooks


def test_missing_input_key_lists_present_keys(net) -> None:
    with HookingContextFactory().prepare(net) as hooked:
        bad = TensorDict(x=torch.randn(2, 4), batch_size=[2])
        with pytest.raises(
            MissingKeyError, match=r"Missing model input key\(s\) \['input'\].*keys present: \['x'\]"
        ):
            hooked(bad)
        with pytest.raises(KeyError):
            hooked(bad)


def test_non_module_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="expects an nn.Module"):
        HookingContextFactory().prepare(lambda x: x)  # type: ignore[arg-type]


def test_enter_failure_rolls_back(net) -> None:
    class Broken(HookingContextFactory):
        def _plan(self, hooked):
            from tdhook._core.directions import HookSpec

            return [
                HookSpec(net.linear1, lambda *a: None),
                HookSpec(hooked.resolve("missing"), lambda *a: None),
            ]

    with pytest.raises(ValueError, match="missing"), Broken().prepare(net):
        pass
    assert not net.linear1._forward_hooks


def test_legacy_hook_module_override(net, td) -> None:
    seen = []

    class Legacy(HookingContextFactory):
        def _hook_module(self, hooked):
            return hooked.register_submodule_hook("linear1", lambda m, a, o: seen.append(o.shape))

    with Legacy().prepare(net) as hooked:
        hooked(td)
    assert seen == [torch.Size([5, 6])]
    assert not net.linear1._forward_hooks


def test_hooks_fire_on_raw_model_inside_context(net, td) -> None:
    with ActivationCaching("linear1").prepare(net) as hooked:
        net(td["input"])
    assert "linear1" in hooked.hooking_context.cache


def test_top_level_package_star_import() -> None:
    import tdhook

    namespace: dict = {}
    exec("from tdhook import *", namespace)
    assert namespace["latent"] is tdhook.latent
    with pytest.raises(AttributeError, match="available"):
        tdhook.nothing


def test_unknown_hook_context_state_error_is_runtime_error() -> None:
    assert issubclass(ContextStateError, RuntimeError)

"""Hook traps (issue 11 §3): in-place operations, repeated calls and compiled models.

Every expected value is computed by hand from the module's weights (the closed form of the
small models below), never by tdhook itself.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import Saliency
from tdhook.errors import CompiledModelError, InPlaceModificationError, MultipleCallError, TdhookError
from tdhook.latent import ActivationAddition, ActivationCaching, ActivationPatching
from tdhook.modules import HookedModule


def _inplace_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3), nn.ReLU(inplace=True))


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


class AddsInPlace(nn.Module):
    """``fc`` followed by a functional in-place op in ``forward`` (no module to hook before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.add_(1.0)
        return h


class Twice(nn.Module):
    """``fc`` applied twice in one forward: ``fc(tanh(fc(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def _twice_calls(model: Twice, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        first = model.fc(x)
        return first, model.fc(torch.tanh(first))


# ------------------------------------------------------------------------------------------------
# In-place operations after a hooked module
# ------------------------------------------------------------------------------------------------


def test_caching_keeps_output_before_inplace_relu() -> None:
    model = _inplace_mlp()
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected0 = model[0](x)  # negative entries: ReLU(inplace) would zero them in the cache
        expected2 = model[2](torch.relu(expected0))
    assert (expected0 < 0).any()
    with ActivationCaching(r"[02]$").prepare(model) as hooked, torch.no_grad():
        td = hooked(TensorDict(input=x, batch_size=[6]))
    cache = hooked.hooking_context.cache
    torch.testing.assert_close(cache["0"], expected0)
    torch.testing.assert_close(cache["2"], expected2)
    torch.testing.assert_close(td["output"], torch.relu(expected2))
    assert _no_hooks(model)


def test_copy_only_when_an_inplace_module_touches_the_value() -> None:
    """Layer 0 feeds ReLU(inplace) and is copied; the last layer's output is stored as is (no copy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    with ActivationCaching(r"[02]$").prepare(model) as hooked, torch.no_grad():
        td = hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
    cache = hooked.hooking_context.cache
    assert cache["2"].data_ptr() == td["output"].data_ptr()  # not copied
    assert (cache["0"] < 0).any()  # copied before the in-place ReLU


def test_run_get_and_save_keep_output_before_inplace_relu() -> None:
    model = _inplace_mlp()
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected0 = model[0](x)
    hooked = HookedModule.from_module(model)
    outer = TensorDict()
    with hooked.run(x, cache=outer) as run:
        got = run.get("[0]")
        saved = run.save("[0]")
    torch.testing.assert_close(got.resolve(), expected0)
    torch.testing.assert_close(saved.resolve(), expected0)
    with hooked.run(x, run_cache=TensorDict()) as run:  # the TensorDict-cache path
        got = run.get("[0]")
    torch.testing.assert_close(got.resolve(), expected0)
    assert _no_hooks(model)


def test_run_set_with_proxy_is_not_modified_by_inplace_relu() -> None:
    """A saved value patched into the model is copied before ReLU(inplace) modifies it."""
    model = _inplace_mlp()
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected0 = model[0](x)
    hooked = HookedModule.from_module(model)
    with hooked.run(x) as first_run:  # keep the run alive: its proxies reference its values weakly
        first = first_run.get("[0]")
    with hooked.run(torch.randn(6, 4)) as run:
        run.set("[0]", first)
    torch.testing.assert_close(first.resolve(), expected0)


def test_patching_records_and_patches_outputs_before_inplace_relu() -> None:
    model = _inplace_mlp()
    clean, corrupt = torch.randn(6, 4), torch.randn(6, 4)
    with torch.no_grad():
        expected0 = model[0](clean)
        clean_out = model(clean.clone())
    td = TensorDict({"input": clean, ("patched", "input"): corrupt}, batch_size=[6])
    with ActivationPatching(["[0]"], clean_intermediate_keys=False).prepare(model) as hooked, torch.no_grad():
        td = hooked(td)
    torch.testing.assert_close(td["_cache", "[0]"], expected0)
    torch.testing.assert_close(td["patched", "output"], clean_out)
    torch.testing.assert_close(td["output"], clean_out)


def test_functional_inplace_op_is_refused_and_callback_copy_fixes_it() -> None:
    torch.manual_seed(0)
    model = AddsInPlace()
    x = torch.randn(3, 4)
    refused = pytest.raises(InPlaceModificationError, match=r"'fc'.*modified in place.*output\.clone\(\)")
    with refused, ActivationCaching("fc").prepare(model) as hooked, torch.no_grad():
        hooked(TensorDict(input=x, batch_size=[3]))
    assert _no_hooks(model)
    with (
        ActivationCaching("fc", callback=lambda output, **_: output.clone()).prepare(model) as hooked,
        torch.no_grad(),
    ):
        hooked(TensorDict(input=x, batch_size=[3]))
    torch.testing.assert_close(hooked.hooking_context.cache["fc"], model.fc(x).detach())
    hooked = HookedModule.from_module(model)
    with pytest.raises(InPlaceModificationError, match="fc_output"), hooked.run(x) as run:
        run.get("fc")
    assert _no_hooks(model)
    assert issubclass(InPlaceModificationError, (TdhookError, RuntimeError))


def test_raw_model_call_inside_context_is_protected() -> None:
    model = _inplace_mlp()
    x = torch.randn(6, 4)
    with ActivationCaching("0").prepare(model) as hooked, torch.no_grad():
        model(x)
    torch.testing.assert_close(hooked.hooking_context.cache["0"], model[0](x).detach())


# ------------------------------------------------------------------------------------------------
# A module called more than once in one forward
# ------------------------------------------------------------------------------------------------


def test_caching_keeps_every_call() -> None:
    model = Twice()
    x = torch.randn(3, 4)
    first, second = _twice_calls(model, x)
    with ActivationCaching("fc", directions="fwd").prepare(model) as hooked, torch.no_grad():
        hooked(TensorDict(input=x, batch_size=[3]))
    cache = hooked.hooking_context.cache
    assert set(cache.keys()) == {"fc", "fc#1"}
    torch.testing.assert_close(cache["fc"], first)
    torch.testing.assert_close(cache["fc#1"], second)
    with ActivationCaching("fc", directions=["fwd", "fwd_pre"]).prepare(model) as hooked, torch.no_grad():
        hooked(TensorDict(input=x, batch_size=[3]))
    torch.testing.assert_close(hooked.hooking_context.cache["fwd_pre", "fc#1"], torch.tanh(first))


def test_accumulate_never_mixes_calls_with_samples() -> None:
    model = Twice()
    x1, x2 = torch.randn(3, 4), torch.randn(2, 4)
    a1, b1 = _twice_calls(model, x1)
    a2, b2 = _twice_calls(model, x2)
    with ActivationCaching("fc", accumulate=True).prepare(model) as hooked, torch.no_grad():
        hooked(TensorDict(input=x1, batch_size=[3]))
        hooked(TensorDict(input=x2, batch_size=[2]))
    cache = hooked.hooking_context.cache
    torch.testing.assert_close(cache["fc"], torch.cat([a1, a2]))
    torch.testing.assert_close(cache["fc#1"], torch.cat([b1, b2]))


def test_run_get_keeps_every_call() -> None:
    model = Twice()
    x = torch.randn(3, 4)
    first, second = _twice_calls(model, x)
    hooked = HookedModule.from_module(model)
    with hooked.run(x) as run:
        proxy = run.get("fc")
    torch.testing.assert_close(proxy.resolve(), first)
    torch.testing.assert_close(run.cache["fc_output#1"], second)


def test_patching_gives_each_call_its_own_clean_activation() -> None:
    model = Twice()
    clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
    first, second = _twice_calls(model, clean)
    td = TensorDict({"input": clean, ("patched", "input"): corrupt}, batch_size=[3])
    with ActivationPatching("fc", clean_intermediate_keys=False).prepare(model) as hooked, torch.no_grad():
        td = hooked(td)
    # call 1 patched with clean call 1 gives the clean output (call 0's value would not)
    torch.testing.assert_close(td["patched", "output"], second)
    torch.testing.assert_close(td["_cache", "fc"], first)
    torch.testing.assert_close(td["_cache", "fc#1"], second)
    seen = []

    def patch_fn(module_key, output, output_to_patch):
        seen.append(output_to_patch)
        return output

    td = TensorDict({"input": clean, ("patched", "input"): corrupt}, batch_size=[3])
    with ActivationPatching("fc", patch_fn=patch_fn).prepare(model) as hooked, torch.no_grad():
        hooked(td)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], first)
    torch.testing.assert_close(seen[1], second)


def test_steering_vector_and_layer_attribution_refuse_repeated_calls() -> None:
    model = Twice()
    td = TensorDict({("positive", "input"): torch.randn(3, 4), ("negative", "input"): torch.randn(3, 4)}, [3])
    twice = pytest.raises(MultipleCallError, match="'fc' ran 2 times in one forward")
    with ActivationAddition(["fc"]).prepare(model) as hooked, twice:
        hooked(td)
    twice = pytest.raises(MultipleCallError, match="'fc' ran more than once in one forward")
    with Saliency(input_modules=["fc"], use_inputs=False).prepare(model) as hooked, twice:
        hooked(TensorDict(input=torch.randn(3, 4), batch_size=[3]))
    assert _no_hooks(model)


def test_counting_restarts_at_every_forward() -> None:
    """Two forwards of a layer called once each are two first calls, not calls 0 and 1."""
    model = _inplace_mlp()
    with ActivationCaching("0").prepare(model) as hooked, torch.no_grad():
        hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
        hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
    assert set(hooked.hooking_context.cache.keys()) == {"0"}


# ------------------------------------------------------------------------------------------------
# Compiled models
# ------------------------------------------------------------------------------------------------


def _compiled_variants() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    optimized = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), backend="eager")
    method = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    method.compile(backend="eager")
    forward = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    forward.forward = torch.compile(forward.forward, backend="eager")
    inner = nn.Sequential(nn.Linear(3, 4), torch.compile(nn.ReLU(), backend="eager"))
    return [("optimized", optimized), ("module.compile", method), ("forward", forward), ("submodule", inner)]


@pytest.mark.parametrize("case", range(4))
def test_compiled_models_are_refused(case: int) -> None:
    _, model = _compiled_variants()[case]
    with pytest.raises(CompiledModelError, match=r"compile.*ignores hooks added after compilation"):
        ActivationCaching("0").prepare(model)
    with pytest.raises(CompiledModelError, match="Hook the eager model"):
        HookedModule.from_module(model)
    assert issubclass(CompiledModelError, TypeError)


def test_eager_module_of_a_compiled_model_works() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3)
    with ActivationCaching("0").prepare(compiled._orig_mod) as hooked, torch.no_grad():
        hooked(TensorDict(input=x, batch_size=[2]))
    torch.testing.assert_close(hooked.hooking_context.cache["0"], model[0](x).detach())


def test_a_class_forward_compiled_after_it_was_seen_eager_is_refused() -> None:
    """compiled_reason remembers class forwards seen eager; a forward replaced later is a new object."""
    from tdhook._core.boundary import compiled_reason

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    model = nn.Sequential(Block(), nn.ReLU())
    with ActivationCaching("0").prepare(model):  # seen eager (and remembered)
        pass
    assert compiled_reason(model[0]) is None
    Block.forward = torch.compile(Block.forward, backend="eager")  # type: ignore[method-assign]
    assert "torch.compile'd forward" in (compiled_reason(model[0]) or "")
    with pytest.raises(CompiledModelError, match=r"'0' has a torch.compile'd forward"):
        ActivationCaching("0").prepare(model)


def test_an_unhashable_class_forward_is_checked_every_time() -> None:
    from tdhook._core.boundary import compiled_reason

    class Forward:  # a callable with __eq__ and no __hash__: unhashable
        def __eq__(self, other: object) -> bool:
            return other is self

        def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return x

    class Odd(nn.Module):
        forward = Forward()

    assert compiled_reason(Odd()) is None
    assert compiled_reason(Odd()) is None

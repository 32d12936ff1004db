"""Bad arguments to the core are refused before anything is hooked (issue 11 §1, §4; addendum §6)."""

from __future__ import annotations

import gc

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import (
    DeadReferenceError,
    DtypeMismatchError,
    HookSignatureError,
    InvalidInputError,
    NoMatchError,
    TdhookError,
)
from tdhook.hooks import CacheProxy, HookFactory, MultiHookManager, register_hook_to_module
from tdhook.latent import ActivationCaching, SteeringVectors
from tdhook.modules import HookedModule


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


# -- §1: a refused low-level call leaves no hook behind --------------------------------------------


@pytest.mark.parametrize("bad", [{}, [], "cache", 3])
def test_bad_caches_are_refused_before_any_hook(net, td, bad) -> None:
    hooked = HookedModule.from_module(net)
    with pytest.raises(InvalidInputError, match=r"run_cache must be a TensorDict.*got"):
        hooked.run(td, run_cache=bad)
    with pytest.raises(InvalidInputError, match=r"^cache must be a TensorDict"):
        hooked.run(td, cache=bad)
    with pytest.raises(InvalidInputError, match="cache must be a TensorDict"):
        hooked.get(bad, "linear1")
    with hooked.run(td) as run, pytest.raises(InvalidInputError, match="run.cache must be a TensorDict"):
        run.cache = bad
    assert _no_hooks(net)
    out = net(td["input"])  # the plain model still works
    assert out.shape == (5, 2)


# -- addendum §6: dead references are ValueErrors; hook signatures checked at registration -------


def test_dead_reference_is_a_value_error(net, td) -> None:
    cache = TensorDict()
    proxy = CacheProxy("k", cache)
    del cache
    gc.collect()
    with pytest.raises(ValueError, match="Dead reference to cache"):
        proxy.resolve()
    assert issubclass(DeadReferenceError, (TdhookError, ValueError, RuntimeError))
    from tdhook.hooks import MutableWeakRef

    target = TensorDict()
    ref = MutableWeakRef(target)
    hook = HookFactory.make_caching_hook("x", ref)
    handle = net.linear1.register_forward_hook(hook)
    del target
    gc.collect()
    try:
        with pytest.raises(DeadReferenceError, match="Dead reference to cache"):
            net(td["input"])
    finally:
        handle.remove()


def _fwd_two(module, args):
    return None


def _fwd_ok(module, args, output, extra=1, **kwargs):
    return None


def _fwd_star(module, *args):
    return None


def _fwd_star_too_many(a, b, c, d, *args):
    return None


def _fwd_kwonly(module, args, output, *, scale):
    return None


def test_hook_signatures_are_checked_at_registration(net) -> None:
    with pytest.raises(
        HookSignatureError, match=r"Hook \(fwd\) must have the signature \(module, args, output\)"
    ):
        register_hook_to_module(net.linear1, _fwd_two, "fwd")
    with pytest.raises(ValueError, match=r"Hook \(fwd\) must have at most 3 positional parameters"):
        register_hook_to_module(net.linear1, _fwd_star_too_many, "fwd")
    with pytest.raises(HookSignatureError, match=r"keyword-only parameters \['scale'\]"):
        register_hook_to_module(net.linear1, _fwd_kwonly, "fwd")
    with pytest.raises(
        HookSignatureError, match=r"Hook \(bwd_pre\) must have the signature \(module, grad_output\)"
    ):
        HookedModule.from_module(net).register_submodule_hook("linear1", _fwd_ok, "bwd_pre")
    with pytest.raises(HookSignatureError, match="must be callable"):
        register_hook_to_module(net.linear1, "not a hook", "fwd")
    with pytest.raises(HookSignatureError, match=r"Hook \(fwd_pre\)"):
        MultiHookManager("linear").register_hook(net, lambda name: _fwd_ok, direction="fwd_pre")
    assert _no_hooks(net)
    handles = [
        register_hook_to_module(net.linear1, _fwd_ok, "fwd"),
        register_hook_to_module(net.linear1, _fwd_star, "fwd"),
        register_hook_to_module(net.linear1, _fwd_two, "fwd_pre"),
        register_hook_to_module(net.linear1, lambda *a: None, "bwd"),
    ]
    for h in handles:
        h.remove()


# -- §4: one string is one name; lists of patterns --------------------------------------------------


def test_single_direction_string_is_one_direction(net, td) -> None:
    with ActivationCaching("linear1", directions="fwd_pre").prepare(net) as hooked:
        hooked(td)
    assert set(hooked.hooking_context.cache.keys()) == {"linear1"}
    torch.testing.assert_close(hooked.hooking_context.cache["linear1"], td["input"])


def test_list_of_patterns_selects_any(net, td) -> None:
    with ActivationCaching([r"linear1$", r"linear3$"]).prepare(net) as hooked:
        hooked(td)
    assert set(hooked.hooking_context.cache.keys()) == {"linear1", "linear3"}
    with pytest.raises(NoMatchError, match=r"Invalid module pattern \[1, 2\]: expected a regular expression"):
        ActivationCaching([1, 2])
    with pytest.raises(NoMatchError, match="got int"):
        ActivationCaching(3)
    manager = MultiHookManager([r"linear1$", r"linear2$"])
    handles = manager.register_hook(net, lambda name: _fwd_ok)
    assert len(handles) == 2
    handles.remove()
    assert _no_hooks(net)


# -- §4: input dtype vs the model's parameters ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_mismatch_is_a_clear_error(net, td, dtype) -> None:
    bad = TensorDict(input=td["input"].to(dtype), batch_size=[5])
    pattern = rf"Input 'input' has dtype {dtype} but the model's parameters are torch.float32.*x.to\(torch.float32\)"
    with ActivationCaching("linear1").prepare(net) as hooked:
        with pytest.raises(DtypeMismatchError, match=pattern):
            hooked(bad)
        with pytest.raises(DtypeMismatchError, match="positional argument 0"):
            hooked(td["input"].to(dtype))
    hooked = HookedModule.from_module(net)
    refused = pytest.raises(RuntimeError, match=f"has dtype {dtype}")  # also the class torch raises
    with refused, hooked.run(td["input"].to(dtype)) as run:
        run.get("linear1")
    assert _no_hooks(net)


def test_matching_and_non_float_inputs_pass(td) -> None:
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    ids = TensorDict(input=torch.randint(0, 10, (3, 5)), batch_size=[3])
    with SteeringVectors(["[0]"], vectors={"[0]": torch.zeros(4)}).prepare(emb) as hooked:
        assert hooked(ids)["output"].shape == (3, 5, 2)
    double = nn.Linear(4, 2).double()
    with ActivationCaching(".*").prepare(nn.Sequential(double)) as hooked:
        hooked(TensorDict(input=td["input"].double(), batch_size=[5]))

"""The low-level get/set/save/run API, checked against plain torch hooks."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tdhook.errors import ContextStateError, HookSignatureError, InvalidDirectionError, ModulePathError
from tdhook.hooks import CacheProxy, EarlyStoppingException, HookFactory, MultiHookHandle, MultiHookManager
from tdhook.modules import HookedModule


def torch_reference(net, x):
    """Activations and gradients collected with hand-written torch hooks."""
    seen = {}
    handles = [
        net.linear1.register_forward_hook(lambda m, a, o: seen.__setitem__("l1_out", o.detach().clone())),
        net.linear2.register_forward_pre_hook(lambda m, a: seen.__setitem__("l2_in", a[0].detach().clone())),
        net.linear2.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("l2_gin", gi[0].clone())),
        net.linear2.register_full_backward_pre_hook(lambda m, go: seen.__setitem__("l2_gout", go[0].clone())),
    ]
    out = net(x.clone().requires_grad_(True))
    out.sum().backward()
    for h in handles:
        h.remove()
    net.zero_grad()
    return seen, out.detach()


def test_run_get_matches_torch_hooks(net, td) -> None:
    ref, out = torch_reference(net, td["input"])
    hooked = HookedModule.from_module(net, ["input"], ["output"])

    def backward(module, data):
        data["input"] = data["input"].clone().requires_grad_(True)
        module(data)["output"].sum().backward()

    with hooked.run(td, grad_enabled=True, run_callback=backward) as run:
        l1 = run.get("linear1")
        l2_in = run.get_input("linear2")
        l2_gin = run.get_grad("linear2")
        l2_gout = run.get_grad_output("linear2")
    torch.testing.assert_close(l1.resolve(), ref["l1_out"])
    torch.testing.assert_close(l2_in.resolve(), ref["l2_in"])
    torch.testing.assert_close(l2_gin.resolve(), ref["l2_gin"])
    torch.testing.assert_close(l2_gout.resolve(), ref["l2_gout"])
    torch.testing.assert_close(td["output"], out)
    assert set(run.cache.keys()) == {
        "linear1_output",
        "linear2_input",
        "linear2_grad_input",
        "linear2_grad_output",
    }


def test_run_set_with_proxy_and_callback(net, td) -> None:
    """The paper's intervention: save layer 1, write it into layer 2, then add 1 (k edits)."""
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    with hooked.run(td) as run:
        s1 = run.get("linear2")
        run.set("linear3", None, callback=lambda output, **_: output + 1)
        run.set("linear3", None, callback=lambda output, **_: output + 1)
        s2 = run.get("linear3", cache_key="s2")
    x = td["input"]
    h2 = net.linear2(net.relu(net.linear1(x)))
    torch.testing.assert_close(s1.resolve(), h2)
    torch.testing.assert_close(s2.resolve(), net.linear3(net.relu(h2)) + 2)
    torch.testing.assert_close(td["output"], net.linear3(net.relu(h2)) + 2)

    with hooked.run(td) as run:
        a = run.get("linear1")
        run.set("linear2", a)  # copy layer 1's output into layer 2's
    torch.testing.assert_close(td["output"], net.linear3(net.relu(net.linear1(x))))


def test_save_keys_and_outer_cache(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    outer = TensorDict()
    with hooked.run(td, cache=outer, run_name="r1", run_sep="/") as run:
        run.save("linear1")
        run.save("linear2", cache_key="custom")
        run.save_input("linear3")
    assert set(outer.keys()) == {"r1/linear1_output", "custom", "r1/linear3_input"}
    with hooked.run(td) as run:
        proxy = run.save("linear1")
        assert proxy.resolve() is None  # not run yet
    assert "run.linear1_output" in run.cache


def test_stop_skips_the_rest(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    with hooked.run(td.clone()) as run:
        p = run.get("linear1")
        run.stop("linear1")
        q = run.get("linear3")
    assert p.resolve() is not None
    assert q.resolve() is None
    handle = hooked.stop("linear1")
    with pytest.raises(EarlyStoppingException, match="Early stopping triggered for key linear1"):
        hooked(td.clone())
    handle.remove()


def test_hooks_removed_even_if_body_raises(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    run = hooked.run(td)
    with pytest.raises(ZeroDivisionError), run:
        _ = run.get("linear1"), 1 / 0
    assert not net.linear1._forward_hooks


def test_run_methods_outside_with(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    run = hooked.run(td)
    with pytest.raises(ContextStateError, match="Not in context, method get must be called in context"):
        run.get("linear1")


def test_persistent_get_set(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    cache = TensorDict()
    handle, proxy = hooked.get(cache, "linear1")
    set_handle = hooked.set("linear3", torch.zeros(5, 2))
    hooked(td)
    assert isinstance(proxy, CacheProxy)
    torch.testing.assert_close(proxy.resolve(), net.linear1(td["input"]))
    assert torch.equal(td["output"], torch.zeros(5, 2))
    handle.remove()
    set_handle.remove()
    assert not net.linear1._forward_hooks
    assert not net.linear3._forward_hooks
    # absolute keys resolve from the hooked module
    handle, proxy = hooked.get(cache, "td_module.module.linear2", relative=False)
    hooked(td)
    assert proxy.key == "td_module.module.linear2_output"
    handle.remove()


def test_fixed_bwd_default_caches_grad_input(net, td) -> None:
    """tdhook 0.1 cached grad_output under a `_grad_input` key (spec §13.12)."""
    ref, _ = torch_reference(net, td["input"])
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    cache = TensorDict()
    handle, proxy = hooked.get_grad(cache, "linear2")
    td["input"].requires_grad_(True)
    hooked(td)["output"].sum().backward()
    handle.remove()
    torch.testing.assert_close(proxy.resolve(), ref["l2_gin"])


def test_errors_are_clear(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    with pytest.raises(InvalidDirectionError, match=r"Invalid direction: 'sideways'. Expected one of"):
        hooked.get(TensorDict(), "linear1", direction="sideways")
    with pytest.raises(ModulePathError, match=r"(?i)linear4.*nearest.*linear1"):
        hooked.get(TensorDict(), "linear4")
    with pytest.raises(HookSignatureError, match="Callback missing required parameters"):
        hooked.set("linear1", None, callback=lambda output: output)
    with pytest.raises(HookSignatureError, match="positional-only"):
        hooked.set("linear1", None, callback=lambda output, /, **_: output)
    message = "Callback returned a value of type str but the original value was of type Tensor"
    with pytest.raises(RuntimeError, match=message), hooked.run(td) as run:
        run.set("linear1", None, callback=lambda output, **_: "text")
    assert not net.linear1._forward_hooks


def test_tuple_values_need_a_callback() -> None:
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x + 1

    model = torch.nn.Sequential(Pair())
    hooked = HookedModule.from_module(torch.nn.ModuleDict({"pair": model}).pair, ["input"], ["a", "b"])
    td = TensorDict(input=torch.ones(2, 1), batch_size=[2])
    with (
        pytest.raises(RuntimeError, match="tuple values are not supported for caching"),
        hooked.run(td) as run,
    ):
        run.get("[0]")
    with hooked.run(td) as run:
        p = run.get("[0]", callback=lambda output, **_: output[1])
    assert torch.equal(p.resolve(), torch.full((2, 1), 2.0))


def test_hook_factory_and_managers(net, td) -> None:
    cache = TensorDict()
    manager = MultiHookManager(r"linear\d")
    handles = manager.register_hook(net, lambda name: HookFactory.make_caching_hook(name, cache))
    net(td["input"])
    assert set(cache.keys()) == {"linear1", "linear2", "linear3"}
    assert isinstance(handles, MultiHookHandle)
    with handles:
        pass
    assert not net.linear1._forward_hooks
    empty = MultiHookManager(None).register_hook(net, lambda name: None)
    empty.remove()
    with pytest.raises(TypeError):
        handles + 1  # type: ignore[operator]


def test_tensor_call_semantics(net) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(hooked(x), net(x))


def test_run_cache_read_inside_the_body_is_filled_at_exit(net, td) -> None:
    """``run.cache`` is built on demand from the run's values; read early, it still gets them."""
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    with hooked.run(td.clone()) as run:
        early = run.cache
        proxy = run.get("linear1")
        assert "linear1_output" not in early  # hooks fire at exit
        later = run.get("linear2")  # registered after the cache was read: goes to it directly
    assert early is run.cache
    torch.testing.assert_close(early["linear1_output"], proxy.resolve())
    torch.testing.assert_close(early["linear2_output"], later.resolve())
    own = TensorDict()
    with hooked.run(td.clone(), run_cache=own) as run:
        run.get("linear1")
    assert run.cache is own
    assert set(own.keys()) == {"linear1_output"}


def test_run_values_follow_callbacks_and_directions(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    with hooked.run(td.clone()) as run:
        doubled = run.save("linear1", callback=lambda output, key, **_: output * 2)
        inp = run.save("linear2", direction="fwd_pre")
    x = td["input"]
    torch.testing.assert_close(doubled.resolve(), 2 * net.linear1(x))
    torch.testing.assert_close(inp.resolve(), net.relu(net.linear1(x)))
    with pytest.raises(InvalidDirectionError, match="Invalid direction: 'forward'"), hooked.run(td) as run:
        run.save("linear1", direction="forward")
    for bad in (["fwd"], None, 3):  # not a string: the same clear error, never a TypeError
        with pytest.raises(InvalidDirectionError, match="Invalid direction"), hooked.run(td) as run:
            run.save("linear1", direction=bad)
        with pytest.raises(InvalidDirectionError, match="Invalid direction"), hooked.run(td) as run:
            run.get("linear1", direction=bad)


class _Returns(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        outs = {"tensor": x, "dict": {"output": 2 * x}, "other_dict": {"a": x}, "tuple1": (x,)}
        outs.update({"tuple2": (x, x), "none": None})
        return outs[self.kind]


@pytest.mark.parametrize("kind", ["tensor", "dict", "other_dict", "tuple1", "tuple2", "none"])
def test_tensor_call_shortcut_matches_tensordict_module(kind) -> None:
    """A tensor call skips the TensorDict round trip but returns (or raises) what it would."""
    hooked = HookedModule.from_module(_Returns(kind))
    x = torch.ones(2)

    def call(fn):
        try:
            out = fn(x)
        except RuntimeError as err:
            return "error", str(err).split("(")[0]
        return type(out).__name__, out.to_dict() if isinstance(out, TensorDict) else out

    ours, theirs = call(hooked), call(hooked.td_module)
    assert ours[0] == theirs[0]
    assert str(ours[1]) == str(theirs[1])


def test_tensor_call_shortcut_keeps_hooks_on_the_wrapper(net) -> None:
    """Hooks on the TensorDictModule (or global module hooks) still fire: no shortcut then."""
    hooked = HookedModule.from_module(net)
    x = torch.randn(3, 4)
    seen = []
    handle = hooked.td_module.register_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        hooked(x)
    finally:
        handle.remove()
    assert seen == ["TensorDictModule"]
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__)
    )
    try:
        hooked(x)
        through_wrapper = list(calls)
        calls.clear()
        hooked.td_module(x)
    finally:
        handle.remove()
    assert through_wrapper == [*calls, "HookedModule"]  # the TensorDictModule's call included
    assert "TensorDictModule" in calls


def test_callback_check_is_remembered_per_code_but_not_for_wrappers() -> None:
    import functools

    from tdhook._core import signatures as core_hooks
    from tdhook._core.directions import HookDirection
    from tdhook._core.signatures import check_callback

    def make():
        return lambda output, **_: output

    check_callback(make(), HookDirection.FWD)
    assert (make().__code__, HookDirection.FWD, ()) in core_hooks._CHECKED
    check_callback(make(), HookDirection.FWD)  # a new lambda, same code: remembered

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    good = wrap(lambda output, **_: output)
    bad = wrap(lambda value: value)  # same wrapper code, another signature (via __wrapped__)
    check_callback(good, HookDirection.FWD)
    with pytest.raises(HookSignatureError, match="missing required parameters"):
        check_callback(bad, HookDirection.FWD)


def test_set_callback_receives_every_hook_argument_by_keyword(net, td) -> None:
    hooked = HookedModule.from_module(net, ["input"], ["output"])
    seen = {}

    def callback(module, args, output, value, direction):
        seen.update(module=module, args=args, output=output, value=value, direction=direction)
        return output * 0

    with hooked.run(td.clone()) as run:
        run.set("linear1", torch.ones(1), callback=callback)
    assert seen["module"] is net.linear1
    torch.testing.assert_close(seen["args"][0], td["input"])
    torch.testing.assert_close(seen["output"], net.linear1(td["input"]))
    torch.testing.assert_close(seen["value"], torch.ones(1))
    assert seen["direction"] == "fwd"


def test_hooking_a_module_list_warns() -> None:
    from tdhook.errors import TdhookWarning

    class WithList(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def forward(self, x):
            return self.blocks[0](x)

    hooked = HookedModule.from_module(WithList())
    with pytest.warns(TdhookWarning, match=r"hooking a ModuleList \(blocks\), which will never be executed"):
        hooked.register_submodule_hook("blocks", lambda *a: None).remove()
    with pytest.warns(TdhookWarning, match="hooking a ModuleList"), hooked.run(torch.ones(1, 2)) as run:
        proxy = run.save("blocks")
    assert proxy.resolve() is None  # never called

"""HookSession: values equal hand-written torch hooks, replacements equal manual patches, exact cleanup."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from contract.test_contract import assert_same, snapshot  # tests/ is on sys.path (rootdir import)
from torch import nn

from tdhook.errors import (
    ContextStateError,
    InvalidDirectionError,
    InvalidInputError,
    ModulePathError,
    TargetError,
)
from tdhook.session import HookSession, SessionStop
from tdhook.targets import Target

# ------------------------------------------------------------------------------------------------
# Models and helpers
# ------------------------------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


class Recurrent(nn.Module):
    """One cell applied three times (a module called several times per forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(3):
            h = torch.tanh(self.cell(h))
        return self.out(h)


class PairOut(nn.Module):
    """A block returning ``(hidden, aux)``, like a transformer block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x) * scale
        return h, h.sum(-1)


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = PairOut()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, aux = self.block(x, scale=2.0)
        return self.head(h) + aux.unsqueeze(-1)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 4)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(getattr(m, d, {})) for m in model.modules() for d in ("_forward_hooks", "_forward_pre_hooks")
    )


# ------------------------------------------------------------------------------------------------
# Captures equal hand-written torch hooks
# ------------------------------------------------------------------------------------------------


def test_activation_captures_equal_torch_hooks(x) -> None:
    model = mlp()
    seen: dict[str, Any] = {}
    handles = [
        model[1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone())),
        model[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone())),
    ]
    model(x)
    for h in handles:
        h.remove()
    with HookSession(model) as s:
        out = s.capture(Target("1", indices=(0, 3)))
        whole = s.capture("1")
        inp = s.capture(Target("2"), direction="fwd_pre")
        model(x)
    assert torch.equal(out.values[0], seen["out"][:, [0, 3]])
    assert torch.equal(whole.values[0], seen["out"])
    assert torch.equal(inp.values[0], seen["in"])
    assert not out.values[0].requires_grad
    assert out.calls == [0]
    assert out.passes == [0]


def test_fwd_pre_kwargs_sees_args_and_kwargs(x) -> None:
    model = WithBlock()
    seen = {}
    handle = model.block.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=a[0].clone(), scale=k["scale"]), with_kwargs=True
    )
    model(x)
    handle.remove()
    with HookSession(model) as s:
        arg = s.capture(Target("block", output_path=(0, 0)), direction="fwd_pre_kwargs")
        hidden = s.capture(Target("block", output_path=(0,), indices=(1,)))
        model(x)
    assert torch.equal(arg.values[0], seen["x"])
    assert seen["scale"] == 2.0
    assert torch.equal(hidden.values[0], (model.block.lin(x) * 2.0)[:, [1]].detach())


def test_every_occurrence_in_call_order_and_a_selected_one(x) -> None:
    model = Recurrent()
    seen: list[torch.Tensor] = []
    handle = model.cell.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    model(x)
    model(x)
    handle.remove()
    with HookSession(model) as s:
        every = s.capture("cell")
        second = s.capture(Target("cell", indices=(2,), occurrences=(1,)))
        model(x)
        model(x)
    assert len(every.values) == 6
    for mine, theirs in zip(every.values, seen):
        assert torch.equal(mine, theirs)
    assert every.calls == [0, 1, 2, 0, 1, 2]
    assert every.passes == [0, 0, 0, 1, 1, 1]
    assert [v.shape for v in second.values] == [torch.Size([5, 1])] * 2
    assert torch.equal(second.values[0], seen[1][:, [2]])
    assert second.calls == [1, 1]


def test_gradient_captures_equal_full_backward_hooks(x) -> None:
    model = mlp()
    seen = {}
    handles = [
        model[2].register_full_backward_pre_hook(lambda m, go: seen.__setitem__("out", go[0].clone())),
        model[2].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("in", gi[0].clone())),
    ]
    xg = x.clone().requires_grad_(True)
    model(xg).pow(2).sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    with HookSession(model) as s:
        g_out = s.capture(Target("2", "gradient", indices=(1,)))
        g_in = s.capture(Target("2", "gradient"), direction="bwd")
        model(x.clone().requires_grad_(True)).pow(2).sum().backward()
    assert torch.equal(g_out.values[0], seen["out"][:, [1]])
    assert torch.equal(g_in.values[0], seen["in"])


def test_gradient_of_each_occurrence_equals_tensor_hooks(x) -> None:
    model = Recurrent()
    grads: dict[int, torch.Tensor] = {}
    calls = {"n": 0}

    def tap(m, a, o):
        i = calls["n"]
        calls["n"] += 1
        o.register_hook(lambda g: grads.__setitem__(i, g.clone()))

    handle = model.cell.register_forward_hook(tap)
    model(x).sum().backward()
    handle.remove()
    model.zero_grad()
    with HookSession(model) as s:
        every = s.capture(Target("cell", "gradient"))
        first = s.capture(Target("cell", "gradient", occurrences=(0,)))
        model(x).sum().backward()
    assert every.calls == [2, 1, 0]  # backward order: the last call first
    for call, value in zip(every.calls, every.values):
        assert torch.equal(value, grads[call])
    assert first.calls == [0]
    assert torch.equal(first.values[0], grads[0])


def test_gradients_of_a_module_followed_by_an_inplace_op(x) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    reference = nn.Sequential(model[0], nn.ReLU(), model[2])  # same weights, ReLU out of place
    grads = {}
    handle = reference[0].register_full_backward_pre_hook(lambda m, go: grads.__setitem__("g", go[0].clone()))
    reference(x.clone().requires_grad_(True)).sum().backward()
    handle.remove()
    with HookSession(model) as s:  # torch's full backward hooks raise here (a view modified in place)
        got = s.capture(Target("0", "gradient"))
        model(x).sum().backward()
    assert torch.equal(got.values[0], grads["g"])


def test_parameter_capture_is_a_snapshot() -> None:
    model = mlp()
    with HookSession(model) as s:
        expected = model[0].weight[[2]].detach().clone()
        row = s.capture(Target("0", "parameter", 0, (2,), parameter="weight"))
        with torch.no_grad():
            model[0].weight.add_(1.0)
    assert torch.equal(row.values[0], expected)
    assert row.calls == [None]


def test_detach_false_keeps_the_graph(x) -> None:
    model = mlp()
    with HookSession(model) as s:
        kept = s.capture(Target("0", indices=(0,)), detach=False)
        out = model(x)
    assert kept.values[0].requires_grad
    (grad,) = torch.autograd.grad(kept.values[0].sum(), model[0].bias)
    assert torch.equal(grad, torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert out.requires_grad


# ------------------------------------------------------------------------------------------------
# Replacement equals manual patching
# ------------------------------------------------------------------------------------------------


def _manual(model: nn.Module, module: nn.Module, fn: Any, x: torch.Tensor) -> torch.Tensor:
    handle = module.register_forward_hook(lambda m, a, o: fn(o))
    try:
        return model(x)
    finally:
        handle.remove()


def _zero_unit(o: torch.Tensor, unit: int, value: float = 0.0) -> torch.Tensor:
    o = o.clone()
    o[:, unit] = value
    return o


def test_replacement_equals_manual_patching(x) -> None:
    model = mlp()
    expected = _manual(model, model[1], lambda o: _zero_unit(o, 2, 3.0), x)
    v = torch.arange(5.0).unsqueeze(1)
    expected_tensor = _manual(model, model[0], lambda o: torch.cat([o[:, :3], v], dim=1), x)
    with HookSession(model) as s:
        s.replace(Target("1", indices=(2,)), 3.0)
        patched = model(x)
    with HookSession(model) as s:
        s.replace(Target("0", indices=(3,)), v)
        patched_tensor = model(x)
    assert torch.equal(patched, expected)
    assert torch.equal(patched_tensor, expected_tensor)
    assert not torch.equal(model(x), expected)


def test_replacement_inside_a_tuple_output_and_an_input(x) -> None:
    model = WithBlock()
    expected = _manual(model, model.block, lambda o: (_zero_unit(o[0], 0), o[1]), x)
    with HookSession(model) as s:
        s.replace(Target("block", output_path=(0,), indices=(0,)), 0.0)
        assert torch.equal(model(x), expected)
    handle = model.head.register_forward_pre_hook(lambda m, a: (a[0] * 0 + 1,))
    expected_input = model(x)
    handle.remove()
    with HookSession(model) as s:
        s.replace(Target("head"), 1.0, direction="fwd_pre")
        assert torch.equal(model(x), expected_input)
    handle = model.block.register_forward_pre_hook(lambda m, a, k: ((a[0] * 0,), k), with_kwargs=True)
    expected_args = model(x)
    handle.remove()
    with HookSession(model) as s:
        s.replace(Target("block", output_path=(0, 0)), 0.0, direction="fwd_pre_kwargs")
        assert torch.equal(model(x), expected_args)
    with HookSession(model) as s:
        s.replace(Target("block", output_path=(1, "scale")), 0.0, direction="fwd_pre_kwargs")
        with pytest.raises(TargetError, match="reaches a float, not a tensor"):
            model(x)


def test_replacement_of_selected_occurrences_only(x) -> None:
    model = Recurrent()
    state = {"n": 0}

    def second_only(o):
        state["n"] += 1
        return _zero_unit(o, 1) if state["n"] == 2 else None

    expected = _manual(model, model.cell, second_only, x)
    with HookSession(model) as s:
        s.replace(Target("cell", indices=(1,), occurrences=(1,)), 0.0)
        assert torch.equal(model(x), expected)


def test_gradient_replacement_equals_a_manual_backward_hook(x) -> None:
    model = mlp()
    handle = model[2].register_full_backward_pre_hook(lambda m, go: (_zero_unit(go[0], 0),))
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    handle.remove()
    expected = xg.grad.clone()
    with HookSession(model) as s:
        s.replace(Target("2", "gradient", indices=(0,)), 0.0)
        xs = x.clone().requires_grad_(True)
        model(xs).sum().backward()
    assert torch.equal(xs.grad, expected)


def test_parameter_replacement_is_written_then_restored_bit_for_bit(x) -> None:
    model = mlp()
    before = model[2].weight.detach().clone()
    manual = mlp()
    with torch.no_grad():
        manual[2].weight[1] = 0.5
    with HookSession(model) as s:
        s.replace(Target("2", "parameter", 0, (1,), parameter="weight"), 0.5)
        assert torch.equal(model(x), manual(x))
        s.replace(Target("2", "parameter", parameter="weight"), 0.0)  # a second edit of the same parameter
        assert torch.equal(model[2].weight, torch.zeros(4, 4))
    assert torch.equal(model[2].weight, before)
    with (
        pytest.raises(TargetError, match=r"does not broadcast to the selected shape \(1, 4\)"),
        HookSession(model) as s,
    ):
        s.replace(Target("2", "parameter", 0, (1,), parameter="weight"), torch.zeros(3))
    assert torch.equal(model[2].weight, before)


def test_live_routing_feeds_a_capture_through_a_transform(x) -> None:
    model = mlp()
    h0 = model[0](x)
    expected = _manual(model, model[2], lambda o: torch.cat([o[:, :1], 2 * h0[:, 1:2], o[:, 2:]], dim=1), x)
    with HookSession(model) as s:
        source = s.capture(Target("0", indices=(1,)))
        s.replace(Target("2", indices=(1,)), source, transform=lambda v: 2 * v)
        first = model(x)
        second = model(x)  # routed from the same pass again, not from the previous one
    assert torch.allclose(first, expected)
    assert torch.equal(first, second)


def test_live_routing_refuses_a_destination_before_its_source(x) -> None:
    model = mlp()
    with HookSession(model) as s:
        late = s.capture(Target("2"))
        s.replace(Target("0"), late)
        with pytest.raises(ContextStateError, match="fired before its source"):
            model(x)
        with pytest.raises(ContextStateError, match="fired before its source"):
            model(x)  # the previous pass's value is not used either


# ------------------------------------------------------------------------------------------------
# Early stop
# ------------------------------------------------------------------------------------------------


def _counters(model: nn.Module) -> tuple[dict[str, int], list[Any]]:
    counts = {name: 0 for name, _ in model.named_children()}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, name=name: counts.__setitem__(name, counts[name] + 1))
        for name, m in model.named_children()
    ]
    return counts, handles


def test_stop_skips_the_rest_of_the_forward(x) -> None:
    model = mlp()
    counts, handles = _counters(model)
    with HookSession(model) as s:
        result = s.stop("2")
        assert s.run(x) is None
    for h in handles:
        h.remove()
    assert counts == {"0": 1, "1": 1, "2": 1, "3": 0, "4": 0}
    assert result.reached
    assert torch.equal(result.output, model[2](model[1](model[0](x))))


def test_a_direct_call_ends_the_block_and_the_session_suppresses_its_own_signal(x) -> None:
    model = mlp()
    after = []
    with HookSession(model) as s:
        s.stop("0")
        model(x)
        after.append("ran")  # skipped: the stop signal ends the block
    assert after == []
    assert hook_count(model) == 0


def test_stop_is_not_swallowed_by_a_models_except_exception(x) -> None:
    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp()

        def forward(self, x):
            try:
                return self.inner(x)
            except Exception:  # a careless model
                return torch.zeros(())

    model = Guarded()
    with HookSession(model) as s:
        result = s.stop("inner.0")
        assert s.run(x) is None
    assert result.reached
    assert issubclass(SessionStop, BaseException)
    assert not issubclass(SessionStop, Exception)


def test_another_sessions_stop_passes_through(x) -> None:
    model = mlp()
    with HookSession(model) as outer:
        result = outer.stop("0")
        with HookSession(model) as inner, pytest.raises(SessionStop):
            inner.run(x)
    assert result.reached
    assert hook_count(model) == 0


def test_stop_cannot_be_combined_with_gradients() -> None:
    model = mlp()
    with HookSession(model) as s:
        s.stop("2")
        with pytest.raises(ContextStateError, match="cannot be combined with stop"):
            s.capture(Target("0", "gradient"))
    with HookSession(model) as s:
        s.capture(Target("0", "gradient"))
        with pytest.raises(ContextStateError, match="cannot be combined with gradient targets"):
            s.stop("2")


# ------------------------------------------------------------------------------------------------
# Occurrences fail closed
# ------------------------------------------------------------------------------------------------


def test_a_call_index_never_reached_raises_at_the_end_of_the_pass(x) -> None:
    model = Recurrent()
    with HookSession(model) as s:
        s.capture(Target("cell", occurrences=(1, 3)))
        with pytest.raises(
            TargetError, match=r"call\(s\) \[3\] of module 'cell' were never reached; it ran 3 time"
        ):
            model(x)
    assert hook_count(model) == 0


def test_the_check_runs_after_entries_on_the_root(x) -> None:
    model = Recurrent()
    with HookSession(model) as s:
        s.capture(Target("cell", occurrences=(2,)))
        root = s.capture(Target("", occurrences=(0,)))
        model(x)
    assert len(root.values) == 1


# ------------------------------------------------------------------------------------------------
# Program, cleanup, lifecycle
# ------------------------------------------------------------------------------------------------


def test_program_lists_what_is_installed(x) -> None:
    model = Recurrent()
    with HookSession(model) as s:
        s.capture(Target("cell", occurrences=(0,)))
        s.replace(Target("out"), 0.0)
        s.replace(Target("out", "parameter", parameter="bias"), 1.0)
        program = s.program
        assert sorted(e.operation for e in program) == sorted(
            ["pass_start", "capture", "pass_end", "replace", "parameter_replace"]
        )
        assert program.hook_count == hook_count(model) == 4
        assert program.to_list()[1]["target"] == Target("cell", occurrences=(0,)).to_dict()
    assert len(s.program) == 0


@pytest.mark.parametrize("raise_inside", [False, True])
def test_cleanup_is_exact_on_exit_and_on_exceptions(x, raise_inside) -> None:
    model = Recurrent()
    model.train()
    model(x).sum().backward()  # gradients present before the session
    before = snapshot(model)

    class Boom(Exception):
        pass

    try:
        with HookSession(model) as s:
            s.capture(Target("cell", occurrences=(1,)))
            s.capture(Target("cell", "gradient"), direction="bwd")
            s.replace(Target("cell", indices=(0,)), 1.0)
            s.replace(Target("cell", "parameter", 1, (2,), parameter="weight"), 3.0)
            s.capture(Target("out", "parameter", parameter="bias"))
            model(x)
            if raise_inside:
                raise Boom
    except Boom:
        pass
    assert_same(before, snapshot(model))
    with pytest.raises(ContextStateError, match="must be called inside"):
        s.capture("cell")


def test_gradient_taps_are_inert_after_exit(x) -> None:
    model = mlp()
    with HookSession(model) as s:
        g = s.capture(Target("2", "gradient"))
        s.replace(Target("0", "gradient"), 0.0)
        out = model(x.clone().requires_grad_(True))
    out.sum().backward()  # the graph outlived the session: nothing recorded, nothing replaced
    assert g.values == []
    assert model[0].weight.grad is not None
    assert model[0].weight.grad.abs().sum() > 0


def test_the_session_holds_the_model_weakly(x) -> None:
    model = mlp()
    ref = weakref.ref(model)
    s = HookSession(model)
    with s:
        s.capture("0")
        del model
        gc.collect()
        assert ref() is None
        with pytest.raises(ContextStateError, match="garbage-collected"):
            s.capture("0")
    assert not s.is_active


def test_lifecycle_errors_and_reentry(x) -> None:
    model = mlp()
    s = HookSession(model)
    with pytest.raises(RuntimeError, match=r"HookSession.capture\(\) must be called inside"):
        s.capture("0")
    with s, pytest.raises(RuntimeError, match="Cannot enter a HookSession twice"):
        s.__enter__()
    with s:  # entering again after exit works, from a clean program
        assert [e.operation for e in s.program] == []
        got = s.capture("0")
        s.run(x)
    assert len(got.values) == 1
    assert hook_count(model) == 0


def test_bad_inputs_are_refused_before_touching_the_model() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="expects an nn.Module"):
        HookSession("model")  # type: ignore[arg-type]
    with HookSession(model) as s:
        with pytest.raises(ModulePathError, match=r"Nearest existing module names"):
            s.capture("5")
        with pytest.raises(InvalidDirectionError, match=r"'bwd' does not apply to a activation target"):
            s.capture("0", direction="bwd")
        with pytest.raises(InvalidDirectionError, match=r"'fwd' does not apply to a gradient target"):
            s.capture(Target("0", "gradient"), direction="fwd")
        with pytest.raises(InvalidDirectionError, match="parameters are read and written directly"):
            s.capture(Target("0", "parameter", parameter="weight"), direction="fwd")
        with pytest.raises(ValueError, match="Invalid direction: 'sideways'"):
            s.capture("0", direction="sideways")
        with pytest.raises(InvalidInputError, match="transform= applies to a routed capture only"):
            s.replace("0", 1.0, transform=lambda v: v)
        with pytest.raises(InvalidInputError, match="takes a tensor, a number or a CapturedTarget, got str"):
            s.replace("0", "zero")  # type: ignore[arg-type]
        other_model = mlp()
        other = HookSession(other_model)
        with other:
            foreign = other.capture("0")
        with pytest.raises(InvalidInputError, match="not one of this session's captures"):
            s.replace("2", foreign)
        assert [e.operation for e in s.program] == []
        assert hook_count(model) == 0


@pytest.mark.parametrize("grad", [True, False])
def test_detached_capture_is_an_independent_copy_with_and_without_grad(grad: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with torch.set_grad_enabled(grad), HookSession(model) as s:
        last = s.capture("1")
        out = model(x)
    kept = last.values[0]
    assert not kept.requires_grad
    assert kept.grad_fn is None
    assert kept.data_ptr() != out.data_ptr()
    expected = out.detach().clone()
    out.detach().add_(1.0)  # the caller modifies the model's output afterwards
    assert torch.equal(kept, expected)


def test_uncopied_captures_at_and_before_an_inplace_module_keep_the_values_it_overwrites(x) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    with torch.no_grad():
        pre_relu = model[0](x)
    assert (pre_relu < 0).any()  # the in-place ReLU overwrites something
    with HookSession(model) as s:
        # the ReLU's input, held without a copy: the guard on the ReLU must copy it *after* this
        # hook holds it and before the ReLU runs
        at_relu = s.capture(Target("1"), direction="fwd_pre", detach=False)
        before_relu = s.capture(Target("0"), detach=False)
        model(x)
    assert torch.equal(at_relu.values[0], pre_relu)
    assert torch.equal(before_relu.values[0], pre_relu)
    assert [e.operation for e in s.program] == []  # left: nothing installed

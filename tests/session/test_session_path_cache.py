"""Sessions resolve each module path once per model and re-check it at every use.

A session opened per call (a policy hooked once per environment step) would otherwise walk every
path again; the cache must never give a stale module (a swapped submodule, a TensorDictModule's
wrapped module replaced, a submodule compiled since) and never keep a model alive.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook import _session
from tdhook.errors import CompiledModelError, ModulePathError
from tdhook.session import HookSession


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2)
    )


def _capture(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    with HookSession(model) as s:
        captured = s.capture(path)
        model(x)
    return captured.values[0]


def test_a_swapped_submodule_is_captured_not_the_cached_one() -> None:
    model, x = _model(), torch.randn(5, 3)
    first = _capture(model, "2.0", x)
    torch.testing.assert_close(first, model[2][0](torch.relu(model[0](x))))
    old = [model[2][0]]  # kept alive, as a user may keep them
    model[2][0] = nn.Linear(4, 4)  # the deepest step changes
    torch.testing.assert_close(_capture(model, "2.0", x), model[2][0](torch.relu(model[0](x))))
    old.append(model[2])
    model[2] = nn.Sequential(nn.Linear(4, 4), nn.Tanh())  # an intermediate step changes
    torch.testing.assert_close(_capture(model, "2.0", x), model[2][0](torch.relu(model[0](x))))
    del model[2]  # the path is gone: the usual error, naming it
    with HookSession(model) as s, pytest.raises(ModulePathError, match=r"2\.0"):
        s.capture("2.0")


def test_a_submodule_compiled_since_is_refused() -> None:
    model, x = _model(), torch.randn(5, 3)
    _capture(model, "2.0", x)
    model[2].compile()  # compiled in place after the path was cached
    with HookSession(model) as s:
        with pytest.raises(CompiledModelError, match=r"'2\.0' up to step 1.*module.compile\(\)"):
            s.capture("2.0")
        with pytest.raises(CompiledModelError, match=r"'2\.0' up to step 1"):
            s.capture("2.0")  # refused again: a refused path is not cached


def test_a_wrapped_module_replaced_inside_a_tensordict_module_is_seen() -> None:
    model, x = _model(), torch.randn(5, 3)
    td_module = TensorDictModule(model, in_keys=["x"], out_keys=["y"])
    with HookSession(td_module) as s:  # "0" falls through to the wrapped module's child
        captured = s.capture("0")
        td_module(x=x)
    torch.testing.assert_close(captured.values[0], model[0](x))
    other = _model()
    other[0] = nn.Linear(3, 4)
    td_module.module = other
    with HookSession(td_module) as s:
        captured = s.capture("0")
        td_module(x=x)
    torch.testing.assert_close(captured.values[0], other[0](x))


class _WithParentLink(nn.Module):
    """A submodule that refers back to its root (a reference cycle, collected only by gc)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.owner: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_the_cache_never_keeps_a_model_alive() -> None:
    model = nn.Sequential(_WithParentLink(), nn.ReLU())
    model[0].owner.append(model)  # the root is reachable from its own submodule
    _capture(model, "0.linear", torch.randn(2, 3))
    key = id(model)
    assert key in _session._CHAINS  # cached...
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # ...weakly: the model is collected
    assert key not in _session._CHAINS  # and its entry dropped


def test_a_path_capture_after_an_uncopied_one_keeps_the_pass_end_last() -> None:
    """The inlined path capture installs what the general one does (program, hooks, values)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with HookSession(model) as s:
        kept = s.capture("0", detach=False)  # guards in-place modules, installs the pass end
        copied = s.capture("2")  # a plain path: the inlined capture
        general = s.capture(_session.Target("2"), direction="fwd")  # the general code path
        out = model(x)
        ops = [(e.operation, e.module_path) for e in s.program.entries]
    assert ops[0] == ("pass_start", "")
    assert ops[-1] == ("pass_end", "")
    assert ("capture", "2") in ops
    torch.testing.assert_close(kept.values[0], model[0](x))  # copied just before the in-place ReLU
    torch.testing.assert_close(copied.values[0], out)
    torch.testing.assert_close(general.values[0], out)
    assert copied.calls == general.calls == [0]
    assert copied.passes == general.passes == [0]
    assert copied.values[0] is not out  # a detached copy
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

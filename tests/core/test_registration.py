"""The hook core's registration (``_core.directions.register``): torch's semantics at a fifth of its cost.

Plain forward and forward-pre hooks go straight into the module's hook table; these tests pin
that the result is indistinguishable from ``register_forward(_pre)_hook``.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tdhook._core.directions import HookDirection, register
from tdhook.errors import InvalidDirectionError


def _recorder(log: list[str], name: str):
    def hook(*args):
        log.append(name)

    return hook


@pytest.mark.parametrize("direction", [HookDirection.FWD, HookDirection.FWD_PRE])
def test_handle_is_torchs_and_removes_exactly_its_hook(direction: HookDirection) -> None:
    module = nn.Linear(2, 2)
    table = module._forward_hooks if direction is HookDirection.FWD else module._forward_pre_hooks
    log: list[str] = []
    theirs = (
        module.register_forward_hook(_recorder(log, "torch"))
        if direction is HookDirection.FWD
        else module.register_forward_pre_hook(_recorder(log, "torch"))
    )
    ours = register(module, _recorder(log, "ours"), direction)
    assert isinstance(ours, RemovableHandle)
    assert ours.id < 0 <= theirs.id  # our own counter, disjoint from torch's
    later = module.register_forward_hook(lambda *a: None)  # torch's counter is left alone
    assert later.id == theirs.id + 1
    later.remove()
    assert list(table) == [theirs.id, ours.id]
    module(torch.ones(1, 2))
    assert log == ["torch", "ours"]
    ours.remove()
    ours.remove()  # idempotent, like torch's
    assert list(table) == [theirs.id]
    theirs.remove()
    assert not table


@pytest.mark.parametrize("direction", [HookDirection.FWD, HookDirection.FWD_PRE])
def test_prepend_runs_first(direction: HookDirection) -> None:
    module = nn.Linear(2, 2)
    log: list[str] = []
    first = register(module, _recorder(log, "a"), direction)
    second = register(module, _recorder(log, "b"), direction, prepend=True)
    module(torch.ones(1, 2))
    assert log == ["b", "a"]
    second.remove()
    first.remove()
    assert not module._forward_hooks
    assert not module._forward_pre_hooks


def test_handle_does_not_keep_the_module_alive() -> None:
    module = nn.Linear(2, 2)
    handle = register(module, lambda *a: None, HookDirection.FWD)
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None
    handle.remove()  # the table is gone: a no-op, as with torch's handle


def test_a_module_with_its_own_registration_is_asked() -> None:
    calls: list[str] = []

    class Custom(nn.Linear):
        def register_forward_hook(self, hook, **kwargs):
            calls.append("fwd")
            return super().register_forward_hook(hook, **kwargs)

        def register_forward_pre_hook(self, hook, **kwargs):
            calls.append("pre")
            return super().register_forward_pre_hook(hook, **kwargs)

    module = Custom(2, 2)
    register(module, lambda *a: None, HookDirection.FWD).remove()
    register(module, lambda *a: None, HookDirection.FWD_PRE).remove()
    assert calls == ["fwd", "pre"]


def test_always_call_hooks_run_on_an_exception_and_are_forward_only() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    module = Boom()
    log: list[str] = []
    handle = register(module, _recorder(log, "end"), HookDirection.FWD, always_call=True)
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.ones(1))
    assert log == ["end"]
    handle.remove()
    assert not module._forward_hooks
    assert not module._forward_hooks_always_called
    with pytest.raises(InvalidDirectionError, match="forward hooks only"):
        register(module, lambda *a: None, HookDirection.FWD_PRE, always_call=True)


def test_threads_registering_at_once_never_share_an_id() -> None:
    import threading

    module = nn.Linear(2, 2)
    start = threading.Barrier(4, timeout=30)
    handles: list[list[RemovableHandle]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        start.wait()
        for _ in range(2000):
            handles[i].append(register(module, lambda *a: None, HookDirection.FWD))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    ids = [h.id for hs in handles for h in hs]
    assert len(set(ids)) == len(ids) == 8000
    assert len(module._forward_hooks) == 8000  # no hook overwrote another
    for hs in handles:
        for h in hs:
            h.remove()
    assert not module._forward_hooks

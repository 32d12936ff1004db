"""The TensorDict path: ``HookedModule.from_module(model, in_keys=["input"], out_keys=["output"])``
called with a TensorDict, against a plain ``TensorDictModule`` call.

On the depth-12 width-10 MLP at batch 1, one thread, gradients disabled (a small policy called
once per environment step, where hooking costs most). Each library sets its saves up per call:
``run()`` (``with hooked.run(td) as run: run.save(...)``), a ``HookSession`` entered around the
call, and raw torch hooks registered around ``TensorDictModule(td)``. The table reports µs per
call above the plain ``TensorDictModule`` call; targets: at most 2× raw hooks' overhead at 1 and
12 saves, and at most +5 µs at 0 saves (read off the table: the harness compares ratios only).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Task
from .hook_overhead import DEPTH, WIDTH, _build, _inference
from .hook_overhead import Raw as _Raw


def _setup(params: Any) -> tuple[torch.nn.Module, Any, list[str], Any]:
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule

    torch.set_num_threads(1)
    model, x, names = _build(params)
    td = TensorDict(input=x, batch_size=[1])
    return model, td, names, TensorDictModule(model, in_keys=["input"], out_keys=["output"])


class Run(Impl):
    """``with hooked.run(td) as run: run.save(name) ...`` (0.1's deferred API)."""

    name = "tdhook_run"
    label = "tdhook run()"
    inner = 20

    def setup(self, params):
        from tdhook.modules import HookedModule

        model, self.td, self.names, _ = _setup(params)
        self.hooked = HookedModule.from_module(model, in_keys=["input"], out_keys=["output"])
        self.saved: list[Any] = []

    @_inference
    def run(self):
        with self.hooked.run(self.td) as run:
            proxies = [run.save(name) for name in self.names]
        self.saved = [p.resolve() for p in proxies]

    def output(self):
        return dict(zip(self.names, self.saved))


class Session(Impl):
    """``with HookSession(model) as s: s.capture(name) ...; hooked(td)``."""

    name = "tdhook_session"
    label = "tdhook HookSession"
    inner = 20

    def setup(self, params):
        from tdhook.modules import HookedModule
        from tdhook.session import HookSession

        model, self.td, self.names, _ = _setup(params)
        self.model = model
        self.session = HookSession  # imported once, as the other libraries are
        self.hooked = HookedModule.from_module(model, in_keys=["input"], out_keys=["output"])
        self.captured: list[Any] = []

    @_inference
    def run(self):
        with self.session(self.model) as s:
            captured = [s.capture(name) for name in self.names]
            self.hooked(self.td)
        self.captured = captured

    def output(self):
        return {name: c.values[0] for name, c in zip(self.names, self.captured)}


class Raw(_Raw):
    """``register_forward_hook`` per save, ``TensorDictModule(td)``, ``remove()``."""

    label = "TensorDictModule + raw hooks"

    def setup(self, params):
        model, self.td, self.names, self.td_module = _setup(params)
        self.modules = [model.get_submodule(n) for n in self.names]
        self.forward = functools.partial(self.td_module, self.td)
        self.store: dict[str, Any] = {}


class Plain(Impl):
    """A plain ``TensorDictModule`` call (the baseline)."""

    name = "plain"
    label = "TensorDictModule"
    inner = 20

    def setup(self, params):
        _, self.td, _, self.td_module = _setup(params)

    @_inference
    def run(self):
        self.td_module(self.td)

    def output(self):
        return None


TASK = Task(
    name="tensordict_path",
    title=f"TensorDict input: depth-{DEPTH} width-{WIDTH} MLP, batch 1, 1 thread, saves set up per call "
    "(µs above a plain TensorDictModule call)",
    env="tdhook",
    impls=[Run, Session, Raw, Plain],
    cases=[
        Case("saves=0", {"saves": 0}, smoke={"saves": 0}),
        Case("saves=1", {"saves": 1}, smoke={"saves": 1}),
        Case("saves=12", {"saves": 12}, smoke={"saves": 12}),
    ],
    rtol=0.0,
    atol=0.0,
    case_targets={"saves=1": {"raw": 2.0}, "saves=12": {"raw": 2.0}},
    baseline="plain",
    memory=False,
    timing={"warmup": 50, "min_repeats": 30, "max_repeats": 300, "budget_s": 3.0, "rounds": 3},
)

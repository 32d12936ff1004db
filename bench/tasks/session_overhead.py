"""Session overhead: ``HookSession`` with one capture against ``run()`` with one save.

On the depth-12 width-10 MLP at batch 1, one thread, gradients disabled: each library sets its
saves up *per call* (a session entered and left around every call, as ``run()`` is), runs the
model and tears down. ``tdhook_session_open`` keeps one session open and only calls the model
(the steady state of a policy called once per environment step). The table reports µs per call
above the plain forward; the target is the session within 1.2× of ``run()``'s overhead.
"""

from __future__ import annotations

from typing import Any

import torch

from .._harness import Case, Impl, Task
from .hook_overhead import DEPTH, WIDTH, _build, _inference
from .hook_overhead import Plain as _Plain
from .hook_overhead import Raw as _Raw
from .hook_overhead import Tdhook as _Run


class _OneThread:
    """The issue's setting: one intra-op thread (set at set-up, in the child process)."""

    def setup(self, params: Any) -> None:
        torch.set_num_threads(1)
        super().setup(params)  # type: ignore[misc]


class Session(_OneThread, Impl):
    """``with HookSession(model) as s: s.capture(name) ...; model(x)`` around every call."""

    name = "tdhook_session"
    label = "tdhook HookSession (per call)"
    inner = 20

    def setup(self, params):
        from tdhook.session import HookSession

        model, self.x, self.names = _build(params)
        self.model = model
        self.session = HookSession  # imported once, as the other libraries are
        self.captured: list[Any] = []

    @_inference
    def run(self):
        with self.session(self.model) as s:
            captured = [s.capture(name) for name in self.names]
            self.model(self.x)
        self.captured = captured

    def output(self):
        return {name: c.values[0] for name, c in zip(self.names, self.captured)}


class SessionOpen(_OneThread, Impl):
    """One session open for every call; each call runs the model and takes its captures."""

    name = "tdhook_session_open"
    label = "tdhook HookSession (kept open)"
    inner = 20

    def setup(self, params):
        from tdhook.session import HookSession

        model, self.x, self.names = _build(params)
        self.model = model
        self.session = HookSession(model).__enter__()  # left open: the child process ends after timing
        self.captured = [self.session.capture(name) for name in self.names]
        self.values: list[Any] = []

    @_inference
    def run(self):
        self.model(self.x)
        self.values = [c.take() for c in self.captured]

    def output(self):
        return {name: v[0] for name, v in zip(self.names, self.values)}


class Run(_OneThread, _Run):
    label = "tdhook run()"
    name = "tdhook_run"


class Raw(_OneThread, _Raw):
    pass


class Plain(_OneThread, _Plain):
    pass


TASK = Task(
    name="session_overhead",
    title=f"HookSession vs run(): depth-{DEPTH} width-{WIDTH} MLP, batch 1, 1 thread, saves set up per call "
    "(µs above the plain forward)",
    env="tdhook",
    impls=[Session, SessionOpen, Run, Raw, Plain],
    cases=[
        Case("saves=1", {"saves": 1}, smoke={"saves": 1}),
        Case("saves=12", {"saves": 12}, smoke={"saves": 12}),
    ],
    rtol=0.0,
    atol=0.0,
    targets={"tdhook_run": 1.2},
    baseline="plain",
    memory=False,
    timing={"warmup": 50, "min_repeats": 30, "max_repeats": 300, "budget_s": 3.0, "rounds": 3},
)

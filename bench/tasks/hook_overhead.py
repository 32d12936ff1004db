"""Hook overhead: a depth-12 width-10 MLP at batch 1, saving 0, 1 or 12 linear outputs per call.

Every library sets its saves up *per call* (as a user of a ``trace``/``run`` API does), runs the
model and tears down, all with gradients disabled. The table reports µs per call above the
plain forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Skip, Task
from ..models import sequential_mlp

DEPTH, WIDTH = 12, 10


def _inference(run: Any) -> Any:
    """Run a call with gradients disabled.

    Every library runs in inference mode: tdhook's ``run()`` disables gradients by default, so a
    plain forward recording autograd would be a slower baseline than ours.
    """

    @functools.wraps(run)
    def wrapper(self: Any) -> Any:
        with torch.no_grad():
            return run(self)

    return wrapper


def _build(params: Any) -> tuple[torch.nn.Sequential, torch.Tensor, list[str]]:
    model = sequential_mlp(DEPTH, WIDTH)
    x = torch.randn(1, WIDTH)
    linear = [str(i) for i in range(0, 2 * DEPTH - 1, 2)]  # names of the Linear layers
    return model, x, linear[: params["saves"]]


class Tdhook(Impl):
    """tdhook's deferred ``run`` API (the nnsight-like one): ``with hooked.run(x) as run: run.save(...)``."""

    name = "tdhook"
    label = "tdhook run()"
    inner = 20

    def setup(self, params):
        from tdhook.modules import HookedModule

        model, self.x, self.names = _build(params)
        self.hooked = HookedModule.from_module(model)
        self.saved: list[Any] = []

    @_inference
    def run(self):
        with self.hooked.run(self.x) as run:
            proxies = [run.save(name) for name in self.names]
        self.saved = [p.resolve() for p in proxies]

    def output(self):
        return dict(zip(self.names, self.saved))


class TdhookCaching(Impl):
    """``ActivationCaching`` entered and left around every call."""

    name = "tdhook_caching"
    label = "tdhook ActivationCaching"
    inner = 20

    def setup(self, params):
        from tdhook.latent import ActivationCaching

        model, self.x, self.names = _build(params)
        if not self.names:
            raise Skip("ActivationCaching needs at least one module to save")
        pattern = "(" + "|".join(self.names) + ")$"
        self.context = ActivationCaching(pattern, detach=False).prepare(model)

    @_inference
    def run(self):
        with self.context as hooked:
            hooked(self.x)
        self.cache = self.context.cache

    def output(self):
        return {name: self.cache[name] for name in self.names}


def _store(store: dict, key: str, module: Any, args: Any, output: Any) -> None:
    store[key] = output


class Raw(Impl):
    """``register_forward_hook`` per save, forward, ``remove()``."""

    name = "raw"
    label = "raw torch hooks"
    inner = 20

    def setup(self, params):
        self.model, self.x, self.names = _build(params)
        self.modules = [self.model.get_submodule(n) for n in self.names]
        self.forward = functools.partial(self.model, self.x)
        self.store: dict[str, Any] = {}

    @_inference
    def run(self):
        store: dict[str, Any] = {}
        handles = [
            m.register_forward_hook(functools.partial(_store, store, n))
            for n, m in zip(self.names, self.modules)
        ]
        try:
            self.forward()
        finally:
            for h in handles:
                h.remove()
        self.store = store

    def output(self):
        return dict(self.store)


class Plain(Impl):
    """The forward alone (the baseline the overheads are measured against)."""

    name = "plain"
    label = "plain forward"
    inner = 20

    def setup(self, params):
        self.model, self.x, self.names = _build(params)

    @_inference
    def run(self):
        self.out = self.model(self.x)

    def output(self):
        return None


class Nnsight(Impl):
    """``with model.trace(x): [model[i].output.save() ...]``."""

    name = "nnsight"
    label = "nnsight"
    inner = 20

    def setup(self, params):
        from nnsight import NNsight

        model, self.x, self.names = _build(params)
        self.model = NNsight(model)
        self.index = [int(n) for n in self.names]
        self.saved: list[Any] = []

    @_inference
    def run(self):
        model = self.model
        saved = []
        with model.trace(self.x):
            for i in self.index:
                saved.append(model[i].output.save())
        self.saved = saved

    def output(self):
        return dict(zip(self.names, self.saved))


TASK = Task(
    name="hook_overhead",
    title="Hook overhead: depth-12 width-10 MLP, batch 1, saves set up per call (µs above the plain forward)",
    env="nnsight",
    impls=[Tdhook, TdhookCaching, Raw, Nnsight, Plain],
    cases=[
        Case("saves=0", {"saves": 0}),
        Case("saves=1", {"saves": 1}, smoke={"saves": 1}),
        Case("saves=12", {"saves": 12}, smoke={"saves": 12}),
    ],
    rtol=0.0,
    atol=0.0,
    targets={"raw": 2.0},
    baseline="plain",
    memory=False,
    timing={"warmup": 20, "min_repeats": 30, "max_repeats": 300, "budget_s": 3.0, "rounds": 3},
)

"""Intervention (the paper's MLP task): save layer 0, set layer −2 to it, apply k "+1" edits.

On the depth-10 MLP: cache ``layers[0]``'s output, replace ``layers[-2]``'s output by it, add 1
to that output ``k`` times (k separate edits), and save the edited ``layers[-2]`` output and the
model output. Every library sets its edits up per call, under ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Task
from ..models import mlp


def _build(params: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    model = mlp(params["depth"], params["width"])
    x = torch.randn(params["batch"], params["width"], generator=torch.Generator().manual_seed(1))
    return model, x


def add_one(output: Any, **_: Any) -> torch.Tensor:
    return output + 1


class Tdhook(Impl):
    """``HookedModule.run``: ``get``, ``set`` to the proxy, k ``set(callback=+1)``, ``get``."""

    name = "tdhook"
    label = "tdhook run()"

    def setup(self, params):
        from tdhook.modules import HookedModule

        model, self.x = _build(params)
        self.hooked = HookedModule.from_module(model)
        self.k = params["k"]
        self.last = f"layers[{params['depth'] - 1}]"

    def run(self):
        with self.hooked.run(self.x) as run:
            h0 = run.get("layers[0]")
            run.set("layers[-2]", h0)
            for _ in range(self.k):
                run.set("layers[-2]", None, callback=add_one)
            edited = run.get("layers[-2]", cache_key="edited")
            out = run.get("layers[-1]", cache_key="out")
        self.result = {"h0": h0.resolve(), "edited": edited.resolve(), "out": out.resolve()}

    def output(self):
        return self.result


def _save(store: dict, key: str, module: Any, args: Any, output: Any) -> None:
    store[key] = output


def _replace(store: dict, key: str, module: Any, args: Any, output: Any) -> torch.Tensor:
    return store[key]


def _add_one(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output + 1


class Raw(Impl):
    """The same edits as raw forward hooks registered per call (the floor)."""

    name = "raw"
    label = "raw torch hooks"

    def setup(self, params):
        self.model, self.x = _build(params)
        self.k = params["k"]

    def run(self):
        layers = self.model.layers
        store: dict[str, Any] = {}
        hooks = [
            layers[0].register_forward_hook(functools.partial(_save, store, "h0")),
            layers[-2].register_forward_hook(functools.partial(_replace, store, "h0")),
        ]
        hooks += [layers[-2].register_forward_hook(_add_one) for _ in range(self.k)]
        hooks.append(layers[-2].register_forward_hook(functools.partial(_save, store, "edited")))
        try:
            with torch.no_grad():
                store["out"] = self.model(self.x)
        finally:
            for h in hooks:
                h.remove()
        self.result = store

    def output(self):
        return self.result


class Nnsight(Impl):
    """``with model.trace(x)``: save, assign ``.output``, k ``+1`` assignments, save."""

    name = "nnsight"
    label = "nnsight"

    def setup(self, params):
        from nnsight import NNsight

        model, self.x = _build(params)
        self.model = NNsight(model)
        self.k = params["k"]

    def run(self):
        model = self.model
        with torch.no_grad(), model.trace(self.x):
            h0 = model.layers[0].output.save()
            model.layers[-2].output = h0
            for _ in range(self.k):
                model.layers[-2].output = model.layers[-2].output + 1
            edited = model.layers[-2].output.save()
            out = model.output.save()
        self.result = {"h0": h0, "edited": edited, "out": out}

    def output(self):
        return self.result


TASK = Task(
    name="intervention",
    title="Intervention on the MLP (depth 10): save layer 0, set layer −2 to it, k +1 edits, save",
    env="nnsight",
    impls=[Tdhook, Raw, Nnsight],
    cases=[
        Case(
            "w256 b100 k5",
            {"depth": 10, "width": 256, "batch": 100, "k": 5},
            smoke={"depth": 4, "width": 8, "batch": 2, "k": 2},
        ),
        Case("w256 b100 k50", {"depth": 10, "width": 256, "batch": 100, "k": 50}),
        Case("w1000 b1000 k5", {"depth": 10, "width": 1000, "batch": 1000, "k": 5}, quick=False),
    ],
    rtol=1e-5,
    atol=1e-5,
    targets={"nnsight": 0.8},
    timing={"warmup": 5, "min_repeats": 20, "max_repeats": 200, "budget_s": 5.0, "rounds": 3},
)

"""What every task's *ours* side of an attribution method shares."""

from __future__ import annotations

from typing import Any

import torch

from .._harness import Impl


class OursAttribution(Impl):
    """An attribution method's context entered once in ``setup``; each run is one TensorDict call.

    Subclasses build the method and the model in ``setup`` and call :meth:`enter`; ``run``
    attributes to ``key`` (the model's input key), with a zero baseline when ``baseline`` is set.
    """

    name = "tdhook"
    key = "input"
    baseline = False

    def enter(self, method: Any, model: Any, x: torch.Tensor) -> None:
        from tensordict import TensorDict

        self.context = method.prepare(model)
        self.hooked = self.context.__enter__()
        self.x = x
        self.td_class = TensorDict

    def run(self):
        x = self.x
        td = self.td_class({self.key: x}, batch_size=x.shape[:1])
        if self.baseline:
            td["baseline", self.key] = torch.zeros_like(x)
        self.attr = self.hooked(td)["attr", self.key]

    def output(self):
        return self.attr

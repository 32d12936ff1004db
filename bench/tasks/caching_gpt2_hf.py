"""Caching every module of the Hugging Face GPT-2 small with the default rule (no callback).

``ActivationCaching(".+")`` stores every submodule's output: tensors as they are, the attention
modules' ``(attn_output, None)`` as ``(name, "0")``, the ``transformer`` model output by field.
Raw hooks store the raw outputs in a dict (the floor). The gate compares the 12 block outputs,
the 12 attention outputs and the logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Task
from ._gpt2 import N_LAYERS, SMOKE, block_names, build, first


def attn_names(n_layer: int = N_LAYERS) -> list[str]:
    return [f"{n}.attn" for n in block_names(n_layer)]


class Tdhook(Impl):
    """``ActivationCaching(".+")`` (no callback), entered and left around every call."""

    name = "tdhook"
    label = "tdhook ActivationCaching('.+')"

    def setup(self, params):
        from tensordict import TensorDict

        from tdhook.latent import ActivationCaching

        model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        self.context = ActivationCaching(".+").prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]
        )
        self.td_class = TensorDict

    def run(self):
        ids = self.ids
        with torch.no_grad(), self.context as hooked:
            self.td = hooked(self.td_class(input_ids=ids, batch_size=ids.shape[:1]))

    def output(self):
        cache = self.context.cache
        return {
            **{n: cache[n] for n in block_names(self.n_layer)},
            **{n: cache[n, "0"] for n in attn_names(self.n_layer)},
            "logits": self.td["logits"],
        }


def _store(store: dict, key: str, module: Any, args: Any, output: Any) -> None:
    store[key] = output


class Raw(Impl):
    """``register_forward_hook`` on every submodule storing its raw output, forward, ``remove()``."""

    name = "raw"
    label = "raw torch hooks"

    def setup(self, params):
        self.model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        self.modules = [(n, m) for n, m in self.model.named_modules() if n]

    def run(self):
        store: dict[str, Any] = {}
        handles = [m.register_forward_hook(functools.partial(_store, store, n)) for n, m in self.modules]
        try:
            with torch.no_grad():
                self.logits = self.model(self.ids).logits
        finally:
            for h in handles:
                h.remove()
        self.store = store

    def output(self):
        return {
            **{n: self.store[n] for n in block_names(self.n_layer)},
            **{n: first(self.store[n]) for n in attn_names(self.n_layer)},
            "logits": self.logits,
        }


TASK = Task(
    name="caching_gpt2_hf",
    title="Caching every module of the HF GPT-2 small with the default nesting rule, vs raw hooks",
    env="dev",
    impls=[Tdhook, Raw],
    cases=[Case("all modules (1,64)", {"batch": 1, "seq": 64}, smoke=SMOKE)],
    rtol=1e-5,
    atol=1e-5,
    targets={"raw": 1.15},
    timing={"warmup": 2, "min_repeats": 10, "max_repeats": 50, "budget_s": 10.0, "rounds": 3},
)

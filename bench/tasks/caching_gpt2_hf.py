"""Caching every module of the Hugging Face GPT-2 small with the default rule (no callback).

``ActivationCaching(".+")`` stores every submodule's output: tensors as they are, the attention
modules' ``(attn_output, None)`` as ``(name, "0")``, the ``transformer`` model output by field.
Raw hooks store the raw outputs in a dict (the floor). The model, the inputs and both set-ups
are :mod:`._gpt2`'s (scope ``all``); only what is stored and what the gate reads differ. The gate
compares the 12 block outputs, the 12 attention outputs and the logits.
"""

from __future__ import annotations

from typing import Any

from .._harness import Case, Task
from . import _gpt2
from ._gpt2 import N_LAYERS, SMOKE, block_names, first


def attn_names(n_layer: int = N_LAYERS) -> list[str]:
    return [f"{n}.attn" for n in block_names(n_layer)]


def _raw(output: Any) -> Any:
    return output


class Tdhook(_gpt2.Tdhook):
    """``ActivationCaching(".+")`` (no callback), entered and left around every call."""

    label = "tdhook ActivationCaching('.+')"
    callback = None
    out_key = "logits"

    def output(self):
        cache = self.context.cache
        return {
            **{n: cache[n] for n in block_names(self.n_layer)},
            **{n: cache[n, "0"] for n in attn_names(self.n_layer)},
            "logits": self.td["logits"],
        }


class Raw(_gpt2.Raw):
    """``register_forward_hook`` on every submodule storing its raw output, forward, ``remove()``."""

    keep = staticmethod(_raw)

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
    cases=[
        Case("all modules (1,64)", {"batch": 1, "seq": 64, "scope": "all"}, smoke={**SMOKE, "scope": "all"})
    ],
    rtol=1e-5,
    atol=1e-5,
    targets={"raw": 1.15},
    timing={"warmup": 2, "min_repeats": 10, "max_repeats": 50, "budget_s": 10.0, "rounds": 3},
)

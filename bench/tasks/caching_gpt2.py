"""Caching GPT-2 small's activations: tdhook vs raw torch hooks vs nnsight (see :mod:`._gpt2`)."""

from __future__ import annotations

from .._harness import Task
from ._gpt2 import CASES, Nnsight, Raw, Tdhook

TASK = Task(
    name="caching_gpt2",
    title="Caching GPT-2 small (random init): 12 block outputs or every submodule, vs raw hooks and nnsight",
    env="nnsight",
    impls=[Tdhook, Raw, Nnsight],
    cases=CASES,
    rtol=1e-5,
    atol=1e-5,
    targets={"raw": 1.05, "nnsight": 0.8},
    timing={"warmup": 2, "min_repeats": 10, "max_repeats": 50, "budget_s": 10.0, "rounds": 3},
)

"""Caching GPT-2 small's activations: tdhook vs raw torch hooks vs TransformerLens (see :mod:`._gpt2`)."""

from __future__ import annotations

from .._harness import Task
from ._gpt2 import CASES, Raw, Tdhook, TransformerLens

TASK = Task(
    name="caching_gpt2_tl",
    title="Caching GPT-2 small (random init): 12 block outputs or every hook point, vs raw hooks and TransformerLens",
    env="transformer-lens",
    impls=[Tdhook, Raw, TransformerLens],
    cases=CASES,
    rtol=1e-5,
    atol=1e-5,
    targets={"raw": 1.05},  # the issue sets no target vs TransformerLens
    timing={"warmup": 2, "min_repeats": 10, "max_repeats": 50, "budget_s": 10.0, "rounds": 3},
)

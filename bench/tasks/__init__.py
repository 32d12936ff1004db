"""Benchmark tasks, one module each; every module defines ``TASK`` (a :class:`bench._harness.Task`).

Peers are imported inside ``setup`` only, so every module imports in every environment.
"""

from __future__ import annotations

import importlib

from .._harness import Task

__all__ = ["TASKS", "load"]

#: Every task, in report order.
TASKS = (
    "ig_captum",
    "saliency_captum",
    "lrp_zennit",
    "caching_gpt2",
    "caching_gpt2_tl",
    "caching_gpt2_hf",
    "hook_overhead",
    "session_overhead",
    "tensordict_path",
    "intervention",
    "composed",
    "twonn_dense",
    "probes_sklearn",
    "attribution_patching_gpt2",
)


def load(name: str) -> Task:
    """Import ``bench.tasks.<name>`` and return its ``TASK``."""
    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}; available: {', '.join(TASKS)}.")
    return importlib.import_module(f"{__name__}.{name}").TASK

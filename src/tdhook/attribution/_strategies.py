"""The values that configure the gradient engine: samplers and combines (``tdhook.attribution``).

A :class:`Sampler` says where gradients are taken (the input itself; IG's path points;
GradientShap's random baselines) and how they are weighted and summed over those points; a
:class:`Combine` says how the summed gradients become attributions. Both are small frozen
values; per-call data lives in the :class:`Job`. A sampler reaches the model through a
:class:`Run` (extra no-grad passes, targets and seeds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from ..core import HookedModule, Installable
from ._capture import CallState
from ._options import GradientOptions
from ._targets import targets_and_seeds

__all__ = ["PLAIN", "Combine", "Job", "PlanEdits", "Run", "Sampler", "as_is"]


@dataclass
class Job:
    """Everything one call needs, in flat layout (batch ``N = prod(B)`` first)."""

    td: TensorDictBase
    batch: torch.Size
    n: int
    model_inputs: dict[NestedKey, torch.Tensor]
    attributed: list[NestedKey]
    additional: TensorDictBase | None
    #: Model outputs at the real inputs, batch ``B`` (set by a sampler's extra pass, if any).
    outputs: dict[NestedKey, Any] | None = None
    #: Per-sample target indices (flat ``(N,)``), from a ``targets`` tensor.
    target_index: torch.Tensor | None = None
    #: The ``inputs`` given to the :class:`Combine` (flat), when not the values differentiated.
    attr_inputs: dict[str, torch.Tensor] | None = None
    #: Per-call values of the sampler (baselines, draws...).
    extras: dict[str, Any] = field(default_factory=dict)


class Run:
    """The model, as one call's sampler may use it (extra no-grad passes, targets and seeds)."""

    def __init__(
        self,
        options: GradientOptions,
        state: CallState,
        hooked: HookedModule,
        call_next: Callable[..., Any],
        kwargs: Mapping[str, Any],
        *,
        seed_times_target: bool = False,
    ) -> None:
        self.options = options
        self.hooked = hooked
        self._state = state
        self._call_next = call_next
        self._kwargs = dict(kwargs)
        self._seed_times_target = seed_times_target

    def __call__(self, work: TensorDictBase, *, grad: bool = True) -> Any:
        """Run the model (its hooks act as set by the engine)."""
        if grad:
            return self._call_next(work, **self._kwargs)
        with torch.no_grad():
            return self._call_next(work, **self._kwargs)

    def record(self, work: TensorDictBase) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
        """One no-grad pass that records ``input_modules`` activations and target-module outputs."""
        state = self._state
        state.record = {}
        state.targets = {}
        try:
            out = self(work, grad=False)
        finally:
            record, state.record = state.record, None
            module_targets, state.targets = state.targets, {}
        return out, record, module_targets

    def targets_and_seeds(
        self,
        out: TensorDictBase,
        module_targets: dict[str, torch.Tensor],
        shape: torch.Size,
        additional: TensorDictBase | None,
        *,
        check_grad: bool = True,
        index: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """See :func:`~tdhook.attribution._targets.targets_and_seeds`."""
        return targets_and_seeds(
            self.options,
            self.hooked.out_keys,
            out,
            module_targets,
            shape,
            additional,
            check_grad=check_grad,
            index=index,
            seed_times_target=self._seed_times_target,
        )


class Sampler:
    """Where gradients are taken and how they are weighted: the input itself (one point).

    Subclasses (IG's path, GradientShap's draws) are frozen values; everything per call goes in
    ``job.extras``, so one sampler serves any number of calls and threads.
    """

    #: Points per forward/backward pass (``None``: all at once).
    chunk_size: int | None = None
    #: A memory budget: at most this many rows (``N × points``) per forward pass, or ``None``.
    max_rows: int | None = None

    def n_points(self, job: Job) -> int:
        """Number of sample points per input (IG steps, noise samples). 1: the input itself."""
        return 1

    def prepare(self, run: Run, job: Job) -> None:
        """Per-call set-up (read baselines, draw noise, extra passes), before the gradients."""

    def points(self, job: Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        """Attributed inputs at points ``start:stop``, flat ``(N * (stop - start), ...)``, N-major."""
        return {k: job.model_inputs[k] for k in job.attributed}

    def weights(self, job: Job, start: int, stop: int) -> torch.Tensor | None:
        """Weights of points ``start:stop`` in the sum over points (``None``: plain sum)."""
        return None

    def factors(self, job: Job, start: int, stop: int) -> dict[str, torch.Tensor] | None:
        """Per-point factors multiplying the gradients before the sum (e.g. GradientShap's ``x − b``)."""
        return None

    def module_transforms(
        self, job: Job, start: int, stop: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Replacements of ``input_modules`` outputs at points ``start:stop`` (leaves needing grad)."""
        return {}

    def finish(self, run: Run, job: Job, attrs: dict[str, torch.Tensor]) -> None:
        """Per-call extras (e.g. IG's convergence delta), written into ``job.td``."""


#: The sampler of single-point methods.
PLAIN = Sampler()


class Combine(Protocol):
    """Turn gradients into attributions.

    ``grads`` and ``inputs`` map each attribution sub-key (an in_key, or an ``input_modules``
    key) to ``(*B, *feature)`` tensors (``grads``: ``(*B, K, *feature)`` with
    ``separate_targets``, and ``inputs`` then ``(*B, 1, *feature)`` so that they broadcast).
    """

    def __call__(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...


def as_is(grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The :class:`Combine` returning the gradients (LRP's relevance, the plain gradient)."""
    return grads


#: ``f(hooked) -> [Installable, ...]``: reversible model edits a method adds to the plan.
PlanEdits = Callable[[HookedModule], list[Installable]]

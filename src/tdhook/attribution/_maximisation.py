"""Activation maximisation: gradient ascent on the inputs (``tdhook.attribution``).

``n_steps`` times: ``x ← clamp(x + alpha · ∂T/∂x, min_value, max_value)``, where ``T`` is the
sum of the (``init_attr_targets``-selected) outputs of ``modules_to_maximise``. Each step is one
forward and one backward pass of the gradient engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from ..core import HookedModule
from ._engine import GradientAttribution
from ._errors import KEYS, AttributionError
from ._options import AttrCallback, GradientOptions, module_names
from ._targets import key_str

__all__ = ["ActivationMaximisation"]


class ActivationMaximisation(GradientAttribution):
    """Optimise the inputs to maximise module activations; ``(attr, in_key)`` is the result.

    Args:
        modules_to_maximise: Module paths whose outputs are maximised (one string is one path).
        alpha: Step size of the (unnormalised) gradient ascent.
        n_steps: Number of steps.
        min_value: Lower clamp of the inputs.
        max_value: Upper clamp of the inputs.
        init_attr_targets: ``f(targets, additional) -> TensorDict`` selecting what to maximise.
        init_attr_grads: Seeds of the backward pass.
        additional_init_keys: Keys passed to the callbacks.
        attribution_key: Root key of the results.
        clean_intermediate_keys: Kept for compatibility (nothing intermediate is written).

    Raises:
        AttributionError: For no module, a bad ``n_steps``, a negative or non-finite ``alpha``,
            or ``min_value > max_value`` (a ``ValueError``).
    """

    def __init__(
        self,
        modules_to_maximise: Sequence[str],
        alpha: float = 0.1,
        n_steps: int = 10,
        min_value: float = -math.inf,
        max_value: float = math.inf,
        init_attr_targets: AttrCallback | None = None,
        init_attr_grads: AttrCallback | None = None,
        additional_init_keys: Sequence[NestedKey] | None = None,
        attribution_key: str = KEYS.attr,
        clean_intermediate_keys: bool = True,
    ) -> None:
        modules = module_names(modules_to_maximise, "modules_to_maximise")
        if not modules:
            raise AttributionError("modules_to_maximise is empty; pass module paths, e.g. ['layer3'].")
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
            raise AttributionError(
                f"n_steps must be a non-negative int, got {n_steps!r}. Pass e.g. n_steps=10."
            )
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise AttributionError(
                f"alpha must be a finite step size >= 0, got {alpha!r}. For gradient descent, negate the "
                "target in init_attr_targets."
            )
        if math.isnan(min_value) or math.isnan(max_value) or min_value > max_value:
            raise AttributionError(
                f"min_value={min_value!r} and max_value={max_value!r} must be numbers with min_value <= "
                "max_value (the clamp range of the inputs)."
            )
        self._configure(
            GradientOptions(
                use_inputs=True,
                use_outputs=False,
                target_modules=modules,
                init_attr_targets=init_attr_targets,
                init_attr_grads=init_attr_grads,
                additional_init_keys=additional_init_keys,
                attribution_key=attribution_key,
                clean_intermediate_keys=clean_intermediate_keys,
            )
        )
        self.alpha = float(alpha)
        self.n_steps = n_steps
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        run = self.run(hooked, call_next, kwargs)
        job = self.make_job(hooked, td)
        outputs = self.plain_outputs(run, job)
        current = {k: job.model_inputs[k].detach().clone() for k in job.attributed}
        for _ in range(self.n_steps):
            job.model_inputs.update(current)
            grads, _, _ = self.gradients(run, job)
            current = {
                k: (current[k] + self.alpha * grads[key_str(k)]).clamp(self.min_value, self.max_value)
                for k in job.attributed
            }
        for key in hooked.out_keys:
            td.set(key, outputs[key])
        for key, value in current.items():
            td.set(
                (self.options.attribution_key, key), value.reshape(torch.Size((*job.batch, *value.shape[1:])))
            )
        return td

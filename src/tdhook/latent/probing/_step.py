"""One probe step: parse the step type, check the inputs, then fit, update or predict.

Shared by :class:`~tdhook.latent.probing.Probe` and
:class:`~tdhook.latent.probing.BilinearProbe`. Inputs are checked before any estimator sees
them: an empty batch and (unless ``check_finite=False``) NaN/Inf activations or labels are
refused with tdhook errors, which :class:`~tdhook.latent.probing.Probing` prefixes with the
probed module.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch

from ..._checks import check_finite
from ...errors import InsufficientSamplesError, ProbingError

__all__ = ["StepType", "check_probe_inputs", "default_preprocess", "require_labels", "run_step"]


class StepType(str, Enum):
    """What a probe does with a batch."""

    FIT = "fit"
    PARTIAL_FIT = "partial_fit"
    PREDICT = "predict"

    @classmethod
    def parse(cls, value: Any) -> StepType:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            hint = (
                " Probing passes TensorDict entries to probes only when asked: use "
                'Probing(..., additional_keys=["labels", "step_type"]) and set td["step_type"] = "fit" or "predict".'
                if value is None
                else ""
            )
            raise ProbingError(
                f"step_type must be 'fit' or 'predict', got {value!r} ('partial_fit' also trains a streaming "
                f"estimator on one more batch).{hint}"
            ) from None


def _partial_fit(estimator: Any, *xs: Any, labels: Any) -> None:
    if not hasattr(estimator, "partial_fit"):
        raise ProbingError(
            f"{type(estimator).__name__} has no partial_fit, so it cannot be trained batch by batch. Use "
            "step_type='fit', or a streaming estimator (tdhook.latent.stats.StreamingLinearRegression, "
            "StreamingLogisticRegression, or any scikit-learn estimator with partial_fit)."
        )
    estimator.partial_fit(*xs, labels)


def _as_checkable(value: Any) -> torch.Tensor | None:
    """``value`` as a tensor when it is one or an array (NumPy...), else None (not checked)."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def check_probe_inputs(xs: tuple[Any, ...], labels: Any, step: StepType, finite: bool) -> None:
    """Refuse an empty batch, and NaN/Inf activations or labels, before the estimator sees them.

    Raises:
        InsufficientSamplesError: If an input has 0 samples (rows).
        NonFiniteInputError: If ``finite`` and an input (or, when fitting, a label) is NaN/Inf.
    """
    names = ("X",) if len(xs) == 1 else tuple(f"h{i + 1}" for i in range(len(xs)))
    for name, value in zip(names, xs, strict=True):
        x = _as_checkable(value)
        if x is None:
            continue
        if x.ndim and x.shape[0] == 0:
            raise InsufficientSamplesError(
                f"The probe's input {name} has 0 samples (shape {tuple(x.shape)}): the batch is empty, so there is "
                f"nothing to {step.value} on. Call the hooked model on a batch with at least one sample."
            )
        if finite:
            check_finite(x, name=name, expected=_nonfinite_fix(step, "activations"))
    y = _as_checkable(labels) if step is not StepType.PREDICT else None
    if finite and y is not None:
        check_finite(y, name="labels", expected=_nonfinite_fix(step, "labels"))


def _nonfinite_fix(step: StepType, what: str) -> str:
    return (
        f"the estimator cannot {step.value} on {what} that are not finite. Find where they appear (the "
        "model's inputs or weights) and drop those samples, or pass check_finite=False to the probe manager "
        "if the estimator handles NaN itself."
    )


def run_step(
    estimator: Any,
    step: StepType,
    xs: tuple[Any, ...],
    labels: Any,
    fit_callback: Callable[[Any, Any], Any] | None,
    predict_callback: Callable[[Any, Any], Any],
    check_finite: bool = True,
) -> None:
    """Fit, update or predict with ``estimator`` on ``xs`` (checked first) and report to the callbacks."""
    check_probe_inputs(xs, labels, step, check_finite)
    if step is StepType.PARTIAL_FIT:
        _partial_fit(estimator, *xs, labels=labels)
    elif step is StepType.FIT:
        estimator.fit(*xs, y=labels)
        if fit_callback is not None:
            fit_callback(estimator.predict(*xs), labels)
    else:
        predict_callback(estimator.predict(*xs), labels)


def default_preprocess(data: Any) -> Any:
    """Detach and flatten every non-batch dimension: ``[B, T, D] -> [B, T*D]``."""
    if isinstance(data, tuple):
        if len(data) != 1:
            raise ProbingError(
                f"The probed value is a tuple of {len(data)} items (e.g. a transformer block's output); pass "
                "data_preprocess_callback=lambda data: data[0].detach().flatten(1) to pick one."
            )
        data = data[0]
    if not isinstance(data, torch.Tensor):
        raise ProbingError(
            f"Probes receive tensors, got {type(data).__name__}; pass a data_preprocess_callback returning one."
        )
    data = data.detach()
    return data.flatten(1) if data.ndim > 1 else data.unsqueeze(1)


def require_labels(labels: Any, step: StepType) -> None:
    if labels is None and step is not StepType.PREDICT:
        raise ProbingError(
            "Probe got no labels to fit on. Set td['labels'] and pass "
            'Probing(..., additional_keys=["labels", "step_type"]).'
        )

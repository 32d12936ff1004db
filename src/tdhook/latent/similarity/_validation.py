"""Input validation shared by the two-view similarity estimators (tdhook 0.1 §8.6 semantics)."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor

from ..._checks import as_float, check_finite, read_key
from ...errors import IncompatibleInputsError, InsufficientSamplesError

__all__ = ["read_pair"]


def read_pair(
    td: TensorDictBase, key_a: NestedKey, key_b: NestedKey, *, owner: str, method: str
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Read two views ``(..., N, D_a)`` and ``(..., N, D_b)`` and flatten them to ``(B, N, D)``.

    Feature widths may differ; batch shapes, sample counts and devices must match. Integer
    inputs are promoted to float32.

    Args:
        td: The TensorDict.
        key_a: Key of the first view.
        key_b: Key of the second view.
        owner: Estimator class name (for messages).
        method: Method name used in the shape message (``"CKA"``, ``"Information Imbalance"``).

    Returns:
        Both views flattened and the common batch shape.

    Raises:
        MissingKeyError: If a key is absent.
        IncompatibleInputsError: On rank, batch-shape, sample-count or device mismatch.
        NonFiniteInputError: If a view holds NaN or inf (naming its key).
    """
    a = read_key(td, key_a, owner=owner)
    b = read_key(td, key_b, owner=owner)
    for key, x in ((key_a, a), (key_b, b)):
        if x.ndim < 2:
            raise IncompatibleInputsError(
                f"{method} expects tensors with shape (N, D) or (..., N, D); got shape {tuple(x.shape)} at "
                f"{key!r}. Add a feature dimension with x.unsqueeze(-1)."
            )
    if a.shape[:-2] != b.shape[:-2]:
        raise IncompatibleInputsError(
            f"Expected matching batch shapes, got {tuple(a.shape[:-2])} at {key_a!r} and {tuple(b.shape[:-2])} "
            f"at {key_b!r}; both views must hold the same datasets."
        )
    if a.shape[-2] != b.shape[-2]:
        raise IncompatibleInputsError(
            f"Expected matching sample counts, got {a.shape[-2]} at {key_a!r} and {b.shape[-2]} at {key_b!r}; "
            f"row i of both views must describe the same sample."
        )
    if a.device != b.device:
        raise IncompatibleInputsError(
            f"Expected both tensors on the same device, got {a.device} at {key_a!r} and {b.device} at "
            f"{key_b!r}; move one with .to(device)."
        )
    for key, x in ((key_a, a), (key_b, b)):
        if x.shape[-1] == 0:
            raise IncompatibleInputsError(
                f"{method} got 0 features at {key!r} (shape {tuple(x.shape)}): every sample coincides, so the "
                "views cannot be compared. Pass views with at least one feature."
            )
    if a.shape[-2] == 0 and a.numel() == 0 and math.prod(a.shape[:-2]) > 0:
        raise InsufficientSamplesError(
            f"{method} got 0 samples at {key_a!r} and {key_b!r} (shapes {tuple(a.shape)} and {tuple(b.shape)}); "
            "pass at least 2 samples per view."
        )
    a, b = as_float(a), as_float(b)
    check_finite(a, name=f"{owner} input {key_a!r}")
    check_finite(b, name=f"{owner} input {key_b!r}")
    batch = tuple(a.shape[:-2])
    n = a.shape[-2]
    size = math.prod(batch)
    return a.reshape(size, n, a.shape[-1]), b.reshape(size, n, b.shape[-1]), batch


def empty_output(batch: tuple[int, ...], device: torch.device) -> Tensor:
    """The empty float32 result of an empty flattened batch."""
    return torch.empty(batch, dtype=torch.float32, device=device)

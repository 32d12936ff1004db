"""Helpers shared by the dimension estimators: argument checks, input reading, ``k="auto"``, repr."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor

from ..._checks import as_float, check_chunk_size, check_finite, check_number, format_repr, read_key
from ...errors import IncompatibleInputsError, InvalidInputError, InvalidParameterError

__all__ = [
    "AUTO",
    "KSpec",
    "auto_k",
    "check_eps",
    "check_k",
    "init_io",
    "read_points",
]

AUTO: Literal["auto"] = "auto"
KSpec = int | Literal["auto"]


def check_k(k: Any, *, minimum: int, message: str) -> KSpec:
    """Validate a neighbourhood size: ``"auto"`` or an ``int >= minimum``.

    Args:
        k: The value passed by the user.
        minimum: Smallest valid integer.
        message: The reference's message for a too-small ``k`` (e.g. ``"k must be at least 1"``).

    Raises:
        InvalidInputError: If ``k`` is neither an ``int`` nor ``"auto"`` (a ``TypeError``).
        InvalidParameterError: If ``k < minimum`` (a ``ValueError``).
    """
    if isinstance(k, str) and k == AUTO:
        return AUTO
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInputError(f"k must be an int or 'auto', got {k!r} of type {type(k).__name__}.")
    if k < minimum:
        raise InvalidParameterError(f"{message}, got k={k}; pass k='auto' or an int >= {minimum}.")
    return k


def check_eps(eps: Any) -> float:
    """Validate the duplicate threshold (a number ``>= 0``)."""
    return check_number(eps, name="eps", minimum=0, hint="Distances <= eps count as duplicates; e.g. 1e-5.")


def auto_k(n_points: int) -> int:
    """``k="auto"``: ``max(2, min(floor(sqrt(N)), (N - 1) // 2))``."""
    return max(2, min(math.isqrt(n_points), (n_points - 1) // 2))


def read_points(td: TensorDictBase, key: NestedKey, *, owner: str) -> tuple[Tensor, tuple[int, ...]]:
    """Read ``(..., N, D)`` points and flatten them to ``(B, N, D)``.

    Returns:
        The float points and the leading batch shape.

    Raises:
        MissingKeyError: If ``key`` is absent.
        IncompatibleInputsError: If the entry has fewer than 2 dimensions.
        NonFiniteInputError: If it holds NaN or inf (the key is named).
    """
    x = read_key(td, key, owner=owner)
    if x.ndim < 2:
        raise IncompatibleInputsError(
            f"{owner} expects points of shape (N, D) or (..., N, D) at {key!r}, got shape {tuple(x.shape)}; "
            f"add a feature dimension with x.unsqueeze(-1)."
        )
    if x.shape[-1] == 0:
        raise IncompatibleInputsError(
            f"{owner} got points with 0 features at {key!r} (shape {tuple(x.shape)}): every point coincides, so "
            "no dimension can be estimated. Pass points with at least one feature."
        )
    x = as_float(x)
    check_finite(x, name=f"{owner} input {key!r}")
    batch = tuple(x.shape[:-2])
    return x.reshape(math.prod(batch), x.shape[-2], x.shape[-1]), batch


def init_io(
    estimator: Any,
    in_key: Any,
    out_key: Any,
    eps: Any,
    chunk_size: Any,
    extra_out_keys: list[Any] | None = None,
) -> None:
    """Validate and set the attributes every estimator shares: keys, ``eps`` and ``chunk_size``."""
    estimator.in_key = in_key
    estimator.out_key = out_key
    estimator.eps = check_eps(eps)
    estimator.chunk_size = check_chunk_size(chunk_size)
    estimator.in_keys = [in_key]
    estimator.out_keys = [out_key, *(extra_out_keys or [])]


def read_knn_points(estimator: Any, td: TensorDictBase) -> tuple[Tensor, tuple[int, ...], int, int]:
    """The points at ``estimator.in_key``, the batch shape, ``N`` and the resolved ``k`` (``"auto"``: from ``N``)."""
    x, batch = read_points(td, estimator.in_key, owner=type(estimator).__name__)
    n = x.shape[-2]
    return x, batch, n, auto_k(n) if estimator.k == AUTO else int(estimator.k)


class KnnEstimator(TensorDictModuleBase):
    """Base of the per-point k-NN estimators: ``k`` (or ``"auto"``), keys, ``eps``, ``chunk_size``."""

    #: The smallest valid ``k`` and the message for a smaller one.
    k_minimum: ClassVar[tuple[int, str]] = (1, "k must be at least 1")

    def __init__(
        self,
        k: KSpec = AUTO,
        in_key: NestedKey = "data",
        out_key: NestedKey = "dimension",
        eps: float = 1e-5,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        minimum, message = self.k_minimum
        self.k = check_k(k, minimum=minimum, message=message)
        init_io(self, in_key, out_key, eps, chunk_size)

    def __repr__(self) -> str:
        return format_repr(self, k=self.k, eps=self.eps)

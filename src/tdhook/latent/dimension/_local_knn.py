"""Local (per-point) intrinsic dimension from k-th and 2k-th neighbour distances."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase

from ...errors import InsufficientSamplesError
from ._common import KnnEstimator, read_knn_points
from ._knn import knn

__all__ = ["LocalKnnDimensionEstimator"]


class LocalKnnDimensionEstimator(KnnEstimator):
    """Per-point dimension ``d(x) = ln 2 / ln(R_2k(x) / R_k(x))``.

    ``R_k`` and ``R_2k`` are the distances to the k-th and 2k-th nearest valid neighbours
    (neighbours closer than ``eps`` count as duplicates and are skipped). In a ``d``-dimensional
    uniform neighbourhood the number of points within radius ``R`` grows like ``R^d``, so
    doubling the count multiplies the radius by ``2^{1/d}``. The estimate is NaN where a point
    lacks 2k valid neighbours or ``R_2k <= R_k``.

    Args:
        k: Neighbourhood size, an ``int > 1`` or ``"auto"``
            (``max(2, min(floor(sqrt(N)), (N - 1) // 2))``).
        in_key: Key of the ``(N, D)`` or ``(..., N, D)`` points.
        out_key: Key of the float32 per-point estimates, shape ``(..., N)``.
        eps: Duplicate threshold.
        chunk_size: Rows per neighbour-search block (``None``: automatic).

    Raises:
        InvalidInputError: If ``k`` is neither an int nor ``"auto"`` (a ``TypeError``).
        InvalidParameterError: If ``k <= 1``.
        InsufficientSamplesError: At call time, if ``N < 2k + 1``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> circle = torch.randn(1000, 2)
        >>> circle = circle / circle.norm(dim=1, keepdim=True)
        >>> td = LocalKnnDimensionEstimator(k=10)(TensorDict({"data": circle}))
        >>> round(float(td["dimension"].nanmedian()))
        1
    """

    k_minimum = (2, "k must be greater than 1")

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Estimate the per-point dimension of ``tensordict[in_key]`` and write it to ``out_key``."""
        x, batch, n, k = read_knn_points(self, tensordict)
        if n < 2 * k + 1:
            raise InsufficientSamplesError(
                f"At least 2k+1 points required for local KNN (k={k}), got {n} at {self.in_key!r}; "
                f"lower k or pass more points."
            )
        dist = knn(x, 2 * k, eps=self.eps, chunk_size=self.chunk_size).distances.to(torch.float64)
        r_k, r_2k = dist[..., k - 1], dist[..., 2 * k - 1]
        ok = torch.isfinite(r_2k) & (r_2k > r_k)
        dim = torch.where(ok, math.log(2.0) / torch.log(torch.where(ok, r_2k / r_k, 2.0)), torch.nan)
        tensordict.set(self.out_key, dim.to(torch.float32).reshape(*batch, n))
        return tensordict

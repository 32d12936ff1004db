"""Compatibility path (tdhook 0.1): ``tdhook.latent.dimension_estimation.local_pca``.

Besides :class:`LocalPcaDimensionEstimator` (which lives in :mod:`tdhook.latent.dimension` and
computes every local spectrum in batched torch), this module keeps the three helpers that 0.1's
module defined and that 0.1-era code imports: :func:`_dim_from_eigenvalues_maxgap`,
:func:`_dim_from_eigenvalues_ratio` and :func:`_local_pca` (one PCA object per point, as 0.1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InvalidParameterError
from ..dimension import LocalPcaDimensionEstimator, knn

__all__ = ["LocalPcaDimensionEstimator"]

_GAP_FLOOR = 1e-15
"""Added to the denominator of consecutive eigenvalue ratios (``maxgap``)."""

_CRITERIA = ("maxgap", "ratio")


def _dim_from_eigenvalues_maxgap(eigenvalues: np.ndarray) -> int:
    """One plus the index of the largest ratio ``λ_i / (λ_{i+1} + 1e-15)``; 1 for fewer than two values.

    Args:
        eigenvalues: 1-D eigenvalues in decreasing order.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size < 2:
        return 1
    return int(np.argmax(lam[:-1] / (lam[1:] + _GAP_FLOOR))) + 1


def _dim_from_eigenvalues_ratio(eigenvalues: np.ndarray, alpha: float) -> int:
    """Number of eigenvalues strictly above ``alpha`` times the first one, at least 1 (1 if empty).

    Args:
        eigenvalues: 1-D eigenvalues in decreasing order.
        alpha: Threshold relative to the first (largest) eigenvalue.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0:
        return 1
    return max(1, int(np.sum(lam > alpha * lam[0])))


def _local_pca(data: Tensor, k: int, eps: float, criterion: str, alpha: float, pca_cls: Any) -> Tensor:
    """Per-point local-PCA dimension of ``(N, D)`` points, with one ``pca_cls`` fit per point.

    The neighbourhood of a point is the point and its ``k`` nearest distinct neighbours
    (neighbours at distance ``<= eps`` are duplicates and do not count). A point with fewer than
    ``k`` valid neighbours gets NaN. Otherwise ``pca_cls(n_components=None)`` is fitted on the
    neighbourhood (float64 NumPy) and its ``explained_variance_`` is turned into a dimension by
    ``criterion``: ``"maxgap"`` (:func:`_dim_from_eigenvalues_maxgap`) or ``"ratio"``
    (:func:`_dim_from_eigenvalues_ratio`); an empty spectrum gives 1.

    Args:
        data: ``(N, D)`` floating points.
        k: Neighbours per point (``>= 1``).
        eps: Duplicate threshold.
        criterion: ``"maxgap"`` or ``"ratio"``.
        alpha: Threshold of ``"ratio"``.
        pca_cls: A scikit-learn-style PCA class, e.g. ``sklearn.decomposition.PCA``.

    Returns:
        ``(N,)`` float32 estimates on ``data``'s device.

    Raises:
        InvalidParameterError: ``ValueError("Unknown criterion: ...")`` for another criterion
            (checked before any work), or ``k < 1``.
    """
    if criterion not in _CRITERIA:
        raise InvalidParameterError(f"Unknown criterion: {criterion!r}; expected one of {list(_CRITERIA)}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParameterError(f"k must be an int >= 1, got {k!r}.")
    n = data.shape[0]
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=data.device)
    if n <= k:  # no point can have k neighbours
        return out
    points = data.detach()
    idx = knn(points, k, eps=eps).indices.cpu()
    numpy_points = points.cpu().to(torch.float64).numpy()
    for i in range(n):
        if int(idx[i, -1]) < 0:  # fewer than k valid neighbours
            continue
        hood = numpy_points[[i, *idx[i].tolist()]]
        eigenvalues = np.asarray(pca_cls(n_components=None).fit(hood).explained_variance_)
        if eigenvalues.size == 0:
            out[i] = 1.0
        elif criterion == "maxgap":
            out[i] = _dim_from_eigenvalues_maxgap(eigenvalues)
        else:
            out[i] = _dim_from_eigenvalues_ratio(eigenvalues, alpha)
    return out

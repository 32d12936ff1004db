"""Exact k-nearest neighbours in row chunks: the neighbour search behind every estimator here.

Memory stays ``O(N·k)`` plus one ``chunk × N`` block: the full ``N × N`` distance matrix is never
built. For the Euclidean distance (``p=2``) each block ranks candidates with one matrix product
in the input precision (on mean-centred points), whose rounding error scales with the squared
norm of the points; the distances of the best ``k + margin`` candidates are then recomputed
from coordinate differences, accurate to the rounding of the distance itself, and sorted by
``(distance, index)``. The result does not depend on the chunk size. Rows for which duplicates
(distance ``<= eps``) crowd out the candidates are searched again directly over all points.

:mod:`tdhook.latent.similarity` reuses :func:`prepare_points` and :func:`block_keys` for its
rank computations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..._checks import as_float, check_finite, check_number
from ...errors import (
    IncompatibleInputsError,
    InsufficientSamplesError,
    InvalidInputError,
    InvalidParameterError,
)

__all__ = ["KnnResult", "PreparedPoints", "block_keys", "default_chunk_size", "knn", "prepare_points"]

BLOCK_ELEMENTS = 1 << 25
"""Target number of elements of one ``chunk × N`` distance block (and one refinement block)."""

_MIN_MARGIN = 8
"""Extra candidates kept beyond ``k`` before the exact refinement."""


class KnnResult(NamedTuple):
    """Nearest neighbours of every point, nearest first.

    Attributes:
        distances: ``(..., N, k)`` distances, in the input's floating dtype; ``inf`` where a
            point has fewer than ``k`` valid neighbours.
        indices: ``(..., N, k)`` int64 indices into the ``N`` points; ``-1`` where the distance
            is ``inf``.
    """

    distances: Tensor
    indices: Tensor


class PreparedPoints(NamedTuple):
    """Points ready for :func:`block_keys` (see :func:`prepare_points`)."""

    points: Tensor
    sq_norms: Tensor | None
    p: float


def default_chunk_size(n_points: int, width: int = 1) -> int:
    """Rows per block so that a block has about :data:`BLOCK_ELEMENTS` elements.

    Args:
        n_points: Number of columns of a distance block (the points searched).
        width: Elements per row and column pair beyond one (e.g. ``candidates × D`` for a
            refinement block); the larger of ``n_points`` and ``width`` is used.
    """
    return max(1, min(n_points, BLOCK_ELEMENTS // max(n_points, width, 1)))


def prepare_points(x: Tensor, p: float = 2.0) -> PreparedPoints:
    """Centre the points and cache squared norms for :func:`block_keys`.

    Args:
        x: ``(N, D)`` floating points (the dtype of the keys).
        p: Minkowski exponent.
    """
    if p == 2:
        centred = x - x.mean(0)
        return PreparedPoints(centred, (centred * centred).sum(-1), 2.0)
    return PreparedPoints(x, None, p)


def block_keys(prepared: PreparedPoints, start: int, stop: int) -> Tensor:
    """Keys ordering the distances from rows ``start:stop`` to all points, shape ``(stop-start, N)``.

    For ``p=2`` the key is ``‖y‖² - 2 x·y`` (the squared distance minus a per-row constant, so
    the order within a row is the distance order); otherwise it is the Minkowski distance.
    Self entries are not masked.
    """
    rows = prepared.points[start:stop]
    if prepared.sq_norms is not None:
        return torch.addmm(prepared.sq_norms.unsqueeze(0), rows, prepared.points.T, beta=1.0, alpha=-2.0)
    return torch.cdist(rows, prepared.points, p=prepared.p)


def knn(
    x: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    eps: float | None = None,
    p: float = 2.0,
) -> KnnResult:
    """Exact ``k`` nearest neighbours of every point among the others, computed in row chunks.

    A point is never its own neighbour. With ``eps`` set, points at distance ``<= eps`` are
    treated as duplicates and skipped (their distance is ``inf`` and they sort last), as the
    dimension estimators of tdhook 0.1 did. Ties are broken by the lower index.

    Args:
        x: ``(N, D)`` points, or ``(..., N, D)`` for several datasets searched separately.
            Integer tensors are promoted to float32.
        k: Number of neighbours, ``1 <= k <= N - 1``.
        chunk_size: Rows per block; by default a block holds about 32M elements.
        eps: Distances ``<= eps`` are ignored; ``None`` ignores only the point itself.
        p: Minkowski exponent of the distance (``2`` is Euclidean).

    Returns:
        A :class:`KnnResult` of ``(..., N, k)`` distances and indices.

    Raises:
        InsufficientSamplesError: If ``N < k + 1``.
        NonFiniteInputError: If ``x`` holds NaN or inf.
        IncompatibleInputsError: If ``x`` has fewer than 2 dimensions.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0], [3.0]])
        >>> knn(x, 1).indices.squeeze(-1)
        tensor([1, 0, 1])
    """
    if not isinstance(x, Tensor):
        raise InvalidInputError(
            f"knn expects a tensor of shape (N, D) or (..., N, D), got {type(x).__name__}."
        )
    if x.ndim < 2:
        raise IncompatibleInputsError(
            f"knn expects points of shape (N, D) or (..., N, D), got shape {tuple(x.shape)}; "
            f"add a feature dimension with x.unsqueeze(-1)."
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInputError(f"k must be an int, got {k!r} of type {type(k).__name__}.")
    if k < 1:
        raise InvalidParameterError(f"k must be at least 1, got {k}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise InvalidParameterError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if eps is not None:
        check_number(eps, name="eps", minimum=0, hint="Pass None to keep duplicates, or e.g. 1e-5.")
    if not (isinstance(p, (int, float)) and p > 0):
        raise InvalidParameterError(f"p must be a number > 0, got {p!r}.")
    x = as_float(x)
    n, d = x.shape[-2], x.shape[-1]
    if n < k + 1:
        raise InsufficientSamplesError(
            f"knn with k={k} needs at least k+1 = {k + 1} points per dataset, got {n}; lower k or pass more points."
        )
    if d == 0:
        raise IncompatibleInputsError(
            f"knn got points with 0 features (shape {tuple(x.shape)}): every point coincides, so neighbours "
            "are undefined. Pass points with at least one feature."
        )
    check_finite(x, name="knn input x")
    batch = x.shape[:-2]
    flat = x.reshape(math.prod(batch), n, d)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    distances = torch.empty(flat.shape[0], n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(flat.shape[0], n, k, dtype=torch.long, device=x.device)
    for b in range(flat.shape[0]):  # datasets, not points
        dist_b, idx_b = _knn_one(flat[b].to(compute), k, chunk_size=chunk_size, eps=eps, p=float(p))
        distances[b], indices[b] = dist_b.to(x.dtype), idx_b
    return KnnResult(distances.reshape(*batch, n, k), indices.reshape(*batch, n, k))


def _knn_one(
    x: Tensor, k: int, *, chunk_size: int | None, eps: float | None, p: float
) -> tuple[Tensor, Tensor]:
    """Neighbours within one ``(N, D)`` dataset (float32 or float64); returns distances and indices."""
    n, d = x.shape
    n_cand = min(n - 1, k + max(_MIN_MARGIN, k // 4))
    chunk = chunk_size or default_chunk_size(n, n_cand * d)
    exact = x  # differences in the input precision: memory-bound, so float32 halves the traffic
    prepared = prepare_points(x, p)
    out_d = torch.empty(n, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = torch.arange(start, stop, device=x.device)
        keys = block_keys(prepared, start, stop)
        keys[rows - start, rows] = math.inf
        cand = keys.topk(n_cand, dim=1, largest=False, sorted=False).indices
        del keys
        dist, idx = _refine(exact, rows, cand, eps=eps, p=p)
        if eps is not None and n_cand < n - 1:
            # duplicates may have filled the candidate list: search those rows over all points
            short = ~torch.isfinite(dist[:, k - 1])
            if bool(short.any()):
                full_d, full_i = _full_rows(exact, rows[short], k, eps=eps, p=p)
                dist, idx = dist[:, :k].clone(), idx[:, :k].clone()
                dist[short], idx[short] = full_d, full_i
        out_d[start:stop], out_i[start:stop] = dist[:, :k], idx[:, :k]
    return out_d, out_i


def _sorted_by_distance(dist: Tensor, idx: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    """Mask duplicates, then sort each row by ``(distance, index)``."""
    if eps is not None:
        dist = dist.masked_fill(dist <= eps, math.inf)
    dist, order = dist.sort(dim=1, stable=True)
    idx = idx.gather(1, order)
    tied = (dist[:, 1:] == dist[:, :-1]).any(dim=1)  # also true for two inf: harmless extra work
    if bool(tied.any()):  # exact ties (lattices, symmetric data): order them by index
        rows = tied.nonzero().squeeze(1)
        sub_idx, perm = idx[rows].sort(dim=1)
        sub_dist, order = dist[rows].gather(1, perm).sort(dim=1, stable=True)
        dist[rows], idx[rows] = sub_dist, sub_idx.gather(1, order)
    return dist, idx.masked_fill(dist == math.inf, -1)


def _refine(
    exact: Tensor, rows: Tensor, cand: Tensor, *, eps: float | None, p: float
) -> tuple[Tensor, Tensor]:
    """Distances to the candidates from coordinate differences, sorted by ``(distance, index)``."""
    diff = exact[cand] - exact[rows].unsqueeze(1)
    dist = torch.linalg.vector_norm(diff, ord=p, dim=-1)
    return _sorted_by_distance(dist, cand, eps)


def _full_rows(exact: Tensor, rows: Tensor, k: int, *, eps: float, p: float) -> tuple[Tensor, Tensor]:
    """Exact search of ``rows`` over all points (used when duplicates crowd the candidates)."""
    dist = torch.cdist(exact[rows], exact, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    dist[torch.arange(rows.numel(), device=rows.device), rows] = math.inf
    idx = torch.arange(exact.shape[0], device=exact.device).expand_as(dist)
    dist, idx = _sorted_by_distance(dist, idx, eps)
    return dist[:, :k], idx[:, :k]

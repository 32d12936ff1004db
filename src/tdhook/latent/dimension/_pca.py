"""Per-point dimension from the PCA spectrum of each point's neighbourhood (local PCA, CA-PCA).

Both estimators gather each point's neighbourhood (from the chunked :func:`knn`), centre it, and
take the eigenvalues of its covariance with one batched ``torch.linalg.eigvalsh`` per chunk of
points, in float64. When the neighbourhood has fewer points than dimensions the ``n × n`` Gram
matrix is decomposed instead of the ``D × D`` covariance: the non-zero eigenvalues are the same.
The eigenvalues match scikit-learn's ``PCA().explained_variance_`` (``min(n, D)`` of them), so
scikit-learn is not needed.
"""

from __future__ import annotations

import enum

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor

from ..._checks import check_number, format_repr, parse_choice
from ...errors import InsufficientSamplesError, InvalidParameterError
from ._common import AUTO, KnnEstimator, KSpec, read_knn_points
from ._knn import BLOCK_ELEMENTS, knn

__all__ = ["CaPcaDimensionEstimator", "LocalPcaDimensionEstimator", "PcaCriterion"]

_GAP_FLOOR = 1e-15
"""Added to the denominator of eigenvalue ratios (``maxgap``)."""


class PcaCriterion(str, enum.Enum):
    """How :class:`LocalPcaDimensionEstimator` turns a local spectrum into a dimension."""

    MAXGAP = "maxgap"
    """``argmax_i λ_i / (λ_{i+1} + 1e-15) + 1``: the position of the largest spectral gap."""
    RATIO = "ratio"
    """Number of eigenvalues above ``alpha · λ_1`` (at least 1)."""


def _spectra(x: Tensor, idx: Tensor, *, include_self: bool) -> Tensor:
    """Descending PCA eigenvalues of every point's neighbourhood, shape ``(N, min(n, D))``.

    Args:
        x: ``(N, D)`` float64 points.
        idx: ``(N, m)`` neighbour indices (``-1`` entries are replaced by the point itself; the
            caller marks those rows invalid).
        include_self: Whether the neighbourhood contains the point itself.

    Points are processed in chunks sized so that one chunk's neighbourhoods and matrices hold
    about ``BLOCK_ELEMENTS / 4`` float64 values.
    """
    n_pts, dim = x.shape
    size = idx.shape[1] + int(include_self)
    width = min(size, dim)
    chunk = max(1, BLOCK_ELEMENTS // 4 // (size * dim + width * width))
    out = torch.empty(n_pts, width, dtype=torch.float64, device=x.device)
    self_idx = torch.arange(n_pts, device=x.device).unsqueeze(1)
    safe = torch.where(idx >= 0, idx, self_idx)
    if include_self:
        safe = torch.cat([self_idx, safe], dim=1)
    for start in range(0, n_pts, chunk):
        stop = min(n_pts, start + chunk)
        hood = x[safe[start:stop]]
        hood = hood - hood.mean(1, keepdim=True)
        mat = hood @ hood.transpose(1, 2) if size <= dim else hood.transpose(1, 2) @ hood
        eig = torch.linalg.eigvalsh(mat / (size - 1))
        out[start:stop] = eig.flip(-1).clamp_min(0.0)
    return out


def _check_sizes(n: int, needed: int, what: str, k: int, key: NestedKey) -> None:
    if n < needed:
        raise InsufficientSamplesError(
            f"{what} (k={k}), got {n} points at {key!r}; lower k or pass more points."
        )


class LocalPcaDimensionEstimator(KnnEstimator):
    """Per-point dimension from the PCA spectrum of the point and its k nearest valid neighbours.

    Args:
        k: Neighbours per point, an ``int >= 1`` or ``"auto"``
            (``max(2, min(floor(sqrt(N)), (N - 1) // 2))``).
        criterion: ``"maxgap"`` or ``"ratio"`` (see :class:`PcaCriterion`).
        alpha: Threshold of the ``"ratio"`` criterion, relative to the largest eigenvalue.
        in_key: Key of the ``(N, D)`` or ``(..., N, D)`` points.
        out_key: Key of the per-point estimates, shape ``(..., N)``, in the input's dtype; NaN
            where a point has fewer than ``k`` valid neighbours.
        eps: Duplicate threshold.
        chunk_size: Rows per neighbour-search block (``None``: automatic).

    Raises:
        InvalidParameterError: If ``k < 1`` or the criterion is unknown (raised here, at
            construction, rather than at the first call as tdhook 0.1 did).
        InsufficientSamplesError: At call time, if ``N < k + 1``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> plane = torch.randn(500, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)
        >>> td = LocalPcaDimensionEstimator(k=20)(TensorDict({"data": plane}))
        >>> float(td["dimension"].median())
        2.0
    """

    def __init__(
        self,
        k: KSpec = AUTO,
        criterion: PcaCriterion | str = PcaCriterion.MAXGAP,
        alpha: float = 0.05,
        in_key: NestedKey = "data",
        out_key: NestedKey = "dimension",
        eps: float = 1e-5,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(k, in_key, out_key, eps, chunk_size=chunk_size)
        self.criterion = parse_choice(PcaCriterion, criterion, name="criterion")
        self.alpha = check_number(
            alpha,
            name="alpha",
            minimum=0,
            maximum=1,
            hint="It is a fraction of the largest eigenvalue, e.g. 0.05.",
        )

    def __repr__(self) -> str:
        return format_repr(self, k=self.k, criterion=self.criterion.value, alpha=self.alpha, eps=self.eps)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Estimate the per-point dimension of ``tensordict[in_key]`` and write it to ``out_key``."""
        x, batch, n, k = read_knn_points(self, tensordict)
        _check_sizes(n, k + 1, "At least k+1 points required for local PCA", k, self.in_key)
        idx = knn(x, k, eps=self.eps, chunk_size=self.chunk_size).indices
        out = torch.empty(x.shape[0], n, dtype=torch.float64, device=x.device)
        for b in range(x.shape[0]):  # datasets, not points
            lam = _spectra(x[b].to(torch.float64), idx[b], include_self=True)
            dim = self._criterion(lam)
            out[b] = torch.where(idx[b, :, -1] >= 0, dim, torch.nan)
        tensordict.set(self.out_key, out.to(x.dtype).reshape(*batch, n))
        return tensordict

    def _criterion(self, lam: Tensor) -> Tensor:
        if self.criterion is PcaCriterion.MAXGAP:
            if lam.shape[1] < 2:
                return torch.ones(lam.shape[0], dtype=lam.dtype, device=lam.device)
            ratios = lam[:, :-1] / (lam[:, 1:] + _GAP_FLOOR)
            return (ratios.argmax(dim=1) + 1).to(lam.dtype)
        if self.criterion is PcaCriterion.RATIO:
            above = (lam > self.alpha * lam[:, :1]).sum(dim=1)
            return above.clamp_min(1).to(lam.dtype)
        raise InvalidParameterError(f"Unknown criterion: {self.criterion!r}")  # pragma: no cover


class CaPcaDimensionEstimator(KnnEstimator):
    """Curvature-adjusted local PCA (CA-PCA, Gilbert & O'Neill, 2023), per point.

    The neighbourhood is the ``k + 1`` nearest valid neighbours (the point excluded); ``r`` is
    the mean of the k-th and (k+1)-th neighbour distances and ``λ̂`` the neighbourhood's PCA
    eigenvalues divided by ``r²``, zero-padded to ``D``. A ``d``-ball of radius ``r`` has
    normalised eigenvalues ``1/(d+2)``; curvature moves variance into the normal directions.
    The estimate is the ``d ∈ 1..D`` minimising

    ``‖1/(d+2) - (λ̂[:d] + (3d+4)/(d(d+4)) · tail_d)‖₂ + 2 · tail_d``, with ``tail_d = Σ_{i≥d} λ̂_i``,

    evaluated for every ``d`` at once with cumulative sums. The estimate is NaN where a point
    has fewer than ``k + 1`` valid neighbours. Like tdhook 0.1's, it tends to over-estimate in
    high ambient dimension with noisy data: prefer TwoNN or local kNN there.

    Args:
        k: Neighbourhood size, an ``int >= 1`` or ``"auto"``.
        in_key: Key of the ``(N, D)`` or ``(..., N, D)`` points.
        out_key: Key of the per-point estimates, shape ``(..., N)``, in the input's dtype.
        eps: Duplicate threshold.
        chunk_size: Rows per neighbour-search block (``None``: automatic).

    Raises:
        InvalidParameterError: If ``k < 1``.
        InsufficientSamplesError: At call time, if ``N < k + 2``.
    """

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Estimate the per-point dimension of ``tensordict[in_key]`` and write it to ``out_key``."""
        x, batch, n, k = read_knn_points(self, tensordict)
        dim = x.shape[-1]
        _check_sizes(n, k + 2, "At least k+2 points required for CA-PCA", k, self.in_key)
        result = knn(x, k + 1, eps=self.eps, chunk_size=self.chunk_size)
        out = torch.empty(x.shape[0], n, dtype=torch.float64, device=x.device)
        for b in range(x.shape[0]):  # datasets, not points
            dist = result.distances[b].to(torch.float64)
            radius = 0.5 * (dist[:, k - 1] + dist[:, k])
            lam = _spectra(x[b].to(torch.float64), result.indices[b], include_self=False)
            lam_hat = torch.zeros(n, dim, dtype=torch.float64, device=x.device)
            ok = torch.isfinite(radius) & (radius > 0)
            lam_hat[:, : lam.shape[1]] = lam / torch.where(ok, radius, 1.0).unsqueeze(1) ** 2
            out[b] = torch.where(ok, ca_pca_dimension(lam_hat), torch.nan)
        tensordict.set(self.out_key, out.to(x.dtype).reshape(*batch, n))
        return tensordict


def ca_pca_dimension(lam_hat: Tensor) -> Tensor:
    """CA-PCA's choice of ``d`` for each row of normalised, descending, ``D``-padded eigenvalues.

    ``‖t_d - λ_d‖² = Σ_{i<d} (a_d - λ̂_i)² = d·a_d² - 2·a_d·S1_d + S2_d`` with
    ``a_d = 1/(d+2) - c_d · tail_d``, ``S1``/``S2`` the cumulative sums of ``λ̂`` and ``λ̂²``.

    Args:
        lam_hat: ``(N, D)`` float64.

    Returns:
        ``(N,)`` float64 dimensions in ``1..D``.
    """
    dim = lam_hat.shape[1]
    d = torch.arange(1, dim + 1, dtype=lam_hat.dtype, device=lam_hat.device)
    s1 = lam_hat.cumsum(dim=1)
    s2 = (lam_hat * lam_hat).cumsum(dim=1)
    tail = (s1[:, -1:] - s1).clamp_min(0.0)
    a = 1.0 / (d + 2) - (3 * d + 4) / (d * (d + 4)) * tail
    sq = (d * a * a - 2 * a * s1 + s2).clamp_min(0.0)
    objective = sq.sqrt() + 2 * tail
    return (objective.argmin(dim=1) + 1).to(lam_hat.dtype)

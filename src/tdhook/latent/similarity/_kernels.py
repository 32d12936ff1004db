"""Kernels and HSIC estimators behind the CKA estimators (batch and streaming).

Everything is computed in float64. The batch (biased) HSIC of an RBF kernel is accumulated over
``chunk × N`` blocks of the Gram matrices using
``tr(K H L H) = Σ K∘L - 2N Σ_i k̄_i l̄_i + N² k̄ l̄`` (``k̄_i`` row means, ``k̄`` grand mean), so
neither ``N × N`` matrix is held in memory.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from ...errors import UnknownKernelError
from ..dimension._knn import default_chunk_size

__all__ = [
    "CkaKernel",
    "cka_from_hsic",
    "gram_matrix",
    "hsic_unbiased",
    "linear_cka",
    "median_sigma",
    "parse_kernel",
    "rbf_cka",
]

_MEDIAN_SUBSET = 4096
"""Points used by the median heuristic (evenly spaced) when ``N`` is larger."""


class CkaKernel(str, enum.Enum):
    """Kernels of :class:`~tdhook.latent.similarity.CkaEstimator` and ``StreamingCka``."""

    LINEAR = "linear"
    """``k(x, y) = x·y``."""
    RBF = "rbf"
    """``k(x, y) = exp(-‖x - y‖² / (2σ²))``; ``σ`` defaults to the median heuristic."""


def parse_kernel(value: CkaKernel | str) -> CkaKernel:
    """Convert a kernel name once, at the boundary.

    Raises:
        UnknownKernelError: Naming the valid kernels (a ``NotImplementedError`` and a ``ValueError``).
    """
    try:
        return CkaKernel(value)
    except ValueError:
        valid = [k.value for k in CkaKernel]
        raise UnknownKernelError(f"Unsupported kernel {value!r}; expected one of {valid}.") from None


def _sq_dists(rows: Tensor, points: Tensor, row_sq: Tensor, sq: Tensor) -> Tensor:
    return torch.addmm(row_sq.unsqueeze(1) + sq.unsqueeze(0), rows, points.T, alpha=-2.0).clamp_min_(0.0)


def median_sigma(x: Tensor) -> Tensor:
    """Median heuristic bandwidth ``σ = sqrt(median_{i≠j} ‖x_i - x_j‖²)`` of ``(N, D)`` float64 points.

    With more than 4096 points an evenly spaced subset of 4096 is used. Falls back to the mean
    squared distance when the median is 0 (many duplicates); returns 0 for constant data.
    """
    n = x.shape[0]
    if n > _MEDIAN_SUBSET:
        x = x[torch.linspace(0, n - 1, _MEDIAN_SUBSET, device=x.device).round().long()]
        n = _MEDIAN_SUBSET
    sq = (x * x).sum(-1)
    d2 = _sq_dists(x, x, sq, sq)
    off = d2[~torch.eye(n, dtype=torch.bool, device=x.device)]
    if off.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    med = off.median()
    if med <= 0:
        med = off.mean()
    return med.sqrt()


def gram_matrix(x: Tensor, kernel: CkaKernel, sigma: float | Tensor | None = None) -> Tensor:
    """Full ``(N, N)`` Gram matrix of ``(N, D)`` points (used on minibatches)."""
    if kernel is CkaKernel.LINEAR:
        return x @ x.T
    if kernel is CkaKernel.RBF:
        s = median_sigma(x) if sigma is None else torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sq = (x * x).sum(-1)
        return torch.exp(-_sq_dists(x, x, sq, sq) / (2 * s * s))
    raise UnknownKernelError(f"Unsupported kernel {kernel!r}.")  # pragma: no cover


def cka_from_hsic(hsic_ab: Tensor, hsic_aa: Tensor, hsic_bb: Tensor, eps: float) -> Tensor:
    """``HSIC(a, b) / sqrt(HSIC(a, a) · HSIC(b, b))``, NaN where the denominator is ``<= eps`` or not finite."""
    denom = (hsic_aa * hsic_bb).clamp_min(0.0).sqrt()
    ok = torch.isfinite(denom) & (denom > eps)
    return torch.where(ok, hsic_ab / torch.where(ok, denom, 1.0), torch.nan)


def linear_cka(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Linear CKA of ``(B, N, D_a)`` and ``(B, N, D_b)`` float64 views, shape ``(B,)``.

    ``‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)`` on column-centred views; the ``N × N`` Gram form is used
    instead when it is cheaper (fewer samples than features).
    """
    a = a - a.mean(-2, keepdim=True)
    b = b - b.mean(-2, keepdim=True)
    n, da, db = a.shape[-2], a.shape[-1], b.shape[-1]
    if da * db + da * da + db * db <= n * (da + db + 1):
        ab = a.transpose(-1, -2) @ b
        aa = a.transpose(-1, -2) @ a
        bb = b.transpose(-1, -2) @ b
        hsic_ab = (ab * ab).sum((-1, -2))
    else:
        aa = a @ a.transpose(-1, -2)  # Gram matrices K, L: <K, L> = ‖AᵀB‖², ‖K‖ = ‖AᵀA‖
        bb = b @ b.transpose(-1, -2)
        hsic_ab = (aa * bb).sum((-1, -2))
    return cka_from_hsic(hsic_ab, (aa * aa).sum((-1, -2)), (bb * bb).sum((-1, -2)), eps)


def rbf_cka(a: Tensor, b: Tensor, *, sigma: float | None, eps: float, chunk_size: int | None) -> Tensor:
    """RBF-kernel CKA of one ``(N, D_a)`` / ``(N, D_b)`` pair of float64 views, in row blocks.

    Returns:
        A 0-d float64 tensor.
    """
    n = a.shape[0]
    sig_a = median_sigma(a) if sigma is None else torch.tensor(sigma, dtype=a.dtype, device=a.device)
    sig_b = median_sigma(b) if sigma is None else torch.tensor(sigma, dtype=b.dtype, device=b.device)
    if not (sig_a > 0 and sig_b > 0):
        return torch.tensor(torch.nan, dtype=a.dtype, device=a.device)
    sq_a, sq_b = (a * a).sum(-1), (b * b).sum(-1)
    chunk = chunk_size or default_chunk_size(n) // 4 or 1
    kl = torch.zeros((), dtype=a.dtype, device=a.device)
    kk, ll = kl.clone(), kl.clone()
    row_k = torch.empty(n, dtype=a.dtype, device=a.device)
    row_l = torch.empty_like(row_k)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        k_blk = torch.exp(-_sq_dists(a[start:stop], a, sq_a[start:stop], sq_a) / (2 * sig_a * sig_a))
        l_blk = torch.exp(-_sq_dists(b[start:stop], b, sq_b[start:stop], sq_b) / (2 * sig_b * sig_b))
        kl += (k_blk * l_blk).sum()
        kk += (k_blk * k_blk).sum()
        ll += (l_blk * l_blk).sum()
        row_k[start:stop] = k_blk.mean(1)
        row_l[start:stop] = l_blk.mean(1)

    def centred(prod: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        return prod - 2 * n * (r1 * r2).sum() + n * n * r1.mean() * r2.mean()

    return cka_from_hsic(centred(kl, row_k, row_l), centred(kk, row_k, row_k), centred(ll, row_l, row_l), eps)


def hsic_unbiased(k_mat: Tensor, l_mat: Tensor) -> Tensor:
    """Unbiased HSIC estimator of Song et al. (2012) for ``(n, n)`` Gram matrices, ``n >= 4``.

    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))`` with ``K̃``, ``L̃``
    the Gram matrices with zeroed diagonals.
    """
    n = k_mat.shape[-1]
    k_t = k_mat - torch.diag_embed(torch.diagonal(k_mat, dim1=-2, dim2=-1))
    l_t = l_mat - torch.diag_embed(torch.diagonal(l_mat, dim1=-2, dim2=-1))
    trace = (k_t * l_t.transpose(-1, -2)).sum((-1, -2))
    sum_k, sum_l = k_t.sum((-1, -2)), l_t.sum((-1, -2))
    cross = (k_t.sum(-2) * l_t.sum(-1)).sum(-1)  # 1ᵀ K̃ L̃ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))

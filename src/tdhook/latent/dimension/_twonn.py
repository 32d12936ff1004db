"""TwoNN intrinsic dimension (Facco et al., 2017) as a TensorDict module."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor

from ..._checks import format_repr, suffix_key
from ...errors import InsufficientSamplesError
from ._common import init_io, read_points
from ._knn import knn

__all__ = ["TwoNnDimensionEstimator", "two_nn_fit"]


class TwoNnDimensionEstimator(TensorDictModuleBase):
    """Global intrinsic dimension from the ratio of the two nearest-neighbour distances.

    For each point ``μ = r₂ / r₁`` (second over first nearest neighbour, ignoring points closer
    than ``eps``). Under local uniformity ``μ`` is Pareto-distributed with exponent ``d``, so
    ``d`` is the least-squares slope through the origin of ``y = -log(1 - F(μ))`` against
    ``x = log μ``, ``F`` being the empirical CDF of the sorted ``μ`` (the largest is dropped).
    Points without two valid neighbours are dropped.

    Reads ``(N, D)`` or ``(..., N, D)`` points; each leading index is a separate dataset. The
    neighbour search is chunked (see :func:`~tdhook.latent.dimension.knn`).

    Args:
        in_key: Key of the points.
        out_key: Key of the float32 estimate, shape ``batch``.
        return_xy: Also write the regression points at ``out_key + "_x"`` and ``out_key + "_y"``,
            shape ``(*batch, N - 1)``, NaN-padded.
        eps: Neighbours at distance ``<= eps`` are treated as duplicates and ignored.
        chunk_size: Rows per neighbour-search block (``None``: automatic).

    Raises:
        InsufficientSamplesError: At call time, with fewer than 3 points, or fewer than 3 points
            having two valid neighbours.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> plane = torch.randn(2000, 2) @ torch.randn(2, 10)
        >>> td = TwoNnDimensionEstimator()(TensorDict({"data": plane}))
        >>> round(float(td["dimension"]))
        2
    """

    def __init__(
        self,
        in_key: NestedKey = "data",
        out_key: NestedKey = "dimension",
        return_xy: bool = False,
        eps: float = 1e-5,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.return_xy = return_xy
        extra = [suffix_key(out_key, "_x"), suffix_key(out_key, "_y")] if return_xy else []
        init_io(self, in_key, out_key, eps, chunk_size, extra)

    def __repr__(self) -> str:
        return format_repr(self, eps=self.eps)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Estimate the dimension of ``tensordict[in_key]`` and write it to ``out_key``."""
        x, batch = read_points(tensordict, self.in_key, owner=type(self).__name__)
        n = x.shape[-2]
        if n < 3:
            raise InsufficientSamplesError(
                f"At least 3 points required for Two NN dimension estimation, got {n} at {self.in_key!r}."
            )
        result = knn(x, 2, eps=self.eps, chunk_size=self.chunk_size)
        dim, xs, ys = two_nn_fit(result.distances.to(torch.float64), in_key=self.in_key, eps=self.eps)
        tensordict.set(self.out_key, dim.to(torch.float32).reshape(batch))
        if self.return_xy:
            tensordict.set(self.out_keys[1], xs.to(torch.float32).reshape(*batch, n - 1))
            tensordict.set(self.out_keys[2], ys.to(torch.float32).reshape(*batch, n - 1))
        return tensordict


def two_nn_fit(
    distances: Tensor, *, in_key: NestedKey = "data", eps: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """TwoNN regression from the two nearest distances of each point.

    Args:
        distances: ``(B, N, 2)`` nearest and second-nearest distances (``inf`` when missing).
        in_key: Key named in error messages.
        eps: Duplicate threshold, named in error messages.

    Returns:
        ``(B,)`` dimensions and the ``(B, N - 1)`` NaN-padded regression points ``x``, ``y``.
    """
    r1, r2 = distances[..., 0], distances[..., 1]
    mu = r2 / r1
    valid = torch.isfinite(mu)
    n_valid = valid.sum(-1)
    if bool((n_valid < 3).any()):
        worst = int(n_valid.argmin())
        raise InsufficientSamplesError(
            f"At least 3 valid points required for Two NN dimension estimation, but dataset {worst} at "
            f"{in_key!r} has only {int(n_valid[worst])} point(s) with two neighbours farther than eps={eps} "
            f"(closer points count as duplicates). Remove duplicates, add points, or lower eps."
        )
    n = mu.shape[-1]
    mu_sorted = torch.where(valid, mu, torch.inf).sort(dim=-1).values
    rank = torch.arange(1, n + 1, dtype=mu.dtype, device=mu.device)
    n_valid_f = n_valid.unsqueeze(-1).to(mu.dtype)
    used = rank < n_valid_f  # drop the largest μ (F = 1) and the invalid points
    xs = torch.where(used, torch.log(mu_sorted), torch.nan)
    ys = torch.where(used, -torch.log1p(-torch.where(used, rank / n_valid_f, 0.0)), torch.nan)
    x0, y0 = torch.nan_to_num(xs), torch.nan_to_num(ys)
    dim = (x0 * y0).sum(-1) / (x0 * x0).sum(-1)
    return dim, xs[..., : n - 1], ys[..., : n - 1]

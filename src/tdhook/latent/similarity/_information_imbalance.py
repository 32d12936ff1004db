"""Information imbalance (Glielmo et al., 2022) between two views, as a TensorDict module."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor

from ..._checks import check_chunk_size, format_repr
from ...errors import InsufficientSamplesError, InvalidParameterError
from ..dimension._knn import block_keys, default_chunk_size, prepare_points
from ._validation import empty_output, read_pair

__all__ = ["InformationImbalanceEstimator", "information_imbalance"]


class InformationImbalanceEstimator(TensorDictModuleBase):
    """How well nearest neighbours in one view predict nearest neighbours in the other.

    ``Δ(A→B) = (2/N) · mean_i r_B(i, nn_A(i))``, where ``nn_A(i)`` is the nearest neighbour of
    ``i`` in view A and ``r_B(i, j)`` the rank of ``j`` among ``i``'s neighbours in view B
    (1 for the nearest; ties broken by the lower index). ``Δ ≈ 2/N``: A's neighbourhoods are
    preserved in B (identical views give exactly ``2/N``); ``Δ ≈ 1``: A says nothing about B.
    Ranks are computed in row blocks with Minkowski distances of order ``p``, so memory stays
    ``O(chunk · N)`` (tdhook 0.1 built both ``N × N`` distance matrices).

    Reads ``(N, D_a)`` / ``(N, D_b)`` or ``(..., N, D_·)`` views; writes one float32 value per
    dataset at each output key, shape ``batch``.

    Args:
        in_key_a: Key of view A.
        in_key_b: Key of view B.
        out_key_a_to_b: Key of ``Δ(A→B)``.
        out_key_b_to_a: Key of ``Δ(B→A)``.
        p: Minkowski exponent (2 is Euclidean).
        chunk_size: Rows per distance block (``None``: automatic).

    Raises:
        InsufficientSamplesError: At call time, with fewer than 2 samples.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> a = torch.randn(50, 3)
        >>> td = InformationImbalanceEstimator()(TensorDict({"data_a": a, "data_b": 2 * a}))
        >>> round(float(td["information_imbalance_a_to_b"]), 6)  # 2 / N: neighbourhoods preserved
        0.04
    """

    def __init__(
        self,
        in_key_a: NestedKey = "data_a",
        in_key_b: NestedKey = "data_b",
        out_key_a_to_b: NestedKey = "information_imbalance_a_to_b",
        out_key_b_to_a: NestedKey = "information_imbalance_b_to_a",
        p: float = 2.0,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise InvalidParameterError(f"p must be a number > 0 (2 is Euclidean), got {p!r}.")
        self.in_key_a = in_key_a
        self.in_key_b = in_key_b
        self.out_key_a_to_b = out_key_a_to_b
        self.out_key_b_to_a = out_key_b_to_a
        self.p = float(p)
        self.chunk_size = check_chunk_size(chunk_size)
        self.in_keys = [in_key_a, in_key_b]
        self.out_keys = [out_key_a_to_b, out_key_b_to_a]

    def __repr__(self) -> str:
        return format_repr(self, p=self.p)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Compute both imbalances between ``tensordict[in_key_a]`` and ``tensordict[in_key_b]``."""
        a, b, batch = read_pair(
            tensordict,
            self.in_key_a,
            self.in_key_b,
            owner=type(self).__name__,
            method="Information Imbalance",
        )
        if a.shape[0] == 0:
            tensordict.set(self.out_key_a_to_b, empty_output(batch, a.device))
            tensordict.set(self.out_key_b_to_a, empty_output(batch, a.device))
            return tensordict
        n = a.shape[1]
        if n < 2:
            raise InsufficientSamplesError(
                f"Expected at least 2 samples, got {n} at {self.in_key_a!r} and {self.in_key_b!r}."
            )
        results = [
            information_imbalance(a[i], b[i], p=self.p, chunk_size=self.chunk_size)
            for i in range(a.shape[0])  # datasets, not points
        ]
        a_to_b = torch.stack([r[0] for r in results]).to(torch.float32).reshape(batch)
        b_to_a = torch.stack([r[1] for r in results]).to(torch.float32).reshape(batch)
        tensordict.set(self.out_key_a_to_b, a_to_b)
        tensordict.set(self.out_key_b_to_a, b_to_a)
        return tensordict


def information_imbalance(
    a: Tensor, b: Tensor, *, p: float = 2.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(Δ(A→B), Δ(B→A))`` for one pair of ``(N, D_a)``, ``(N, D_b)`` views, in one blocked pass.

    Each block holds the distance keys of ``chunk`` rows to all points in both views; the
    nearest neighbour in one view and its rank in the other are read from the same block.
    """
    n = a.shape[0]
    prep_a = prepare_points(a.to(torch.float64), p)
    prep_b = prepare_points(b.to(torch.float64), p)
    chunk = chunk_size or max(1, default_chunk_size(n) // 2)
    rank_sum_ab = torch.zeros((), dtype=torch.float64, device=a.device)
    rank_sum_ba = torch.zeros_like(rank_sum_ab)
    cols = torch.arange(n, device=a.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        local = torch.arange(stop - start, device=a.device)
        keys_a = block_keys(prep_a, start, stop)
        keys_b = block_keys(prep_b, start, stop)
        keys_a[local, local + start] = math.inf
        keys_b[local, local + start] = math.inf
        nn_a = keys_a.argmin(dim=1)  # first (lowest-index) minimum on ties
        nn_b = keys_b.argmin(dim=1)
        rank_sum_ab += _ranks(keys_b, nn_a, cols).sum()
        rank_sum_ba += _ranks(keys_a, nn_b, cols).sum()
    return 2.0 * rank_sum_ab / (n * n), 2.0 * rank_sum_ba / (n * n)


def _ranks(keys: Tensor, target: Tensor, cols: Tensor) -> Tensor:
    """Rank (1-based, self excluded, ties by lower index) of column ``target[r]`` in each row of ``keys``."""
    value = keys.gather(1, target.unsqueeze(1))
    less = (keys < value).sum(1)
    tied_before = ((keys == value) & (cols.unsqueeze(0) < target.unsqueeze(1))).sum(1)
    return (less + tied_before + 1).to(torch.float64)

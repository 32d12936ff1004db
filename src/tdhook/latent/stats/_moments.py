"""Running mean and covariance over batches: the sufficient statistics of every streaming estimator.

:class:`StreamingMoments` merges batches with Chan et al.'s parallel formula in float64, so it
can be fed one batch at a time, merged with another instance, or summed across processes with
:meth:`StreamingMoments.all_reduce`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import as_float, as_tensor, check_finite
from ._distributed import all_reduce_sum, require_process_group
from ._errors import IncompatibleInputsError, InsufficientSamplesError

__all__ = ["StreamingMoments"]


class _Acc(NamedTuple):
    """The accumulators: sample count, mean ``(D,)`` and centred second moment ``(D, D)``."""

    n: Tensor
    mean: Tensor
    m2: Tensor


class StreamingMoments:
    """Running count, mean and centred second moment of a stream of ``(n, D)`` batches.

    The accumulators are ``count`` (scalar), ``mean`` (``D``) and ``m2`` (``D × D``, the sum of
    outer products of deviations from the mean), kept in ``dtype`` (float64 by default). Two
    sets of accumulators merge exactly with Chan et al.'s parallel formula, which is what
    :meth:`update`, :meth:`merge` and :meth:`all_reduce` do.

    Args:
        dtype: Accumulator dtype.

    Examples:
        >>> import torch
        >>> moments = StreamingMoments()
        >>> for batch in torch.randn(1000, 3).split(100):
        ...     _ = moments.update(batch)
        >>> moments.count
        1000
        >>> moments.covariance().shape
        torch.Size([3, 3])
    """

    def __init__(self, *, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self._acc: _Acc | None = None

    def __repr__(self) -> str:
        dim = None if self._acc is None else self._acc.mean.shape[0]
        return f"{type(self).__name__}(count={self.count}, dim={dim}, dtype={self.dtype})"

    # ------------------------------------------------------------------ updates

    def reset(self) -> StreamingMoments:
        """Forget every batch seen so far."""
        self._acc = None
        return self

    def update(self, x: Any, *, validate: bool = True) -> StreamingMoments:
        """Add a batch of samples.

        Args:
            x: ``(n, D)`` samples (``(n, ...)`` is flattened to ``(n, D)``; ``(n,)`` is one
                feature). Array-likes are converted with ``torch.as_tensor``.
            validate: Check that ``x`` is finite (skip only if the caller already did).

        Returns:
            ``self``, so calls chain.

        Raises:
            NonFiniteInputError: If ``x`` holds NaN or inf.
            IncompatibleInputsError: If the width differs from earlier batches.
        """
        x = _as_matrix(x, name="x", validate=validate)
        if x.shape[0] == 0:
            return self
        x = x.to(self.dtype)
        n = torch.tensor(float(x.shape[0]), dtype=self.dtype, device=x.device)
        mean = x.mean(0)
        centred = x - mean
        m2 = centred.T @ centred
        self._merge_parts(n, mean, m2)
        return self

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold another accumulator's statistics into this one (``other`` is unchanged).

        Returns:
            ``self``.
        """
        theirs = other.state()
        if theirs:
            self._merge_parts(theirs["count"], theirs["mean"], theirs["m2"])
        return self

    def _merge_parts(self, n_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        n_b, mean_b, m2_b = n_b.to(self.dtype), mean_b.to(self.dtype), m2_b.to(self.dtype)
        if self._acc is None:
            self._acc = _Acc(n_b, mean_b, m2_b)
            return
        n_a, mean_a, m2_a = self._acc
        if mean_b.shape != mean_a.shape:
            raise IncompatibleInputsError(
                f"StreamingMoments got a batch with {mean_b.shape[0]} features after batches with "
                f"{mean_a.shape[0]}; every batch must have the same width. Call reset() to start over."
            )
        n_b, mean_b, m2_b = n_b.to(n_a.device), mean_b.to(mean_a.device), m2_b.to(m2_a.device)
        total = n_a + n_b
        delta = mean_b - mean_a
        self._acc = _Acc(
            total,
            mean_a + delta * (n_b / total),
            m2_a + m2_b + torch.outer(delta, delta) * (n_a * n_b / total),
        )

    # ----------------------------------------------------------------- results

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return 0 if self._acc is None else round(float(self._acc.n))

    @property
    def mean(self) -> Tensor:
        """Mean of the samples seen, shape ``(D,)``."""
        return self._require(1, "mean").mean

    @property
    def m2(self) -> Tensor:
        """Sum of outer products of deviations from the mean, shape ``(D, D)``."""
        return self._require(1, "m2").m2

    def covariance(self, *, correction: int = 1) -> Tensor:
        """Covariance matrix, ``m2 / (count - correction)`` (``torch.cov``'s convention).

        Args:
            correction: 1 for the unbiased estimate, 0 for the maximum-likelihood one.

        Raises:
            InsufficientSamplesError: If ``count <= correction``.
        """
        self._require(correction + 1, "covariance")
        return self.m2 / (self.count - correction)

    def variance(self, *, correction: int = 1) -> Tensor:
        """Per-feature variance, the diagonal of :meth:`covariance`."""
        return torch.diagonal(self.covariance(correction=correction)).clone()

    def second_moment(self) -> Tensor:
        """Uncentred sum of outer products ``Σ x xᵀ`` (``m2 + count · mean meanᵀ``)."""
        return self.m2 + self.count * torch.outer(self.mean, self.mean)

    def _require(self, n: int, what: str) -> _Acc:
        if self._acc is None or self.count < n:
            raise InsufficientSamplesError(
                f"StreamingMoments.{what} needs at least {n} sample(s), got {self.count}; call update(x) "
                f"with more data first."
            )
        return self._acc

    # ------------------------------------------------------------ state / dist

    def state(self) -> dict[str, Tensor]:
        """The accumulators as a dict of tensors: ``count``, ``mean`` and ``m2`` (empty before any data)."""
        if self._acc is None:
            return {}
        return {"count": self._acc.n.clone(), "mean": self._acc.mean.clone(), "m2": self._acc.m2.clone()}

    def load_state(self, state: dict[str, Tensor]) -> StreamingMoments:
        """Replace the accumulators with those of :meth:`state` (an empty dict resets)."""
        if not state:
            return self.reset()
        self._acc = _Acc(*(state[name].to(self.dtype).clone() for name in ("count", "mean", "m2")))
        return self

    def all_reduce(self, group: Any = None) -> StreamingMoments:
        """Combine the statistics of every rank, so each rank ends with those of all the data.

        Two sums: first ``count`` and ``count · mean`` give the global mean; then each rank's
        ``m2 + count · δ δᵀ`` (with ``δ`` its mean's offset from the global mean) is summed. This
        is Chan's formula for many parts and stays exact in float64. Every rank must call it and
        must have seen at least one batch (of the same width).

        Args:
            group: A ``torch.distributed`` process group; ``None`` is the default group.

        Returns:
            ``self``.

        Raises:
            DistributedNotInitializedError: If no process group is initialised.
            InsufficientSamplesError: If this rank has seen no data.
        """
        require_process_group(type(self).__name__)
        mine = self._require(1, "all_reduce")
        count = mine.n.clone()
        weighted = mine.mean * count
        all_reduce_sum([count, weighted], group)
        mean = weighted / count
        delta = mine.mean - mean
        m2 = mine.m2 + torch.outer(delta, delta) * mine.n
        all_reduce_sum([m2], group)
        self._acc = _Acc(count, mean, m2)
        return self


def _as_matrix(x: Any, *, name: str, validate: bool = True) -> Tensor:
    """Return ``x`` as a float ``(n, D)`` tensor (flattening trailing dims), checking it is finite."""
    x = as_float(as_tensor(x, name=name))
    if x.ndim == 0:
        raise IncompatibleInputsError(
            f"{name} must have a sample dimension, shape (n, D); got a scalar. Pass x.reshape(1, -1)."
        )
    x = x.reshape(x.shape[0], -1) if x.ndim != 1 else x.unsqueeze(1)
    if validate:
        check_finite(x, name=name)
    return x

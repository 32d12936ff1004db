"""Running mean and covariance over batches: the sufficient statistics of every streaming estimator.

:class:`StreamingMoments` merges batches with Chan et al.'s parallel formula in float64, so it
can be fed one batch at a time, merged with another instance, or summed across processes with
:meth:`StreamingMoments.all_reduce`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..._checks import as_float, as_tensor, check_finite
from ..._distributed import all_reduce_sum, require_process_group
from ...errors import IncompatibleInputsError, InsufficientSamplesError

__all__ = ["StreamingMoments"]


class _Acc(NamedTuple):
    """The accumulators: sample count, mean ``(D,)`` and centred second moment ``(D, D)``.

    ``mean`` and ``m2`` are owned by the accumulator and updated in place. Only the upper
    triangle of ``m2`` is kept current by :func:`_add_gram`; :meth:`StreamingMoments._full`
    mirrors it into the lower one before ``m2`` leaves the class.
    """

    n: float
    mean: Tensor
    m2: Tensor


#: Below this width a Gram matrix is one ``addmm`` (the blocks would cost more in calls than they save).
_BLOCKED_MIN_WIDTH = 96
#: Column block width of the upper-triangle Gram update.
_BLOCK = 64


def _add_gram(m2: Tensor, x: Tensor) -> Tensor:
    """``m2 += xᵀx`` on the upper triangle (and diagonal) of ``m2``; the lower triangle is left stale.

    A Gram matrix is symmetric, so BLAS's ``syrk`` does half a matrix product's work. torch has
    no ``syrk``; block rows of the upper triangle (``x[:, i:j]ᵀ x[:, i:]``) get most of the saving
    (about 30% of the float64 time at width 256) with exact float64 arithmetic.
    """
    d = x.shape[1]
    if d < _BLOCKED_MIN_WIDTH:
        return m2.addmm_(x.T, x)
    for start in range(0, d, _BLOCK):
        stop = min(start + _BLOCK, d)
        m2[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
    return m2


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

    def update(self, x: Any) -> StreamingMoments:
        """Add a batch of samples.

        Args:
            x: ``(n, D)`` samples (``(n, ...)`` is flattened to ``(n, D)``; ``(n,)`` is one
                feature). Array-likes are converted with ``torch.as_tensor``.

        Returns:
            ``self``, so calls chain.

        Raises:
            NonFiniteInputError: If ``x`` holds NaN or inf.
            IncompatibleInputsError: If the width differs from earlier batches.
        """
        x = _as_matrix(x, name="x")
        if x.shape[0] == 0:
            return self
        converted = x.to(self.dtype)
        return self._update(converted, owned=converted is not x)  # a converted copy is ours to centre

    def _update(self, x: Tensor, *, owned: bool) -> StreamingMoments:
        """Fold in a non-empty ``(n, D)`` batch already in ``self.dtype``; ``owned``: it may be centred in place."""
        mean = x.mean(0)
        if not bool(torch.isfinite(mean).all()):  # NaN and inf reach the mean: the check is free
            check_finite(x, name="x")
        centred = x.sub_(mean) if owned else x - mean
        if self._acc is None:
            d = x.shape[1]
            self._acc = _Acc(float(x.shape[0]), mean, _add_gram(x.new_zeros(d, d), centred))
            return self
        self._fold(float(x.shape[0]), mean, lambda m2: _add_gram(m2, centred))
        return self

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold another accumulator's statistics into this one (``other`` is unchanged).

        Returns:
            ``self``.
        """
        theirs = other.state()
        if not theirs:
            return self
        if self._acc is None:
            return self.load_state(theirs)
        m2_b = theirs["m2"].to(self._acc.m2)
        self._fold(float(theirs["count"]), theirs["mean"].to(self._acc.mean), lambda m2: m2.add_(m2_b))
        return self

    def _fold(self, n_b: float, mean_b: Tensor, add_m2: Callable[[Tensor], object]) -> None:
        """Chan's update, in place: ``m2 += m2_b + δδᵀ · n_a n_b / n``, ``mean += δ · n_b / n``."""
        acc = self._acc
        if acc is None:  # pragma: no cover - callers handle the first batch
            raise InsufficientSamplesError("internal: _fold needs existing statistics")
        if mean_b.shape != acc.mean.shape:
            raise IncompatibleInputsError(
                f"StreamingMoments got a batch with {mean_b.shape[0]} features after batches with "
                f"{acc.mean.shape[0]}; every batch must have the same width. Call reset() to start over."
            )
        total = acc.n + n_b
        delta = mean_b - acc.mean
        add_m2(acc.m2)
        acc.m2.addr_(delta, delta, alpha=acc.n * n_b / total)
        acc.mean.add_(delta, alpha=n_b / total)
        self._acc = _Acc(total, acc.mean, acc.m2)

    # ----------------------------------------------------------------- results

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return 0 if self._acc is None else round(self._acc.n)

    @property
    def mean(self) -> Tensor:
        """Mean of the samples seen, shape ``(D,)``."""
        return self._require(1, "mean").mean

    @property
    def m2(self) -> Tensor:
        """Sum of outer products of deviations from the mean, shape ``(D, D)``."""
        return self._full(self._require(1, "m2")).m2

    @staticmethod
    def _full(acc: _Acc) -> _Acc:
        """Mirror the upper triangle of ``acc.m2`` (the one :func:`_add_gram` keeps) into the lower, in place."""
        m2 = acc.m2
        if m2.shape[0] >= _BLOCKED_MIN_WIDTH:
            d = m2.shape[0]
            lower = torch.tril_indices(d, d, offset=-1, device=m2.device)
            m2[lower[0], lower[1]] = m2[lower[1], lower[0]]
        return acc

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
        acc = self._full(self._acc)
        count = torch.tensor(acc.n, dtype=self.dtype, device=acc.mean.device)
        return {"count": count, "mean": acc.mean.clone(), "m2": acc.m2.clone()}

    def load_state(self, state: dict[str, Tensor]) -> StreamingMoments:
        """Replace the accumulators with those of :meth:`state` (an empty dict resets)."""
        if not state:
            return self.reset()
        self._acc = _Acc(
            float(state["count"]), state["mean"].to(self.dtype).clone(), state["m2"].to(self.dtype).clone()
        )
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
        mine = self._full(self._require(1, "all_reduce"))
        count = torch.tensor([mine.n], dtype=self.dtype, device=mine.mean.device)
        weighted = mine.mean * mine.n
        all_reduce_sum([count, weighted], group)
        mean = weighted / count
        delta = mine.mean - mean
        m2 = torch.addr(mine.m2, delta, delta, alpha=mine.n)
        all_reduce_sum([m2], group)
        self._acc = _Acc(float(count), mean, m2)
        return self


def _as_matrix(x: Any, *, name: str) -> Tensor:
    """Return ``x`` as a float ``(n, D)`` tensor (flattening trailing dims)."""
    x = as_float(as_tensor(x, name=name))
    if x.ndim == 0:
        raise IncompatibleInputsError(
            f"{name} must have a sample dimension, shape (n, D); got a scalar. Pass x.reshape(1, -1)."
        )
    return x.flatten(1) if x.ndim != 1 else x.unsqueeze(1)

"""Streaming least-squares and ridge regression from accumulated sufficient statistics.

:class:`StreamingLinearRegression` keeps a :class:`~tdhook.latent.stats.StreamingMoments` of the
concatenated ``[X | y]`` columns; the solution is the same as fitting scikit-learn's
``LinearRegression`` (``alpha=0``) or ``Ridge(alpha)`` on all the data at once, but memory is
``O((D + T)²)`` whatever the number of samples, and batches can come from several processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import as_float, as_tensor, check_finite
from ...errors import IncompatibleInputsError, InvalidParameterError, NonFiniteInputError, NotFittedError
from ._moments import StreamingMoments

__all__ = ["StreamingLinearRegression"]


class StreamingLinearRegression:
    """Ordinary least squares (``alpha=0``) or ridge regression fitted batch by batch.

    ``partial_fit`` accumulates the count, the means and the centred cross-products of ``X`` and
    ``y`` in float64 (Chan's parallel formula); the coefficients are solved on demand, the first
    time ``coef_``, ``intercept_``, ``predict`` or ``score`` is used after new data. With
    ``fit_intercept=True`` the intercept is not penalised, as in scikit-learn's ``Ridge``. With
    ``alpha=0`` the minimum-norm least-squares solution is returned when ``X`` is rank-deficient.

    Args:
        alpha: L2 penalty (``Ridge``'s ``alpha``); 0 is ordinary least squares.
        fit_intercept: Whether to fit an intercept (by centring); if ``False`` the model goes
            through the origin.

    Attributes:
        coef_: ``(D,)`` for a 1-D target, ``(T, D)`` for a ``(n, T)`` target (scikit-learn's layout).
        intercept_: A 0-d tensor for a 1-D target, ``(T,)`` otherwise.
        n_features_in_: ``D``.

    Examples:
        >>> import torch
        >>> X = torch.randn(1000, 5, dtype=torch.float64)
        >>> y = X @ torch.arange(5.0, dtype=torch.float64) + 3.0
        >>> reg = StreamingLinearRegression()
        >>> for xb, yb in zip(X.split(100), y.split(100)):
        ...     _ = reg.partial_fit(xb, yb)
        >>> torch.allclose(reg.coef_, torch.arange(5.0, dtype=torch.float64))
        True
        >>> round(float(reg.intercept_), 6)
        3.0
    """

    def __init__(self, alpha: float = 0.0, fit_intercept: bool = True) -> None:
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
            raise InvalidParameterError(
                f"alpha must be a number >= 0, got {alpha!r}; use 0 for least squares."
            )
        self.alpha = float(alpha)
        self.fit_intercept = fit_intercept
        self._moments = StreamingMoments(dtype=torch.float64)
        self._n_features: int | None = None
        self._n_targets: int | None = None
        self._y_1d = False
        self._solution: tuple[Tensor, Tensor] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, fit_intercept={self.fit_intercept})"

    # ------------------------------------------------------------------ fitting

    def reset(self) -> StreamingLinearRegression:
        """Forget all data seen so far."""
        self._moments.reset()
        self._n_features = self._n_targets = None
        self._solution = None
        return self

    def partial_fit(self, X: Any, y: Any) -> StreamingLinearRegression:
        """Accumulate one batch.

        Args:
            X: ``(n, D)`` features (``(n, ...)`` is flattened); tensors or array-likes.
            y: ``(n,)`` or ``(n, T)`` targets.

        Returns:
            ``self``.

        Raises:
            IncompatibleInputsError: If ``X`` and ``y`` disagree in ``n``, or the widths change
                between batches.
            NonFiniteInputError: If ``X`` or ``y`` holds NaN or inf.
        """
        x2, y2, y_1d = self._check_xy(X, y)
        if self._n_features is not None and (x2.shape[1], y2.shape[1]) != (self._n_features, self._n_targets):
            raise IncompatibleInputsError(
                f"StreamingLinearRegression was fitted with {self._n_features} feature(s) and "
                f"{self._n_targets} target(s), got a batch with {x2.shape[1]} and {y2.shape[1]}; every batch "
                f"must have the same widths. Call reset() (or fit()) to start over."
            )
        if x2.shape[0]:
            joint = torch.empty(x2.shape[0], x2.shape[1] + y2.shape[1], dtype=torch.float64, device=x2.device)
            joint[:, : x2.shape[1]] = x2  # one converting copy per block, no float32 concatenation
            joint[:, x2.shape[1] :] = y2
            try:
                self._moments._update(joint, owned=True)  # our own buffer: centred in place
            except NonFiniteInputError:
                check_finite(x2, name="X")  # name the culprit
                check_finite(y2, name="y")
                raise
            self._solution = None
        if self._n_features is None:
            self._n_features, self._n_targets, self._y_1d = x2.shape[1], y2.shape[1], y_1d
        return self

    def fit(self, X: Any, y: Any) -> StreamingLinearRegression:
        """Forget previous data and fit on ``(X, y)``; same arguments as :meth:`partial_fit`."""
        return self.reset().partial_fit(X, y)

    @staticmethod
    def _check_xy(X: Any, y: Any) -> tuple[Tensor, Tensor, bool]:
        x = as_float(as_tensor(X, name="X"))
        t = as_float(as_tensor(y, name="y"))
        if x.ndim < 2:
            raise IncompatibleInputsError(
                f"X must have shape (n, D), got {tuple(x.shape)}; pass X.reshape(-1, 1) for a single feature."
            )
        if t.ndim not in (1, 2):
            raise IncompatibleInputsError(f"y must have shape (n,) or (n, T), got {tuple(t.shape)}.")
        if x.shape[0] != t.shape[0]:
            raise IncompatibleInputsError(
                f"X and y must have the same number of samples, got {x.shape[0]} and {t.shape[0]}."
            )
        return x.flatten(1), (t.unsqueeze(1) if t.ndim == 1 else t), t.ndim == 1

    # ------------------------------------------------------------------ solving

    def _solve(self) -> tuple[Tensor, Tensor]:
        if self._solution is not None:
            return self._solution
        if self._moments.count == 0 or self._n_features is None:
            raise NotFittedError(
                "This StreamingLinearRegression is not fitted yet; call partial_fit(X, y) or fit(X, y) "
                "before predict, score, coef_ or intercept_."
            )
        d = self._n_features
        mean = self._moments.mean
        gram = self._moments.m2 if self.fit_intercept else self._moments.second_moment()
        a, b = gram[:d, :d], gram[:d, d:]
        if self.alpha > 0:
            a = a + self.alpha * torch.eye(d, dtype=a.dtype, device=a.device)
            coef = torch.linalg.solve(a, b)
        else:
            # minimum-norm solution of the normal equations: pinv(XᵀX) Xᵀy == pinv(X) y. The SVD
            # driver (CPU only; the matrix is small) keeps ill-conditioned directions as
            # scikit-learn does, where gelsy truncates them and CUDA's gels needs full rank.
            coef = torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(a.device)
        intercept = mean[d:] - mean[:d] @ coef if self.fit_intercept else torch.zeros_like(mean[d:])
        self._solution = (coef, intercept)
        return self._solution

    @property
    def coef_(self) -> Tensor:
        """Coefficients, ``(D,)`` or ``(T, D)``."""
        coef, _ = self._solve()
        return coef[:, 0] if self._y_1d else coef.T

    @property
    def intercept_(self) -> Tensor:
        """Intercept, a 0-d tensor or ``(T,)``."""
        _, intercept = self._solve()
        return intercept[0] if self._y_1d else intercept

    @property
    def n_features_in_(self) -> int:
        """Number of features seen during fit."""
        coef, _ = self._solve()
        return coef.shape[0]

    @property
    def n_samples_seen_(self) -> int:
        """Number of samples accumulated so far."""
        return self._moments.count

    def predict(self, X: Any) -> Tensor:
        """Predict targets for ``X``.

        Args:
            X: ``(n, D)`` features.

        Returns:
            ``(n,)`` or ``(n, T)`` predictions (the target layout of the fit), in ``X``'s floating
            dtype (float32 for integer inputs), on ``X``'s device.

        Raises:
            NotFittedError: Before any data was seen.
            IncompatibleInputsError: If ``X`` has the wrong width.
        """
        coef, intercept = self._solve()
        x = as_float(as_tensor(X, name="X"))
        if x.ndim < 2:
            raise IncompatibleInputsError(f"X must have shape (n, D), got {tuple(x.shape)}.")
        x = x.flatten(1)
        if x.shape[1] != coef.shape[0]:
            raise IncompatibleInputsError(
                f"X has {x.shape[1]} features but StreamingLinearRegression was fitted with {coef.shape[0]}."
            )
        check_finite(x, name="X")
        out = x.to(torch.float64) @ coef.to(x.device) + intercept.to(x.device)
        out = out.to(x.dtype)
        return out[:, 0] if self._y_1d else out

    def score(self, X: Any, y: Any) -> float:
        """Coefficient of determination R² of the prediction, averaged uniformly over targets.

        This is scikit-learn's ``r2_score(y, predict(X))`` (``multioutput="uniform_average"``);
        a constant target scores 1 when predicted exactly and 0 otherwise.
        """
        x2, y2, _ = self._check_xy(X, y)
        check_finite(y2, name="y")
        pred = self.predict(x2).reshape(y2.shape).to(torch.float64)
        truth = y2.to(pred.device, torch.float64)
        return r2_score(truth, pred)

    # ------------------------------------------------------------ state / dist

    def state(self) -> dict[str, Tensor]:
        """Sufficient statistics (``count``, ``mean``, ``m2`` of ``[X | y]``) as a dict of tensors."""
        return self._moments.state()

    def all_reduce(self, group: Any = None) -> StreamingLinearRegression:
        """Combine the statistics of every rank (see :meth:`StreamingMoments.all_reduce`).

        After it, every rank holds the fit on the union of the ranks' data.

        Raises:
            DistributedNotInitializedError: If no process group is initialised.
        """
        self._moments.all_reduce(group)
        self._solution = None
        return self


def r2_score(truth: Tensor, pred: Tensor) -> float:
    """R², averaged over columns, with scikit-learn's conventions for constant targets."""
    ss_res = ((truth - pred) ** 2).sum(0)
    ss_tot = ((truth - truth.mean(0)) ** 2).sum(0)
    nonzero = ss_tot > 0
    scores = torch.where(nonzero, 1 - ss_res / torch.where(nonzero, ss_tot, 1), (ss_res == 0).to(truth.dtype))
    return float(scores.mean())

"""Probe estimators: a mean-difference classifier and small torch models with a scikit-learn API.

Every estimator checks its inputs at the boundary (sample counts, feature widths, labels,
finiteness) and refuses to predict before it is fitted, so a probe never returns a plausible
wrong answer. The torch estimators train in their own grad-enabled scope on detached copies of
the inputs, so ``fit`` works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (as
probes run by a hooked call usually are) and leaves the caller's grad mode as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..._checks import check_finite, check_positive_int
from ...errors import IncompatibleInputsError, InvalidParameterError, NotFittedError

__all__ = [
    "BilinearEstimator",
    "LinearEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "TorchEstimator",
]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _preview(values: np.ndarray, limit: int = 6) -> str:
    shown = values[:limit].tolist()
    return f"{shown}{' ...' if values.size > limit else ''}"


class MeanDifferenceClassifier:
    """Binary classifier along the difference of the class means (a "diff-in-means" probe).

    ``coef_ = μ₊ − μ₋`` and ``intercept_ = −½(‖μ₊‖² − ‖μ₋‖²)``, both divided by ``‖coef_‖``
    when ``normalize``. The labels are ``0``/``1`` (or ``False``/``True``); ``1`` is the
    positive class.

    Args:
        normalize: Normalise the direction to unit norm.

    Examples:
        >>> import numpy as np
        >>> clf = MeanDifferenceClassifier().fit(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1, 0]))
        >>> clf.predict(np.array([[2.0, 5.0]])).tolist()
        [True]
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self._coef: np.ndarray | None = None
        self._intercept: np.ndarray | None = None

    def fit(self, X: Any, y: Any) -> MeanDifferenceClassifier:
        """Fit on ``X`` of shape ``(N, D)`` and binary labels ``y`` of shape ``(N,)``.

        Raises:
            ValueError: If ``y`` is not 1-D, holds a value other than 0 and 1 (more than two
                classes, continuous values), has one class only, or its length differs from
                ``X``'s; if ``X`` is not 2-D or holds NaN or inf.
        """
        X, y = _numpy(X), _numpy(y)
        if y.ndim > 1:
            raise IncompatibleInputsError(
                f"Multiclass classification not supported: y has shape {y.shape}, expected (N,) binary labels."
            )
        if X.ndim != 2:
            raise IncompatibleInputsError(
                f"MeanDifferenceClassifier expects X of shape (N, D), got {X.shape}; flatten the features "
                "first, e.g. X.reshape(len(X), -1)."
            )
        if X.shape[0] != y.shape[0]:
            raise IncompatibleInputsError(
                f"X has {X.shape[0]} samples but y has {y.shape[0]}; give one label per row of X."
            )
        if not np.isfinite(X).all():
            raise IncompatibleInputsError("X contains NaN or inf values; drop or impute them before fit.")
        if y.size == 0:
            raise IncompatibleInputsError(
                "MeanDifferenceClassifier.fit got 0 samples; give rows of both classes."
            )
        values = np.unique(y)
        if not np.isin(values, [0, 1]).all():
            raise IncompatibleInputsError(
                f"Multiclass classification not supported: MeanDifferenceClassifier is binary and needs labels "
                f"0 and 1 (or False/True), got the values {_preview(values)}. Map the labels to 0/1, or use "
                "LinearEstimator(num_classes=...) or StreamingLogisticRegression for more classes."
            )
        y = y.astype(bool)
        if y.all() or (~y).all():
            raise IncompatibleInputsError(
                f"Both classes must be present in y, got only the label {int(y[0])} "
                f"in {y.size} samples; fit on a batch holding both 0 and 1."
            )
        mu_pos, mu_neg = X[y].mean(0), X[~y].mean(0)
        coef = (mu_pos - mu_neg)[None, :]
        intercept = np.array([-0.5 * (mu_pos @ mu_pos - mu_neg @ mu_neg)])
        norm = np.linalg.norm(coef)
        if self.normalize and norm > 0:
            coef, intercept = coef / norm, intercept / norm
        self._coef, self._intercept = coef, intercept
        return self

    @property
    def coef_(self) -> np.ndarray:
        if self._coef is None:
            raise NotFittedError(
                "Model not fitted: this MeanDifferenceClassifier has no coef_ yet; call fit(X, y) first."
            )
        return self._coef

    @property
    def intercept_(self) -> np.ndarray:
        if self._intercept is None:
            raise NotFittedError(
                "Model not fitted: this MeanDifferenceClassifier has no intercept_ yet; call fit(X, y) first."
            )
        return self._intercept

    def decision_function(self, X: Any) -> np.ndarray:
        coef = self.coef_
        X = _numpy(X)
        if X.ndim != 2 or X.shape[1] != coef.shape[1]:
            raise IncompatibleInputsError(
                f"MeanDifferenceClassifier was fitted on {coef.shape[1]} features, got X of shape {X.shape}; "
                f"give X of shape (N, {coef.shape[1]})."
            )
        return X @ coef[0] + self.intercept_[0]

    def predict(self, X: Any) -> np.ndarray:
        return self.decision_function(X) > 0

    def predict_proba(self, X: Any) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)


def _mark_fitted(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: loaded weights count as fitted."""
    if isinstance(module, TorchEstimator) and not incompatible_keys.missing_keys:
        module._fitted = True


class TorchEstimator(nn.Module):
    """Base class of the torch probes: ``fit(*Xs, y)`` trains with Adam, ``predict(*Xs)`` infers.

    Regression (``num_classes=None``) uses MSE with the target shape checked exactly (the output
    shape, e.g. ``[N, 1]``); classification uses cross-entropy on integer class indices shaped
    like the output without its last dimension, and ``predict`` returns the argmax.

    ``fit`` trains in its own grad-enabled scope (``torch.inference_mode(False)`` and
    ``torch.enable_grad()``) on detached copies of the inputs, so it works inside
    ``torch.no_grad()`` and ``torch.inference_mode()`` and leaves the caller's grad mode
    unchanged. ``predict`` before ``fit`` (or before loading weights with ``load_state_dict``)
    raises :class:`~tdhook.errors.NotFittedError`.

    Args:
        num_classes: Number of classes, or None for regression.
        epochs: Training epochs per ``fit``.
        lr: Adam learning rate.
        batch_size: Minibatch size.
        device: Device to train on (data is moved there).
        verbose: Print ``"Epoch e/E"`` every 10 epochs.

    Raises:
        ValueError: If ``num_classes``, ``epochs`` or ``batch_size`` is not a positive int, or
            ``lr`` is not a positive number.
    """

    n_inputs = 1

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            check_positive_int(num_classes, name="num_classes")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise InvalidParameterError(f"lr must be a number > 0, got {lr!r}.")
        self.num_classes = num_classes
        self.epochs = check_positive_int(epochs, name="epochs")
        self.lr = float(lr)
        self.batch_size = check_positive_int(batch_size, name="batch_size")
        self.device = torch.device(device) if device is not None else None
        self.verbose = verbose
        self._fitted = False
        self.register_load_state_dict_post_hook(_mark_fitted)

    @property
    def out_features(self) -> int:
        return self.num_classes or 1

    @property
    def in_features(self) -> tuple[int, ...]:
        """Width of each input's last dimension (one entry per input)."""
        raise NotImplementedError

    @property
    def _name(self) -> str:
        return type(self).__name__.replace("Estimator", "")

    def _check_count(self, n: int) -> None:
        if n != self.n_inputs:
            raise IncompatibleInputsError(
                f"{self._name} estimator expects {self.n_inputs} input tensor{'s' if self.n_inputs > 1 else ''}, "
                f"got {n}"
            )

    def _check_inputs(self, xs: tuple[Any, ...]) -> list[torch.Tensor]:
        """Count, width and length checks; detached float32 copies on the estimator's device."""
        self._check_count(len(xs))
        dev = self.device or next(self.parameters()).device
        tensors = []
        for i, (x, width) in enumerate(zip(xs, self.in_features)):
            t = torch.as_tensor(x).detach()
            if t.is_inference():
                t = t.clone()  # inference tensors cannot be saved for backward
            if t.ndim < 2 or t.shape[-1] != width:
                raise IncompatibleInputsError(
                    f"{type(self).__name__} input {i} must have shape (N, ..., {width}), got {tuple(t.shape)}; "
                    f"flatten the activations to (N, {width}) or build the estimator for width {t.shape[-1]}."
                )
            t = t.to(device=dev, dtype=torch.float32)
            check_finite(t, name=f"{type(self).__name__} input {i}")
            tensors.append(t)
        lengths = [t.shape[0] for t in tensors]
        if len(set(lengths)) > 1:
            raise IncompatibleInputsError(
                f"{type(self).__name__} inputs have different numbers of samples {lengths}; give paired rows."
            )
        return tensors

    def _check_target(self, y: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
        dev = tensors[0].device
        target = torch.as_tensor(y).detach()
        if target.is_inference():
            target = target.clone()
        target = target.to(dev)
        n = tensors[0].shape[0]
        if n == 0:
            raise IncompatibleInputsError(f"{type(self).__name__}.fit got 0 samples; give at least one row.")
        with torch.no_grad():
            out_shape = (n, *self(*(t[:1] for t in tensors)).shape[1:])
        if self.num_classes is None:
            if tuple(target.shape) != out_shape:
                raise IncompatibleInputsError(
                    f"Output shape {out_shape} does not match target shape {tuple(target.shape)}; "
                    f"give regression targets shaped {out_shape} (e.g. y.reshape({', '.join(map(str, out_shape))}))."
                )
            target = target.to(torch.float32)
            check_finite(target, name="y")
            return target
        if tuple(target.shape) != out_shape[:-1]:
            raise IncompatibleInputsError(
                f"Output shape {out_shape} does not match target shape {tuple(target.shape)}: classification "
                f"targets are class indices shaped like the output without its last dimension, "
                f"{out_shape[:-1]} (e.g. y.reshape({', '.join(map(str, out_shape[:-1]))}))."
            )
        if target.is_floating_point() and not bool((target == target.round()).all()):
            bad = target[target != target.round()].flatten()[:3].tolist()
            raise IncompatibleInputsError(
                f"Classification targets must be integer class indices, got non-integer values {bad}; "
                "for continuous targets use num_classes=None (regression)."
            )
        target = target.to(torch.long)
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.out_features):
            raise IncompatibleInputsError(
                f"Classification targets must lie in [0, {self.out_features}) for num_classes={self.num_classes}, "
                f"got values from {int(target.min())} to {int(target.max())}."
            )
        return target

    def _make_trainable(self) -> None:
        """Replace parameters created under ``torch.inference_mode()`` by trainable copies."""
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None and param.is_inference():
                    module._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)

    def fit(self, *xs: Any, y: Any) -> TorchEstimator:
        """Train on ``xs`` (one ``(N, ..., d)`` tensor per input) and targets ``y``; returns ``self``.

        Raises:
            ValueError: On a wrong number of inputs, a feature width or sample count that does
                not match, a target whose shape does not match the output ("Output shape ...
                does not match target shape ..."), non-integer or out-of-range class indices, or
                NaN/inf values.
        """
        with torch.inference_mode(False), torch.enable_grad():
            self._make_trainable()
            tensors = self._check_inputs(xs)
            dev = tensors[0].device
            self.to(dev)
            target = self._check_target(y, tensors)
            n = target.shape[0]
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            self.train()
            for epoch in range(self.epochs):
                order = torch.randperm(n, device=dev)
                for start in range(0, n, self.batch_size):
                    idx = order[start : start + self.batch_size]
                    out = self(*(t[idx] for t in tensors))
                    loss = self._loss(out, target[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if self.verbose and (epoch + 1) % 10 == 0:
                    print(f"Epoch {epoch + 1}/{self.epochs}")
        self._fitted = True
        return self

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.num_classes is None:
            return nn.functional.mse_loss(out, target)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def predict(self, *xs: Any) -> torch.Tensor:
        """Outputs (regression) or argmax classes for ``xs``.

        Raises:
            NotFittedError: Before ``fit`` (or ``load_state_dict``).
            ValueError: On a wrong number of inputs, or a feature width that does not match.
        """
        self._check_count(len(xs))
        if not self._fitted:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call fit(..., y=...) first, or load trained "
                "weights with load_state_dict(...)."
            )
        tensors = self._check_inputs(xs)
        self.eval()
        out = self(*tensors)
        return out.argmax(-1) if self.num_classes is not None else out


class LinearEstimator(TorchEstimator):
    """A linear probe (``nn.Linear(d_latent, num_classes or 1)``) trained by :class:`TorchEstimator`.

    Examples:
        >>> import torch
        >>> x = torch.randn(64, 3)
        >>> est = LinearEstimator(3, epochs=5).fit(x, y=x[:, :1])
        >>> est.predict(x).shape
        torch.Size([64, 1])
    """

    def __init__(self, d_latent: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.linear = nn.Linear(d_latent, self.out_features, bias=bias)

    @property
    def in_features(self) -> tuple[int, ...]:
        return (self.linear.in_features,)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        self._check_count(len(xs))
        return self.linear(xs[0])


class BilinearEstimator(TorchEstimator):
    """A bilinear probe ``h1ᵀ W h2 + b`` (``nn.Bilinear``)."""

    n_inputs = 2

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bilinear = nn.Bilinear(d_latent1, d_latent2, self.out_features, bias=bias)

    @property
    def in_features(self) -> tuple[int, ...]:
        return (self.bilinear.in1_features, self.bilinear.in2_features)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        self._check_count(len(xs))
        return self.bilinear(xs[0], xs[1])


class LowRankBilinearEstimator(TorchEstimator):
    """A low-rank bilinear probe ``linear1(h1) ⊙ linear2(h2) + bias``.

    ``linear1`` and ``linear2`` are ``nn.Linear`` layers to ``num_classes or 1`` features, each
    with its own bias; ``bias`` is an extra top-level parameter (``None`` when ``bias=False``).
    The parameter names are tdhook 0.1's, so its saved state dicts load.
    """

    n_inputs = 2

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.linear1 = nn.Linear(d_latent1, self.out_features)
        self.linear2 = nn.Linear(d_latent2, self.out_features)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @property
    def in_features(self) -> tuple[int, ...]:
        return (self.linear1.in_features, self.linear2.in_features)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        self._check_count(len(xs))
        out = self.linear1(xs[0]) * self.linear2(xs[1])
        return out + self.bias if self.bias is not None else out

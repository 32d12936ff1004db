"""Probe estimators: a mean-difference classifier and small torch models with a scikit-learn API."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import NotFittedError

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


class MeanDifferenceClassifier:
    """Binary classifier along the difference of the class means (a "diff-in-means" probe).

    ``coef_ = μ₊ − μ₋`` and ``intercept_ = −½(‖μ₊‖² − ‖μ₋‖²)``, both divided by ``‖coef_‖``
    when ``normalize``.

    Args:
        normalize: Normalise the direction to unit norm.
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self._coef: np.ndarray | None = None
        self._intercept: np.ndarray | None = None

    def fit(self, X: Any, y: Any) -> MeanDifferenceClassifier:
        X, y = _numpy(X), _numpy(y)
        if y.ndim > 1:
            raise ValueError(
                f"Multiclass classification not supported: y has shape {y.shape}, expected (N,)."
            )
        y = y.astype(bool)
        if y.all() or (~y).all():
            raise ValueError("Both classes must be present in y (got a single class).")
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
            raise NotFittedError("Model not fitted: call fit(X, y) first.")
        return self._coef

    @property
    def intercept_(self) -> np.ndarray:
        if self._intercept is None:
            raise NotFittedError("Model not fitted: call fit(X, y) first.")
        return self._intercept

    def decision_function(self, X: Any) -> np.ndarray:
        return _numpy(X) @ self.coef_[0] + self.intercept_[0]

    def predict(self, X: Any) -> np.ndarray:
        return self.decision_function(X) > 0

    def predict_proba(self, X: Any) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)


class TorchEstimator(nn.Module):
    """Base class of the torch probes: ``fit(*Xs, y)`` trains with Adam, ``predict(*Xs)`` infers.

    Regression (``num_classes=None``) uses MSE with the target shape checked exactly;
    classification uses cross-entropy and ``predict`` returns the argmax.

    Args:
        num_classes: Number of classes, or None for regression.
        epochs: Training epochs per ``fit``.
        lr: Adam learning rate.
        batch_size: Minibatch size.
        device: Device to train on (data is moved there).
        verbose: Print ``"Epoch e/E"`` every 10 epochs.
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
        self.num_classes = num_classes
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.verbose = verbose

    @property
    def out_features(self) -> int:
        return self.num_classes or 1

    def _check_inputs(self, xs: tuple[Any, ...]) -> list[torch.Tensor]:
        if len(xs) != self.n_inputs:
            raise ValueError(
                f"{type(self).__name__.replace('Estimator', '')} estimator expects {self.n_inputs} input tensor"
                f"{'s' if self.n_inputs > 1 else ''}, got {len(xs)}"
            )
        dev = self.device or next(self.parameters()).device
        return [torch.as_tensor(x, dtype=torch.float32, device=dev) for x in xs]

    def fit(self, *xs: Any, y: Any) -> TorchEstimator:
        tensors = self._check_inputs(xs)
        dev = tensors[0].device
        self.to(dev)
        target = torch.as_tensor(y, device=dev)
        target = target.float() if self.num_classes is None else target.long()
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
        return self

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.num_classes is None:
            if out.shape != target.shape:
                raise ValueError(
                    f"Output shape {tuple(out.shape)} does not match target shape {tuple(target.shape)}; "
                    "give regression targets shaped [N, 1]."
                )
            return nn.functional.mse_loss(out, target)
        return nn.functional.cross_entropy(out, target)

    @torch.no_grad()
    def predict(self, *xs: Any) -> torch.Tensor:
        tensors = self._check_inputs(xs)
        self.eval()
        out = self(*tensors)
        return out.argmax(-1) if self.num_classes is not None else out


class LinearEstimator(TorchEstimator):
    """A linear probe (``nn.Linear(d_latent, num_classes or 1)``) trained by :class:`TorchEstimator`."""

    def __init__(self, d_latent: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.linear = nn.Linear(d_latent, self.out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class BilinearEstimator(TorchEstimator):
    """A bilinear probe ``h1ᵀ W h2 + b`` (``nn.Bilinear``)."""

    n_inputs = 2

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bilinear = nn.Bilinear(d_latent1, d_latent2, self.out_features, bias=bias)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return self.bilinear(h1, h2)


class LowRankBilinearEstimator(TorchEstimator):
    """A low-rank bilinear probe ``(U h1) ⊙ (V h2) + b``."""

    n_inputs = 2

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.u = nn.Linear(d_latent1, self.out_features)
        self.v = nn.Linear(d_latent2, self.out_features)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        out = self.u(h1) * self.v(h2)
        return out + self.bias if self.bias is not None else out

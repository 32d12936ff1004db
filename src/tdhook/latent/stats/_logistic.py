"""Multinomial logistic regression trained in torch, one batch at a time.

:class:`StreamingLogisticRegression` is a softmax classifier whose ``partial_fit`` runs a few
epochs of minibatch Adam (or full-batch L-BFGS) on the batch it is given, keeping its parameters
and optimiser state between calls. It is the classification counterpart of
:class:`~tdhook.latent.stats.StreamingLinearRegression` for probes that see activations batch by
batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._checks import as_float, as_tensor, check_finite, check_positive_int, parse_choice
from ..._distributed import all_reduce_sum, require_process_group
from ...errors import IncompatibleInputsError, InvalidParameterError, NotFittedError

__all__ = ["LogisticOptimizer", "StreamingLogisticRegression"]


@dataclass
class _Fitted:
    """Parameters and training state, created by the first ``partial_fit``."""

    weight: Tensor
    bias: Tensor
    classes: Tensor
    generator: torch.Generator
    optim: torch.optim.Optimizer | None = None


class LogisticOptimizer(str, enum.Enum):
    """How :meth:`StreamingLogisticRegression.partial_fit` trains on a batch."""

    ADAM = "adam"
    """``epochs`` passes of shuffled minibatch Adam (state kept across calls)."""
    LBFGS = "lbfgs"
    """Full-batch L-BFGS on each batch, ``epochs`` outer steps of up to 20 iterations each.

    Each call starts a fresh L-BFGS from the current parameters and converges on that batch,
    so it suits few large batches (or one ``fit``); Adam suits many small ones.
    """


class StreamingLogisticRegression:
    """Softmax (multinomial) logistic regression fitted batch by batch.

    The loss is the mean cross-entropy plus ``alpha / 2 · ‖W‖²`` (the intercept is not
    penalised). scikit-learn's ``LogisticRegression(C=C)`` fitted on ``n`` samples corresponds to
    ``alpha = 1 / (C · n)``.

    Args:
        num_classes: Number of classes; labels are then ``0 .. num_classes - 1``. If ``None``,
            the classes are taken from ``classes=`` in the first ``partial_fit`` call, or else
            from the labels of the first batch.
        alpha: L2 penalty on the weights.
        lr: Learning rate (Adam) or step size (L-BFGS).
        epochs: Passes over each batch given to ``partial_fit``.
        batch_size: Minibatch size for Adam.
        optimizer: ``"adam"`` or ``"lbfgs"`` (see :class:`LogisticOptimizer`).
        fit_intercept: Whether to learn an intercept.
        random_state: Seed of the minibatch shuffling.

    Attributes:
        classes_: The class labels, shape ``(C,)``.
        coef_: Weights, shape ``(C, D)`` (one row per class, also for two classes).
        intercept_: Intercepts, shape ``(C,)``.

    Examples:
        >>> import torch
        >>> X = torch.randn(400, 2)
        >>> y = (X[:, 0] > 0).long()
        >>> clf = StreamingLogisticRegression(lr=0.1, epochs=20, random_state=0)
        >>> for xb, yb in zip(X.split(100), y.split(100)):
        ...     _ = clf.partial_fit(xb, yb, classes=torch.tensor([0, 1]))
        >>> clf.score(X, y) > 0.95
        True
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        alpha: float = 1e-4,
        lr: float = 1e-2,
        epochs: int = 10,
        batch_size: int = 256,
        optimizer: LogisticOptimizer | str = LogisticOptimizer.ADAM,
        fit_intercept: bool = True,
        random_state: int | None = None,
    ) -> None:
        if num_classes is not None:
            check_positive_int(num_classes, name="num_classes", minimum=2)
        if not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise InvalidParameterError(f"alpha must be a number >= 0, got {alpha!r}.")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise InvalidParameterError(f"lr must be a number > 0, got {lr!r}.")
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.epochs = check_positive_int(epochs, name="epochs")
        self.batch_size = check_positive_int(batch_size, name="batch_size")
        self.optimizer = parse_choice(LogisticOptimizer, optimizer, name="optimizer")
        self.fit_intercept = fit_intercept
        self.random_state = random_state
        self._fitted: _Fitted | None = None
        self._n_seen = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, alpha={self.alpha}, lr={self.lr}, "
            f"epochs={self.epochs}, batch_size={self.batch_size}, optimizer={self.optimizer.value!r})"
        )

    # ------------------------------------------------------------------ fitting

    def reset(self) -> StreamingLogisticRegression:
        """Forget the parameters, classes and optimiser state."""
        self._fitted = None
        self._n_seen = 0
        return self

    def fit(self, X: Any, y: Any) -> StreamingLogisticRegression:
        """Reset, then :meth:`partial_fit` on ``(X, y)``."""
        return self.reset().partial_fit(X, y)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> StreamingLogisticRegression:
        """Train for ``epochs`` passes over one batch, continuing from the current parameters.

        Args:
            X: ``(n, D)`` features (``(n, ...)`` is flattened).
            y: ``(n,)`` labels, values among the classes.
            classes: All class labels; only read on the first call (as in scikit-learn's
                ``SGDClassifier.partial_fit``). Needed when the first batch lacks a class and
                ``num_classes`` is not set.

        Returns:
            ``self``.

        Raises:
            IncompatibleInputsError: On shape mismatches, a label that is not a known class, or
                continuous (non-whole, NaN) labels.
            NonFiniteInputError: If ``X`` holds NaN or inf.
        """
        x, labels = self._check_xy(X, y)
        fitted = self._fitted if self._fitted is not None else self._init(x, labels, classes)
        self._fitted = fitted
        target = self._encode(fitted.classes, labels.to(x.device))
        x = x.to(fitted.weight.dtype)
        params = [fitted.weight, fitted.bias] if self.fit_intercept else [fitted.weight]
        if self.optimizer is LogisticOptimizer.LBFGS:
            fitted.optim = None  # L-BFGS curvature history belongs to the previous batch's objective
        if fitted.optim is None:
            if self.optimizer is LogisticOptimizer.ADAM:
                fitted.optim = torch.optim.Adam(params, lr=self.lr)
            else:
                fitted.optim = torch.optim.LBFGS(
                    params, lr=self.lr, max_iter=20, line_search_fn="strong_wolfe"
                )
        if self.optimizer is LogisticOptimizer.ADAM:
            self._train_adam(fitted, fitted.optim, x, target)
        else:
            self._train_lbfgs(fitted.optim, fitted, x, target)
        self._n_seen += x.shape[0]
        return self

    def _init(self, x: Tensor, labels: Tensor, classes: Any) -> _Fitted:
        if classes is not None:
            found = torch.unique(as_tensor(classes, name="classes").reshape(-1))
        elif self.num_classes is not None:
            found = torch.arange(self.num_classes)
        else:
            found = torch.unique(labels)
        if found.numel() < 2:
            raise IncompatibleInputsError(
                f"StreamingLogisticRegression needs at least 2 classes, found {found.tolist()}; pass "
                f"classes=[...] (all labels) to the first partial_fit call, or set num_classes."
            )
        if self.num_classes is not None and found.numel() != self.num_classes:
            raise IncompatibleInputsError(
                f"num_classes={self.num_classes} but classes has {found.numel()} labels: {found.tolist()}."
            )
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        generator = torch.Generator(device="cpu")
        if self.random_state is not None:
            generator.manual_seed(self.random_state)
        else:
            generator.seed()
        return _Fitted(
            weight=torch.zeros(found.numel(), x.shape[1], dtype=dtype, device=x.device, requires_grad=True),
            bias=torch.zeros(found.numel(), dtype=dtype, device=x.device, requires_grad=True),
            classes=found.to(x.device),
            generator=generator,
        )

    @staticmethod
    def _encode(classes: Tensor, labels: Tensor) -> Tensor:
        pos = torch.searchsorted(classes, labels.to(classes.dtype)).clamp(max=classes.numel() - 1)
        bad = classes[pos] != labels.to(classes.dtype)
        if bool(bad.any()):
            unknown = torch.unique(labels[bad]).tolist()
            raise IncompatibleInputsError(
                f"Labels {unknown} are not among the classes {classes.tolist()} fixed at the first partial_fit; "
                f"pass classes=[...] with every label to the first call (or set num_classes)."
            )
        return pos

    def _loss(self, fitted: _Fitted, x: Tensor, target: Tensor) -> Tensor:
        logits = x @ fitted.weight.T + fitted.bias
        loss = F.cross_entropy(logits, target)
        if self.alpha > 0:
            loss = loss + 0.5 * self.alpha * (fitted.weight**2).sum()
        return loss

    def _train_adam(self, fitted: _Fitted, optim: torch.optim.Optimizer, x: Tensor, target: Tensor) -> None:
        n = x.shape[0]
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=fitted.generator).to(x.device)
                for idx in order.split(self.batch_size):
                    optim.zero_grad(set_to_none=True)
                    loss = self._loss(fitted, x[idx], target[idx])
                    loss.backward()
                    optim.step()

    def _train_lbfgs(self, optim: torch.optim.Optimizer, fitted: _Fitted, x: Tensor, target: Tensor) -> None:
        def closure() -> float:
            optim.zero_grad(set_to_none=True)
            loss = self._loss(fitted, x, target)
            loss.backward()
            return float(loss.detach())

        with torch.enable_grad():
            for _ in range(self.epochs):
                optim.step(closure)

    @staticmethod
    def _check_xy(X: Any, y: Any) -> tuple[Tensor, Tensor]:
        x = as_float(as_tensor(X, name="X"))
        labels = as_tensor(y, name="y")
        if x.ndim < 2:
            raise IncompatibleInputsError(f"X must have shape (n, D), got {tuple(x.shape)}.")
        if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
            raise IncompatibleInputsError(
                f"y must have shape (n,) = ({x.shape[0]},) to match X, got {tuple(labels.shape)}."
            )
        check_finite(x, name="X")
        if labels.is_floating_point():
            continuous = labels != labels.round()  # NaN included
            if bool(continuous.any()):
                examples = labels[continuous][:3].tolist()
                raise IncompatibleInputsError(
                    f"y holds continuous values such as {examples} ({int(continuous.sum())} of {labels.numel()} "
                    "labels are not whole numbers), but StreamingLogisticRegression is a classifier and needs "
                    "class labels. For continuous targets use StreamingLinearRegression; for classes, pass "
                    "integer labels (e.g. y.round().long() if they are class ids stored as floats)."
                )
        return x.flatten(1), labels

    # ---------------------------------------------------------------- predicting

    def _params(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._fitted is None:
            raise NotFittedError(
                "This StreamingLogisticRegression is not fitted yet; call partial_fit(X, y) or fit(X, y) "
                "before predict, predict_proba, score, coef_ or intercept_."
            )
        return self._fitted.weight.detach(), self._fitted.bias.detach(), self._fitted.classes

    @property
    def classes_(self) -> Tensor:
        """Class labels, in the order of the rows of :attr:`coef_`."""
        return self._params()[2]

    @property
    def coef_(self) -> Tensor:
        """Weights, ``(C, D)``."""
        return self._params()[0].clone()

    @property
    def intercept_(self) -> Tensor:
        """Intercepts, ``(C,)``."""
        return self._params()[1].clone()

    def decision_function(self, X: Any) -> Tensor:
        """Logits ``X Wᵀ + b``, shape ``(n, C)``."""
        weight, bias, _ = self._params()
        x = as_float(as_tensor(X, name="X"))
        x = x.flatten(1)
        if x.shape[1] != weight.shape[1]:
            raise IncompatibleInputsError(
                f"X has {x.shape[1]} features but StreamingLogisticRegression was fitted with {weight.shape[1]}."
            )
        return x.to(weight) @ weight.T + bias

    def predict_proba(self, X: Any) -> Tensor:
        """Class probabilities (softmax of the logits), shape ``(n, C)``."""
        return torch.softmax(self.decision_function(X), dim=-1)

    def predict(self, X: Any) -> Tensor:
        """Most probable class label for each row of ``X``, shape ``(n,)``."""
        _, _, classes = self._params()
        return classes[self.decision_function(X).argmax(-1)]

    def score(self, X: Any, y: Any) -> float:
        """Mean accuracy of :meth:`predict` on ``(X, y)``."""
        labels = as_tensor(y, name="y")
        pred = self.predict(X)
        return float((pred == labels.to(pred.device, pred.dtype)).to(torch.float64).mean())

    # ------------------------------------------------------------ state / dist

    def state(self) -> dict[str, Tensor]:
        """Parameters as a dict of tensors: ``weight``, ``bias``, ``classes``, ``n_samples_seen``.

        Empty before the first ``partial_fit``.
        """
        if self._fitted is None:
            return {}
        weight, bias, classes = self._params()
        return {
            "weight": weight.clone(),
            "bias": bias.clone(),
            "classes": classes.clone(),
            "n_samples_seen": torch.tensor(float(self._n_seen), dtype=torch.float64),
        }

    def all_reduce(self, group: Any = None) -> StreamingLogisticRegression:
        """Average the parameters over the ranks, weighted by the samples each rank trained on.

        This is one round of model averaging (as in federated averaging): it sums
        ``n_r · W_r`` and ``n_r`` with ``torch.distributed.all_reduce``. Unlike the regression
        accumulators, the result is not the single-process fit, only close to it when the ranks'
        data are alike. Optimiser state is reset, so training may continue from the average.

        Raises:
            DistributedNotInitializedError: If no process group is initialised.
            NotFittedError: If this rank has not been fitted.
        """
        require_process_group(type(self).__name__)
        weight, bias, _ = self._params()
        count = torch.tensor(float(self._n_seen), dtype=weight.dtype, device=weight.device)
        totals = torch.cat([(weight * count).reshape(-1), bias * count, count.reshape(1)])
        all_reduce_sum([totals], group)
        n_total = totals[-1]
        n_w = weight.numel()
        with torch.no_grad():
            weight.copy_(totals[:n_w].view_as(weight) / n_total)
            bias.copy_(totals[n_w:-1] / n_total)
        self._n_seen = round(float(n_total))
        if self._fitted is not None:
            self._fitted.optim = None
        return self

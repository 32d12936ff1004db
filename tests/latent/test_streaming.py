"""Streaming moments, linear/ridge regression and logistic regression.

Oracles: ``torch.mean``/``torch.cov`` on the concatenated data, scikit-learn's
``LinearRegression``/``Ridge``/``LogisticRegression`` fitted on all the data at once.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdhook.errors import NotFittedError
from tdhook.latent.stats import (
    DistributedNotInitializedError,
    IncompatibleInputsError,
    InsufficientSamplesError,
    InvalidParameterError,
    NonFiniteInputError,
    StreamingLinearRegression,
    StreamingLogisticRegression,
    StreamingMoments,
)

sklearn_linear = pytest.importorskip("sklearn.linear_model")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _uneven_batches(x: torch.Tensor, *others: torch.Tensor):
    sizes = [1, 17, 100, 3, 250, 29]
    sizes.append(x.shape[0] - sum(sizes))
    return zip(x.split(sizes), *(o.split(sizes) for o in others))


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("width", [6, 150], ids=["one-addmm", "blocked-upper-triangle"])
def test_moments_match_torch_mean_and_cov(width):
    x = 50.0 + 3.0 * _randn(500, width, seed=1)
    moments = StreamingMoments()
    for (batch,) in _uneven_batches(x):
        moments.update(batch)
        torch.testing.assert_close(moments.m2, moments.m2.T)  # read between updates: stays symmetric
    assert moments.count == 500
    torch.testing.assert_close(moments.mean, x.mean(0))
    torch.testing.assert_close(moments.covariance(), torch.cov(x.T))
    torch.testing.assert_close(moments.covariance(correction=0), torch.cov(x.T, correction=0))
    torch.testing.assert_close(moments.variance(), x.var(0))
    torch.testing.assert_close(moments.second_moment(), x.T @ x)
    single = StreamingMoments().update(_randn(10, seed=2))  # (n,) is one feature
    assert single.mean.shape == (1,)


@pytest.mark.parametrize("width", [4, 130])
def test_moments_merge_and_state_round_trip(width):
    x = _randn(300, width, seed=3, dtype=torch.float32)
    kept = x.clone()
    left, right = StreamingMoments().update(x[:120]), StreamingMoments().update(x[120:])
    merged = StreamingMoments().merge(left).merge(right).update(x[:0])
    whole = StreamingMoments().update(x)
    torch.testing.assert_close(whole.covariance(), torch.cov(x.double().T))
    assert torch.equal(x, kept)  # only the float64 copy is centred in place
    torch.testing.assert_close(merged.mean, whole.mean)
    torch.testing.assert_close(merged.covariance(), whole.covariance())
    assert merged.mean.dtype == torch.float64
    restored = StreamingMoments().load_state(merged.state())
    assert set(restored.state()) == {"count", "mean", "m2"}
    torch.testing.assert_close(restored.m2, merged.m2)
    assert StreamingMoments().state() == {}
    assert "count=300" in repr(whole)


def test_moments_errors():
    moments = StreamingMoments().update(_randn(5, 3))
    with pytest.raises(IncompatibleInputsError, match="4 features after batches with 3"):
        moments.update(_randn(5, 4))
    with pytest.raises(InsufficientSamplesError, match="at least 2 sample"):
        StreamingMoments().update(_randn(1, 3)).covariance()
    bad = _randn(5, 3)
    bad[1, 1] = math.inf
    with pytest.raises(NonFiniteInputError, match="x contains 1 non-finite"):
        StreamingMoments().update(bad)


# ------------------------------------------------------------------------ regression


def _regression_data(n=900, d=12, t=3, seed=4):
    x = 5.0 + _randn(n, d, seed=seed) @ _randn(d, d, seed=seed + 1)
    y = x @ _randn(d, t, seed=seed + 2) + 0.5 * _randn(n, t, seed=seed + 3) - 7.0
    return x, y


def _fit_stream(model, x, y):
    for xb, yb in _uneven_batches(x, y):
        model.partial_fit(xb, yb)
    return model


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_streaming_regression_equals_sklearn_on_concatenated_data(alpha, fit_intercept):
    x, y = _regression_data()
    ours = _fit_stream(StreamingLinearRegression(alpha=alpha, fit_intercept=fit_intercept), x, y)
    if alpha == 0:
        ref = sklearn_linear.LinearRegression(fit_intercept=fit_intercept)
    else:
        ref = sklearn_linear.Ridge(alpha=alpha, fit_intercept=fit_intercept)
    ref.fit(x.numpy(), y.numpy())
    scale = float(torch.as_tensor(ref.coef_).abs().max())
    torch.testing.assert_close(ours.coef_, torch.as_tensor(ref.coef_), rtol=1e-5, atol=1e-5 * scale)
    ref_intercept = torch.as_tensor(ref.intercept_, dtype=torch.float64).expand(
        3
    )  # sklearn: 0.0 without intercept
    torch.testing.assert_close(ours.intercept_, ref_intercept, rtol=1e-5, atol=1e-5)
    pred = ours.predict(x)
    torch.testing.assert_close(pred, torch.as_tensor(ref.predict(x.numpy())), rtol=1e-6, atol=1e-6)
    assert ours.score(x, y) == pytest.approx(ref.score(x.numpy(), y.numpy()), abs=1e-8)
    assert ours.n_samples_seen_ == 900
    assert ours.n_features_in_ == 12


def test_streaming_regression_1d_target_numpy_and_fit_resets():
    x, y = _regression_data(t=1)
    y1 = y[:, 0]
    ours = StreamingLinearRegression().fit(x[:10], y1[:10])  # discarded by the next fit
    ours.fit(x.numpy(), y1.numpy())
    ref = sklearn_linear.LinearRegression().fit(x.numpy(), y1.numpy())
    assert ours.coef_.shape == (12,)
    assert ours.intercept_.shape == ()
    torch.testing.assert_close(ours.coef_, torch.as_tensor(ref.coef_), rtol=1e-6, atol=1e-8)
    assert float(ours.intercept_) == pytest.approx(float(ref.intercept_), rel=1e-6)
    assert ours.predict(x.float()).dtype == torch.float32
    assert ours.predict(x).shape == (900,)
    assert ours.score(x, y1) == pytest.approx(sklearn_metrics.r2_score(y1.numpy(), ref.predict(x.numpy())))


def test_streaming_regression_rank_deficient_gives_minimum_norm_solution():
    x, y = _regression_data(d=5, t=2)
    x = torch.cat([x, x[:, :2] * 2.0], dim=1)  # collinear columns
    ours = _fit_stream(StreamingLinearRegression(), x, y)
    ref = sklearn_linear.LinearRegression().fit(x.numpy(), y.numpy())
    torch.testing.assert_close(ours.predict(x), torch.as_tensor(ref.predict(x.numpy())), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.coef_, torch.as_tensor(ref.coef_), rtol=1e-5, atol=1e-6)


def test_streaming_regression_on_ill_conditioned_deep_relu_features():
    """Deep random ReLU features: dead units (exact zero columns) and a huge condition number."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 64)] + [torch.nn.Linear(64, 64) for _ in range(9)]
    x = _randn(3000, 16, seed=11, dtype=torch.float32)
    y = torch.sin(x[:, :2]) + x[:, 2:4]
    with torch.no_grad():
        for layer in layers:
            x = torch.relu(layer(x))
    x_train, x_test, y_train, y_test = (
        x[:2000].double(),
        x[2000:].double(),
        y[:2000].double(),
        y[2000:].double(),
    )
    ours = _fit_stream(StreamingLinearRegression(), x_train, y_train)
    ref = sklearn_linear.LinearRegression().fit(x_train.numpy(), y_train.numpy())
    assert ours.score(x_test, y_test) == pytest.approx(ref.score(x_test.numpy(), y_test.numpy()), abs=1e-6)


def test_streaming_regression_errors():
    with pytest.raises(NotFittedError, match="not fitted yet; call partial_fit") as info:
        StreamingLinearRegression().predict(_randn(3, 2))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AttributeError)
    with pytest.raises(AttributeError):
        StreamingLinearRegression().coef_
    with pytest.raises(IncompatibleInputsError, match="same number of samples, got 10 and 9"):
        StreamingLinearRegression().partial_fit(_randn(10, 2), _randn(9))
    model = StreamingLinearRegression().partial_fit(_randn(10, 2), _randn(10))
    with pytest.raises(IncompatibleInputsError, match="2 feature.*got a batch with 3"):
        model.partial_fit(_randn(10, 3), _randn(10))
    with pytest.raises(IncompatibleInputsError, match="X has 3 features"):
        model.predict(_randn(4, 3))
    bad = _randn(10, 2)
    bad[0, 0] = math.nan
    with pytest.raises(NonFiniteInputError, match="X contains 1 non-finite"):
        model.partial_fit(bad, _randn(10))
    with pytest.raises(InvalidParameterError, match="alpha must be a number >= 0"):
        StreamingLinearRegression(alpha=-1.0)


# -------------------------------------------------------------------------- logistic


def _blobs(n_per_class=200, seed=5):
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0]], dtype=torch.float64)
    x = torch.cat([c + _randn(n_per_class, 3, seed=seed + i) for i, c in enumerate(centres)]) * 3.0 + 2.0
    y = torch.arange(3).repeat_interleave(n_per_class)
    perm = torch.randperm(3 * n_per_class, generator=_gen(seed))
    return x[perm].float(), y[perm]


def test_streaming_logistic_adam_reaches_sklearn_accuracy():
    x, y = _blobs()
    ref = sklearn_linear.LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy())
    ref_acc = ref.score(x.numpy(), y.numpy())
    clf = StreamingLogisticRegression(lr=0.05, epochs=15, random_state=0)
    for xb, yb in zip(x.split(100), y.split(100)):
        clf.partial_fit(xb, yb, classes=[0, 1, 2])
    assert clf.score(x, y) >= ref_acc - 0.02
    proba = clf.predict_proba(x)
    torch.testing.assert_close(proba.sum(1), torch.ones(600))
    assert clf.coef_.shape == (3, 3)
    assert clf.intercept_.shape == (3,)
    assert torch.equal(clf.classes_, torch.tensor([0, 1, 2]))


def test_streaming_logistic_lbfgs_matches_sklearn_solution():
    """One L-BFGS fit on all data minimises sklearn's objective: alpha = 1 / (C · n)."""
    x, y = _blobs()
    x = x.double()
    ref = sklearn_linear.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    clf = StreamingLogisticRegression(alpha=1.0 / 600, lr=1.0, epochs=10, optimizer="lbfgs").fit(x, y)
    torch.testing.assert_close(
        clf.predict_proba(x), torch.as_tensor(ref.predict_proba(x.numpy())), rtol=0, atol=2e-3
    )
    assert clf.score(x, y) == pytest.approx(ref.score(x.numpy(), y.numpy()), abs=1 / 600 + 1e-9)


def test_streaming_logistic_labels_and_errors():
    x, y = _blobs()
    labels = torch.tensor([10, 20, 30])[y]
    clf = StreamingLogisticRegression(epochs=3, random_state=0).fit(x, labels)
    assert set(clf.predict(x).tolist()) <= {10, 20, 30}
    with pytest.raises(
        IncompatibleInputsError, match=r"Labels \[40\] are not among the classes \[10, 20, 30\]"
    ):
        clf.partial_fit(x[:5], torch.full((5,), 40))
    with pytest.raises(NotFittedError, match="StreamingLogisticRegression is not fitted"):
        StreamingLogisticRegression().predict(x)
    with pytest.raises(IncompatibleInputsError, match="at least 2 classes"):
        StreamingLogisticRegression().partial_fit(x[:5], torch.zeros(5, dtype=torch.long))
    with pytest.raises(
        InvalidParameterError, match=r"Unknown optimizer: .*; expected one of \['adam', 'lbfgs'\]"
    ):
        StreamingLogisticRegression(optimizer="sgd")
    seeded = [
        StreamingLogisticRegression(epochs=2, random_state=3, num_classes=3).fit(x, y).coef_ for _ in range(2)
    ]
    assert torch.equal(seeded[0], seeded[1])


# ------------------------------------------------------------------ no process group


@pytest.mark.parametrize(
    "make",
    [
        lambda: StreamingMoments().update(_randn(5, 2)),
        lambda: StreamingLinearRegression().partial_fit(_randn(5, 2), _randn(5)),
        lambda: StreamingLogisticRegression(epochs=1).partial_fit(_randn(6, 2), torch.tensor([0, 1] * 3)),
    ],
    ids=["moments", "linear", "logistic"],
)
def test_all_reduce_without_process_group_says_how_to_fix(make):
    with pytest.raises(DistributedNotInitializedError, match=r"init_process_group.*torchrun") as info:
        make().all_reduce()
    assert isinstance(info.value, RuntimeError)

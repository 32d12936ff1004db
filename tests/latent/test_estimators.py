"""Probe estimators (spec §8.4, addendum §5, issue 11 §4): grad modes, shapes, state dicts, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from tensordict import TensorDict
from torch import nn

from tdhook.errors import NotFittedError, TdhookError
from tdhook.latent.probing import (
    BilinearEstimator,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    ProbeManager,
    Probing,
)
from tdhook.latent.stats import StreamingLogisticRegression


def regression_data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


def make(cls: type, **kwargs):
    torch.manual_seed(0)
    if cls is LinearEstimator:
        return LinearEstimator(3, **kwargs)
    return cls(3, 2, **kwargs)


def inputs(cls: type, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (x,) if cls is LinearEstimator else (x, x[:, :2])


ESTIMATORS = [LinearEstimator, BilinearEstimator, LowRankBilinearEstimator]
GRAD_MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "enable_grad": torch.enable_grad,
}


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_fit_under_any_grad_mode_leaves_it_unchanged(cls, mode) -> None:
    x, y = regression_data()
    x = x.clone().requires_grad_(True)
    manager = GRAD_MODES[mode]
    with manager():
        grad_before, inference_before = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        est = make(cls, epochs=3, lr=0.05)  # created inside the mode too (probes are made at enter)
        before = [p.detach().clone() for p in est.parameters()]
        est.fit(*inputs(cls, x), y=y)
        assert torch.is_grad_enabled() == grad_before
        assert torch.is_inference_mode_enabled() == inference_before
        pred = est.predict(*inputs(cls, x))
    assert pred.shape == (128, 1)
    assert any(not torch.equal(b, p) for b, p in zip(before, est.parameters()))  # it trained
    assert x.grad is None  # inputs were detached: no gradient reached the caller's tensor
    assert all(p.requires_grad and not p.is_inference() for p in est.parameters())


def test_probing_fits_a_torch_probe_inside_no_grad() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x, y = regression_data()
    manager = ProbeManager(
        LinearEstimator, {"d_latent": 4, "epochs": 2}, lambda preds, labels: {"n": len(preds)}
    )
    td = TensorDict({"input": x, "labels": y, "step_type": "fit"}, batch_size=[128])
    for mode in (torch.no_grad, torch.inference_mode):
        manager.reset_estimators()
        manager.reset_metrics()
        with (
            mode(),
            Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
                model
            ) as hooked,
        ):
            hooked(td)
        assert manager.fit_metrics["0_fwd"] == {"n": 128}


def test_linear_probe_matches_least_squares() -> None:
    x, y = regression_data()
    est = LinearEstimator(3, epochs=300, lr=0.05, batch_size=128).fit(x, y=y)
    ref = LinearRegression().fit(x.numpy(), y.numpy())
    torch.testing.assert_close(
        est.linear.weight.detach(), torch.tensor(ref.coef_, dtype=torch.float32), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(
        est.linear.bias.detach(), torch.tensor(ref.intercept_, dtype=torch.float32), atol=2e-3, rtol=0
    )


def test_linear_forward_argument_count_is_a_value_error() -> None:
    est = LinearEstimator(3)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="Linear estimator expects 1 input tensor, got 2"):
        est(x, x)
    with pytest.raises(ValueError, match="Linear estimator expects 1 input tensor, got 0"):
        est()
    with pytest.raises(ValueError, match="Bilinear estimator expects 2 input tensors, got 1"):
        BilinearEstimator(3, 2)(x)
    assert est(x).shape == (4, 1)


def test_classification_target_shape_errors() -> None:
    x, _ = regression_data(32)
    labels = (x[:, 0] > 0).long()
    est = LinearEstimator(3, num_classes=2, epochs=1)
    with pytest.raises(
        ValueError, match=r"Output shape \(32, 2\) does not match target shape \(32, 1\)"
    ) as info:
        est.fit(x, y=labels[:, None])
    assert isinstance(info.value, TdhookError)
    assert "(32,)" in str(info.value)  # names the expected shape
    with pytest.raises(ValueError, match=r"non-integer values \[0\.5"):
        est.fit(x, y=torch.full((32,), 0.5))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\).*from 0 to 2"):
        est.fit(x, y=labels * 2)
    with pytest.raises(ValueError, match=r"Output shape \(32, 1\) does not match target shape \(32,\)"):
        LinearEstimator(3, epochs=1).fit(x, y=x[:, 0])
    # Float labels holding integers, and bools, are class indices.
    LinearEstimator(3, num_classes=2, epochs=1).fit(x, y=labels.float())
    LinearEstimator(3, num_classes=2, epochs=1).fit(x, y=labels.bool())


def test_sample_count_width_and_finiteness_errors() -> None:
    x, y = regression_data(32)
    with pytest.raises(ValueError, match=r"Output shape \(32, 1\) does not match target shape \(30, 1\)"):
        LinearEstimator(3, epochs=1).fit(x, y=y[:30])
    with pytest.raises(ValueError, match=r"different numbers of samples \[32, 30\]"):
        BilinearEstimator(3, 2, epochs=1).fit(x, x[:30, :2], y=y)
    with pytest.raises(ValueError, match=r"input 0 must have shape \(N, \.\.\., 3\), got \(32, 5\)"):
        LinearEstimator(3, epochs=1).fit(torch.randn(32, 5), y=y)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LinearEstimator(3, epochs=1).fit(bad, y=y)
    with pytest.raises(ValueError, match="0 samples"):
        LinearEstimator(3, epochs=1).fit(x[:0], y=y[:0])


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_predict_before_fit(cls) -> None:
    x, _ = regression_data(8)
    with pytest.raises(NotFittedError, match=f"This {cls.__name__} is not fitted yet") as info:
        make(cls).predict(*inputs(cls, x))
    assert isinstance(info.value, ValueError)


def test_constructor_ranges() -> None:
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        LinearEstimator(3, epochs=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got -4"):
        LinearEstimator(3, batch_size=-4)
    with pytest.raises(ValueError, match=r"lr must be a number > 0, got -0\.1"):
        LinearEstimator(3, lr=-0.1)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        LinearEstimator(3, num_classes=2.5)


def test_low_rank_bilinear_loads_an_01_state_dict() -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "linear1.weight": torch.randn(2, 3, generator=g),
        "linear1.bias": torch.randn(2, generator=g),
        "linear2.weight": torch.randn(2, 4, generator=g),
        "linear2.bias": torch.randn(2, generator=g),
        "bias": torch.randn(2, generator=g),
    }
    est = LowRankBilinearEstimator(3, 4, num_classes=2)
    assert set(est.state_dict()) == set(state)
    est.load_state_dict(state)  # strict
    h1, h2 = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    logits = (h1 @ state["linear1.weight"].T + state["linear1.bias"]) * (
        h2 @ state["linear2.weight"].T + state["linear2.bias"]
    ) + state["bias"]
    torch.testing.assert_close(est(h1, h2), logits)
    assert torch.equal(est.predict(h1, h2), logits.argmax(-1))  # loaded weights count as fitted
    no_bias = LowRankBilinearEstimator(3, 4, bias=False)
    assert no_bias.bias is None
    assert set(no_bias.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        LowRankBilinearEstimator(3, 4, num_classes=2).load_state_dict(
            {"linear1.weight": state["linear1.weight"]}
        )


def test_mean_difference_classifier_input_errors() -> None:
    x = np.array([[1.0, 0.0], [3.0, 0.0], [-1.0, 2.0], [-3.0, 2.0]])
    clf = MeanDifferenceClassifier()
    with pytest.raises(
        ValueError, match=r"Multiclass classification not supported.*values \[0, 1, 2\]"
    ) as info:
        clf.fit(x, np.array([0, 1, 2, 1]))
    assert isinstance(info.value, TdhookError)
    with pytest.raises(ValueError, match=r"values \[0\.2, 0\.7"):
        clf.fit(x, np.array([0.2, 0.7, 0.9, 0.7]))
    with pytest.raises(ValueError, match="X has 4 samples but y has 3"):
        clf.fit(x, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"X of shape \(N, D\), got \(4,\)"):
        clf.fit(x[:, 0], np.array([0, 1, 1, 0]))
    with pytest.raises(NotFittedError, match="Model not fitted: this MeanDifferenceClassifier"):
        MeanDifferenceClassifier().predict(x)
    clf.fit(x, np.array([True, True, False, False]))
    with pytest.raises(ValueError, match=r"fitted on 2 features, got X of shape \(4, 3\)"):
        clf.predict(np.ones((4, 3)))


def test_mean_difference_classifier_matches_the_closed_form_on_torch_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = torch.arange(40) % 2
    clf = MeanDifferenceClassifier(normalize=False).fit(x, y)
    mu1, mu0 = x[y == 1].mean(0).double(), x[y == 0].mean(0).double()
    np.testing.assert_allclose(clf.coef_[0], (mu1 - mu0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(clf.intercept_, [-0.5 * float(mu1 @ mu1 - mu0 @ mu0)], rtol=1e-5)


def test_streaming_logistic_refuses_continuous_labels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g)
    y = torch.rand(20, generator=g)
    with pytest.raises(ValueError, match=r"continuous.*StreamingLinearRegression") as info:
        StreamingLogisticRegression().fit(x, y)
    assert f"{float(y[0]):.4g}"[:4] in str(info.value)  # names a value
    assert isinstance(info.value, TdhookError)
    labels = (x[:, 0] > 0).float()  # floats holding class labels are fine
    clf = StreamingLogisticRegression(epochs=2, random_state=0).fit(x, labels)
    assert set(clf.predict(x).tolist()) <= {0.0, 1.0}
    nan_labels = labels.clone()
    nan_labels[0] = float("nan")
    with pytest.raises(ValueError, match="nan"):
        StreamingLogisticRegression().fit(x, nan_labels)
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) = \(20,\) to match X, got \(19,\)"):
        StreamingLogisticRegression().fit(x, labels[:19])
    with pytest.raises(NotFittedError, match="not fitted yet"):
        StreamingLogisticRegression().predict(x)

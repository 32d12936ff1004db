"""Probing, probes, managers and estimators (spec §8.4), against scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, r2_score
from tensordict import TensorDict
from torch import nn

from tdhook.errors import NoMatchError, NotFittedError, ProbingError
from tdhook.latent.probing import (
    BilinearEstimator,
    BilinearProbeManager,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    ProbeManager,
    ProbesNeverFiredWarning,
    Probing,
)
from tdhook.latent.stats import StreamingLinearRegression


def r2(preds, labels):
    return {"r2": r2_score(labels, preds)}


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.fixture
def data() -> TensorDict:
    torch.manual_seed(1)
    x = torch.randn(64, 4)
    return TensorDict(input=x, labels=x[:, :1] * 2 - x[:, 1:2], batch_size=[64])


def run_probing(probing, model, data):
    with probing.prepare(model) as hooked:
        train, test = data[:48].clone(), data[48:].clone()
        train["step_type"] = "fit"
        hooked(train)
        test["step_type"] = "predict"
        hooked(test)


def test_metrics_equal_sklearn_on_manual_activations(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    run_probing(Probing(r"\d$", manager.probe_factory, additional_keys=["labels", "step_type"]), model, data)
    assert list(manager.fit_metrics) == ["0_fwd", "1_fwd", "2_fwd", "3_fwd", "4_fwd"]
    x = data["input"]
    h = model[1](model[0](x))  # layer 1's output
    reg = LinearRegression().fit(h[:48].detach().numpy(), data["labels"][:48].numpy())
    expected_test = r2_score(data["labels"][48:].numpy(), reg.predict(h[48:].detach().numpy()))
    assert manager.predict_metrics["1_fwd"]["r2"] == pytest.approx(expected_test, rel=1e-5)
    assert manager.fit_metrics["0_fwd"]["r2"] == pytest.approx(
        1.0, abs=1e-5
    )  # labels are linear in the input


def test_containers_skipped_and_absolute_names(model, data) -> None:
    outer = nn.Sequential(model)
    manager = ProbeManager(LinearRegression, {}, r2)
    probing = Probing(
        r"td_module\.module\.0",
        manager.probe_factory,
        relative=False,
        additional_keys=["labels", "step_type"],
    )
    run_probing(probing, outer, data)
    assert "td_module.module.0_fwd" not in manager.fit_metrics  # the inner Sequential is a container
    assert "td_module.module.0.2_fwd" in manager.fit_metrics


def test_fwd_pre_and_bwd_directions(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, allow_overwrite=True)
    probing = Probing(
        "2$", manager.probe_factory, directions=["fwd_pre"], additional_keys=["labels", "step_type"]
    )
    run_probing(probing, model, data)
    assert set(manager.fit_metrics) == {"2_fwd_pre"}


def test_missing_step_type_says_to_pass_additional_keys(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    with (
        pytest.raises(ProbingError, match=r"step_type must be 'fit' or 'predict', got None.*additional_keys"),
        Probing("0$", manager.probe_factory).prepare(model) as hooked,
    ):
        hooked(data)
    assert not model[0]._forward_hooks


def test_missing_labels_and_bad_step_type(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    td = data.exclude("labels")
    td["step_type"] = "fit"
    with (
        pytest.raises(ProbingError, match="no labels"),
        Probing("0$", manager.probe_factory, additional_keys=["step_type"]).prepare(model) as hooked,
    ):
        hooked(td)
    manager = ProbeManager(LinearRegression, {}, r2, allow_overwrite=True)
    data["step_type"] = "train"
    with (
        pytest.raises(ValueError, match="step_type must be 'fit' or 'predict', got 'train'"),
        Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
            model
        ) as hooked,
    ):
        hooked(data)
    with (
        pytest.raises(KeyError, match=r"Missing additional \(probing\) key\(s\) \['nope'\]"),
        Probing("0$", manager.probe_factory, additional_keys=["nope"]).prepare(model) as hooked,
    ):
        hooked(data)


def test_duplicates_without_overwrite(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    probing = Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"])
    data["step_type"] = "fit"
    with probing.prepare(model) as hooked:
        hooked(data)
        with pytest.raises(ProbingError, match="Metrics for 0_fwd already exist"):
            hooked(data)
    with pytest.raises(ProbingError, match="Probe 0_fwd already exists, call reset_estimators"):
        probing.prepare(model).__enter__()
    assert not model[0]._forward_hooks
    manager.reset_estimators()
    manager.reset_metrics()
    with probing.prepare(model) as hooked:
        hooked(data)
        with hooked.disable_context_hooks():  # does not re-create probes (spec §13.7)
            pass
    assert "0_fwd" in manager.fit_metrics


def test_no_match_raises(model) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    with pytest.raises(NoMatchError, match="matched no module"):
        Probing("transformer", manager.probe_factory).prepare(model).__enter__()


def test_classification_probe_and_preprocess(model, data) -> None:
    data["labels"] = (data["input"][:, 0] > 0).long()
    manager = ProbeManager(
        LogisticRegression,
        {"max_iter": 500},
        lambda p, y: {"acc": accuracy_score(y, p)},
        data_preprocess_callback=lambda d: d.detach().flatten(1) * 10,
    )
    run_probing(Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"]), model, data)
    assert manager.fit_metrics["0_fwd"]["acc"] > 0.8


def test_mean_difference_classifier_closed_form() -> None:
    x = np.array([[1.0, 0.0], [3.0, 0.0], [-1.0, 2.0], [-3.0, 2.0]])
    y = np.array([1, 1, 0, 0])
    clf = MeanDifferenceClassifier(normalize=False).fit(x, y)
    np.testing.assert_allclose(clf.coef_, [[4.0, -2.0]])
    np.testing.assert_allclose(clf.intercept_, [-0.5 * (4.0 - 8.0)])  # means (2, 0) and (-2, 2)
    assert clf.predict(x).tolist() == [True, True, False, False]
    assert clf.predict_proba(x).shape == (4, 2)
    normed = MeanDifferenceClassifier().fit(x, y)
    np.testing.assert_allclose(np.linalg.norm(normed.coef_), 1.0)
    with pytest.raises(NotFittedError, match="Model not fitted"):
        MeanDifferenceClassifier().coef_
    with pytest.raises(ValueError, match="Both classes must be present"):
        clf.fit(x, np.ones(4))
    with pytest.raises(ValueError, match="Multiclass classification not supported"):
        clf.fit(x, np.ones((4, 2)))


def test_torch_estimators_learn() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    est = LinearEstimator(3, epochs=150, lr=0.1, batch_size=256).fit(x, y=y)
    assert r2_score(y.numpy(), est.predict(x).numpy()) > 0.99
    with pytest.raises(ValueError, match="Output shape .* does not match target shape"):
        LinearEstimator(3, epochs=1).fit(x, y=y[:, 0])
    with pytest.raises(ValueError, match="Linear estimator expects 1 input tensor, got 2"):
        LinearEstimator(3).predict(x, x)
    cls = (x[:, 0] > 0).long()
    est = LinearEstimator(3, num_classes=2, epochs=60, lr=0.1, batch_size=256).fit(x, y=cls)
    assert (est.predict(x) == cls).float().mean() > 0.95
    h2 = torch.randn(256, 2)
    target = (x[:, :1] * h2[:, :1]).detach()
    for cls_ in (BilinearEstimator, LowRankBilinearEstimator):
        est = cls_(3, 2, epochs=200, lr=0.05, batch_size=256).fit(x, h2, y=target)
        assert r2_score(target.numpy(), est.predict(x, h2).numpy()) > 0.9
    assert LowRankBilinearEstimator(3, 2, bias=False).bias is None


def test_torch_estimators_train_inside_no_grad_and_on_graph_inputs() -> None:
    """Probing runs the model under no_grad, and activations may carry the model's graph."""
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    cls = (x[:, 0] > 0).long()
    with torch.no_grad():
        est = LinearEstimator(3, num_classes=2, epochs=60, lr=0.1, batch_size=256).fit(x, y=cls)
    assert (est.predict(x) == cls).float().mean() > 0.95
    layer = torch.nn.Linear(3, 3)
    h = layer(x)  # requires grad through the layer: the probe must not backpropagate into it
    BilinearEstimator(3, 3, epochs=3, batch_size=64).fit(h, h, y=x[:, :1])
    assert layer.weight.grad is None


@pytest.mark.parametrize("relative", [True, False])
def test_bilinear_pairs_work_in_both_modes(model, data, relative) -> None:
    manager = BilinearProbeManager(
        [("0", "2"), ("1", "2")], LowRankBilinearEstimator, {"d_latent1": 16, "d_latent2": 8, "epochs": 5}, r2
    )
    probing = Probing(
        manager.key_pattern, manager.probe_factory, relative=relative, additional_keys=["labels", "step_type"]
    )
    manager.before_all()
    run_probing(probing, model, data)
    manager.after_all()
    assert set(manager.fit_metrics) == {"0_2_fwd", "1_2_fwd"}
    assert set(manager.predict_metrics) == {"0_2_fwd", "1_2_fwd"}


def test_bilinear_unresolved_pair_raises() -> None:
    manager = BilinearProbeManager([("a", "b")], BilinearEstimator, {"d_latent1": 2, "d_latent2": 2}, r2)
    dispatcher = manager.probe_factory("a", "fwd")
    dispatcher.step(torch.randn(4, 2), labels=torch.randn(4, 1), step_type="fit")
    with pytest.raises(ValueError, match=r"Bilinear probes still waiting on keys: \['a', 'b'\]"):
        manager.after_all()


def test_streaming_probe_equals_sklearn_on_concatenated_batches(model, data) -> None:
    from tdhook.latent.stats import StreamingLinearRegression

    manager = ProbeManager(StreamingLinearRegression, {}, r2)
    probing = Probing(r"[02]$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with probing.prepare(model) as hooked:
        for batch in data[:48].split(16):
            batch = batch.clone()
            batch["step_type"] = "partial_fit"
            hooked(batch)
        test = data[48:].clone()
        test["step_type"] = "predict"
        hooked(test)
    assert manager.fit_metrics == {}
    h = model[2](model[1](model[0](data["input"]))).detach().numpy()
    reg = LinearRegression().fit(h[:48], data["labels"][:48].numpy())
    expected = r2_score(data["labels"][48:].numpy(), reg.predict(h[48:]))
    assert manager.predict_metrics["2_fwd"]["r2"] == pytest.approx(expected, abs=1e-4)


def test_sklearn_partial_fit_estimators_and_refusal(model, data) -> None:
    from sklearn.linear_model import SGDRegressor

    manager = ProbeManager(SGDRegressor, {"random_state": 0}, r2)
    labels = data["labels"][:, 0]
    with Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
        model
    ) as hooked:
        for _ in range(20):
            for batch in data.split(16):
                batch = batch.clone()
                batch["labels"] = batch["labels"][:, 0]  # SGDRegressor wants 1-D targets
                batch["step_type"] = "partial_fit"
                hooked(batch)
        data["labels"] = labels
        data["step_type"] = "predict"
        hooked(data)
    assert manager.predict_metrics["0_fwd"]["r2"] > 0.9
    manager = ProbeManager(LinearRegression, {}, r2)
    data["step_type"] = "partial_fit"
    with (
        pytest.raises(ProbingError, match="LinearRegression has no partial_fit"),
        Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
            model
        ) as hooked,
    ):
        hooked(data)
    with pytest.raises(ProbingError, match="has no all_reduce"):
        manager.all_reduce()


class _NanAfter(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_non_finite_activations_name_the_layer(data) -> None:
    """A NaN layer is refused before any estimator sees it, naming the module; opting out lets
    the estimator decide (scikit-learn's own error then gets a note naming the probe)."""
    from tdhook.errors import NonFiniteInputError

    model = nn.Sequential(nn.Linear(4, 8), _NanAfter(), nn.Linear(8, 1))
    batch = data.clone()
    for estimator, step in ((StreamingLinearRegression, "partial_fit"), (LinearRegression, "fit")):
        manager = ProbeManager(estimator, {}, r2)
        batch["step_type"] = step
        with (
            pytest.raises(
                NonFiniteInputError, match=r"probe on module '1' \(fwd\): X contains 512 non-finite"
            ),
            Probing(r"1$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
                model
            ) as hooked,
        ):
            hooked(batch)
        assert isinstance(manager.estimators["1_fwd"], estimator)
        assert not hasattr(manager.estimators["1_fwd"], "coef_")  # never fitted
        assert not model[1]._forward_hooks
    manager = ProbeManager(LinearRegression, {}, r2, check_finite=False)
    with (
        pytest.raises(ValueError, match="NaN") as info,
        Probing(r"1$", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
            model
        ) as hooked,
    ):
        hooked(batch)
    assert not isinstance(info.value, NonFiniteInputError)  # scikit-learn's own check
    assert "raised by the probe on module '1' (fwd)" in info.value.__notes__


def test_empty_batches_and_non_finite_labels_are_refused_before_the_estimator(model, data) -> None:
    from tdhook.errors import InsufficientSamplesError, NonFiniteInputError

    manager = ProbeManager(LinearRegression, {}, r2, allow_overwrite=True)
    probing = Probing(r"2$", manager.probe_factory, additional_keys=["labels", "step_type"])
    empty = data[:0].clone()
    for step in ("fit", "predict"):
        empty["step_type"] = step
        with (
            pytest.raises(InsufficientSamplesError, match=r"probe on module '2' \(fwd\): .* has 0 samples"),
            probing.prepare(model) as hooked,
        ):
            hooked(empty)
    bad = data.clone()
    bad["labels"][3] = float("inf")
    bad["step_type"] = "fit"
    with (
        pytest.raises(NonFiniteInputError, match=r"module '2'.*labels contains 1 non-finite"),
        probing.prepare(model) as hooked,
    ):
        hooked(bad)
    bad["step_type"] = "predict"  # labels are only checked when they are fitted on
    fit = data.clone()
    fit["step_type"] = "fit"
    with probing.prepare(model) as hooked:
        hooked(fit)
    manager.reset_metrics()
    reuse = ProbeManager(LinearRegression, {}, lambda p, y: {"n": len(p)}, reuse_probes=True)
    probing = Probing(r"2$", reuse.probe_factory, additional_keys=["labels", "step_type"])
    with probing.prepare(model) as hooked:
        hooked(fit)
        hooked(bad)  # predicting with NaN labels is the metric's business
    assert reuse.predict_metrics["2_fwd"] == {"n": 64}


def test_bilinear_probes_refuse_empty_and_non_finite_pairs(model, data) -> None:
    from tdhook.errors import InsufficientSamplesError, NonFiniteInputError

    manager = BilinearProbeManager([("0", "2")], BilinearEstimator, {"d_latent1": 16, "d_latent2": 8}, r2)
    probing = Probing(manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"])
    empty = data[:0].clone()
    empty["step_type"] = "fit"
    with pytest.raises(InsufficientSamplesError, match="h1 has 0 samples"), probing.prepare(model) as hooked:
        hooked(empty)
    nan_model = nn.Sequential(nn.Linear(4, 16), _NanAfter(), nn.Linear(16, 8))
    manager = BilinearProbeManager([("0", "1")], BilinearEstimator, {"d_latent1": 16, "d_latent2": 16}, r2)
    probing = Probing(manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"])
    batch = data.clone()
    batch["step_type"] = "fit"
    with pytest.raises(NonFiniteInputError, match="h2 contains"), probing.prepare(nan_model) as hooked:
        hooked(batch)


def test_backward_probes_that_never_fire_warn_at_exit_and_fire_with_a_backward(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, allow_overwrite=True)
    probing = Probing(
        "[24]$", manager.probe_factory, directions=["bwd"], additional_keys=["labels", "step_type"]
    )
    td = data.clone()
    td["step_type"] = "fit"
    with (
        pytest.warns(
            ProbesNeverFiredWarning,
            match=r"2 probe\(s\) never fired.*'2' \(bwd\), '4' \(bwd\).*\.backward\(\)",
        ),
        probing.prepare(model) as hooked,
    ):
        hooked(td.clone())  # no backward: the probes never see a gradient
    assert manager.fit_metrics == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbesNeverFiredWarning)
        with probing.prepare(model) as hooked:
            hooked(td.clone().set("input", data["input"].requires_grad_()))["output"].sum().backward()
    assert set(manager.fit_metrics) == {"2_bwd", "4_bwd"}  # with the labels of the forward


def test_forward_probes_of_modules_that_never_run_warn(model, data) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, allow_overwrite=True)
    probing = Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with (
        pytest.warns(ProbesNeverFiredWarning, match=r"'0' \(fwd\).*call the hooked module"),
        probing.prepare(model),
    ):
        pass
    with warnings.catch_warnings():  # an exit by an exception does not add a warning
        warnings.simplefilter("error", ProbesNeverFiredWarning)
        with pytest.raises(KeyError), probing.prepare(model):
            raise KeyError("boom")


def test_bilinear_pair_naming_a_module_that_is_not_probed_is_refused(model, data) -> None:
    manager = BilinearProbeManager(
        [("0", "2"), ("2", "linear9")], BilinearEstimator, {"d_latent1": 16, "d_latent2": 8}, r2
    )
    probing = Probing(manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"])
    with pytest.raises(
        ProbingError, match=r"pair \('2', 'linear9'\) names \['linear9'\].*probed modules: \['0', '2'\]"
    ):
        probing.prepare(model).__enter__()
    assert not model[0]._forward_hooks
    assert not model[2]._forward_hooks
    assert manager.estimators == {}  # refused before any probe was created
    narrow = Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with pytest.raises(ProbingError, match=r"pair \('0', '2'\) names \['2'\]"):
        narrow.prepare(model).__enter__()


def test_a_tensor_call_is_refused_when_labels_come_from_the_tensordict(model, data) -> None:
    """A tensor call carries no ``additional_keys``: the probes would get the previous call's
    labels with new activations, so it is refused before the model runs."""
    from tdhook.errors import InvalidInputError

    seen: list[torch.Tensor] = []

    class Recorder:
        def step(self, value, **extras):
            seen.append(value)

    probing = Probing(r"0$", lambda name, direction: Recorder(), additional_keys=["labels"])
    with probing.prepare(model) as hooked:
        hooked(data)
        with pytest.raises(InvalidInputError, match="Probing needs a TensorDict input, got Tensor"):
            hooked(data["input"])
    assert len(seen) == 1
    plain = Probing(r"0$", lambda name, direction: Recorder())  # no labels: a tensor call is fine
    with plain.prepare(model) as hooked:
        hooked(data["input"])
    assert len(seen) == 2

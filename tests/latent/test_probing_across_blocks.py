"""Probes that live across `with` blocks (reuse_probes) and the results TensorDict, against scikit-learn."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from tensordict import TensorDict
from torch import nn

from tdhook.errors import ProbingError
from tdhook.latent.probing import BilinearProbeManager, LowRankBilinearEstimator, ProbeManager, Probing


def r2(preds, labels):
    return {"r2": r2_score(labels, preds), "n": len(preds)}


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def batch(seed: int, step_type: str) -> TensorDict:
    torch.manual_seed(seed)
    x = torch.randn(48, 4)
    td = TensorDict(input=x, labels=x[:, :1] * 2 - x[:, 1:2], batch_size=[48])
    td["step_type"] = step_type
    return td


def probing(manager: ProbeManager) -> Probing:
    return Probing(r"[02]$", manager.probe_factory, additional_keys=["labels", "step_type"])


def test_fit_in_one_block_and_predict_in_a_later_one(model) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, reuse_probes=True)
    train, test = batch(1, "fit"), batch(2, "predict")
    with probing(manager).prepare(model) as hooked:
        hooked(train)
    with probing(manager).prepare(model) as hooked:  # a new context, even a new Probing
        hooked(test)
    # oracle: scikit-learn fitted on the training activations, evaluated on the test ones
    with torch.no_grad():
        for key, layer in (("0_fwd", model[0]), ("2_fwd", model[:3])):
            reference = LinearRegression().fit(layer(train["input"]), train["labels"])
            expected = r2_score(test["labels"], reference.predict(layer(test["input"])))
            assert manager.predict_metrics[key]["r2"] == pytest.approx(expected, abs=1e-10)
            assert manager.results["predict"][key]["r2"].item() == pytest.approx(expected, abs=1e-10)
    assert manager.probe_factory("0", "fwd") is manager.probe_factory("0", "fwd")


def test_the_0_1_duplicate_probe_error_is_kept_by_default(model) -> None:
    manager = ProbeManager(LinearRegression, {}, r2)
    context = probing(manager).prepare(model)
    with context as hooked:
        hooked(batch(1, "fit"))
    with pytest.raises(ValueError, match="Probe 0_fwd already exists, call reset_estimators()"), context:
        pass


def test_results_is_keyed_by_phase_and_probe(model) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, reuse_probes=True)
    with probing(manager).prepare(model) as hooked:
        hooked(batch(1, "fit"))
        hooked(batch(2, "predict"))
    results = manager.results
    assert isinstance(results, TensorDict)
    assert set(results.keys()) == {"fit", "predict"}
    assert set(results["fit"].keys()) == {"0_fwd", "2_fwd"}
    value = results["fit"]["2_fwd"]["r2"]
    assert isinstance(value, torch.Tensor)
    assert value.ndim == 0
    assert value.item() == pytest.approx(manager.fit_metrics["2_fwd"]["r2"])
    assert results["predict", "0_fwd", "n"].item() == 48


def test_recording_twice_follows_overwrite_results(model) -> None:
    strict = ProbeManager(LinearRegression, {}, r2, reuse_probes=True)
    with probing(strict).prepare(model) as hooked:
        hooked(batch(1, "fit"))
        with pytest.raises(ProbingError, match="Metrics for 0_fwd already exist"):
            hooked(batch(3, "fit"))
    relaxed = ProbeManager(LinearRegression, {}, r2, reuse_probes=True, overwrite_results=True)
    with probing(relaxed).prepare(model) as hooked:
        hooked(batch(1, "fit"))
        hooked(batch(3, "fit"))
    with torch.no_grad():
        acts = model[0](batch(3, "fit")["input"])
    expected = r2_score(
        batch(3, "fit")["labels"], LinearRegression().fit(acts, batch(3, "fit")["labels"]).predict(acts)
    )
    assert relaxed.results["fit"]["0_fwd"]["r2"].item() == pytest.approx(expected, abs=1e-10)


def test_reset_results_keeps_estimators_and_reset_estimators_starts_over(model) -> None:
    manager = ProbeManager(LinearRegression, {}, r2, reuse_probes=True)
    with probing(manager).prepare(model) as hooked:
        hooked(batch(1, "fit"))
    estimator = manager.estimators["0_fwd"]
    manager.reset_results()
    assert manager.fit_metrics == {}
    assert set(manager.results["fit"].keys()) == set()
    with probing(manager).prepare(model) as hooked:
        hooked(batch(2, "predict"))  # still fitted
    assert manager.estimators["0_fwd"] is estimator
    manager.reset_estimators()
    assert manager.estimators == {}
    assert manager.probe_factory("0", "fwd").estimator is not estimator


def test_results_refuses_non_dict_metrics(model) -> None:
    manager = ProbeManager(LinearRegression, {}, lambda p, y: float(r2_score(y, p)))
    with probing(manager).prepare(model) as hooked:
        hooked(batch(1, "fit"))
    assert isinstance(manager.fit_metrics["0_fwd"], float)  # 0.1's tables accept anything
    with pytest.raises(TypeError, match="compute_metrics returned a float for probe '0_fwd'"):
        _ = manager.results
    words = ProbeManager(LinearRegression, {}, lambda p, y: {"label": "good"})
    with probing(words).prepare(model) as hooked:
        hooked(batch(1, "fit"))
    with pytest.raises(TypeError, match="Metric 'label' of probe '0_fwd' is a str"):
        _ = words.results


def test_bilinear_probes_already_persist_and_fill_results(model) -> None:
    torch.manual_seed(0)
    manager = BilinearProbeManager(
        [("0", "2")], LowRankBilinearEstimator, {"d_latent1": 16, "d_latent2": 8, "epochs": 2}, r2
    )
    make = lambda: Probing(  # noqa: E731
        manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"]
    )
    with make().prepare(model) as hooked:
        hooked(batch(1, "fit"))
    with make().prepare(model) as hooked:
        hooked(batch(2, "predict"))
    assert set(manager.results["predict"].keys()) == {"0_2_fwd"}

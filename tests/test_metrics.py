"""tdhook.metrics: infidelity and sensitivity vs captum.metrics with the same perturbations."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency as CaptumSaliency
from captum.metrics import infidelity, sensitivity_max
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import Saliency
from tdhook.errors import MissingKeyError
from tdhook.metrics import InfidelityMetric, MetricError, SensitivityMetric

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _fixed_noise(n, s, f):
    torch.manual_seed(5)
    return torch.randn(n * s, f) * 0.1


def test_infidelity_matches_captum(model):
    x = torch.randn(5, 4)
    noise = _fixed_noise(5, 6, 4)
    attr = CaptumSaliency(model).attribute(x, target=1, abs=False)

    def perturb(inputs):
        return noise, inputs - noise

    ref = infidelity(model, perturb, x, attr, target=1, n_perturb_samples=6)
    metric = InfidelityMetric(6, target=1, perturb_fn=lambda _: noise)
    with Saliency(targets=1).prepare(model) as hooked:
        got = metric(hooked, TensorDict(input=x, batch_size=[5]))
    torch.testing.assert_close(got["input"], ref, rtol=1e-4, atol=1e-7)


def test_sensitivity_matches_captum(model):
    x = torch.randn(5, 4)
    noise = _fixed_noise(5, 6, 4)

    def perturb(inputs, perturb_radius=0.02):
        return inputs + noise

    def explain(inputs, target):
        return CaptumSaliency(model).attribute(inputs, target=target, abs=False)

    ref = sensitivity_max(explain, x, perturb_func=perturb, n_perturb_samples=6, target=1)
    metric = SensitivityMetric(n_perturb_samples=6, perturb_fn=lambda inp: inp + noise)
    with Saliency(targets=1).prepare(model) as hooked:
        got = metric(hooked, TensorDict(input=x, batch_size=[5]))
    torch.testing.assert_close(got["input"], ref, rtol=1e-4, atol=1e-6)


def test_any_key_layout(model):
    """tdhook 0.1 hard-coded ("attr", k) and ("_mod_out", "output")."""
    x = torch.randn(2, 3, 4)
    td = TensorDict(x=x, batch_size=[2, 3])
    with Saliency(attribution_key="saliency").prepare(model, in_keys=["x"], out_keys=["logits"]) as hooked:
        inf = InfidelityMetric(4, attr_key="saliency", output_key="logits")(hooked, td)
        sens = SensitivityMetric(n_perturb_samples=4, attr_key="saliency")(hooked, td)
        assert inf["x"].shape == (2, 3)
        assert sens["x"].shape == (2, 3)
        assert torch.isfinite(inf["x"]).all()
        with pytest.raises(MissingKeyError, match="No model output at 'output'"):
            InfidelityMetric(2)(hooked, td)
        with pytest.raises(MissingKeyError, match="No attribution at"):
            SensitivityMetric(n_perturb_samples=2)(hooked, td)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SensitivityMetric(perturb_radius=-0.1), "perturb_radius"),
        (lambda: SensitivityMetric(perturb_radius=float("nan")), "perturb_radius"),
        (lambda: SensitivityMetric(n_perturb_samples=0), "n_perturb_samples"),
        (lambda: SensitivityMetric(n_perturb_samples=2.5), "n_perturb_samples"),
        (lambda: InfidelityMetric(noise_std=-1.0), "noise_std"),
        (lambda: InfidelityMetric(noise_std=float("inf")), "noise_std"),
        (lambda: InfidelityMetric(n_perturb_samples=True), "n_perturb_samples"),
        (lambda: InfidelityMetric(target="1"), "target must be an int"),
        (lambda: InfidelityMetric(target=1.7), "target must be an int"),
        (lambda: InfidelityMetric(target=True), "target must be an int"),
    ],
)
def test_parameter_ranges_are_checked_at_construction(make, match):
    with pytest.raises(MetricError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "metric", [SensitivityMetric(n_perturb_samples=2), InfidelityMetric(n_perturb_samples=2)]
)
def test_bad_data_is_refused(model, metric):
    with Saliency().prepare(model) as hooked:
        with pytest.raises(MetricError, match="no rows"):
            metric(hooked, TensorDict(input=torch.randn(0, 4), batch_size=[0]))
        x = torch.randn(3, 4)
        x[0, 1] = float("nan")
        with pytest.raises(MetricError, match="NaN/Inf"):
            metric(hooked, TensorDict(input=x, batch_size=[3]))


def test_one_input_key_string_is_one_key(model):
    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    metric = SensitivityMetric(n_perturb_samples=2, input_keys="input")
    assert metric.input_keys == ["input"]
    with Saliency().prepare(model) as hooked:
        torch.manual_seed(0)
        result = metric(hooked, td)
    assert result["input"].shape == (3,)
    assert torch.isfinite(result["input"]).all()

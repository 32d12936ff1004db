"""Inputs that could be misread (issue 11 §4): one documented meaning, or a clear refusal.

* ``targets``: a string, a float or a bool is refused; an integer tensor with one entry per
  sample means per-sample targets (captum's ``target=`` tensor).
* One string where module paths are expected is one path, never its characters.
* NaN/Inf in inputs, baselines or noise parameters, bad parameter ranges and zero-row inputs to
  perturbation methods are refused before the model runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from captum.attr import FeatureAblation as CaptumFeatureAblation
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Occlusion as CaptumOcclusion
from captum.attr import Saliency as CaptumSaliency
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import (
    LRP,
    ActivationMaximisation,
    AttributionError,
    FeatureAblation,
    GradientShap,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
    TargetError,
)
from tdhook.errors import TdhookError

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _run(method, model, td):
    with method.prepare(model) as hooked:
        return hooked(td)


# -- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        ("12", "is a string"),
        (1.7, "float is never rounded"),
        (True, "is a bool"),
        ([0, 1.5], "float is never rounded"),
        ([False], "is a bool"),
        (torch.tensor([0.5, 1.0]), "expected integer class indices"),
        (torch.tensor([True, False]), "expected integer class indices"),
        ([], "targets is empty"),
    ],
)
@pytest.mark.parametrize("cls", [Saliency, IntegratedGradients, FeatureAblation])
def test_ambiguous_targets_are_refused(cls, targets, match):
    with pytest.raises(TargetError, match=match) as info:
        cls(targets=targets)
    assert isinstance(info.value, (TdhookError, ValueError))


@pytest.mark.parametrize("batch", [(4,), (2, 2)])
def test_per_sample_targets_saliency_match_captum(mlp, batch):
    x = torch.randn(*batch, 4)
    labels = torch.tensor([0, 2, 1, 2]).reshape(batch)
    td = _run(Saliency(targets=labels), mlp, TensorDict(input=x, batch_size=batch))
    ref = CaptumSaliency(mlp).attribute(x.reshape(4, 4), target=labels.reshape(4), abs=False)
    torch.testing.assert_close(td["attr", "input"], ref.reshape(*batch, 4))


def test_numpy_targets_read_as_a_tensor(mlp):
    x = torch.randn(4, 4)
    labels = np.array([0, 2, 1, 2])
    td = _run(Saliency(targets=labels), mlp, TensorDict(input=x, batch_size=[4]))
    ref = CaptumSaliency(mlp).attribute(x, target=torch.as_tensor(labels), abs=False)
    torch.testing.assert_close(td["attr", "input"], ref)
    with pytest.raises(TargetError, match="expected integer class indices"):
        Saliency(targets=np.array([0.5]))


def test_per_sample_targets_flat_for_a_2d_batch(mlp):
    x = torch.randn(2, 2, 4)
    flat = torch.tensor([0, 2, 1, 2])
    a = _run(Saliency(targets=flat), mlp, TensorDict(input=x, batch_size=[2, 2]))["attr", "input"]
    b = _run(Saliency(targets=flat.reshape(2, 2)), mlp, TensorDict(input=x, batch_size=[2, 2]))[
        "attr", "input"
    ]
    torch.testing.assert_close(a, b)


def test_per_sample_targets_ig_matches_captum(mlp):
    x, b = torch.randn(4, 4), torch.randn(4, 4)
    labels = torch.tensor([2, 0, 1, -1])
    td = TensorDict(input=x, batch_size=[4])
    td["baseline", "input"] = b
    ig = IntegratedGradients(
        targets=labels, multiply_by_inputs=True, compute_convergence_delta=True, n_steps=20
    )
    _run(ig, mlp, td)
    ref, delta = CaptumIG(mlp).attribute(x, b, target=labels % 3, n_steps=20, return_convergence_delta=True)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td["convergence_delta"], delta.float(), rtol=1e-4, atol=1e-5)


def test_per_sample_targets_perturbation_match_captum(mlp):
    x = torch.randn(4, 4)
    labels = torch.tensor([1, 0, 2, 1])
    td = _run(FeatureAblation(targets=labels), mlp, TensorDict(input=x, batch_size=[4]))
    ref = CaptumFeatureAblation(mlp).attribute(x, target=labels)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)
    td = _run(Occlusion((2,), targets=labels), mlp, TensorDict(input=x, batch_size=[4]))
    ref = CaptumOcclusion(mlp).attribute(x, sliding_window_shapes=(2,), target=labels)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)


def test_per_sample_targets_in_a_noise_tunnel(mlp):
    """SmoothGrad with zero noise is Saliency; the per-sample targets follow every noisy copy."""
    x = torch.randn(4, 4)
    labels = torch.tensor([1, 0, 2, 1])
    smooth = SmoothGrad(Saliency(targets=labels), n_samples=3, stdevs=0.0)
    got = _run(smooth, mlp, TensorDict(input=x, batch_size=[4]))["attr", "input"]
    ref = CaptumSaliency(mlp).attribute(x, target=labels, abs=False)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2]), torch.tensor([[0, 1], [2, 0]])])
def test_per_sample_targets_of_the_wrong_shape_are_refused(mlp, labels):
    td = TensorDict(input=torch.randn(4, 4), batch_size=[4])
    with pytest.raises(TargetError, match="one class index per sample"):
        _run(Saliency(targets=labels), mlp, td)
    with pytest.raises(TargetError, match="one class index per sample"):
        _run(FeatureAblation(targets=labels), mlp, td)


def test_per_sample_targets_out_of_range(mlp):
    td = TensorDict(input=torch.randn(2, 4), batch_size=[2])
    with pytest.raises(TargetError, match="out of range"):
        _run(Saliency(targets=torch.tensor([0, 3])), mlp, td)


def test_per_sample_targets_refuse_separate_targets():
    with pytest.raises(TargetError, match="separate_targets"):
        Saliency(targets=torch.tensor([0, 1]), separate_targets=True)


def test_zero_dim_integer_tensor_is_one_index(mlp):
    x = torch.randn(3, 4)
    a = _run(Saliency(targets=torch.tensor(2)), mlp, TensorDict(input=x, batch_size=[3]))["attr", "input"]
    b = _run(Saliency(targets=2), mlp, TensorDict(input=x, batch_size=[3]))["attr", "input"]
    torch.testing.assert_close(a, b)


# -- module names ----------------------------------------------------------------------------


def test_one_string_is_one_module_path(mlp):
    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    one = _run(Saliency(input_modules="0", use_inputs=False), mlp, td.clone())
    many = _run(Saliency(input_modules=["0"], use_inputs=False), mlp, td.clone())
    torch.testing.assert_close(one["attr", "0"], many["attr", "0"])
    assert Saliency(target_modules="2").options.target_modules == ("2",)
    am = ActivationMaximisation("2", n_steps=1)
    assert am.options.target_modules == ("2",)
    _run(am, mlp, td.clone())


def test_non_string_module_paths_are_refused():
    with pytest.raises(AttributionError, match="module paths"):
        Saliency(input_modules=[0])
    with pytest.raises(AttributionError, match="module path"):
        ActivationMaximisation(3)


# -- NaN / Inf, parameter ranges, zero rows ---------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "make",
    [
        Saliency,
        lambda: IntegratedGradients(n_steps=3),
        lambda: LRP(warn_on_missing_rule=False),
        lambda: SmoothGrad(n_samples=2, stdevs=0.1),
        FeatureAblation,
    ],
)
def test_non_finite_inputs_are_refused(mlp, make, bad):
    x = torch.randn(3, 4)
    x[1, 2] = bad
    td = TensorDict(input=x, batch_size=[3])
    td["baseline", "input"] = torch.zeros(3, 4)
    calls = []
    handle = mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(AttributionError, match="1 NaN/Inf value"):
            _run(make(), mlp, td)
    finally:
        handle.remove()
    assert calls == []  # refused before the model ran


@pytest.mark.parametrize(
    "make",
    [lambda: IntegratedGradients(n_steps=3), lambda: GradientShap(n_samples=2), FeatureAblation],
)
def test_non_finite_baselines_are_refused(mlp, make):
    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    td["baseline", "input"] = torch.full((3, 4), math.nan)
    with pytest.raises(AttributionError, match="baseline .* NaN/Inf"):
        _run(make(), mlp, td)


def test_check_finite_false_lets_nan_through(mlp):
    x = torch.randn(3, 4)
    x[0, 0] = math.nan
    td = _run(Saliency(check_finite=False), mlp, TensorDict(input=x, batch_size=[3]))
    assert torch.isnan(td["output"][0]).all()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: IntegratedGradients(n_steps=0), "too few"),
        (lambda: IntegratedGradients(n_steps=-1), "too few"),
        (lambda: IntegratedGradients(n_steps=1, method="riemann_left"), "too few"),
        (lambda: IntegratedGradients(n_steps=2.5), "must be an int"),
        (lambda: SmoothGrad(stdevs=-1.0), "stdevs"),
        (lambda: SmoothGrad(stdevs=math.nan), "stdevs"),
        (lambda: SmoothGrad(n_samples=0), "n_samples"),
        (lambda: GradientShap(stdevs=math.inf), "stdevs"),
        (lambda: GradientShap(n_samples=-2), "n_samples"),
        (lambda: ActivationMaximisation(["0"], alpha=-0.1), "alpha"),
        (lambda: ActivationMaximisation(["0"], alpha=math.nan), "alpha"),
        (lambda: ActivationMaximisation(["0"], min_value=1.0, max_value=0.0), "min_value"),
        (lambda: ActivationMaximisation(["0"], min_value=math.nan), "min_value"),
        (lambda: ActivationMaximisation(["0"], n_steps=-1), "n_steps"),
        (lambda: FeatureAblation(baseline_value=math.nan), "baseline_value"),
        (lambda: FeatureAblation(chunk_size=0), "chunk_size"),
    ],
)
def test_parameter_ranges_are_checked_at_construction(make, match):
    with pytest.raises(AttributionError, match=match):
        make()


@pytest.mark.parametrize("make", [FeatureAblation, lambda: Occlusion((2,))])
def test_zero_row_inputs_to_perturbation_are_refused(mlp, make):
    td = TensorDict(input=torch.randn(0, 4), batch_size=[0])
    with pytest.raises(AttributionError, match="no rows"):
        _run(make(), mlp, td)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gradcam_refuses_a_non_finite_input_before_the_model_runs(cnn, bad):
    from tdhook.attribution import DimsConfig, GradCAM

    x = torch.randn(2, 2, 6, 6)
    x[1, 0, 2, 3] = bad
    calls = []
    handle = cnn.register_forward_hook(lambda *_: calls.append(1))
    cam = GradCAM({"2": DimsConfig((-2, -1), (-3,))})
    with cam.prepare(cnn) as hooked, pytest.raises(AttributionError, match=r"input 'input' holds 1 NaN/Inf"):
        hooked(TensorDict(input=x, batch_size=[2]))
    handle.remove()
    assert not calls

"""Guided backprop, Grad-CAM, GradientShap, SmoothGrad/VarGrad, ablation, occlusion, AM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import FeatureAblation as CaptumFeatureAblation
from captum.attr import GradientShap as CaptumGradientShap
from captum.attr import GuidedBackprop, LayerGradCam, NoiseTunnel
from captum.attr import Occlusion as CaptumOcclusion
from captum.attr import Saliency as CaptumSaliency
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import (
    ActivationMaximisation,
    AttributionError,
    DimsConfig,
    FeatureAblation,
    GradCAM,
    GradientShap,
    GuidedBackpropagation,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
    VarGrad,
)
from tdhook.attribution._shap import ShapDraws, ShapSampler
from tdhook.attribution.grad_cam import DimsConfig as CompatDimsConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(method, model, x, batch=None, **extra):
    batch = x.shape[:1] if batch is None else batch
    td = TensorDict(input=x, batch_size=batch)
    for k, v in extra.items():
        td[tuple(k.split("__"))] = v
    with method.prepare(model) as hooked:
        return hooked(td)


def test_guided_backprop_matches_captum_with_inplace_relu(cnn):
    cnn[1].inplace = True
    x = torch.randn(3, 2, 5, 5)
    td = _run(GuidedBackpropagation(targets=1), cnn, x)
    torch.testing.assert_close(td["attr", "input"], GuidedBackprop(cnn).attribute(x, target=1))


def test_guided_backprop_only_clamps_relus():
    """tdhook 0.1 clamped Linear gradients too, so attributions were always >= 0."""
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
    td = _run(GuidedBackpropagation(), model, torch.randn(4, 3))
    torch.testing.assert_close(td["attr", "input"], model.weight.expand(4, 3))


def test_grad_cam_matches_captum_with_relu(cnn):
    x = torch.randn(3, 2, 5, 5)
    td = _run(GradCAM({"2": DimsConfig((-2, -1), (-3,))}, targets=2), cnn, x)
    ref = LayerGradCam(cnn, cnn[2]).attribute(x, target=2, relu_attributions=True).squeeze(1)
    torch.testing.assert_close(td["attr", "2"], ref)
    assert CompatDimsConfig is DimsConfig
    raw = _run(GradCAM({"2": DimsConfig((-2, -1), (-3,))}, targets=2, relu=False), cnn, x)
    ref = LayerGradCam(cnn, cnn[2]).attribute(x, target=2).squeeze(1)
    torch.testing.assert_close(raw["attr", "2"], ref)


def test_grad_cam_errors():
    with pytest.raises(AttributionError, match="sets .*'input_modules'"):
        GradCAM({"2": DimsConfig()}, input_modules=["1"])
    with pytest.raises(AttributionError, match="needs modules_to_attribute"):
        GradCAM(None)
    with pytest.raises(AttributionError, match="must be a DimsConfig"):
        GradCAM({"2": (1, 2)})


def test_gradient_shap_matches_captum_given_the_same_draws(mlp, monkeypatch):
    x, dist = torch.randn(5, 4), torch.randn(7, 4)
    record: dict[str, object] = {}
    choice, uniform, normal = np.random.choice, np.random.uniform, torch.normal

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            record[name] = fn(*args, **kwargs)
            return record[name]

        return wrapped

    monkeypatch.setattr(np.random, "choice", spy("choice", choice))
    monkeypatch.setattr(np.random, "uniform", spy("uniform", uniform))
    monkeypatch.setattr(torch, "normal", spy("normal", normal))
    np.random.seed(0)
    torch.manual_seed(0)
    ref = CaptumGradientShap(mlp).attribute(x, dist, n_samples=6, stdevs=0.3, target=2)
    monkeypatch.undo()

    def replay(self, job, sizes):
        return ShapDraws(
            {"input": record["normal"].reshape(5, 6, 4)},
            torch.as_tensor(np.asarray(record["choice"])).reshape(5, 6),
            torch.as_tensor(record["uniform"]).float().reshape(5, 6),
        )

    monkeypatch.setattr(ShapSampler, "draw", replay)
    for chunk in (None, 4):
        td = _run(
            GradientShap(n_samples=6, stdevs=0.3, baselines={"input": dist}, targets=2, chunk_size=chunk),
            mlp,
            x,
        )
        torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)


def test_gradient_shap_with_per_row_baseline_is_reproducible(mlp):
    x = torch.randn(5, 4)
    a = _run(
        GradientShap(generator=torch.Generator().manual_seed(0)), mlp, x, baseline__input=torch.zeros(5, 4)
    )
    b = _run(
        GradientShap(generator=torch.Generator().manual_seed(0)), mlp, x, baseline__input=torch.zeros(5, 4)
    )
    torch.testing.assert_close(a["attr", "input"], b["attr", "input"])


class _ReplayNoise:
    def __init__(self, noise):
        self.noise = noise
        self.i = 0

    def __call__(self, shape, like):
        out = self.noise[self.i].reshape(shape)
        self.i += 1
        return out


@pytest.mark.parametrize(("cls", "nt_type"), [(SmoothGrad, "smoothgrad"), (VarGrad, "vargrad")])
def test_noise_tunnel_matches_captum(mlp, cls, nt_type, monkeypatch):
    x = torch.randn(5, 4)
    drawn = []
    normal = torch.normal

    def spy(*args, **kwargs):
        drawn.append(normal(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(torch, "normal", spy)
    ref = NoiseTunnel(CaptumSaliency(mlp)).attribute(
        x, nt_type=nt_type, nt_samples=6, stdevs=0.2, target=1, abs=False
    )
    monkeypatch.undo()
    method = cls(Saliency(targets=1), n_samples=6, stdevs=0.2)
    method._noise = _ReplayNoise(drawn)  # type: ignore[method-assign]
    td = _run(method, mlp, x)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td["output"], mlp(x))


def test_smoothgrad_wraps_ig_in_chunks(mlp):
    x = torch.randn(3, 4)
    gen = torch.Generator().manual_seed(0)
    sg = SmoothGrad(IntegratedGradients(n_steps=8), n_samples=4, stdevs=0.0, chunk_size=3, generator=gen)
    td = _run(sg, mlp, x, baseline__input=torch.zeros(3, 4))
    ref = _run(IntegratedGradients(n_steps=8), mlp, x, baseline__input=torch.zeros(3, 4))
    torch.testing.assert_close(td["attr", "input"], ref["attr", "input"])
    assert set(td.keys(include_nested=True, leaves_only=True)) == {
        "input",
        "output",
        ("baseline", "input"),
        ("attr", "input"),
    }


def test_feature_ablation_matches_captum(mlp):
    x = torch.randn(5, 4)
    td = _run(FeatureAblation(targets=1, chunk_size=3), mlp, x)
    torch.testing.assert_close(td["attr", "input"], CaptumFeatureAblation(mlp).attribute(x, target=1))
    groups = torch.tensor([0, 0, 1, 1])
    td = _run(
        FeatureAblation(feature_mask={"input": groups}, targets=1), mlp, x, baseline__input=torch.ones(5, 4)
    )
    ref = CaptumFeatureAblation(mlp).attribute(x, baselines=1.0, target=1, feature_mask=groups.unsqueeze(0))
    torch.testing.assert_close(td["attr", "input"], ref)


def test_feature_ablation_separate_targets(mlp):
    x = torch.randn(5, 4)
    td = _run(FeatureAblation(targets=[0, 2], separate_targets=True), mlp, x)
    assert td["attr", "input"].shape == (5, 2, 4)
    for k, t in enumerate([0, 2]):
        torch.testing.assert_close(
            td["attr", "input"][:, k], CaptumFeatureAblation(mlp).attribute(x, target=t)
        )


@pytest.mark.parametrize(
    ("window", "strides"), [((1, 3, 3), (1, 2, 2)), ((2, 2, 2), 1), ((1, 5, 2), (1, 1, 2))]
)
def test_occlusion_matches_captum(cnn, window, strides):
    x = torch.randn(3, 2, 5, 5)
    td = _run(Occlusion(window, strides=strides, targets=0, chunk_size=7), cnn, x)
    ref = CaptumOcclusion(cnn).attribute(x, sliding_window_shapes=window, strides=strides, target=0)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)


def test_occlusion_errors(cnn):
    with pytest.raises(AttributionError, match="one entry per feature dimension"):
        _run(Occlusion((3, 3)), cnn, torch.randn(2, 2, 5, 5))
    with pytest.raises(AttributionError, match="do not fit"):
        _run(Occlusion((1, 6, 1)), cnn, torch.randn(2, 2, 5, 5))


def test_activation_maximisation_is_gradient_ascent(mlp):
    x = torch.randn(5, 4)
    td = _run(ActivationMaximisation(["2"], alpha=0.05, n_steps=3, min_value=-2, max_value=2), mlp, x)
    cur = x.clone()
    for _ in range(3):
        xr = cur.clone().requires_grad_()
        (g,) = torch.autograd.grad(mlp[:3](xr).sum(), xr)
        cur = (cur + 0.05 * g).clamp(-2, 2)
    torch.testing.assert_close(td["attr", "input"], cur)
    torch.testing.assert_close(td["output"], mlp(x))
    with pytest.raises(AttributionError, match="modules_to_maximise is empty"):
        ActivationMaximisation([])

"""IntegratedGradients: captum oracles for every rule, chunking, layer IG, delta, errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import LayerIntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters as captum_params
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import BaselineError, IntegratedGradients
from tdhook.attribution.gradient_helpers.helpers import SUPPORTED_METHODS, approximation_parameters
from tdhook.errors import MissingKeyError

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def _data(x, b):
    td = TensorDict(input=x, batch_size=x.shape[:1])
    td["baseline", "input"] = b
    return td


def _run(method, model, td):
    with method.prepare(model) as hooked:
        return hooked(td)


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
@pytest.mark.parametrize("n", [10, 50, 100])
def test_approximation_parameters_equal_captum(method, n):
    ours_s, ours_a = approximation_parameters(method)
    ref_s, ref_a = captum_params(method)
    torch.testing.assert_close(torch.tensor(ours_s(n)), torch.tensor(ref_s(n)), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(ours_a(n)), torch.tensor(ref_a(n)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
@pytest.mark.parametrize("multiply", [False, True])
def test_matches_captum(mlp, method, multiply):
    torch.manual_seed(3)
    x, b = torch.randn(6, 4), torch.randn(6, 4)
    ig = IntegratedGradients(
        targets=1, method=method, n_steps=12, multiply_by_inputs=multiply, compute_convergence_delta=True
    )
    td = _run(ig, mlp, _data(x, b))
    ref, delta = CaptumIG(mlp, multiply_by_inputs=multiply).attribute(
        x, b, target=1, method=method, n_steps=12, return_convergence_delta=True
    )
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)
    if multiply:
        torch.testing.assert_close(td["convergence_delta"], delta, rtol=1e-4, atol=1e-5)


def test_matches_captum_on_cnn_with_2d_batch(cnn):
    x = torch.randn(2, 3, 2, 5, 5)
    td = TensorDict(input=x, batch_size=[2, 3])
    td["baseline", "input"] = torch.zeros(2, 3, 2, 5, 5)
    td = _run(IntegratedGradients(targets=0, multiply_by_inputs=True, n_steps=8), cnn, td)
    ref = CaptumIG(cnn).attribute(x.reshape(6, 2, 5, 5), target=0, n_steps=8).reshape(x.shape)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunks_give_the_same_values(mlp, chunk):
    x, b = torch.randn(4, 4), torch.zeros(4, 4)
    full = _run(IntegratedGradients(n_steps=20), mlp, _data(x, b))["attr", "input"]
    chunked = _run(IntegratedGradients(n_steps=20, chunk_size=chunk), mlp, _data(x, b))["attr", "input"]
    torch.testing.assert_close(chunked, full)


def test_separate_targets_and_their_delta(mlp):
    x, b = torch.randn(5, 4), torch.randn(5, 4)
    ig = IntegratedGradients(
        targets=[0, 2], separate_targets=True, multiply_by_inputs=True, compute_convergence_delta=True
    )
    td = _run(ig, mlp, _data(x, b))
    assert td["attr", "input"].shape == (5, 2, 4)
    assert td["convergence_delta"].shape == (5, 2)
    for k, t in enumerate([0, 2]):
        ref, delta = CaptumIG(mlp).attribute(x, b, target=t, return_convergence_delta=True)
        torch.testing.assert_close(td["attr", "input"][:, k], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(td["convergence_delta"][:, k], delta, rtol=1e-4, atol=1e-5)


def test_labels_helper_works_with_convergence_delta(mlp):
    """tdhook 0.1 bug: init_attr_targets_with_labels failed with compute_convergence_delta."""
    x, b = torch.randn(5, 4), torch.zeros(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    td = _data(x, b)
    td["label", "output"] = labels
    ig = IntegratedGradients(
        init_attr_targets=lambda t, a: IntegratedGradients.init_attr_targets_with_labels(t, a, ["output"]),
        additional_init_keys=["label"],
        compute_convergence_delta=True,
        multiply_by_inputs=True,
    )
    td = _run(ig, mlp, td)
    ref, delta = CaptumIG(mlp).attribute(x, b, target=labels, return_convergence_delta=True)
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td["convergence_delta"], delta, rtol=1e-4, atol=1e-5)


def test_no_intermediate_keys_and_outputs_at_the_input(mlp):
    """tdhook 0.1 bug: IG left _register_in/_mod_in/_mod_out in the caller's TensorDict."""
    x = torch.randn(5, 4)
    td = _data(x, torch.zeros(5, 4))
    out = _run(IntegratedGradients(), mlp, td)
    assert out is td
    assert set(td.keys(include_nested=True, leaves_only=True)) == {
        "input",
        "output",
        ("baseline", "input"),
        ("attr", "input"),
    }
    torch.testing.assert_close(td["output"], mlp(x))


def test_unclean_writes_the_interpolated_outputs_at_mod_out(mlp):
    """Addendum §2 P2: clean_intermediate_keys=False adds ("_mod_out", k), batch (*B, n_steps)."""
    x, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    td = TensorDict(input=x, batch_size=[2, 3])
    td["baseline", "input"] = b
    ig = IntegratedGradients(clean_intermediate_keys=False, n_steps=4, method="riemann_left", chunk_size=3)
    _run(ig, mlp, td)
    assert set(td.keys(include_nested=True, leaves_only=True)) == {
        "input",
        "output",
        ("baseline", "input"),
        ("attr", "input"),
        ("_mod_out", "output"),
    }
    alphas = torch.tensor([0.0, 0.25, 0.5, 0.75]).view(1, 1, 4, 1)
    points = b.unsqueeze(2) + alphas * (x - b).unsqueeze(2)  # (2, 3, 4 steps, 4)
    with torch.no_grad():
        torch.testing.assert_close(td["_mod_out", "output"], mlp(points))
        torch.testing.assert_close(td["output"], mlp(x))


def test_layer_ig_through_embedding_matches_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 2))
    ids = torch.randint(1, 10, (5, 3))
    td = TensorDict(input=ids, batch_size=[5])
    td["baseline", "input"] = torch.zeros_like(ids)
    ig = IntegratedGradients(
        input_modules=["0"],
        use_inputs=False,
        targets=1,
        multiply_by_inputs=True,
        compute_convergence_delta=True,
    )
    td = _run(ig, model, td)
    ref, delta = LayerIntegratedGradients(model, model[0]).attribute(
        ids, torch.zeros_like(ids), target=1, return_convergence_delta=True
    )
    torch.testing.assert_close(td["attr", "0"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td["convergence_delta"], delta, rtol=1e-4, atol=1e-5)


def test_baseline_errors(mlp):
    x = torch.randn(5, 4)
    with pytest.raises(BaselineError, match=r"\('baseline', 'input'\) has shape \(5, 3\).*\(5, 4\)"):
        _run(IntegratedGradients(), mlp, _data(x, torch.zeros(5, 3)))
    with pytest.raises(BaselineError, match="is on meta but input 'input' is on cpu"):
        _run(IntegratedGradients(), mlp, _data(x, torch.zeros(5, 4, device="meta")))
    with pytest.raises(MissingKeyError, match="baseline"):
        _run(IntegratedGradients(), mlp, TensorDict(input=x, batch_size=[5]))


def test_argument_errors():
    with pytest.raises(ValueError, match="n_steps=1 is too few .*riemann_left"):
        IntegratedGradients(method="riemann_left", n_steps=1)
    with pytest.raises(ValueError, match="Invalid integral approximation method name: 'simpson'"):
        IntegratedGradients(method="simpson")
    with pytest.raises(ValueError, match="chunk_size"):
        IntegratedGradients(chunk_size=0)
    IntegratedGradients(method="gausslegendre", n_steps=1)


def test_memory_budget_gives_the_same_values(mlp):
    x, b = torch.randn(4, 4), torch.zeros(4, 4)
    full = _run(IntegratedGradients(n_steps=20), mlp, _data(x, b))["attr", "input"]
    budget = _run(IntegratedGradients(n_steps=20, max_batch_size=10), mlp, _data(x, b))["attr", "input"]
    torch.testing.assert_close(budget, full)
    with pytest.raises(ValueError, match="max_batch_size"):
        IntegratedGradients(max_batch_size=0)


@pytest.mark.parametrize("batch", [(0,), (2, 0)])
def test_an_empty_batch_gives_empty_attributions_and_delta(batch):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    td = TensorDict(input=torch.zeros(*batch, 4), batch_size=batch)
    td["baseline", "input"] = torch.zeros(*batch, 4)
    ig = IntegratedGradients(n_steps=5, chunk_size=2, compute_convergence_delta=True, input_modules=["0"])
    with ig.prepare(model) as hooked:
        out = hooked(td)
    assert out["attr", "input"].shape == (*batch, 4)
    assert out["attr", "0"].shape == (*batch, 3)
    assert out["convergence_delta"].shape == batch
    assert out["output"].shape == (*batch, 2)

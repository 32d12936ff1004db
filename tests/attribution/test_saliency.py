"""Saliency and InputXGradient: captum oracles, latent variants, multi-target, errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import Saliency as CaptumSaliency
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import (
    AttributionError,
    InputXGradient,
    IntegerInputError,
    Saliency,
    TargetError,
)

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def _run(method, model, x, batch):
    with method.prepare(model) as hooked:
        return hooked(TensorDict(input=x, batch_size=batch))


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_saliency_matches_captum(mlp, absolute, batch):
    torch.manual_seed(2)
    x = torch.randn(*batch, 4)
    td = _run(Saliency(targets=2, absolute=absolute), mlp, x, batch)
    expected = CaptumSaliency(mlp).attribute(x.reshape(-1, 4), target=2, abs=absolute).reshape(x.shape)
    torch.testing.assert_close(td["attr", "input"], expected)
    torch.testing.assert_close(td["output"], mlp(x))


def test_input_x_gradient_matches_captum_on_cnn(cnn):
    x = torch.randn(3, 2, 5, 5)
    td = _run(InputXGradient(targets=1), cnn, x, [3])
    expected = CaptumInputXGradient(cnn).attribute(x, target=1)
    torch.testing.assert_close(td["attr", "input"], expected)
    td2 = _run(Saliency(targets=1, multiply_by_inputs=True), cnn, x, [3])
    torch.testing.assert_close(td2["attr", "input"], expected)


def test_default_target_is_sum_of_outputs(mlp):
    x = torch.randn(5, 4, requires_grad=True)
    td = _run(Saliency(), mlp, x.detach(), [5])
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(td["attr", "input"], grad)


def test_summed_targets_equal_sum_of_single_maps(mlp):
    x = torch.randn(5, 4)
    both = _run(Saliency(targets=[0, 2]), mlp, x, [5])["attr", "input"]
    a = _run(Saliency(targets=0), mlp, x, [5])["attr", "input"]
    b = _run(Saliency(targets=2), mlp, x, [5])["attr", "input"]
    torch.testing.assert_close(both, a + b)


@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_separate_targets_give_k_maps_after_batch(mlp, batch):
    x = torch.randn(*batch, 4)
    td = _run(InputXGradient(targets=[0, 1, 2], separate_targets=True), mlp, x, batch)
    attr = td["attr", "input"]
    assert attr.shape == (*batch, 3, 4)
    for k in range(3):
        single = _run(InputXGradient(targets=k), mlp, x, batch)["attr", "input"]
        torch.testing.assert_close(attr[..., k, :], single)


def test_returns_caller_td_without_intermediates(mlp):
    td = TensorDict(input=torch.randn(5, 4), batch_size=[5])
    with Saliency().prepare(mlp) as hooked:
        out = hooked(td)
    assert out is td
    assert set(td.keys(include_nested=True, leaves_only=True)) == {"input", "output", ("attr", "input")}
    assert not td["output"].requires_grad
    assert not td["attr", "input"].requires_grad


def test_latent_input_and_target_modules(mlp):
    x = torch.randn(5, 4)
    td = _run(Saliency(input_modules=["0"], use_inputs=False), mlp, x, [5])
    h = mlp[0](x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(mlp[1:](h).sum(), h)
    torch.testing.assert_close(td["attr", "0"], grad)
    assert ("attr", "input") not in td.keys(include_nested=True)

    td = _run(Saliency(target_modules=["2"], use_outputs=False), mlp, x, [5])
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(mlp[:3](xr).sum(), xr)
    torch.testing.assert_close(td["attr", "input"], grad)


def test_input_module_x_activation(mlp):
    x = torch.randn(5, 4)
    td = _run(InputXGradient(input_modules=["2"]), mlp, x, [5])
    h = mlp[:3](x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(mlp[3:](h).sum(), h)
    torch.testing.assert_close(td["attr", "2"], grad * h.detach())


def test_init_attr_targets_and_grads(mlp):
    x = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])

    def pick(targets, additional):
        out = targets["output"].gather(-1, additional["label"].unsqueeze(-1)).squeeze(-1)
        return TensorDict(out=out, batch_size=targets.batch_size)

    method = Saliency(init_attr_targets=pick, additional_init_keys=["label"])
    with method.prepare(mlp) as hooked:
        td = hooked(TensorDict(input=x, label=labels, batch_size=[5]))
    expected = CaptumSaliency(mlp).attribute(x, target=labels, abs=False)
    torch.testing.assert_close(td["attr", "input"], expected)

    seeded = Saliency(init_attr_grads=lambda t, _: TensorDict(output=2 * torch.ones(5, 3), batch_size=[]))
    td = _run(seeded, mlp, x, [5])
    torch.testing.assert_close(td["attr", "input"], 2 * _run(Saliency(), mlp, x, [5])["attr", "input"])


def test_output_grad_callbacks_mask_gradient(mlp):
    x = torch.randn(5, 4)
    cb = {"2": lambda grad_output, **_: (torch.zeros_like(grad_output[0]),)}
    td = _run(Saliency(output_grad_callbacks=cb), mlp, x, [5])
    assert torch.count_nonzero(td["attr", "input"]) == 0


def test_subset_of_in_keys_on_td_module():
    from tensordict.nn import TensorDictModule

    class Two(nn.Module):
        def forward(self, a, b):
            return (a * b).sum(-1, keepdim=True)

    module = TensorDictModule(Two(), in_keys=["a", "b"], out_keys=["y"])
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with Saliency().prepare(module, in_keys=["b"]) as hooked:
        td = hooked(TensorDict(a=a, b=b, batch_size=[4]))
    torch.testing.assert_close(td["attr", "b"], a)
    assert ("attr", "a") not in td.keys(include_nested=True)


def test_integer_inputs_raise_with_fix():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(0, 10, (5, 3))
    with pytest.raises(IntegerInputError, match=r"input_modules=\['embedding'\], use_inputs=False") as info:
        _run(Saliency(), model, ids, [5])
    assert isinstance(info.value, RuntimeError)
    td = _run(Saliency(input_modules=["0"], use_inputs=False), model, ids, [5])
    assert td["attr", "0"].shape == (5, 3, 4)


def test_target_not_depending_on_input(mlp):
    x = torch.randn(5, 4)
    detached = Saliency(init_attr_targets=lambda t, _: TensorDict(o=t["output"].detach(), batch_size=[5]))
    with pytest.raises(TargetError, match="has no grad_fn"):
        _run(detached, mlp, x, [5])

    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.w * (1.0 + 0 * x[:, :1].detach())

    with pytest.raises(TargetError, match="do not depend on 'input'"):
        _run(Saliency(), Ignores(), x, [5])


def test_bad_arguments():
    with pytest.raises(AttributionError, match="separate_targets=True needs several targets"):
        Saliency(targets=1, separate_targets=True)
    with pytest.raises(ValueError, match="init_attr_targets must be callable"):
        Saliency(init_attr_targets=3)
    with pytest.raises(AttributionError, match="nothing to attribute"):
        _run(Saliency(use_inputs=False), nn.Linear(4, 2), torch.randn(3, 4), [3])


def test_additional_keys_must_not_clash(mlp):
    with (
        pytest.raises(ValueError, match="must not be in the in_keys or out_keys"),
        Saliency(additional_init_keys=["input"]).prepare(mlp),
    ):
        pass


def test_tensor_call_is_refused(mlp):
    with Saliency().prepare(mlp) as hooked, pytest.raises(TypeError, match="needs a TensorDict"):
        hooked(torch.randn(2, 4))


def test_init_attr_inputs_selects_and_is_validated():
    """tdhook 0.1 validated the inputs instead of what init_attr_inputs returned."""
    from tensordict.nn import TensorDictModule

    class Two(nn.Module):
        def forward(self, a, b):
            return (a * b).sum(-1, keepdim=True)

    module = TensorDictModule(Two(), in_keys=["a", "b"], out_keys=["y"])
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    pick_b = Saliency(init_attr_inputs=lambda inputs, _: inputs.select("b"))
    with pick_b.prepare(module) as hooked:
        td = hooked(TensorDict(a=a, b=b, batch_size=[4]))
    torch.testing.assert_close(td["attr", "b"], a)
    assert ("attr", "a") not in td.keys(include_nested=True)
    bad = Saliency(init_attr_inputs=lambda inputs, _: inputs["b"])
    with (
        bad.prepare(module) as hooked,
        pytest.raises(
            AttributionError, match="init_attr_inputs function must return a TensorDict, got Tensor"
        ),
    ):
        hooked(TensorDict(a=a, b=b, batch_size=[4]))

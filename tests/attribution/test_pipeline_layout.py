"""The shared gradient pipeline's contract (addendum §2): what the callbacks see and write.

* ``init_attr_grads`` receives the targets in the caller's batch layout (batch ``B``, or
  ``(*B, n_steps)`` for IG), with or without ``init_attr_targets``; bad seeds are refused.
* IG's convergence delta works for a 0-dim batch.
* ``clean_intermediate_keys=False`` also writes the outputs at ``("_mod_out", out_key)``.
* The caller's tensors are never marked ``requires_grad`` (0.1 did so in place; we do not).
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import (
    LRP,
    DimsConfig,
    GradCAM,
    GuidedBackpropagation,
    IntegratedGradients,
    Saliency,
)
from tdhook.attribution.lrp import EpsilonPlus

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 5)


class _Recorder:
    """An ``init_attr_grads`` recording what it receives and returning ``targets * weight``."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Size, dict]] = []

    def __call__(self, targets, additional):
        leaves = {k: tuple(v.shape) for k, v in targets.items(include_nested=True, leaves_only=True)}
        self.seen.append((targets.batch_size, leaves))
        return targets.apply(lambda t: torch.full_like(t, 2.0).detach())


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("with_targets", [False, True])
def test_init_attr_grads_sees_the_callers_batch(batch, with_targets):
    model = _linear()
    x = torch.randn(*batch, 4)
    rec = _Recorder()
    select = (
        (lambda t, _: TensorDict(out=t["output"][..., :2], batch_size=t.batch_size)) if with_targets else None
    )
    with Saliency(init_attr_grads=rec, init_attr_targets=select).prepare(model) as hooked:
        td = hooked(TensorDict(input=x, batch_size=batch))
    key, width = ("out", 2) if with_targets else ("output", 5)
    assert rec.seen == [(torch.Size(batch), {key: (*batch, width)})]
    # seeds of 2 on the selected outputs: grad = 2 * sum of the selected rows of W
    expected = 2 * model.weight[:width].sum(0).detach().expand(*batch, 4)
    torch.testing.assert_close(td["attr", "input"], expected)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_ig_init_attr_grads_sees_batch_and_steps(batch):
    model = _linear()
    x = torch.randn(*batch, 4)
    td = TensorDict(input=x, batch_size=batch)
    td["baseline", "input"] = torch.zeros_like(x)
    rec = _Recorder()
    with IntegratedGradients(init_attr_grads=rec, n_steps=7).prepare(model) as hooked:
        hooked(td)
    assert rec.seen == [(torch.Size((*batch, 7)), {"output": (*batch, 7, 5)})]
    # a linear model: IG with seeds 2 is 2 * sum_j W_j (multiply_by_inputs=False)
    torch.testing.assert_close(td["attr", "input"], 2 * model.weight.sum(0).detach().expand(*batch, 4))


def test_ig_delta_pass_callbacks_see_the_callers_batch():
    model = _linear()
    seen = []

    def targets(t, _):
        seen.append(t.batch_size)
        return TensorDict(out=t["output"][..., 1], batch_size=t.batch_size)

    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    td["baseline", "input"] = torch.zeros(3, 4)
    ig = IntegratedGradients(init_attr_targets=targets, n_steps=4, compute_convergence_delta=True)
    with ig.prepare(model) as hooked:
        hooked(td)
    assert sorted(seen) == sorted([torch.Size([3]), torch.Size([3]), torch.Size([3, 4])])


def test_lrp_explains_a_given_output_relevance():
    """The standard LRP recipe: ``init_attr_grads`` returns the relevance under the output key."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    relevance = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, -1.0]])
    lrp = LRP(
        rule_mapper=EpsilonPlus(epsilon=1e-9),
        init_attr_grads=lambda targets, _: TensorDict(output=relevance, batch_size=targets.batch_size),
        skip_modules=LRP.default_skip,
    )
    with lrp.prepare(model) as hooked:
        attr = hooked(TensorDict(input=x, batch_size=[2]))["attr", "input"]
    # epsilon rule on a ReLU net (eps -> 0, zero biases would conserve): oracle by hand
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        a1 = torch.relu(lin1(x))
        z2 = lin2(a1)
        r1 = a1 * ((relevance / z2) @ lin2.weight)
        z1 = lin1(x)
        r0 = x * (((r1 / z1) * (z1 > 0)) @ lin1.weight)
    torch.testing.assert_close(attr, r0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("seed", "match"),
    [
        (lambda t, _: TensorDict(other=torch.ones(3, 5), batch_size=[3]), "same keys"),
        (lambda t, _: TensorDict(output=torch.ones(3, 4), batch_size=[3]), "same batch size as targets"),
        (lambda t, _: TensorDict(output=torch.ones(5), batch_size=[]), "same batch size as targets"),
        (lambda t, _: torch.ones(3, 5), "must return a TensorDict"),
    ],
)
def test_bad_seeds_are_refused(seed, match):
    with (
        Saliency(init_attr_grads=seed).prepare(_linear()) as hooked,
        pytest.raises(ValueError, match=match),
    ):
        hooked(TensorDict(input=torch.randn(3, 4), batch_size=[3]))


def test_ig_zero_dim_batch_convergence_delta():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, b = torch.randn(4), torch.randn(4)
    td = TensorDict(input=x, batch_size=[])
    td["baseline", "input"] = b
    ig = IntegratedGradients(targets=1, multiply_by_inputs=True, compute_convergence_delta=True, n_steps=20)
    with ig.prepare(model) as hooked:
        hooked(td)
    attr, delta = td["attr", "input"], td["convergence_delta"]
    assert attr.shape == (4,)
    assert delta.shape == ()
    with torch.no_grad():
        expected = attr.sum() - (model(x)[1] - model(b)[1])
    torch.testing.assert_close(delta, expected)
    ref, ref_delta = CaptumIG(model).attribute(
        x[None], b[None], target=1, n_steps=20, return_convergence_delta=True
    )
    torch.testing.assert_close(attr, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta, ref_delta[0].to(delta.dtype), rtol=1e-4, atol=1e-5)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Saliency(clean_intermediate_keys=False),
        lambda: GuidedBackpropagation(clean_intermediate_keys=False),
        lambda: LRP(rule_mapper=EpsilonPlus(), skip_modules=LRP.default_skip, clean_intermediate_keys=False),
        lambda: GradCAM({"0": DimsConfig((-2, -1), (-3,))}, clean_intermediate_keys=False),
    ],
)
def test_unclean_single_pass_writes_mod_out_at_the_callers_batch(make):
    model = _cnn()
    x = torch.randn(2, 3, 1, 4, 4)
    td = TensorDict(input=x, batch_size=[2, 3])
    with make().prepare(model) as hooked:
        hooked(td)
    with torch.no_grad():
        expected = model(x.reshape(6, 1, 4, 4)).reshape(2, 3, 3)
    torch.testing.assert_close(td["_mod_out", "output"], expected)
    torch.testing.assert_close(td["output"], expected)


def test_clean_keys_write_no_mod_out():
    td = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    with Saliency().prepare(_linear()) as hooked:
        hooked(td)
    assert "_mod_out" not in td


@pytest.mark.parametrize(
    "make",
    [
        lambda: Saliency(),
        lambda: GuidedBackpropagation(),
        lambda: LRP(rule_mapper=EpsilonPlus(), skip_modules=LRP.default_skip),
        lambda: IntegratedGradients(n_steps=3),
        lambda: Saliency(init_attr_inputs=lambda inputs, _: inputs),
    ],
)
def test_callers_tensors_are_never_marked_requires_grad(make):
    """Addendum §2 P3 not copied: 0.1 flipped requires_grad on the caller's inputs in place."""
    model = _cnn()
    x = torch.randn(2, 1, 4, 4)
    before = x.clone()
    td = TensorDict(input=x, batch_size=[2])
    td["baseline", "input"] = torch.zeros_like(x)
    with make().prepare(model) as hooked:
        hooked(td)
    assert not x.requires_grad
    assert x.grad is None
    assert not td["input"].requires_grad
    assert td["input"] is x or td["input"].data_ptr() == x.data_ptr()
    assert torch.equal(x, before)
    assert not td["attr", "input"].requires_grad

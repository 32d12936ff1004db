"""tdhook 0.1 attribution recipes (spec §7.3 and §7.6), run as written, with real assertions.

* IG with a target function: ``init_attr_targets`` picks one logit; a single unbatched image is
  batched with ``.unsqueeze(0)``; the attribution has the input's shape and matches captum.
* IG with integer labels through ``init_attr_targets_with_labels`` (+ the convergence delta,
  which 0.1 could not combine with it).
* LRP "explain with this output relevance": ``init_attr_grads`` returns the relevance under the
  output key; and ``init_attr_grads=lambda targets, _: targets`` seeds with the logits; both
  match captum's LRP.
"""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LRP as CaptumLRP
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr._utils import lrp_rules
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import LRP, IntegratedGradients
from tdhook.attribution.lrp import EpsilonPlus

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6)
    ).eval()


def test_ig_with_a_target_function_recipe():
    vgg = _cnn()
    img = torch.rand(3, 8, 8)
    with IntegratedGradients(
        init_attr_targets=lambda t, _: TensorDict(out=t["output"][..., 4], batch_size=t.batch_size)
    ).prepare(vgg) as h:
        td = h(TensorDict({"input": img, ("baseline", "input"): torch.zeros_like(img)}).unsqueeze(0))
        attr = td.get(("attr", "input"))
    assert attr.shape == (1, 3, 8, 8)
    expected = CaptumIG(vgg, multiply_by_inputs=False).attribute(img[None], torch.zeros(1, 3, 8, 8), target=4)
    torch.testing.assert_close(attr, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(td["output"], vgg(img[None]).detach())


def test_ig_with_labels_recipe_and_convergence_delta():
    model = _cnn()
    x = torch.rand(3, 3, 8, 8)
    labels = torch.tensor([0, 5, 2])
    td = TensorDict(input=x, batch_size=[3])
    td["baseline", "input"] = torch.zeros_like(x)
    td["label", "output"] = labels
    ig = IntegratedGradients(
        init_attr_targets=lambda t, a: IntegratedGradients.init_attr_targets_with_labels(t, a, ["output"]),
        additional_init_keys=["label"],
        multiply_by_inputs=True,
        compute_convergence_delta=True,
    )
    with ig.prepare(model) as h:
        h(td)
    ref, delta = CaptumIG(model).attribute(
        x, torch.zeros_like(x), target=labels, return_convergence_delta=True
    )
    torch.testing.assert_close(td["attr", "input"], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(td["convergence_delta"], delta.to(torch.float32), rtol=1e-3, atol=1e-5)


def _mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _captum_lrp(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    theirs = copy.deepcopy(model)
    for k in (0, 2, 4):
        theirs[k].rule = lrp_rules.EpsilonRule(epsilon=1e-3)
    return CaptumLRP(theirs).attribute(x.clone(), target=target)


def test_lrp_explain_with_this_output_relevance_recipe():
    model = _mlp()
    x = torch.randn(4, 5)
    with torch.no_grad():
        logits = model(x)
    relevance = torch.zeros_like(logits)
    relevance[:, 1] = logits[:, 1]  # explain class 1, starting from its logit
    lrp = LRP(
        rule_mapper=EpsilonPlus(epsilon=1e-3),
        init_attr_grads=lambda targets, _: TensorDict(output=relevance, batch_size=targets.batch_size),
        skip_modules=LRP.default_skip,
    )
    with lrp.prepare(model) as hooked:
        td = hooked(TensorDict(input=x, batch_size=[4]))
    assert td["attr", "input"].shape == (4, 5)
    torch.testing.assert_close(td["attr", "input"], _captum_lrp(model, x, 1), rtol=1e-4, atol=1e-5)


def test_lrp_seed_with_the_logits_recipe():
    """``init_attr_grads=lambda targets, _: targets`` with the class picked by ``init_attr_targets``."""
    model = _mlp()
    x = torch.randn(4, 5)
    lrp = LRP(
        rule_mapper=EpsilonPlus(epsilon=1e-3),
        init_attr_targets=lambda t, _: TensorDict(out=t["output"][..., 2], batch_size=t.batch_size),
        init_attr_grads=lambda targets, _: targets,
        skip_modules=LRP.default_skip,
    )
    with lrp.prepare(model) as hooked:
        td = hooked(TensorDict(input=x, batch_size=[4]))
    torch.testing.assert_close(td["attr", "input"], _captum_lrp(model, x, 2), rtol=1e-4, atol=1e-5)

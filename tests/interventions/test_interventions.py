"""optimize_intervention(s): known optima, stopping rules, history, exact restoration of the model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tdhook.errors import InvalidDirectionError, InvalidParameterError, ModulePathError, TargetError
from tdhook.interventions import (
    EarlyStoppingConfig,
    InterventionObjective,
    InterventionSpec,
    OptimizerConfig,
    optimize_intervention,
    optimize_interventions,
)
from tdhook.session import HookSession
from tdhook.targets import Target


def linear_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_a_convex_case_reaches_the_closed_form_optimum() -> None:
    """min_h ||W h + b - y||^2 + lam * mean((h - h0)^2): a ridge problem with a closed form."""
    model = linear_model()
    x = torch.randn(1, 3)
    y = torch.tensor([[1.0, -2.0]])
    lam = 4.0
    W, b = model[1].weight.detach(), model[1].bias.detach()
    h0 = model[0](x).detach()
    n = h0.numel()
    # gradient: 2 W^T (W h + b - y) + (2 lam / n)(h - h0) = 0
    A = W.T @ W + (lam / n) * torch.eye(4)
    h_star = torch.linalg.solve(A, W.T @ (y - b).T + (lam / n) * h0.T).T
    spec = InterventionSpec(
        target=Target("0"),
        objective=lambda output, value: (output - y).pow(2).sum(),
        objective_name="distance",
        max_steps=300,
        optimizer=OptimizerConfig("sgd", 0.05),
        preservation_regularizer=lam,
    )
    result = optimize_intervention(model, x, spec, seed=0)
    stage = result.stages[0]
    assert stage.status == "budget_exhausted"
    torch.testing.assert_close(stage.value, h_star, atol=2e-4, rtol=0)
    torch.testing.assert_close(result.output, model[1](stage.value), atol=1e-6, rtol=0)
    assert torch.equal(stage.initial_value, h0)
    assert stage.history[0]["distance"] == pytest.approx(float((model(x) - y).pow(2).sum().detach()))
    assert stage.history[0]["preservation"] == 0.0
    assert [h["step"] for h in stage.history] == list(range(stage.steps))


def test_finds_an_activation_that_drives_a_logit_and_restores_everything() -> None:
    model = mlp()
    model.train()
    torch.manual_seed(1)
    x = torch.randn(2, 4)
    model(x).sum().backward()  # existing gradients must survive
    model[0].bias.requires_grad_(False)  # mixed flags must survive
    before = {
        "params": [
            (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
            for p in model.parameters()
        ],
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }
    target = Target("1", indices=(0, 1, 2, 3))
    spec = InterventionSpec(
        target=target,
        objective=lambda output, value: InterventionObjective(
            -output[:, 2].mean(), {"logit": output[:, 2].mean()}
        ),
        objective_name="neg_logit",
        max_steps=200,
        optimizer=OptimizerConfig("adam", 0.1),
        early_stopping=EarlyStoppingConfig(objective_threshold=-5.0),
    )
    result = optimize_intervention(model, (x,), spec, seed=3)
    stage = result.stages[0]
    assert stage.status == "converged"
    assert stage.history[-1]["logit"] >= 5.0
    assert stage.best_loss <= -5.0
    assert result.model_passes == 1 + stage.steps + 1
    assert result.model_pass_budget == 1 + 200 + 1
    # the final output is the model patched by hand with the found value (eval mode, as during the call)
    model.eval()
    with HookSession(model) as s:
        s.replace(target, stage.value)
        manual = model(x)
    model.train()
    assert torch.equal(result.output, manual)
    assert (result.output[:, 2] >= 5.0).all()
    # everything restored bit for bit
    for p, (data, flag, grad), grad_obj in zip(model.parameters(), before["params"], before["grads"]):
        assert torch.equal(p, data)
        assert p.requires_grad == flag
        assert p.grad is grad_obj
        assert torch.equal(p.grad, grad)
    assert [m.training for m in model.modules()] == before["training"]
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_stages_run_in_order_with_earlier_values_applied() -> None:
    model = linear_model()
    x = torch.randn(1, 3)
    first = InterventionSpec(
        Target("0", indices=(0,)),
        lambda out, v: (v - 3.0).pow(2).sum(),
        "first",
        max_steps=300,
        optimizer=OptimizerConfig("sgd", 0.2),
        early_stopping=EarlyStoppingConfig(objective_threshold=1e-10),
    )
    second = InterventionSpec(
        Target("1"),
        lambda out, v: (v - 1.0).pow(2).sum(),
        "second",
        max_steps=300,
        optimizer=OptimizerConfig("sgd", 0.2),
        early_stopping=EarlyStoppingConfig(objective_threshold=1e-10),
    )
    result = optimize_interventions(model, x, [first, second])
    s1, s2 = result.stages
    assert s1.status == s2.status == "converged"
    torch.testing.assert_close(s1.value, torch.tensor([[3.0]]), atol=1e-5, rtol=0)
    # the second stage's initial value is layer 1's output with unit 0 of layer 0 set to the first value
    with torch.no_grad():
        h = model[0](x)
        h[:, 0] = s1.value[:, 0]
        assert torch.equal(s2.initial_value, model[1](h))
    torch.testing.assert_close(result.output, torch.ones(1, 2), atol=1e-5, rtol=0)
    assert [t for t, _ in result.interventions] == [first.target, second.target]
    summary = result.to_dict()
    json.dumps(summary)
    assert summary["interventions"][0]["value"]["shape"] == [1, 1]
    assert len(summary["interventions"][0]["value"]["sha256"]) == 64
    assert summary["stages"][1]["status"] == "converged"


def test_stopping_rules_budget_stall_and_non_finite() -> None:
    model = linear_model()
    x = torch.randn(1, 3)
    budget = optimize_intervention(
        model,
        x,
        InterventionSpec(
            Target("0"), lambda out, v: out.sum(), max_steps=4, optimizer=OptimizerConfig("sgd", 0.01)
        ),
    )
    assert budget.stages[0].status == "budget_exhausted"
    assert budget.stages[0].steps == 4
    assert budget.model_passes == budget.model_pass_budget == 1 + 4 + 1
    stalled = optimize_intervention(
        model,
        x,
        InterventionSpec(
            Target("0"),
            lambda out, v: (v * 0).sum(),
            max_steps=50,
            early_stopping=EarlyStoppingConfig(patience=3),
        ),
    )
    assert stalled.stages[0].status == "stalled"
    assert stalled.stages[0].steps == 4  # the first evaluation sets the best, three more without improvement
    nan = optimize_intervention(
        model, x, InterventionSpec(Target("0"), lambda out, v: out.sum() * float("nan"), max_steps=10)
    )
    assert nan.stages[0].status == "non_finite"
    assert torch.equal(nan.stages[0].value, nan.stages[0].initial_value)  # no finite loss: the start is kept


def test_bad_specs_are_refused_before_the_model_runs() -> None:
    model = linear_model()
    x = torch.randn(1, 3)
    with pytest.raises(TargetError, match="optimises an activation Target"):
        InterventionSpec(Target("0", "gradient"), lambda o, v: o.sum())
    with pytest.raises(InvalidDirectionError, match="replaces a forward value"):
        InterventionSpec(Target("0"), lambda o, v: o.sum(), direction="bwd")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ModulePathError, match="Nearest existing module names"):
        optimize_intervention(model, x, InterventionSpec(Target("7"), lambda o, v: o.sum()))
    assert calls == []
    with pytest.raises(TargetError, match="must return a scalar tensor"):
        optimize_intervention(model, x, InterventionSpec(Target("0"), lambda o, v: o))
    with pytest.raises(TargetError, match=r"initial_value has shape \(3,\)"):
        optimize_intervention(
            model, x, InterventionSpec(Target("0"), lambda o, v: o.sum(), initial_value=torch.zeros(3))
        )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: OptimizerConfig("lbfgs"),
            r"Unknown optimizer 'lbfgs'; expected one of \['adam', 'adamw', 'sgd'\]",
        ),
        (
            lambda: OptimizerConfig(learning_rate=0.0),
            r"learning_rate must be a number > 0, got 0.0; e.g. learning_rate",
        ),
        (
            lambda: EarlyStoppingConfig(patience=0),
            r"patience must be a positive int .* got 0; e.g. patience=10",
        ),
        (
            lambda: EarlyStoppingConfig(min_delta=-1.0),
            r"min_delta must be a number >= 0 .* got -1.0; e.g. min_delta",
        ),
        (lambda: EarlyStoppingConfig(min_delta=float("nan")), r"min_delta must be a number >= 0 .* got nan"),
        (
            lambda: InterventionSpec(Target("0"), lambda o, v: o.sum(), max_steps=0),
            r"max_steps must be a positive int .* got 0; e.g. max_steps=100",
        ),
        (
            lambda: InterventionSpec(Target("0"), lambda o, v: o.sum(), preservation_regularizer=-0.5),
            r"preservation_regularizer must be a number >= 0 .* got -0.5; use 0.0 to switch it off",
        ),
        (
            lambda: optimize_interventions(linear_model(), torch.randn(1, 3), []),
            r"optimize_interventions got no InterventionSpec \(an empty sequence\); pass at least one",
        ),
    ],
)
def test_bad_settings_raise_a_package_error_naming_value_and_fix(build, message) -> None:
    with pytest.raises(InvalidParameterError, match=message) as info:
        build()
    assert isinstance(info.value, ValueError)  # 0.2's ``except ValueError`` still works


def test_a_module_called_twice_needs_occurrences() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.cell = nn.Linear(2, 2)

        def forward(self, x):
            return self.cell(self.cell(x))

    model = Twice()
    x = torch.randn(1, 2)
    with pytest.raises(TargetError, match="fired 2 times in one forward pass"):
        optimize_intervention(model, x, InterventionSpec(Target("cell"), lambda o, v: o.sum()))
    result = optimize_intervention(
        model,
        x,
        InterventionSpec(
            Target("cell", occurrences=(0,)),
            lambda o, v: (o - 1).pow(2).sum(),
            max_steps=500,
            optimizer=OptimizerConfig("adam", 0.1),
            early_stopping=EarlyStoppingConfig(objective_threshold=1e-8),
        ),
    )
    assert result.stages[0].status == "converged"
    torch.testing.assert_close(result.output, torch.ones(1, 2), atol=1e-3, rtol=0)


def test_restoration_after_an_objective_raises() -> None:
    model = mlp()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4)
    rng = torch.get_rng_state()

    def boom(output, value):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        optimize_intervention(model, x, InterventionSpec(Target("1"), boom), seed=5)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in model.modules())

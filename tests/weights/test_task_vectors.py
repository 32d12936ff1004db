"""TaskVectors (spec §9.3): vector arithmetic, control-adequacy alpha search, exact restoration."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.contexts import CompositeHookingContextFactory
from tdhook.errors import ContextStateError, InvalidInputError
from tdhook.latent import ActivationCaching
from tdhook.weights import TaskVectors
from tdhook.weights.task_vectors import (
    NoAdequateAlphaError,
    TaskVectorError,
    TaskVectorsContext,
    TaskVectorsModule,
    TaskVectorTools,
)


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture
def finetuned(model) -> nn.Sequential:
    other = copy.deepcopy(model)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
        other[1].running_mean.add_(1.0)
    return other


def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 3)


def td() -> TensorDict:
    return TensorDict(input=x(), batch_size=[6])


def distance_to(target: torch.Tensor):
    """Test accuracy: minus the distance of the model's output to ``target`` (higher is better)."""

    def accuracy(hooked) -> float:
        return -float((hooked(td())["output"] - target).detach().norm())

    return accuracy


def test_vectors_are_weight_differences(model, finetuned) -> None:
    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
        assert isinstance(hooked.extension(TaskVectorTools), TaskVectorTools)
        vector = hooked.get_task_vector(finetuned)
        forget = hooked.get_forget_vector(finetuned)
        for name, p in finetuned.named_parameters():
            key = tuple(name.split("."))
            torch.testing.assert_close(
                vector[key], p.detach() - model.get_submodule(key[0]).get_parameter(key[1])
            )
            torch.testing.assert_close(forget[key], -vector[key])
        torch.testing.assert_close(vector["1", "running_mean"], torch.ones(4))
        assert ("1", "num_batches_tracked") not in vector.keys(
            include_nested=True
        )  # integer buffers are not edited
        both = hooked.get_weights(vector, forget, alpha=3.0)
        torch.testing.assert_close(both["3", "weight"], model[3].weight.detach())


def test_applied_vectors_reproduce_the_finetuned_model_and_are_undone(model, finetuned) -> None:
    model.eval()
    finetuned.eval()
    base_out, tuned_out = model(x()), finetuned(x())
    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
        vector = hooked.get_task_vector(finetuned)
        with hooked.with_applied_vectors(vector, alpha=1.0) as applied:
            assert applied is hooked
            torch.testing.assert_close(hooked(td())["output"], tuned_out)
        torch.testing.assert_close(hooked(td())["output"], base_out)
        with hooked.with_applied_vectors(vector, alpha=0.5):
            half = hooked(td())["output"]
        assert not torch.allclose(half, base_out)
        assert not torch.allclose(half, tuned_out)


def test_alpha_search_picks_the_best_adequate_alpha(model, finetuned) -> None:
    model.eval()
    finetuned.eval()
    target = finetuned(x()).detach()
    # Accuracy grows with alpha up to 1; alphas above 1.2 fail the control check.
    base_weight = model[0].weight.detach().clone()
    adequacy = lambda hooked: float(hooked.module[0].weight.detach().sub(base_weight).norm()) <= 1.2 * base  # noqa: E731
    base = float((finetuned[0].weight - model[0].weight).detach().norm())
    method = TaskVectors([0.25, 0.5, 1.0, 1.5, 2.0], distance_to(target), adequacy)
    with method.prepare(model) as hooked:
        vector = hooked.get_task_vector(finetuned)
        assert isinstance(hooked.hooking_context, TaskVectorsContext)
        assert hooked.hooking_context.compute_alpha(vector) == 1.0
        weights = hooked.get_weights(vector)  # alpha=None searches it
    torch.testing.assert_close(weights["0", "weight"], finetuned[0].weight.detach())
    results = method.search_results
    assert [r[0] for r in results] == [0.25, 0.5, 1.0, 1.5, 2.0]
    assert [r[1] for r in results] == [True, True, True, False, False]
    assert results[2][2] == pytest.approx(0.0, abs=1e-5)
    assert results[3][2] is None


def test_ties_keep_the_first_alpha_and_no_adequate_alpha_raises(model, finetuned) -> None:
    with TaskVectors([0.3, 0.1, 0.2], lambda h: 1.0, lambda h: True).prepare(model) as hooked:
        assert hooked.hooking_context.compute_alpha(hooked.get_task_vector(finetuned)) == 0.3
    with TaskVectors([0.1, 0.2], lambda h: 1.0, lambda h: False).prepare(model) as hooked:
        vector = hooked.get_task_vector(finetuned)
        with pytest.raises(RuntimeError, match="No value satisfies the control adequacy criterion") as info:
            hooked.get_weights(vector)
    assert isinstance(info.value, NoAdequateAlphaError)
    context = TaskVectors([0.1], lambda h: 1.0, lambda h: True).prepare(model)
    with pytest.raises(RuntimeError, match="Cannot compute alpha outside of context"):
        context.compute_alpha(vector)


def test_state_restored_after_an_exception_inside_applied_vectors(model, finetuned) -> None:
    model(torch.randn(4, 3)).sum().backward()
    model.eval()  # a training-mode forward updates BatchNorm statistics in place: the model's own edit
    model[3].bias.requires_grad_(False)
    before = {
        n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    class Boom(Exception):
        pass

    def apply_train_then_fail() -> None:
        with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
            vector = hooked.get_task_vector(finetuned)
            applied = hooked.with_applied_vectors(vector, alpha=1.0)
            applied.__enter__()  # never exited: the context's snapshot must still restore everything
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            hooked(td())["output"].sum().backward()
            torch.optim.SGD(model.parameters(), lr=1.0).step()
            raise Boom

    with pytest.raises(Boom):
        apply_train_then_fail()
    for name, p in model.named_parameters():
        value, flag, grad = before[name]
        assert torch.equal(p, value), name
        assert p.requires_grad == flag, name
        assert (p.grad is None) == (grad is None), name
        assert grad is None or torch.equal(p.grad, grad), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_composed_task_vectors_find_their_factory(model, finetuned) -> None:
    method = TaskVectors([0.5, 1.0], lambda h: 0.0, lambda h: True)
    composite = CompositeHookingContextFactory(ActivationCaching("0"), method)
    with composite.prepare(model) as hooked:
        assert isinstance(hooked.extension(TaskVectorTools), TaskVectorTools)
        vector = hooked.get_task_vector(finetuned)
        hooked.get_weights(vector)
    assert len(method.search_results) == 2


def test_bad_inputs(model) -> None:
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        TaskVectors([], lambda h: 0.0, lambda h: True)
    with pytest.raises(TypeError, match="get_control_adequacy must be callable"):
        TaskVectors([1.0], lambda h: 0.0, None)  # type: ignore[arg-type]
    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
        with pytest.raises(ValueError, match="do not match the model"):
            hooked.get_task_vector(nn.Linear(3, 4))
        with pytest.raises(ValueError, match="at least one task vector"):
            hooked.get_weights()
    plain = TaskVectorsModule.from_module(model)
    with pytest.raises(ContextStateError, match="not prepared with TaskVectors"):
        plain.get_weights(plain.weights.clone())


@pytest.mark.parametrize("alphas", [[float("nan")], [1.0, float("inf")], "0.5", 0.5, [True]])
def test_non_finite_or_non_numeric_alphas_are_refused(alphas) -> None:
    with pytest.raises(TaskVectorError, match="alpha") as info:
        TaskVectors(alphas, lambda h: 0.0, lambda h: True)
    assert isinstance(info.value, ValueError)


def test_mismatched_or_non_finite_vectors_are_refused_with_no_edit(model, finetuned) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model) as hooked:
        vector = hooked.get_task_vector(finetuned)
        wrong = vector.clone()
        wrong["0", "weight"] = torch.zeros(1, 3)  # would broadcast silently
        with pytest.raises(
            TaskVectorError, match=r"Task vector 0 do not match the model: 0.weight has shape \(1, 3\)"
        ):
            hooked.get_weights(wrong, alpha=1.0)
        with pytest.raises(TaskVectorError, match=r"0.weight has shape \(1, 3\), expected \(4, 3\)"):
            hooked.get_task_vector(wrong)
        nan = vector.clone()
        nan["3", "bias"][0] = float("nan")
        with (
            pytest.raises(TaskVectorError, match="NaN or infinite entries in 3.bias"),
            hooked.with_applied_vectors(nan, alpha=1.0),
        ):
            pass
        for bad in (float("nan"), float("inf"), "1", True):
            with pytest.raises(TaskVectorError, match="alpha must be a finite number"):
                hooked.get_weights(vector, alpha=bad)  # type: ignore[arg-type]
        with pytest.raises(TaskVectorError, match=r"The weights for alpha=1e\+39 have NaN or infinite"):
            hooked.get_weights(vector, alpha=1e39)
        with pytest.raises(InvalidInputError, match="Task vector 0 must be a TensorDict"):
            hooked.get_weights({"0": 1})  # type: ignore[arg-type]
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name

"""Pruning (spec §9.2): same masks as torch.nn.utils.prune, exact restoration, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn.utils import prune

from tdhook.errors import ModulePathError
from tdhook.weights import Pruning
from tdhook.weights.pruning import PruningAmountError, PruningContext, PruningSpecError


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def td() -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(5, 4), batch_size=[5])


def torch_global(model: nn.Module, amount, scores=None) -> dict[str, torch.Tensor]:
    """torch's own global L1 pruning on a copy, as the oracle."""
    other = copy.deepcopy(model)
    params = [(m, n) for m in other.modules() for n, _ in m.named_parameters(recurse=False)]
    importance = None if scores is None else {(m, n): scores[i] for i, (m, n) in enumerate(params)}
    prune.global_unstructured(params, prune.L1Unstructured, importance_scores=importance, amount=amount)
    for m, n in params:
        prune.remove(m, n)
    return {k: v.detach().clone() for k, v in other.named_parameters()}


def pruned_state(model: nn.Module, method: Pruning) -> dict[str, torch.Tensor]:
    with method.prepare(model) as hooked:
        hooked(td())
        return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 1.0, 17], ids=lambda a: f"amount={a}")
def test_global_magnitude_matches_torch(model, amount) -> None:
    ours = pruned_state(model, Pruning(None, amount_to_prune=amount))
    expected = torch_global(model, amount)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name


def test_global_custom_importance_matches_torch(model) -> None:
    torch.manual_seed(5)
    scores = [torch.randn_like(p) for p in model.parameters()]
    table = dict(zip([n for n, _ in model.named_parameters()], scores))
    calls = []

    def importance(module_key, parameter_name, parameter):
        calls.append(f"{module_key}.{parameter_name}")
        return table[f"{module_key}.{parameter_name}"]

    ours = pruned_state(model, Pruning(importance, amount_to_prune=0.4))
    expected = torch_global(model, 0.4, scores)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    assert calls == list(table)


def test_none_scores_skip_parameters_and_skip_modules(model) -> None:
    def only_weights(module_key, parameter_name, parameter):
        return parameter if parameter_name == "weight" else None

    ours = pruned_state(model, Pruning(only_weights, amount_to_prune=1.0))
    assert all(torch.equal(ours[f"{i}.bias"], model[i].bias) for i in (0, 2, 4))
    assert all(int((ours[f"{i}.weight"] != 0).sum()) == 0 for i in (0, 2, 4))
    skip_first = lambda name, module: name == "0"  # noqa: E731
    ours = pruned_state(model, Pruning(None, amount_to_prune=1.0, skip_modules=skip_first))
    assert torch.equal(ours["0.weight"], model[0].weight)
    assert int((ours["2.weight"] != 0).sum()) == 0


def test_default_skip_and_td_module_names() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(2, 2))
    td_model = TensorDictModule(inner, in_keys=["input"], out_keys=["output"])
    seen = []

    def importance(module_key, parameter_name, parameter):
        seen.append(module_key)
        return parameter

    method = Pruning(importance, amount_to_prune=0.5, skip_modules=Pruning.default_skip)
    with method.prepare(td_model):
        pass
    assert seen == ["module.0", "module.0"]  # names relative to the TensorDictModule (as tdhook 0.1)
    assert Pruning.default_skip("module", inner)
    assert Pruning.default_skip("x", inner)
    assert not Pruning.default_skip("module.0", inner[0])


@pytest.mark.parametrize(("dim", "amount"), [(0, 0.5), (1, 0.25), (0, 3)])
def test_structured_matches_torch_ln_structured(model, dim, amount) -> None:
    ours = pruned_state(
        model, Pruning(None, modules_to_prune={"[2]": (dim, amount), "4": (dim, None)}, amount_to_prune=0.5)
    )
    other = copy.deepcopy(model)
    for module, module_amount in ((other[2], amount), (other[4], 0.5)):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() > max(dim, 1):
                prune.ln_structured(module, name, amount=module_amount, n=1, dim=dim)
                prune.remove(module, name)
    for name, value in other.named_parameters():
        assert torch.equal(ours[name], value.detach()), name


def test_structured_amount_zero_does_not_fall_back(model) -> None:
    """tdhook 0.1 used `amount or amount_to_prune`, so 0 meant the global amount."""
    ours = pruned_state(model, Pruning(None, amount_to_prune=0.9, modules_to_prune={"0": (0, 0.0)}))
    assert torch.equal(ours["0.weight"], model[0].weight)


def test_relative_path_and_masks(model) -> None:
    method = Pruning(None, amount_to_prune=0.5, relative_path="[2]")
    ours = pruned_state(model, method)
    assert torch.equal(ours["0.weight"], model[0].weight)
    assert set(method.masks) == {"weight", "bias"}
    kept = sum(int(m.sum()) for m in method.masks.values())
    assert kept == 72 - 36


def test_state_restored_bit_identical_with_grads_flags_and_training_in_the_body(model) -> None:
    model(torch.randn(2, 4)).sum().backward()
    model[2].bias.requires_grad_(False)
    params = dict(model.named_parameters())
    before = {
        n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for n, p in params.items()
    }
    pointers = {n: p.data_ptr() for n, p in params.items()}
    grad_objects = {n: p.grad for n, p in params.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    class Boom(Exception):
        pass

    def train_then_fail() -> None:
        with Pruning(None, amount_to_prune=0.5).prepare(model) as hooked:
            for p in model.parameters():
                p.requires_grad_(True)
            optimizer.zero_grad(set_to_none=True)
            hooked(td())["output"].sum().backward()
            optimizer.step()
            raise Boom

    with pytest.raises(Boom):
        train_then_fail()
    assert dict(model.named_parameters()) == params  # same Parameter objects
    for name, p in model.named_parameters():
        value, flag, grad = before[name]
        assert torch.equal(p, value), name
        assert p.data_ptr() == pointers[name], name
        assert p.requires_grad == flag, name
        assert (p.grad is None) == (grad is None), name
        if grad is not None:
            assert p.grad is grad_objects[name]
            assert torch.equal(p.grad, grad), name


def test_context_class(model) -> None:
    assert isinstance(Pruning(None, amount_to_prune=0.1).prepare(model), PruningContext)


@pytest.mark.parametrize("amount", [-0.1, 1.5, -3, True, "half"])
def test_amount_outside_zero_one_is_refused(amount) -> None:
    with pytest.raises(ValueError, match="amount_to_prune must be") as info:
        Pruning(None, amount_to_prune=amount)
    assert isinstance(info.value, PruningAmountError)


def test_other_bad_inputs(model) -> None:
    with pytest.raises(ValueError, match="`amount_to_prune` is required for global pruning"):
        Pruning(None)
    with pytest.raises(
        PruningAmountError, match=r"modules_to_prune\['0'\] amount must be a fraction in \[0, 1\]"
    ):
        Pruning(None, modules_to_prune={"0": (0, 2.5)})
    with pytest.raises(ValueError, match="has no amount"):
        Pruning(None, modules_to_prune={"0": (0, None)})
    with pytest.raises(ValueError, match=r"\(dim, amount_or_None\)"):
        Pruning(None, modules_to_prune={"0": 0.5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="importance_callback must be callable"):
        Pruning(0.5, amount_to_prune=0.5)  # type: ignore[arg-type]
    with (
        pytest.raises(PruningAmountError, match="only 139 are scored"),
        Pruning(None, amount_to_prune=1000).prepare(model),
    ):
        pass
    nothing = Pruning(lambda module_key, parameter_name, parameter: None, amount_to_prune=0.5)
    with pytest.raises(ValueError, match="Nothing to prune"), nothing.prepare(model):
        pass
    with (
        pytest.raises(ModulePathError, match="Nearest existing module names"),
        Pruning(None, modules_to_prune={"layer9": (0, 0.5)}).prepare(model),
    ):
        pass
    bad_shape = Pruning(lambda module_key, parameter_name, parameter: torch.ones(2), amount_to_prune=0.5)
    with pytest.raises(ValueError, match="one score per entry"), bad_shape.prepare(model):
        pass
    for p in model.parameters():
        assert int((p == 0).sum()) == 0  # every failed enter left the model untouched


def test_disable_yields_the_unpruned_model_and_prunes_again_after(model) -> None:
    x = torch.randn(3, 4)
    expected = model(x)
    with Pruning(None, amount_to_prune=0.5).prepare(model) as hooked:
        pruned = hooked(x)
        with hooked.disable_context() as raw:
            assert raw is model
            torch.testing.assert_close(raw(x), expected)
        torch.testing.assert_close(hooked(x), pruned)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_structured_dim_out_of_range_is_refused_before_any_edit(model, dim) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Pruning(None, modules_to_prune={"0": (0, 0.5), "2": (dim, 0.5)})
    with (
        pytest.raises(PruningSpecError, match=rf"dim={dim}, but 2.weight has shape \(8, 8\)"),
        method.prepare(model),
    ):
        pass
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # module "0" was not pruned either


def test_negative_dim_is_the_last_dimension(model) -> None:
    ours = pruned_state(model, Pruning(None, modules_to_prune={"2": (-1, 0.5)}))
    theirs = pruned_state(model, Pruning(None, modules_to_prune={"2": (1, 0.5)}))
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused_before_any_edit(model, bad) -> None:
    def scores(module_key, parameter_name, parameter):
        out = parameter.detach().clone()
        if module_key == "4":
            out[0, 0] = bad
        return out

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method in (Pruning(scores, amount_to_prune=0.5), Pruning(scores, modules_to_prune={"4": (0, 0.5)})):
        with (
            pytest.raises(PruningSpecError, match=r"1 NaN or infinite score\(s\) for 4.weight"),
            method.prepare(model),
        ):
            pass
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name


def test_scores_must_be_real_tensors(model) -> None:
    with (
        pytest.raises(PruningSpecError, match="returned list for 0.weight"),
        Pruning(lambda module_key, parameter_name, parameter: [1.0], amount_to_prune=0.5).prepare(model),
    ):
        pass
    with (
        pytest.raises(PruningSpecError, match="torch.bool score"),
        Pruning(lambda module_key, parameter_name, parameter: parameter > 0, amount_to_prune=0.5).prepare(
            model
        ),
    ):
        pass
    with pytest.raises(PruningSpecError, match=r"\(dim, amount_or_None\)"):
        Pruning(None, modules_to_prune={"0": (True, 0.5)})


def test_masks_are_per_context_across_threads() -> None:
    """One Pruning instance in two threads at once, on two models: each context keeps its own masks
    (issue 11: the masks were one field of the instance, overwritten by the other thread)."""
    import threading

    method = Pruning(None, amount_to_prune=0.5)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    expected = []
    for m in models:  # by hand: the half of all entries with the smallest |value|
        flat = torch.cat([p.detach().abs().reshape(-1) for p in m.parameters()])
        threshold = flat.kthvalue(round(0.5 * flat.numel())).values
        expected.append({n: p.detach().abs() > threshold for n, p in m.named_parameters()})
    both_entered = threading.Barrier(2, timeout=30)
    seen: dict[int, tuple[dict, dict]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with method.prepare(models[i]) as hooked:
                both_entered.wait()  # the other thread's context is active too
                seen[i] = (method.masks_for(hooked), {n: p == 0 for n, p in models[i].named_parameters()})
                both_entered.wait()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in (0, 1):
        own, zeros = seen[i]
        assert set(own) == set(expected[i])
        for name, mask in own.items():
            assert torch.equal(mask, expected[i][name]), (i, name)
            assert torch.equal(zeros[name], ~mask), (i, name)  # the model was pruned with its own masks
    assert any(not torch.equal(seen[0][0][n], seen[1][0][n]) for n in seen[0][0])  # the two differ
    last = method.masks  # the most recent enter's, whichever thread entered last
    assert any(all(torch.equal(last[n], seen[i][0][n]) for n in last) for i in (0, 1))

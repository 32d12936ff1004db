"""Every method: no hook left, model bit-identical, also after an exception in the ``with`` body."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tdhook
from tdhook.contexts import HookingContextFactory

from ._case import ContractCase

_HERE = Path(__file__).parent
CASES: list[ContractCase] = []
for info in sorted(pkgutil.iter_modules([str(_HERE)]), key=lambda i: i.name):
    if info.name.startswith("cases_"):
        CASES.extend(importlib.import_module(f"{__package__}.{info.name}").CASES)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a method could leave behind on a model."""
    state = {}
    for name, module in model.named_modules():
        state[f"{name}:class"] = type(module)
        state[f"{name}:training"] = module.training
        state[f"{name}:attrs"] = sorted(k for k in vars(module) if not k.startswith("_"))
        state[f"{name}:forward"] = "forward" in vars(module)
        for hook_dict in _HOOK_DICTS:
            state[f"{name}:{hook_dict}"] = len(getattr(module, hook_dict, {}))
    for name, p in model.named_parameters():
        state[f"param:{name}"] = (
            p.detach().clone(),
            p.requires_grad,
            None if p.grad is None else p.grad.clone(),
        )
    for name, b in model.named_buffers():
        state[f"buffer:{name}"] = b.clone()
    state["global_fwd"] = len(torch.nn.modules.module._global_forward_hooks)
    state["global_pre"] = len(torch.nn.modules.module._global_forward_pre_hooks)
    state["global_bwd"] = len(torch.nn.modules.module._global_backward_hooks)
    return state


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple):
            assert torch.equal(value[0], other[0]), key
            assert value[1] == other[1], key
            assert (value[2] is None) == (other[2] is None), key
            if value[2] is not None:
                assert torch.equal(value[2], other[2]), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key


class _Boom(Exception):
    pass


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_state_restored_after_normal_exit(case: ContractCase) -> None:
    model = case.model()
    before = snapshot(model)
    with case.factory().prepare(model, **case.prepare_kwargs) as hooked:
        hooked(case.data(model))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_state_restored_after_exception(case: ContractCase) -> None:
    model = case.model()
    before = snapshot(model)
    context = case.factory().prepare(model, **case.prepare_kwargs)
    try:
        with context as hooked:
            hooked(case.data(model))
            raise _Boom
    except _Boom:
        pass
    else:  # pragma: no cover - the body always raises
        pytest.fail("the exception was swallowed")
    assert_same(before, snapshot(model))
    with pytest.raises(RuntimeError, match="must be called in context"):
        hooked(case.data(model))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reentry_and_return_context_false(case: ContractCase) -> None:
    model = case.model()
    before = snapshot(model)
    context = case.factory().prepare(model, **case.prepare_kwargs)
    with context as hooked:
        with pytest.raises(RuntimeError, match="Cannot enter context twice"):
            context.__enter__()
        hooked(case.data(model))
    assert_same(before, snapshot(model))
    hooked = case.factory().prepare(model, return_context=False, **case.prepare_kwargs)
    hooked(case.data(model))
    hooked.restore()
    assert_same(before, snapshot(model))


def _public_modules() -> list[str]:
    """Every module of the package whose dotted name has no private (``_``) part."""
    names = ["tdhook"]
    for info in pkgutil.walk_packages(tdhook.__path__, prefix="tdhook."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _exported_methods() -> list[type]:
    """Every method class in the ``__all__`` of a public module (a failed import fails the test)."""
    found = set()
    for name in _public_modules():
        module = importlib.import_module(name)
        for export in getattr(module, "__all__", []):
            obj = getattr(module, export)
            if isinstance(obj, type) and issubclass(obj, HookingContextFactory):
                found.add(obj)
    return sorted(found, key=lambda t: t.__name__)


def test_every_exported_method_has_a_contract_case() -> None:
    covered = set()
    for case in CASES:
        covered.add(case.covers or type(case.factory()))
    exported = _exported_methods()
    assert len(exported) >= 20, f"the walk over tdhook's public modules found only {exported}"
    missing = [m.__name__ for m in exported if m not in covered]
    assert not missing, f"methods without a contract case in tests/contract/cases_*.py: {missing}"


# --------------------------------------------------------------------------------------------
# HookSession (no prepare(): its own lifecycle, held to the same contract)
# --------------------------------------------------------------------------------------------


class _SessionModel(nn.Module):
    """A reused cell, an in-place ReLU and a tuple-returning block: every kind of session hook."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(2):
            h = self.act(self.cell(h))
        return self.head(h)


def _session_ops(s: Any) -> None:
    from tdhook.targets import Target

    source = s.capture(Target("cell", occurrences=(0,)))
    s.capture("cell", detach=False)
    s.capture(Target("cell", output_path=(0, 0)), direction="fwd_pre_kwargs")
    s.capture(Target("head", "gradient"))
    s.capture(Target("cell", "gradient"), direction="bwd")
    s.replace(Target("cell", indices=(1,), occurrences=(1,)), source, transform=lambda v: v[:, 1:2] * 2)
    s.replace(Target("head", "parameter", parameter="bias"), 5.0)
    s.capture(Target("head", "parameter", parameter="weight"))


@pytest.mark.parametrize("raise_inside", [False, True], ids=["exit", "exception"])
def test_hook_session_restores_the_model(raise_inside: bool) -> None:
    from tdhook.session import HookSession

    model = _SessionModel()
    model(torch.randn(3, 4)).sum().backward()  # gradients present before the session
    before = snapshot(model)
    session = HookSession(model)
    try:
        with session as s:
            _session_ops(s)
            x = torch.randn(3, 4, requires_grad=True)
            torch.autograd.grad(model(x).sum(), x)  # a backward that leaves the parameters' .grad alone
            if raise_inside:
                raise _Boom
    except _Boom:
        pass
    assert_same(before, snapshot(model))
    with pytest.raises(RuntimeError, match="must be called inside"):
        session.capture("cell")
    with session as s:  # re-entry after exit, from a clean program
        with pytest.raises(RuntimeError, match="Cannot enter a HookSession twice"):
            session.__enter__()
        stop = s.stop("cell")
        assert s.run(torch.randn(3, 4)) is None
        assert stop.reached
    assert_same(before, snapshot(model))


def test_version_is_the_declared_one() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert tdhook.__version__ == declared

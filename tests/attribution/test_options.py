"""The gradient engine's configuration (issue 14 item 1): GradientOptions, the 0.1 positional adapter,
explicit signatures, and the structure rules (no forwarding ``*args``, shallow inheritance, short
constructors and modules)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import tdhook.attribution as attribution
import tdhook.attribution.lrp as lrp
from tdhook.attribution import (
    LRP,
    DimsConfig,
    GradCAM,
    GradientAttribution,
    GradientOptions,
    GradientShap,
    GuidedBackpropagation,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from tdhook.attribution.gradient_helpers import GradientAttributionWithBaseline
from tdhook.attribution.lrp import EpsilonPlus
from tdhook.core import HookingContextFactory
from tdhook.errors import InvalidInputError, TdhookError

GRADIENT_METHODS = [
    GradientAttribution,
    GradientAttributionWithBaseline,
    Saliency,
    InputXGradient,
    IntegratedGradients,
    GradientShap,
    GuidedBackpropagation,
    GradCAM,
    LRP,
]
SHARED = [f.name for f in dataclasses.fields(GradientOptions)]


def _run(method, model, td):
    with method.prepare(model) as hooked:
        return hooked(td.clone())


@pytest.fixture
def data() -> TensorDict:
    torch.manual_seed(1)
    td = TensorDict(input=torch.randn(5, 4), batch_size=[5])
    td["baseline", "input"] = torch.zeros(5, 4)
    return td


def test_the_01_positional_order_means_the_same_as_keywords(mlp, data):
    def targets(t, _):
        return TensorDict(out=t["output"][..., 1], batch_size=t.batch_size)

    positional = Saliency(False, True, ["2"], None, targets)
    keywords = Saliency(use_inputs=False, use_outputs=True, input_modules=["2"], init_attr_targets=targets)
    a, b = _run(positional, mlp, data), _run(keywords, mlp, data)
    assert set(a["attr"].keys()) == {"2"}
    torch.testing.assert_close(a["attr", "2"], b["attr", "2"])
    all13 = GradientAttribution(
        True, True, None, None, None, None, None, None, None, None, "grads", True, None
    )
    assert all13.options.attribution_key == "grads"
    ig = IntegratedGradients(True, True, None, None, None, None, None, None, None, None, "ig", n_steps=4)
    assert _run(ig, mlp, data)["ig", "input"].shape == (5, 4)


def test_lrp_takes_rule_mapper_after_the_shared_arguments(mlp, data):
    args = [True, True, None, None, None, None, None, None, None, None, "attr", True, None]
    by_position = LRP(*args, EpsilonPlus(), False, LRP.default_skip, targets=[0])
    by_name = LRP(rule_mapper=EpsilonPlus(), warn_on_missing_rule=False, targets=[0])
    torch.testing.assert_close(
        _run(by_position, mlp, data)["attr", "input"], _run(by_name, mlp, data)["attr", "input"]
    )


def test_gradcam_takes_modules_first_then_the_shared_arguments_from_use_outputs(cnn):
    x = TensorDict(input=torch.randn(2, 2, 6, 6), batch_size=[2])
    cam = GradCAM({"2": DimsConfig((-2, -1), (-3,))}, True)
    assert cam.options.use_outputs is True
    assert cam.options.input_modules == ("2",)
    assert _run(cam, cnn, x)["attr", "2"].shape == (2, 6, 6)
    with pytest.raises(TdhookError, match=r"GradCAM sets \['input_modules'\] itself"):
        GradCAM({"2": DimsConfig()}, True, ["0"])


def test_positional_misuse_is_refused_with_the_order():
    with pytest.raises(InvalidInputError, match="at most 13 positional arguments") as err:
        Saliency(*([None] * 14))
    assert isinstance(err.value, TypeError)
    assert "use_inputs, use_outputs, input_modules" in str(err.value)
    with pytest.raises(InvalidInputError, match="multiple values for 'use_inputs'"):
        Saliency(False, use_inputs=True)


def test_unknown_setting_names_the_nearest():
    with pytest.raises(InvalidInputError, match="unexpected keyword argument 'target'.*'targets'") as err:
        Saliency(target=1)  # type: ignore[call-arg]
    assert isinstance(err.value, TypeError)
    with pytest.raises(InvalidInputError, match="must be a GradientOptions"):
        Saliency(options={"targets": 1})  # type: ignore[arg-type]


def test_one_options_value_configures_several_methods(mlp, data):
    shared = GradientOptions(targets=[1], input_modules="2")
    assert shared.input_modules == ("2",)
    a = _run(Saliency(options=shared, multiply_by_inputs=True), mlp, data)
    b = _run(InputXGradient(targets=[1], input_modules=["2"]), mlp, data)
    torch.testing.assert_close(a["attr", "2"], b["attr", "2"])
    torch.testing.assert_close(a["attr", "input"], b["attr", "input"])
    override = Saliency(options=shared, targets=[0])  # keywords update the options value
    assert override.options.targets == [0]
    assert shared.targets == [1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        shared.targets = [2]  # type: ignore[misc]


def test_options_are_validated_when_built():
    with pytest.raises(TdhookError, match="must be callable"):
        GradientOptions(init_attr_targets=3)  # type: ignore[arg-type]
    with pytest.raises(TdhookError, match="attribution_key must be a string"):
        GradientOptions(attribution_key=("a", "b"))  # type: ignore[arg-type]
    with pytest.raises(TdhookError, match="output_grad_callbacks must map"):
        GradientOptions(output_grad_callbacks=[print])  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", GRADIENT_METHODS, ids=lambda c: c.__name__)
def test_every_setting_is_in_the_runtime_signature(cls):
    params = inspect.signature(cls).parameters
    expected = set(SHARED) - (
        {"use_inputs", "input_modules", "init_attr_inputs"} if cls is GradCAM else set()
    )
    assert expected <= set(params)
    assert "options" in params
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())


def _classes():
    for module in (attribution, lrp):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, HookingContextFactory):
                yield obj


@pytest.mark.parametrize("cls", list(_classes()), ids=lambda c: c.__name__)
def test_structure_rules(cls):
    # no *args forwarding; **settings only as the typed shared settings
    init = inspect.unwrap(cls.__init__)
    params = list(inspect.signature(init).parameters.values())[1:]
    assert not any(p.kind is p.VAR_POSITIONAL for p in params), f"{cls.__name__} takes *args"
    var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
    assert not var_kw or str(var_kw[0].annotation).endswith("Settings]"), f"{cls.__name__} forwards **kwargs"
    # at most ~10 own parameters; the shared ones are grouped in GradientOptions
    assert len([p for p in params if p.kind is not p.VAR_KEYWORD]) <= 10, cls.__name__
    # inheritance depth <= 2 below the hooking base
    chain = [
        c for c in cls.__mro__ if issubclass(c, HookingContextFactory) and c is not HookingContextFactory
    ]
    assert len(chain) <= 2, [c.__name__ for c in chain]


def test_attribution_modules_stay_short():
    root = Path(attribution.__file__).parent
    long = {
        str(p.relative_to(root)): n
        for p in root.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long


def test_baseline_method_multiplies_by_input_minus_baseline(mlp, data):
    data["baseline", "input"] = torch.full((5, 4), 0.5)
    plain = _run(Saliency(), mlp, data)["attr", "input"]
    with_baseline = _run(GradientAttributionWithBaseline(multiply_by_inputs=True), mlp, data)["attr", "input"]
    torch.testing.assert_close(with_baseline, plain * (data["input"] - 0.5))
    torch.testing.assert_close(_run(GradientAttributionWithBaseline(), mlp, data)["attr", "input"], plain)


def _raised_names(path: Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            names.append((node.lineno, ast.unparse(exc)))
    return names


def test_every_raise_is_a_package_error_that_is_also_a_builtin():
    root = Path(attribution.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        module = importlib.import_module(
            "tdhook.attribution."
            + ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        )
        for line, name in _raised_names(path):
            cls = getattr(module, name, None)
            ok = inspect.isclass(cls) and issubclass(cls, TdhookError)
            ok = ok and any(
                issubclass(cls, b)
                for b in (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError)
            )
            if not ok:
                bad.append(f"{path.relative_to(root)}:{line} raises {name}")
    assert not bad, bad

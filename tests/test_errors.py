"""Package errors: every refusal is a ``TdhookError`` that is also the built-in users catch, and its
message names the bad value, what was expected and one fix.

One row per refusal that used to be a bare ``ValueError``/``TypeError`` (issue 14), plus a guard
that no bare raise comes back in the modules converted so far.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sklearn.linear_model import LinearRegression
from tensordict import TensorDict
from torch import nn

import tdhook
from tdhook import errors
from tdhook._types import UnraveledKey
from tdhook.latent import ActivationCaching, SteeringVectors
from tdhook.latent import stats as latent_stats
from tdhook.latent._recording import normalize_module_keys
from tdhook.latent._targeted import publish_cache
from tdhook.latent.probing import ProbeManager, Probing
from tdhook.targets import Target
from tdhook.weights import Pruning, TaskVectors
from tdhook.weights.pruning import PruningSpecError

SRC = pathlib.Path(tdhook.__file__).parent

#: Modules that may hold bare raises; everything else, attribution, sessions and interventions
#: included, must hold none.
#: ``_core/boundary.py``'s direct tensor call raises TensorDictModule's own RuntimeErrors, on
#: purpose: the shortcut must be indistinguishable from the call it replaces
#: (``tests/core/test_lowlevel.py::test_tensor_call_shortcut_matches_tensordict_module``).
OTHERS = ("_core/boundary.py",)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _results_with(metric: Any) -> Any:
    manager = ProbeManager(LinearRegression, {}, lambda p, y: metric)
    probing = Probing("0$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with probing.prepare(_model()) as hooked:
        hooked(TensorDict(input=torch.randn(8, 4), labels=torch.randn(8), step_type="fit", batch_size=[8]))
    return manager.results


def _enter(factory: Any) -> None:
    with factory.prepare(_model()):
        pass


def _task_vector_of(finetuned: Any) -> Any:
    with TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(_model()) as hooked:
        return hooked.get_task_vector(finetuned)


def _prune_nothing() -> None:
    with Pruning(lambda module_key, parameter_name, parameter: None, amount_to_prune=0.5).prepare(_model()):
        pass


def _publish_mismatch() -> None:
    publish_cache(TensorDict(batch_size=[3]), "cache", TensorDict({"0": torch.zeros(5, 2)}, batch_size=[]))


#: (id, call, error class, built-in it must also be, message regex naming value / expectation / fix)
ROWS: list[tuple[str, Callable[[], Any], type, type, str]] = [
    (
        "steering-neither",
        lambda: SteeringVectors(["0"]),
        errors.InvalidParameterError,
        ValueError,
        r"exactly one of steer_fn and vectors, got neither\. Pass steer_fn=",
    ),
    (
        "steering-missing-vector",
        lambda: SteeringVectors(["0", "2"], vectors={"0": torch.ones(6)}),
        errors.InvalidParameterError,
        ValueError,
        r"No steering vector for module\(s\) \['2'\]; vectors has keys \['0'\]\. Give one vector",
    ),
    (
        "steering-vector-not-tensor",
        lambda: SteeringVectors(["0"], vectors={"0": [1.0, 2.0]}),
        errors.InvalidInputError,
        TypeError,
        r"vector of '0' must be a tensor, got list \[1\.0, 2\.0\]\. Convert it, e\.g\. .*torch\.as_tensor",
    ),
    (
        "module-keys-empty",
        lambda: normalize_module_keys([], "modules_to_patch"),
        errors.InvalidInputError,
        TypeError,
        r"modules_to_patch must be a module path or a non-empty list .*got \[\]\. Example:",
    ),
    (
        "probe-factory-not-callable",
        lambda: Probing("0$", "not a factory"),
        errors.InvalidInputError,
        TypeError,
        r"probe_factory must be callable .*got str 'not a factory'\. Pass e\.g\. ProbeManager",
    ),
    (
        "metrics-not-a-dict",
        lambda: _results_with(0.5),
        errors.InvalidInputError,
        TypeError,
        r"compute_metrics returned a float for probe '0_fwd' \(fit\); results needs a dict",
    ),
    (
        "metric-not-a-number",
        lambda: _results_with({"name": object()}),
        errors.InvalidInputError,
        TypeError,
        r"Metric 'name' of probe '0_fwd' is a object \(<object object .*\), not a number .*return numbers",
    ),
    (
        "cache-key-overlaps",
        lambda: _enter(ActivationCaching("0", cache_key="output")),
        errors.InvalidParameterError,
        ValueError,
        r"cache_key 'output' overlaps the model's keys \('output'\).*Pick another key",
    ),
    (
        "cache-key-with-accumulate",
        lambda: ActivationCaching("0", cache_key="cache", accumulate=True),
        errors.InvalidParameterError,
        ValueError,
        r"cache_key='cache' publishes .*accumulate=True.*cache_key=None",
    ),
    (
        "caching-targets-absolute",
        lambda: ActivationCaching(Target("0"), relative=False),
        errors.InvalidParameterError,
        ValueError,
        r"relative=True \(got relative=False\).*Drop relative=False",
    ),
    (
        "caching-targets-backward",
        lambda: ActivationCaching(Target("0"), directions=["bwd"]),
        errors.InvalidParameterError,
        ValueError,
        r"forward-only \(directions=\['fwd'\]\), got \['bwd'\]\. Use tdhook\.session\.HookSession",
    ),
    (
        "caching-without-context",
        lambda: ActivationCaching._context_cache(None),
        errors.InvalidInputError,
        TypeError,
        r"context with a cache, got NoneType: use it through prepare\(model\)",
    ),
    (
        "publish-batch-mismatch",
        _publish_mismatch,
        errors.IncompatibleInputsError,
        ValueError,
        r"Cannot publish the cache under 'cache'.*batch shape \(3,\).*Read context\.cache instead",
    ),
    (
        "pruning-importance-not-callable",
        lambda: Pruning("magnitude", amount_to_prune=0.5),
        errors.InvalidInputError,
        TypeError,
        r"importance_callback must be callable .*got str\. Pass None for magnitude pruning",
    ),
    (
        "pruning-no-amount",
        lambda: Pruning(None),
        PruningSpecError,
        ValueError,
        r"`amount_to_prune` is required for global pruning: pass e\.g\. amount_to_prune=0\.3",
    ),
    (
        "pruning-structured-no-amount",
        lambda: Pruning(None, modules_to_prune={"0": (0, None)}),
        PruningSpecError,
        ValueError,
        r"modules_to_prune\['0'\] has no amount and amount_to_prune is None\. Give one of them",
    ),
    (
        "pruning-nothing-scored",
        _prune_nothing,
        PruningSpecError,
        ValueError,
        r"Nothing to prune: importance_callback returned None .*Return a score",
    ),
    (
        "task-vector-of-a-tensor",
        lambda: _task_vector_of(torch.zeros(3)),
        errors.InvalidInputError,
        TypeError,
        r"nn\.Module .* or a TensorDict of weights, got Tensor tensor\(\[0\., 0\., 0\.\]\)\. Pass the fine-tuned",
    ),
    (
        "task-vectors-accuracy-not-callable",
        lambda: TaskVectors([1.0], 0.9, lambda h: True),
        errors.InvalidInputError,
        TypeError,
        r"get_test_accuracy must be callable as get_test_accuracy\(hooked\) -> float, got float 0\.9\. Pass",
    ),
    (
        "unraveled-key-constructor",
        lambda: UnraveledKey("a"),
        errors.InvalidInputError,
        TypeError,
        r"not a constructor \(called with \('a',\)\); use a str or a tuple of str",
    ),
]


@pytest.mark.parametrize(
    ("call", "cls", "builtin", "message"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_refusals_are_package_errors_that_name_value_expectation_and_fix(
    call: Callable[[], Any], cls: type, builtin: type, message: str
) -> None:
    with pytest.raises(cls, match=message) as info:
        call()
    assert isinstance(info.value, errors.TdhookError)
    assert isinstance(info.value, builtin)


def test_plotting_refusals() -> None:
    from tdhook.plotting import attribution_bars, attribution_heatmap

    with pytest.raises(errors.IncompatibleInputsError, match=r"\(2, 2, 2, 2\)\. Plot one sample.*attr\[0\]"):
        attribution_heatmap(torch.randn(2, 2, 2, 2))
    with pytest.raises(errors.IncompatibleInputsError, match=r"\(2, 2, 2\)\. Plot one sample"):
        attribution_bars(torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match=r"2 labels for 3 attributions; pass one label per feature"):
        attribution_bars(torch.randn(3), ["a", "b"])


def test_estimator_errors_live_in_tdhook_errors() -> None:
    """The errors shared by dimension, similarity, stats and probes have one home (re-exported)."""
    for name in (
        "DistributedNotInitializedError",
        "IncompatibleInputsError",
        "InsufficientSamplesError",
        "InvalidParameterError",
        "NonFiniteInputError",
        "NotFittedError",
        "UnknownKernelError",
    ):
        assert getattr(latent_stats, name) is getattr(errors, name)
        assert name in errors.__all__
    assert issubclass(errors.UnknownKernelError, NotImplementedError)


def _bare_raises(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name) and func.id in (
                "ValueError",
                "TypeError",
                "KeyError",
                "RuntimeError",
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} raise {func.id}")
    return found


def test_no_bare_builtin_raises_outside_the_modules_still_being_converted() -> None:
    files = [
        p
        for p in SRC.rglob("*.py")
        if not any(re.match(rf"{re.escape(o)}(/|$)", str(p.relative_to(SRC))) for o in OTHERS)
    ]
    assert len(files) > 50
    assert [b for p in files for b in _bare_raises(p)] == []

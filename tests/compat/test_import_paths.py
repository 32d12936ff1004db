"""Every import path of tdhook 0.1 (spec §1 and addendum §1) imports and exposes its names.

One table, module path -> names. Where a name also exists in the package's own home of the class
(``tdhook.latent``, ``tdhook.attribution``, ...), the compatibility path must give the *same* object,
so ``isinstance`` checks and state dicts work across paths.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

#: 0.1 module path -> names that module exposes (spec §1 table and addendum §1).
PATHS: dict[str, tuple[str, ...]] = {
    "tdhook": ("__version__",),
    "tdhook.contexts": (
        "HookingContext",
        "HookingContextWithCache",
        "HookingContextFactory",
        "CompositeHookingContextFactory",
    ),
    "tdhook.modules": ("HookedModule", "HookedModuleRun", "get_best_device"),
    "tdhook.hooks": (
        "HookDirection",
        "DIRECTION_TO_PARAMS",
        "DIRECTION_TO_RETURN",
        "DIRECTION_TO_RETURN_INDEX",
        "DIRECTION_TO_TYPE",
        "merge_paths",
        "resolve_submodule_path",
        "submodule_path_to_name",
        "register_hook_to_module",
        "MultiHookHandle",
        "MultiHookManager",
        "MutableWeakRef",
        "TensorDictRef",
        "CacheProxy",
        "EarlyStoppingException",
        "HookFactory",
    ),
    "tdhook.attribution": (
        "ActivationMaximisation",
        "GradCAM",
        "GuidedBackpropagation",
        "IntegratedGradients",
        "Saliency",
        "LRP",
    ),
    "tdhook.attribution.saliency": ("Saliency",),
    "tdhook.attribution.integrated_gradients": ("IntegratedGradients",),
    "tdhook.attribution.guided_backpropagation": ("GuidedBackpropagation",),
    "tdhook.attribution.activation_maximisation": ("ActivationMaximisation",),
    "tdhook.attribution.lrp": ("LRP",),
    "tdhook.attribution.grad_cam": ("GradCAM", "DimsConfig"),
    "tdhook.attribution.gradient_helpers": ("GradientAttribution", "GradientAttributionWithBaseline"),
    "tdhook.attribution.gradient_helpers.common": ("GradientAttribution", "GradientAttributionWithBaseline"),
    "tdhook.attribution.gradient_helpers.helpers": (
        "approximation_parameters",
        "riemann_builders",
        "gauss_legendre_builders",
        "Riemann",
        "SUPPORTED_METHODS",
        "SUPPORTED_RIEMANN_METHODS",
    ),
    "tdhook.attribution.lrp_helpers.rules": (
        "Rule",
        "EpsilonRule",
        "UniformEpsilonRule",
        "PassRule",
        "IgnoreRule",
        "WSquareRule",
        "FlatRule",
        "UniformRule",
        "StopRule",
        "AlphaBetaRule",
        "SoftmaxEpsilonRule",
        "LayerNormRule",
        "PseudoIdentityRule",
        "AHQKVRule",
        "BaseRuleMapper",
        "EpsilonPlus",
        "ParamModifier",
        "RemovableRuleHandle",
        "stabilize",
        "raise_for_unconserved_rel_factory",
    ),
    "tdhook.attribution.lrp_helpers.types": (
        "Activation",
        "AvgPool",
        "BatchNorm",
        "Convolution",
        "ConvolutionStandard",
        "ConvolutionTranspose",
        "Linear",
        "MaxPool",
    ),
    "tdhook.attribution.lrp_helpers.layers": ("Sum",),
    "tdhook.latent": (
        "ActivationAddition",
        "ActivationCaching",
        "ActivationPatching",
        "BilinearProbe",
        "BilinearProbeManager",
        "CkaEstimator",
        "InformationImbalanceEstimator",
        "LinearEstimator",
        "LowRankBilinearEstimator",
        "LocalKnnDimensionEstimator",
        "MeanDifferenceClassifier",
        "Probe",
        "ProbeManager",
        "Probing",
        "SteeringVectors",
        "TwoNnDimensionEstimator",
    ),
    "tdhook.latent.activation_caching": ("ActivationCaching",),
    "tdhook.latent.activation_patching": ("ActivationPatching",),
    "tdhook.latent.steering_vectors": ("ActivationAddition", "SteeringVectors"),
    "tdhook.latent.probing": (
        "Probing",
        "Probe",
        "ProbeManager",
        "BilinearProbe",
        "BilinearProbeManager",
        "LinearEstimator",
        "LowRankBilinearEstimator",
        "MeanDifferenceClassifier",
    ),
    "tdhook.latent.probing.managers": ("Probe", "ProbeManager", "BilinearProbe", "BilinearProbeManager"),
    "tdhook.latent.probing.context": ("Probing", "Probe"),
    "tdhook.latent.probing.estimators": (
        "TorchEstimator",
        "BilinearEstimator",
        "LinearEstimator",
        "LowRankBilinearEstimator",
        "MeanDifferenceClassifier",
    ),
    "tdhook.latent.dimension_estimation": (
        "TwoNnDimensionEstimator",
        "LocalKnnDimensionEstimator",
        "LocalPcaDimensionEstimator",
        "CaPcaDimensionEstimator",
    ),
    "tdhook.latent.dimension_estimation.twonn": ("TwoNnDimensionEstimator",),
    "tdhook.latent.dimension_estimation.local_knn": ("LocalKnnDimensionEstimator",),
    "tdhook.latent.dimension_estimation.local_pca": (
        "LocalPcaDimensionEstimator",
        "_dim_from_eigenvalues_maxgap",
        "_dim_from_eigenvalues_ratio",
        "_local_pca",
    ),
    "tdhook.latent.dimension_estimation.ca_pca": ("CaPcaDimensionEstimator",),
    "tdhook.latent.representation_similarity": ("CkaEstimator", "InformationImbalanceEstimator"),
    "tdhook.latent.representation_similarity.cka": ("CkaEstimator",),
    "tdhook.latent.representation_similarity.information_imbalance": ("InformationImbalanceEstimator",),
    "tdhook.weights": ("Adapters", "Pruning", "TaskVectors"),
    "tdhook.weights.adapters": ("Adapters", "HookedModuleWithAdapters"),
    "tdhook.weights.pruning": ("Pruning", "PruningContext"),
    "tdhook.weights.task_vectors": ("TaskVectors", "TaskVectorsContext", "TaskVectorsModule"),
    "tdhook.metrics": ("InfidelityMetric", "SensitivityMetric"),
    "tdhook.auto": (),
    "tdhook.sources": (),
    "tdhook._types": ("UnraveledKey",),
}

#: 0.1 names deliberately not provided, each named in docs/migration-0.1.md with the reason.
NOT_PROVIDED: dict[str, tuple[str, ...]] = {
    # Internal pipeline blocks; the spec's preface lists them as "not contract".
    "tdhook.modules": (
        "FunctionModule",
        "ModuleCall",
        "ModuleCallWithCache",
        "PGDModule",
        "IntermediateKeysCleaner",
        "flatten_select_reshape_call",
    ),
    # 0.1's metaclass for the layer-type groups, which are plain tuples of classes here.
    "tdhook.attribution.lrp_helpers.types": ("SubclassMeta",),
}

#: Where each class lives in this package; a 0.1 path must give the same object.
HOMES = (
    "tdhook.latent",
    "tdhook.latent.probing",
    "tdhook.latent.dimension",
    "tdhook.latent.similarity",
    "tdhook.attribution",
    "tdhook.weights",
)

CASES = [(module, name) for module, names in PATHS.items() for name in names]


@pytest.mark.parametrize(("module", "name"), CASES, ids=[f"{m}:{n}" for m, n in CASES])
def test_name_importable_from_its_01_path(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module} lacks {name}"
    value = getattr(mod, name)
    assert value is not None
    if not name.startswith("_") and hasattr(mod, "__all__") and module != "tdhook":
        assert name in mod.__all__, f"{name} missing from {module}.__all__"
    for home in HOMES:
        canonical = getattr(importlib.import_module(home), name, None)
        if canonical is not None:
            assert value is canonical, f"{module}.{name} is not {home}.{name}"


@pytest.mark.parametrize("module", sorted(PATHS))
def test_every_01_path_is_a_module(module: str) -> None:
    mod = importlib.import_module(module)
    exported = set(getattr(mod, "__all__", ()))
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names missing attributes {missing}"


def test_empty_01_modules() -> None:
    assert importlib.import_module("tdhook.auto").__all__ == []
    assert importlib.import_module("tdhook.sources").__all__ == []


def test_dimension_and_similarity_paths_are_packages() -> None:
    for module in ("tdhook.latent.dimension_estimation", "tdhook.latent.representation_similarity"):
        assert hasattr(importlib.import_module(module), "__path__"), f"{module} must be a package"


def test_names_not_provided_are_documented() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "migration-0.1.md").read_text()
    for module, names in NOT_PROVIDED.items():
        mod = importlib.import_module(module)
        for name in names:
            assert not hasattr(mod, name), f"{module}.{name} now exists: move it to PATHS"
            assert name in page, f"{module}.{name} is not provided but not named in docs/migration-0.1.md"


def test_direction_mappings() -> None:
    from tdhook.hooks import DIRECTION_TO_PARAMS, DIRECTION_TO_RETURN, DIRECTION_TO_RETURN_INDEX

    assert DIRECTION_TO_RETURN == {
        "fwd": "output",
        "fwd_kwargs": "output",
        "bwd": "grad_input",
        "fwd_pre": "args",
        "fwd_pre_kwargs": "args",
        "bwd_pre": "grad_output",
    }
    assert DIRECTION_TO_RETURN_INDEX == {
        "fwd": 2,
        "bwd": 1,
        "fwd_pre": 1,
        "bwd_pre": 1,
        "fwd_kwargs": 3,
        "fwd_pre_kwargs": 1,
    }
    for direction, index in DIRECTION_TO_RETURN_INDEX.items():
        assert DIRECTION_TO_PARAMS[direction][index] == DIRECTION_TO_RETURN[direction]


def test_unraveled_key_isinstance_semantics() -> None:
    from tdhook._types import UnraveledKey

    for key in ("a", "", ("a",), ("a", "b", "c")):
        assert isinstance(key, UnraveledKey), key
    for key in ((), ("a", 1), ("a", ("b", "c")), 1, None, ["a"], b"a"):
        assert not isinstance(key, UnraveledKey), key
    with pytest.raises(TypeError, match="isinstance"):
        UnraveledKey()


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_get_best_device(monkeypatch, cuda: bool, mps: bool, expected: str) -> None:
    from tdhook.modules import get_best_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    device = get_best_device()
    assert isinstance(device, torch.device)
    assert device == torch.device(expected)

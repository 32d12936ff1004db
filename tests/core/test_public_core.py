"""``tdhook.core`` is the core's canonical public home: a pure re-export of ``tdhook._core``, and
tdhook 0.1's paths (``tdhook.contexts``, ``tdhook.modules``, ``tdhook.hooks``) give the same objects.

(Every 0.1 path and name importing at all is ``tests/compat/test_import_paths.py``'s table; this
one maps each core name of those paths to its canonical name.)
"""

from __future__ import annotations

import importlib
import inspect

import pytest

import tdhook
import tdhook.core

#: (0.1 module, 0.1 name) -> name in ``tdhook.core``.
CANONICAL: dict[tuple[str, str], str] = {
    ("tdhook.contexts", "HookingContext"): "HookingContext",
    ("tdhook.contexts", "HookingContextWithCache"): "HookingContextWithCache",
    ("tdhook.contexts", "HookingContextFactory"): "HookingContextFactory",
    ("tdhook.contexts", "CompositeHookingContextFactory"): "CompositeHookingContextFactory",
    ("tdhook.modules", "HookedModule"): "HookedModule",
    ("tdhook.modules", "HookedModuleRun"): "HookedModuleRun",
    ("tdhook.hooks", "HookDirection"): "HookDirection",
    ("tdhook.hooks", "MultiHookHandle"): "HandleGroup",
    ("tdhook.hooks", "merge_paths"): "join_paths",
    ("tdhook.hooks", "MutableWeakRef"): "MutableWeakRef",
    ("tdhook.hooks", "TensorDictRef"): "TensorDictRef",
    ("tdhook.hooks", "CacheProxy"): "CacheProxy",
    ("tdhook.hooks", "EarlyStoppingException"): "EarlyStoppingException",
}


@pytest.mark.parametrize(
    ("old", "canonical"), list(CANONICAL.items()), ids=lambda v: ".".join(v) if isinstance(v, tuple) else v
)
def test_old_path_gives_the_canonical_object(old: tuple[str, str], canonical: str) -> None:
    module, name = old
    assert getattr(importlib.import_module(module), name) is getattr(tdhook.core, canonical)


def test_every_core_name_of_an_old_path_is_in_the_table() -> None:
    """A core object exported from a 0.1 path must have its row above (so the table stays complete)."""
    core_objects = {id(getattr(tdhook.core, n)) for n in tdhook.core.__all__}
    for module_name in ("tdhook.contexts", "tdhook.modules", "tdhook.hooks"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if id(getattr(module, name)) in core_objects and not isinstance(getattr(module, name), str):
                assert (module_name, name) in CANONICAL, (
                    f"{module_name}.{name} is a core object without a row"
                )


def test_core_only_re_exports_the_private_core() -> None:
    assert sorted(tdhook.core.__all__) == sorted(set(tdhook.core.__all__))
    for name in tdhook.core.__all__:
        obj = getattr(tdhook.core, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):  # not the constants and type aliases
            home = obj.__module__
            assert home.startswith("tdhook._core."), f"tdhook.core.{name} is defined in {home}"


def test_core_is_a_lazy_submodule_of_tdhook() -> None:
    assert "core" in tdhook.__all__
    assert tdhook.core is importlib.import_module("tdhook.core")

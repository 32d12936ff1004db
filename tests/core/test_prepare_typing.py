"""``prepare()`` is typed: a type checker sees the method's context class and the hooked module.

Runs mypy on a snippet (``reveal_type``) the way a user's IDE or CI would see tdhook.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

SNIPPET = """
import torch
from tdhook.contexts import CompositeHookingContextFactory
from tdhook.latent import ActivationCaching
from tdhook.weights import Adapters, Pruning, TaskVectors
from tdhook.weights.task_vectors import TaskVectorTools

model = torch.nn.Linear(2, 2)
reveal_type(ActivationCaching("0").prepare(model))
with Pruning(None, amount_to_prune=0.5).prepare(model) as hooked:
    reveal_type(hooked)
    reveal_type(hooked.extension(TaskVectorTools))
reveal_type(TaskVectors([1.0], lambda h: 0.0, lambda h: True).prepare(model))
reveal_type(Adapters({"a": (torch.nn.Identity(), "", "")}).prepare(model, return_context=False))
reveal_type(CompositeHookingContextFactory(Pruning(None, amount_to_prune=0.5)).prepare(model))
"""

EXPECTED = [
    "tdhook._core.lifecycle.HookingContextWithCache",
    "tdhook._core.hooked.HookedModule",
    "tdhook.weights._task_vectors.TaskVectorTools",
    "tdhook.weights._task_vectors.TaskVectorsContext",
    "tdhook._core.hooked.HookedModule",
    "tdhook._core.lifecycle.HookingContextWithCache",
]


@pytest.mark.slow  # mypy analyses tdhook and torch's stubs: ~40 s of CPU
def test_prepare_and_enter_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mypy import api

    import tdhook

    monkeypatch.setenv("MYPYPATH", str(Path(tdhook.__file__).parents[1]))  # the tdhook under test
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    stdout, stderr, _ = api.run(
        [
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--python-version=3.11",
            f"--cache-dir={tmp_path / 'cache'}",
            str(snippet),
        ]
    )
    revealed = [
        line.split('Revealed type is "')[1].rstrip('"') for line in stdout.splitlines() if "Revealed" in line
    ]
    assert revealed == EXPECTED, stdout + stderr


def test_every_latent_weights_and_transformers_method_declares_its_context_class() -> None:
    """``class M(HookingContextFactory[Ctx])`` with ``Ctx`` the class it builds, so ``prepare()`` is typed."""
    import importlib
    import inspect
    import typing

    from tdhook._core.factory import HookingContextFactory

    checked = []
    for package in ("tdhook.latent", "tdhook.latent.probing", "tdhook.weights", "tdhook.transformers"):
        module = importlib.import_module(package)
        for name in module.__all__:
            cls = getattr(module, name)
            if not (inspect.isclass(cls) and issubclass(cls, HookingContextFactory)):
                continue
            declared = [
                typing.get_args(base)
                for base in getattr(cls, "__orig_bases__", ())
                if typing.get_origin(base) is HookingContextFactory
            ]
            assert declared, name
            assert declared[0][0] is cls._hooking_context_class, (name, declared)
            checked.append(name)
    latent = {"SteeringVectors", "ActivationAddition", "ActivationPatching", "Probing", "Adapters"}
    transformers = {"HeadPatching", "HeadAblation", "HeadCaching", "LogitLens", "AttributionPatching"}
    assert latent | transformers <= set(checked)

"""Every ``>>>`` example in a docstring under ``src/tdhook`` runs and prints what it says.

One test per module (so a failure names the module), plus a guard that the finder really saw
the examples: a module whose source holds ``>>>`` must yield at least one example, so an
example cannot drop out of the run silently (e.g. in a docstring the finder does not reach).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

import tdhook

_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = [tdhook.__name__]
    for info in pkgutil.walk_packages(tdhook.__path__, prefix=f"{tdhook.__name__}."):
        names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def _examples(module: ModuleType) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    tests = _examples(module)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    report: list[str] = []
    for test in tests:
        torch.manual_seed(0)
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples failed in {name}:\n" + "".join(report)


@pytest.mark.parametrize("name", MODULES)
def test_every_written_example_is_collected(name: str) -> None:
    module = importlib.import_module(name)
    source = Path(module.__file__ or "").read_text()
    if ">>>" in source:
        assert _examples(module), f"{name} has '>>>' in its source but the doctest finder saw no example"


def test_the_package_has_examples() -> None:
    total = sum(len(_examples(importlib.import_module(n))) for n in MODULES)
    assert total >= 30, f"only {total} docstrings with examples found under tdhook"

"""The project's rules agree with each other: one Python floor, pinned tools, CI runs every test."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def test_one_python_floor_for_packaging_ruff_and_mypy() -> None:
    floor = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert floor, PYPROJECT["project"]["requires-python"]
    major, minor = floor.groups()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"{major}.{minor}"


def test_pre_commit_runs_ruff_and_mypy_from_the_pinned_venv() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "mypy"} <= set(hooks)
    pins = _pins()
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    for hook in hooks.values():
        tool = hook["entry"].split()[0]
        assert tool.startswith(".venv/bin/"), f"{hook['id']} runs {tool}, not the venv's pinned tool"
        name = tool.removeprefix(".venv/bin/")
        assert name in pins, f"{name} (pre-commit hook {hook['id']}) is not pinned in constraints.txt"
        assert name in dev, f"{name} is not in the dev extra"
    assert "pre-commit" in pins
    assert "--check" in hooks["ruff-format"]["entry"]


def test_default_run_skips_slow_tests_and_ci_runs_them() -> None:
    makefile = (ROOT / "Makefile").read_text()
    unit = re.search(r"^unit:.*\n\t(.*)$", makefile, flags=re.M)
    slow = re.search(r"^test-slow:.*\n\t(.*)$", makefile, flags=re.M)
    assert unit
    assert slow
    assert '-m "not slow"' in unit[1]
    assert "-m slow" in slow[1]
    assert re.search(r"^test-all: test test-slow\b", makefile, flags=re.M)
    assert "make test-all" in (ROOT / ".ci" / "run").read_text()
    assert "slow" in " ".join(PYPROJECT["tool"]["pytest"]["ini_options"]["markers"])

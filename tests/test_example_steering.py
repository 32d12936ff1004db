"""The digits steering example runs offline and shows a steering effect that a random vector does not have."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_steering.py"


def load_example():
    spec = importlib.util.spec_from_file_location("digits_steering", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Small matrices: one thread is ~50x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_digits_steering_example(tmp_path, capsys) -> None:
    results = load_example().main(["--out", str(tmp_path), "--epochs", "60"])
    assert results["test_accuracy"] > 0.9
    by_scale = {row["scale"]: row for row in results["rows"]}
    assert by_scale[0.0]["steering"] == 0.0
    assert by_scale[1.0]["steering"] > 0.6
    assert by_scale[1.0]["steering"] > by_scale[1.0]["control"] + 0.4
    assert results["shift_error"] < 1e-4
    assert (tmp_path / "digits_steering.png").stat().st_size > 1000
    assert json.loads((tmp_path / "digits_steering.json").read_text())["rows"] == results["rows"]
    assert "classified as 8" in capsys.readouterr().out

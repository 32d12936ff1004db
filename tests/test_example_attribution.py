"""The digits attribution example runs offline (IG + LRP on a small CNN) and saves a figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_attribution.py"


@pytest.mark.slow
def test_digits_attribution_example(tmp_path):
    spec = importlib.util.spec_from_file_location("digits_attribution", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fig.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is much faster on a loaded 2-core machine
    try:
        result = module.main(["--out", str(out), "--epochs", "2", "--n", "2"])
    finally:
        torch.set_num_threads(threads)
    assert out.exists()
    assert result["accuracy"] > 0.5
    assert result["delta"] < 0.1

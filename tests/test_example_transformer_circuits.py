"""examples/transformer_circuits.py runs offline (reduced training budget) and its analyses agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer_circuits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_circuits", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformer_circuits_example(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = load_example().main(["--out", str(tmp_path), "--steps", "40", "--batch", "32"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "transformer_circuits.json").read_text())
    assert saved["top_heads_patching"] == [list(h) for h in results["top_heads_patching"]]
    assert (tmp_path / "transformer_circuits.png").stat().st_size > 10_000
    assert len(results["head_patching_restored"]) == 2
    assert len(results["logit_lens_accuracy"]) == 2
    # attribution patching tracks real head patching, whatever the training budget
    assert results["correlation_attribution_vs_patching"] > 0.9
    assert "top heads by head patching" in capsys.readouterr().out

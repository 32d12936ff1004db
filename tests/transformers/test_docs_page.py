"""docs/transformers.md: its python blocks run in order in one namespace, as a reader would paste them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "transformers.md"


def test_transformers_page_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, source in enumerate(blocks):
        exec(compile(source, f"docs/transformers.md block {i}", "exec"), namespace)
    assert namespace["z"].shape == (2, 6, 4, 8)
    assert namespace["attr"]["head"].shape == (2, 2, 4)
    assert namespace["caching"] is not None
    assert torch.is_tensor(namespace["steered"])

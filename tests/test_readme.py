"""The README's code runs as written (quick start, and the examples with a small model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs() -> None:
    quick_start = next(b for b in _blocks() if "Quick start" in b or "ActivationCaching(r" in b)
    namespace: dict = {}
    exec(compile(quick_start, "README quick start", "exec"), namespace)
    assert set(namespace["cache"].keys()) == {"0", "1", "2"}
    assert set(namespace["manager"].fit_metrics) == {"0_fwd", "1_fwd", "2_fwd"}


def test_more_examples_run() -> None:
    block = next(b for b in _blocks() if "CompositeHookingContextFactory(" in b)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                *[torch.nn.Linear(6, 6) for _ in range(6)], torch.nn.Linear(6, 4)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    from tensordict import TensorDict

    namespace = {
        "torch": torch,
        "TensorDict": TensorDict,
        "model": Net(),
        "x": torch.randn(5, 6),
        "x_corrupted": torch.randn(5, 6),
        "v": torch.ones(6),
    }
    exec(compile(block, "README examples", "exec"), namespace)
    td = namespace["td"]
    assert td["attr", "input"].shape == (5, 6)  # the last `with` returned td from the composite
    assert namespace["relevance"].shape == (5, 6)
    assert ("patched", "output") in td.keys(include_nested=True)
    assert "layers.5" in namespace["hooked"].hooking_context.cache

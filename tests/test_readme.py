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


def test_streaming_probe_block_runs_in_a_one_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist
    from sklearn.metrics import r2_score
    from tensordict import TensorDict

    from tdhook.latent.probing import ProbeManager, Probing

    block = next(b for b in _blocks() if "manager.all_reduce()" in b)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, xt = torch.randn(600, 4), torch.randn(100, 4)
    shard = TensorDict(input=x, labels=x[:, :2] * 2, batch_size=[600])
    test = TensorDict(input=xt, labels=xt[:, :2] * 2, batch_size=[100])
    namespace = {"torch": torch, "model": model, "my_shard": shard, "test": test}
    namespace |= {
        "ProbeManager": ProbeManager,
        "Probing": Probing,
        "r2_score": r2_score,
        "TensorDict": TensorDict,
    }
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        exec(compile(block, "README streaming probes", "exec"), namespace)
    finally:
        dist.destroy_process_group()
    metrics = namespace["manager"].predict_metrics
    assert set(metrics) == {"0_fwd", "1_fwd", "2_fwd"}
    assert metrics["0_fwd"]["r2"] > 0.999  # the labels are linear in the first layer's input

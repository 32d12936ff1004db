"""The distributed probing example, launched by torchrun with two gloo processes, equals one process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_probing.py"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLE),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es), 4096 training samples in all" in proc.stdout
    r2 = [float(v) for v in re.findall(r"_fwd: (-?\d\.\d+)", proc.stdout)]
    assert len(r2) == 8  # the 4 Linear and 4 Tanh layers
    assert min(r2) > 0.5  # the probes learn the target
    diff = float(
        re.search(r"max \|R² difference\| vs one process on all the data: (\S+)", proc.stdout).group(1)
    )
    assert diff < 1e-9


@pytest.mark.slow
def test_single_process_without_torchrun() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("1 process(es)")

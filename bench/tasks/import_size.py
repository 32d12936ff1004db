"""Cold import time and installed size of each environment (not a :class:`Task`: no model, no gate).

Import time: median wall time of ``python -c '<statement>'`` in fresh processes (the page cache
is warm after the first), minus the median of ``python -c pass``. Size: disk usage of the
environment's ``site-packages``, with and without torch, torchvision, triton and the CUDA wheels.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .._harness import ENVS_DIR, _quantile, child_env, env_python

#: (environment, statement): ``import torch`` is the floor every library pays.
STATEMENTS = (
    ("tdhook", "import torch"),
    ("tdhook", "import tdhook"),
    ("tdhook", "import tdhook.attribution, tdhook.latent"),
    ("captum", "import captum.attr"),
    ("zennit", "import zennit.composites"),
    ("nnsight", "import nnsight"),
    ("transformer-lens", "import transformer_lens"),
)

_TORCH_PREFIXES = ("torch", "torchvision", "triton", "nvidia", "cuda", "functorch", "torchgen")


def _wall(python: Path, statement: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([str(python), "-c", statement], env=child_env(), check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)


def _disk_mib(root: Path, *, skip_torch: bool) -> float:
    total = 0
    for entry in root.iterdir():
        name = entry.name.lower()
        if skip_torch and name.startswith(_TORCH_PREFIXES):
            continue
        if entry.is_file():
            total += entry.stat().st_blocks * 512
            continue
        for dirpath, _, files in os.walk(entry):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total / 2**20


def measure_all(*, quick: bool = False) -> list[dict[str, Any]]:
    """Measure every statement of :data:`STATEMENTS` whose environment exists."""
    repeats = 3 if quick else 7
    rows = []
    for env, statement in STATEMENTS:
        python = env_python(env)
        row: dict[str, Any] = {"env": env, "statement": statement}
        if not python.exists():
            row["import_s"] = None
            rows.append(row)
            continue
        print(f"[import_size] {env}: {statement}", flush=True)
        floor = statistics.median(_wall(python, "pass", repeats))
        _wall(python, statement, 1)  # warm the page cache
        times = [t - floor for t in _wall(python, statement, repeats)]
        row.update(
            import_s=statistics.median(times), p10_s=_quantile(times, 0.1), p90_s=_quantile(times, 0.9)
        )
        site = next((ENVS_DIR / env / "lib").glob("python*/site-packages"))
        row["size_mib"] = _disk_mib(site, skip_torch=False)
        row["size_wo_torch_mib"] = _disk_mib(site, skip_torch=True)
        rows.append(row)
    return rows

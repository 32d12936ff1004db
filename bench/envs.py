"""Build the benchmark environments: ``python -m bench.envs [NAME ...]`` (default: all).

One virtual environment per peer under ``bench/.envs/<name>``, each with our package installed
editable (``--no-deps``: it needs only torch and tensordict) and pinned by
``bench/constraints-<name>.txt`` (a ``pip freeze`` of a working build). All share torch 2.13.0
(CPU build from local disk) except zennit's, whose torchvision needs the local torch 2.14.1 +
torchvision 0.29.1 pair; ours runs in that environment for the LRP task. An existing
environment is kept; delete its folder to rebuild it.
"""

from __future__ import annotations

import subprocess
import sys

from ._harness import ENVS_DIR, ROOT

#: ``{environment: requirements}`` (versions come from the constraints file).
ENVS: dict[str, list[str]] = {
    "tdhook": ["torch", "tensordict", "psutil"],
    "captum": ["torch", "tensordict", "captum", "psutil"],
    "nnsight": ["torch", "tensordict", "nnsight", "psutil"],
    "transformer-lens": ["torch", "tensordict", "transformer-lens", "psutil"],
    "zennit": ["torch", "torchvision", "tensordict", "zennit", "psutil"],
}


def build(name: str) -> None:
    """Create ``bench/.envs/<name>`` if missing and install its requirements and tdhook."""
    env = ENVS_DIR / name
    python = env / "bin" / "python"
    constraints = ROOT / "bench" / f"constraints-{name}.txt"
    if python.exists():
        print(f"{name}: exists ({env})")
        return
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, *ENVS[name]], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    print(f"{name}: built ({env})")


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(ENVS)
    for name in names:
        if name not in ENVS:
            print(f"Unknown environment {name!r}; available: {', '.join(ENVS)}.", file=sys.stderr)
            return 2
        build(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tdhook: interpretability for any PyTorch model through TensorDict and torch hooks.

Every method follows one pattern::

    with Method(...).prepare(model) as hooked:
        td = hooked(td)

Sub-packages (``attribution``, ``latent``, ``weights``, ``metrics``, ...) are imported lazily on
first access, so ``import tdhook`` stays fast and ``tdhook.latent`` works without an explicit
``import tdhook.latent``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

__all__ = [
    "__version__",
    "attribution",
    "auto",
    "contexts",
    "core",
    "errors",
    "hooks",
    "interventions",
    "latent",
    "metrics",
    "modules",
    "plotting",
    "session",
    "sources",
    "targets",
    "transformers",
    "weights",
]

_SUBMODULES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tdhook' has no attribute {name!r}; available: {sorted(_SUBMODULES)}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)

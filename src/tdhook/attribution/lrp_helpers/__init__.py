"""Compatibility package for tdhook 0.1 import paths (``tdhook.attribution.lrp_helpers.*``).

The implementation lives in :mod:`tdhook.attribution.lrp`; the modules ``rules``, ``types`` and
``layers`` re-export it under the old paths. As in tdhook 0.1, this package itself exports
nothing.
"""

__all__: list[str] = []

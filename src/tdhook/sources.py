"""Compatibility path (tdhook 0.1): ``tdhook.sources``, empty in 0.1 and here."""

from __future__ import annotations

__all__: list[str] = []

"""Reusable model targets: which units of which value of which module (see :class:`Target`)."""

from ._targets import Target, TargetKind

__all__ = ["Target", "TargetKind"]

"""Interactive hook sessions: capture, replace and stop on a live model (see :class:`HookSession`)."""

from ._session import (
    CapturedTarget,
    EarlyStopResult,
    HookProgram,
    HookSession,
    ProgramEntry,
    SessionStop,
)

__all__ = ["CapturedTarget", "EarlyStopResult", "HookProgram", "HookSession", "ProgramEntry", "SessionStop"]

"""The tdhook 0.1 hooked-module classes of the weights methods, for use without a context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .._core.extensions import Extension
from .._core.hooked import ROOT_NAME, HookedModule

__all__ = ["StandaloneHookedModule"]


class StandaloneHookedModule(HookedModule):
    """A hooked module built with one extension attached (``extension_kind``).

    Inside a method's context the hooked module is a plain :class:`~tdhook.core.HookedModule`
    carrying the extension; these classes keep the 0.1 names for use without a context.
    """

    extension_kind: ClassVar[type[Extension]]

    def __init__(
        self,
        td_module: Any,
        hooking_context: Any = None,
        relative_path: str = ROOT_NAME,
        in_keys: Sequence[Any] | None = None,
        out_keys: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(td_module, hooking_context, relative_path, in_keys, out_keys)
        self._attached(self.use_extension(self.extension_kind))

    def _attached(self, extension: Any) -> None:
        """What the class does with its extension once attached (nothing by default)."""

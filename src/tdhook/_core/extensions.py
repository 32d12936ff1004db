"""Extensions: what a method adds to the hooked module of one context (state and methods).

Methods never subclass the hooked module. A method that gives the ``with`` body more than the
hooked module's own API (adapters to train, task vectors to apply) defines an
:class:`Extension` and asks the hooked module for it while it plans::

    adapters = hooked.use_extension(AdapterSet)

The hooked module creates an extension once per context (``AdapterSet(hooked)``): two methods
of one kind share it, and methods of different kinds each add their own, so any two methods
compose in one :class:`~tdhook._core.factory.CompositeHookingContextFactory`. The body reaches
an extension by its type, with full typing (``hooked.extension(AdapterSet).adapter("sae")``),
or by the names it lists in :attr:`Extension.exposes` (``hooked.adapter("sae")``, the tdhook 0.1
spelling). Two extensions exposing one name cannot be attached to one hooked module
(:class:`~tdhook.errors.ExtensionConflictError`).

The hooked module is rebuilt at every enter, so an extension lives as long as one context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .hooked import HookedModule

__all__ = ["Extension"]


class Extension:
    """Base class of the state and methods a method attaches to a hooked module.

    Subclasses take the hooked module as their only constructor argument (see
    :meth:`~tdhook._core.hooked.HookedModule.use_extension`) and list in :attr:`exposes` the
    attribute names the hooked module forwards to them.

    Args:
        hooked: The hooked module the extension belongs to.
    """

    #: Attribute names that ``hooked.<name>`` forwards to this extension.
    exposes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hooked: HookedModule) -> None:
        self.hooked = hooked

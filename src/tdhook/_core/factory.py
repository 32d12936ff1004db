"""Method factories: configure in ``__init__``, bind with ``prepare()``; and their composition."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Literal, TypeVar, overload

from tensordict import TensorDictBase
from torch import nn

from ..errors import CompositionError, InvalidInputError
from .boundary import wrap_module
from .directions import HandleGroup, Installable
from .hooked import HookedModule
from .lifecycle import HookingContext, HookingContextWithCache
from .run import _Deferred

__all__ = ["CompositeHookingContextFactory", "HookingContextFactory"]

#: The context class a method's ``prepare()`` returns.
_C = TypeVar("_C", bound=HookingContext)


class HookingContextFactory(Generic[_C]):
    """Base class of every method: configure in ``__init__``, bind with :meth:`prepare`.

    Subclasses override :meth:`_plan` (what to hook or edit) and, for methods that run the model
    in a particular way (several passes, gradients...), :meth:`_call`. A method whose contexts
    are of a subclass of :class:`HookingContext` names it twice, as the type parameter (so that
    ``prepare()`` is typed) and in ``_hooking_context_class`` (so that it is built)::

        class Adapters(HookingContextFactory[HookingContextWithCache]):
            _hooking_context_class = HookingContextWithCache

    ``with Method(...).prepare(model) as hooked:`` then gives a typed
    :class:`~tdhook._core.hooked.HookedModule`; what a method adds to it is reached with
    ``hooked.extension(Kind)`` (see :mod:`tdhook._core.extensions`).
    """

    _hooking_context_class: type[_C] = HookingContext  # type: ignore[assignment]
    _hooked_module_class: type[HookedModule] = HookedModule
    #: True for methods whose ``_call`` needs a TensorDict (tensor calls are refused).
    _needs_tensordict = False
    #: True for methods that keep no per-call state on the instance, so that one instance may be
    #: active in contexts of several threads at once; others refuse a second thread.
    _thread_safe = False
    #: The TensorDict that a context with a cache (:class:`HookingContextWithCache`) uses; None:
    #: a new one per context. Read by contexts through :attr:`context_cache`.
    _cache: TensorDictBase | None = None
    #: Whether such a context clears its cache at every enter; None: the context's own default.
    _clear_cache: bool | None = None

    # -- what a factory exposes to its contexts ----------------------------------------------------
    @property
    def components(self) -> tuple[HookingContextFactory, ...]:
        """The methods a context of this factory runs, in order: ``(self,)``; a composite's parts."""
        return (self,)

    @property
    def hooked_module_class(self) -> type[HookedModule]:
        """The class of the hooked module a context builds (HookedModule; methods add extensions)."""
        return self._hooked_module_class

    @property
    def needs_tensordict(self) -> bool:
        """True if a call must pass a TensorDict (the method's ``_call`` reads keys); tensor calls are refused."""
        return self._needs_tensordict

    @property
    def thread_safe(self) -> bool:
        """True if one instance may be active in contexts of several threads at once."""
        return self._thread_safe

    @property
    def context_cache(self) -> TensorDictBase | None:
        """The cache TensorDict this method's contexts use (None: a new one per context)."""
        return self._cache

    @property
    def clears_cache(self) -> bool | None:
        """Whether this method's contexts clear their cache at enter (None: the context decides)."""
        return self._clear_cache

    @overload
    def prepare(
        self,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        return_context: Literal[True] = True,
    ) -> _C: ...

    @overload
    def prepare(
        self,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        return_context: Literal[False],
    ) -> HookedModule: ...

    @overload
    def prepare(
        self,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        return_context: bool,
    ) -> _C | HookedModule: ...

    def prepare(
        self,
        module: nn.Module,
        in_keys: Sequence[Any] | dict[str, Any] | None = None,
        out_keys: Sequence[Any] | None = None,
        *,
        return_context: bool = True,
    ) -> _C | HookedModule:
        """Bind this method to ``module``.

        Args:
            module: A plain ``nn.Module`` (read from ``"input"``, written to ``"output"`` unless
                ``in_keys``/``out_keys`` say otherwise) or a ``TensorDictModuleBase`` (its keys;
                ``in_keys``/``out_keys`` may select a subset).
            in_keys: Input keys (or a ``{kwarg: key}`` dict for a plain module).
            out_keys: Output keys.
            return_context: When False, enter immediately and return the hooked module; call
                ``hooked.restore()`` to undo.

        Returns:
            A lazy :class:`HookingContext` (of the method's context class, which its ``with``
            enters to give the :class:`HookedModule`), or the entered :class:`HookedModule` when
            ``return_context=False`` (the tdhook 0.1 flag, kept; typed by overloads).
        """
        td_module, extra, ins, outs = wrap_module(module, in_keys, out_keys)
        context = self._hooking_context_class(self, td_module, extra, ins, outs)
        if return_context:
            return context
        return context.enter_unmanaged()

    # -- extension points ------------------------------------------------------------------------
    def _plan(self, hooked: HookedModule) -> Iterable[Installable]:
        """Return what to install on the model (hooks, reversible edits). Called once per enter.

        The default installs what the legacy :meth:`_hook_module` registers (nothing, unless a
        subclass overrides it).
        """
        return [_Deferred(functools.partial(self._hook_module, hooked))]

    def _hook_module(self, hooked: HookedModule) -> Any:
        """Legacy extension point (tdhook 0.1): register hooks and return a removable handle."""
        return HandleGroup()

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        """Run one call around ``call_next`` (the next method of a composition, or the model).

        The default runs ``call_next`` once on ``td``.
        """
        return call_next(td, **kwargs)

    def _enter(self, context: HookingContext) -> None:
        """Per-enter state set-up (before the plan is built)."""

    def _exit(self, context: HookingContext) -> None:
        """Per-exit state tear-down (after the plan is undone)."""


class _CompositeContext(HookingContextWithCache):
    """The context of a :class:`CompositeHookingContextFactory`: every component, one cache."""


def _flatten_factories(factories: Iterable[Any]) -> list[HookingContextFactory]:
    flat: list[HookingContextFactory] = []
    for f in factories:
        if isinstance(f, CompositeHookingContextFactory):
            flat.extend(f.factories)
        elif isinstance(f, HookingContextFactory):
            flat.append(f)
        else:
            raise InvalidInputError(
                f"CompositeHookingContextFactory takes method instances, got {type(f).__name__}. "
                "Pass configured methods, e.g. CompositeHookingContextFactory(SteeringVectors(...), ActivationCaching(...))."
            )
    return flat


def _most_derived_module_class(factories: Sequence[HookingContextFactory]) -> type[HookedModule]:
    """The one hooked-module class that is a subclass of every component's class."""
    chosen: type[HookedModule] = HookedModule
    for f in factories:
        cls = f.hooked_module_class
        if issubclass(cls, chosen):
            chosen = cls
        elif not issubclass(chosen, cls):
            names = sorted({type(g).__name__ + " -> " + g.hooked_module_class.__name__ for g in factories})
            raise CompositionError(
                f"Cannot compose methods that need unrelated hooked-module classes ({', '.join(names)}). "
                "Use them in nested `with` blocks instead, or subclass one hooked-module class from the other."
            )
    return chosen


class CompositeHookingContextFactory(HookingContextFactory[HookingContextWithCache]):
    """Several methods in one context: hook-only and pipeline methods, in one forward pass.

    Order, deterministic and documented:

    1. **Calls.** Every component's ``_call`` wraps the next one's: the *first* factory is the
       outermost, the last one's ``call_next`` runs the model. A pipeline method that runs the
       model several times (patching: clean then patched run; ActivationAddition: positive then
       negative run) runs everything after it in the list that many times.
    2. **Hooks.** Plans are built and installed in the given order, so hooks on the same module
       fire in that order, each seeing the value left by the previous ones (a cache listed after
       a steering method on the same module stores the steered output). Reversible edits
       (pruning, task vectors) are undone in reverse order at exit, also after an exception.
    3. **Runs.** The hooks of every component fire in every model run, including the extra
       runs of a pipeline method: steering applies to the clean and the patched runs, and a
       cache holds the values of the last run (the patched one).

    The context has a ``.cache`` shared with caching components. Nested composites are
    flattened. Methods add what they need to the hooked module as *extensions* (e.g. the
    adapters of ``Adapters``, the task-vector tools of ``TaskVectors``; see
    :mod:`tdhook._core.extensions`), so any two methods compose; a composite of weight edits
    behaves like nested ``with`` blocks in list order. A (legacy) method that declares its own
    hooked-module class gets the most derived one of those declared.

    Args:
        *factories: The methods to compose (configured instances).

    Raises:
        CompositionError: With no factory, or with components declaring unrelated hooked-module
            classes (a ``ValueError``).
        InvalidInputError: If an argument is not a method instance.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> composite = CompositeHookingContextFactory(
        ...     SteeringVectors(["0"], vectors={"0": torch.ones(4)}), ActivationPatching(["1"]), ActivationCaching("2")
        ... )
        >>> td = TensorDict({"input": torch.randn(2, 3), ("patched", "input"): torch.randn(2, 3)}, batch_size=[2])
        >>> with composite.prepare(model) as hooked:
        ...     td = hooked(td)
        >>> sorted(hooked.hooking_context.cache.keys())
        ['2']
    """

    _hooking_context_class = _CompositeContext

    def __init__(self, *factories: HookingContextFactory) -> None:
        if not factories:
            raise CompositionError(
                "CompositeHookingContextFactory needs at least one factory, e.g. "
                "CompositeHookingContextFactory(SteeringVectors(...), ActivationCaching(...))."
            )
        flat = _flatten_factories(factories)
        self._factories = tuple(flat)
        self._needs_tensordict = any(f.needs_tensordict for f in flat)
        self._hooked_module_class = _most_derived_module_class(flat)

    @property
    def factories(self) -> tuple[HookingContextFactory, ...]:
        """The components, in call and installation order (nested composites flattened)."""
        return self._factories

    @property
    def components(self) -> tuple[HookingContextFactory, ...]:
        return self._factories

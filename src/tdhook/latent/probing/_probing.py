"""Probing: feed the activations of matching modules to probes, with labels from the TensorDict."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensordict import NonTensorData, NonTensorStack, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from ..._core.directions import HookDirection, HookSpec
from ..._core.factory import HookingContextFactory
from ..._core.hook_types import _default_value
from ..._core.hooked import HookedModule
from ..._core.keys import check_keys
from ..._core.lifecycle import HookingContext
from ..._core.paths import select_modules
from ...errors import InvalidInputError, TdhookError, TdhookWarning

__all__ = ["ProbesNeverFiredWarning", "Probing"]


class ProbesNeverFiredWarning(TdhookWarning):
    """Some probes of a :class:`Probing` context never received an activation."""


def _plain(value: Any) -> Any:
    """Turn TensorDict non-tensor entries (``"fit"`` stored in a batched TensorDict) back into Python."""
    if isinstance(value, NonTensorStack):
        items = value.tolist()
        flat = items
        while isinstance(flat, list) and flat and isinstance(flat[0], list):
            flat = [x for sub in flat for x in sub]
        if isinstance(flat, list) and flat and all(x == flat[0] for x in flat):
            return flat[0]
        return items
    if isinstance(value, NonTensorData):
        return value.data
    return value


@dataclass
class _Extras:
    """The additional TensorDict entries of the current call, shared by the probe hooks, and
    which probes have fired since enter."""

    items: dict[str, Any] = field(default_factory=dict)
    fired: set[tuple[str, HookDirection]] = field(default_factory=set)


@dataclass(frozen=True)
class _ProbeHook:
    probe: Any
    direction: HookDirection
    extras: _Extras
    name: str = ""

    def __call__(self, *args: Any) -> None:
        self.extras.fired.add((self.name, self.direction))
        try:
            self.probe.step(_default_value(self.direction, args), **self.extras.items)
        except Exception as err:
            named = _naming_the_module(err, self.name, self.direction)
            if named is err:
                raise
            raise named from err


def _naming_the_module(err: Exception, name: str, direction: HookDirection) -> Exception:
    """``err`` with the probed module named: a tdhook error's message gets it as a prefix (same
    class); any other exception (e.g. scikit-learn's ``ValueError`` on NaN) keeps its message and
    gets a note."""
    where = f"probe on module {name!r} ({direction.value})"
    if isinstance(err, TdhookError):
        try:
            return type(err)(f"{where}: {err}")
        except TypeError:  # an error class with another constructor: fall back to a note
            pass
    err.add_note(f"raised by the {where}")
    return err


class Probing(HookingContextFactory[HookingContext]):
    """Fit and evaluate probes on the activations of every module matching ``key_pattern``.

    For each matching module and direction, ``probe_factory(name, direction)`` creates a probe
    at enter; at every call its ``step(activation, **extras)`` receives the entries named by
    ``additional_keys`` (typically ``labels`` and ``step_type`` = ``"fit"``/``"predict"``).

    Args:
        key_pattern: Regular expression matched with ``re.match`` against module names. A
            pattern that matches nothing raises, listing real names.
        probe_factory: ``(name, direction) -> probe`` with a ``step(data, **kw)`` method, e.g.
            ``ProbeManager(...).probe_factory``.
        relative: Match names relative to the model (True) or absolute ``td_module.…`` names.
        directions: Hook points (default ``["fwd"]``); the probe sees the output (fwd), the input
            (fwd_pre) or the input gradient (bwd).
        additional_keys: TensorDict keys passed to ``step`` as keyword arguments. With them, a
            call with a plain tensor is refused (it has no labels to pass).
        classes_to_hook: Only modules of these classes are probed (default: all).
        classes_to_skip: Modules of these classes are skipped (default: containers, i.e.
            ``nn.ModuleList``, ``nn.Sequential`` and TensorDict modules).

    Probes that never fire during a context (a ``"bwd"`` probe without a ``.backward()`` in
    the ``with`` block, a module the forward pass skips) are reported at a normal exit with a
    :class:`ProbesNeverFiredWarning` naming them: their estimators saw no data (an exit by an
    exception does not warn). The entries of
    ``additional_keys`` of a call stay available until the next call, so backward probes get
    the labels of the forward they belong to.

    A probe factory whose owner has a ``check_probed(names)`` method (e.g.
    :meth:`BilinearProbeManager.check_probed`) is asked, at enter and before any probe is
    created, to check the probed module names; a pair naming a module that is not probed is
    refused there.

    Examples:
        >>> import torch
        >>> from sklearn.linear_model import LinearRegression
        >>> from sklearn.metrics import r2_score
        >>> from tensordict import TensorDict
        >>> from tdhook.latent.probing import ProbeManager, Probing
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> manager = ProbeManager(LinearRegression, {}, lambda p, y: {"r2": r2_score(y, p)})
        >>> probing = Probing(r"\\d$", manager.probe_factory, additional_keys=["labels", "step_type"])
        >>> x = torch.randn(32, 3)
        >>> with probing.prepare(model) as hooked:
        ...     _ = hooked(TensorDict(input=x, labels=x.sum(-1), step_type="fit", batch_size=[32]))
        >>> sorted(manager.fit_metrics)
        ['0_fwd', '1_fwd', '2_fwd']
    """

    default_classes_to_hook: tuple[type, ...] = (nn.Module,)
    default_classes_to_skip: tuple[type, ...] = (nn.ModuleList, nn.Sequential, TensorDictModuleBase)

    def __init__(
        self,
        key_pattern: str,
        probe_factory: Callable[[str, str], Any],
        relative: bool = True,
        directions: Sequence[str] | None = None,
        additional_keys: Sequence[Any] | None = None,
        classes_to_hook: Sequence[type] | None = None,
        classes_to_skip: Sequence[type] | None = None,
    ) -> None:
        if not callable(probe_factory):
            raise InvalidInputError(
                f"probe_factory must be callable as probe_factory(name, direction), got {type(probe_factory).__name__} "
                f"{probe_factory!r:.40}. "
                "Pass e.g. ProbeManager(...).probe_factory."
            )
        self.key_pattern = key_pattern
        self._probe_factory = probe_factory
        self._relative = relative
        self._directions = [HookDirection.parse(d) for d in (directions or ["fwd"])]
        self._additional_keys = list(additional_keys or [])
        # A tensor call carries no labels: the probes would get the previous call's.
        self._needs_tensordict = bool(self._additional_keys)
        self._classes_to_hook = tuple(classes_to_hook or self.default_classes_to_hook)
        self._classes_to_skip = tuple(classes_to_skip or self.default_classes_to_skip)
        self._extras = _Extras()
        self._planned: list[tuple[str, HookDirection]] = []

    @property
    def key_pattern(self) -> str:
        return self._key_pattern

    @key_pattern.setter
    def key_pattern(self, value: str) -> None:
        self._key_pattern = value

    @property
    def additional_keys(self) -> list[Any]:
        return list(self._additional_keys)

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        root = hooked.root if self._relative else hooked
        selected = select_modules(
            root,
            self._key_pattern,
            classes_to_hook=self._classes_to_hook,
            classes_to_skip=self._classes_to_skip,
        )
        names = [name for name, _ in selected]
        check = getattr(getattr(self._probe_factory, "__self__", None), "check_probed", None)
        if callable(check):  # e.g. BilinearProbeManager: every pair key must be probed
            check(names)
        self._planned = [(name, d) for d in self._directions for name in names]
        specs = []
        for direction in self._directions:
            for name, module in selected:
                probe = self._probe_factory(name, direction.value)
                specs.append(HookSpec(module, _ProbeHook(probe, direction, self._extras, name), direction))
        return specs

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        if self._additional_keys:
            check_keys(td, self._additional_keys, what="additional (probing)")
            self._extras.items = {
                (k if isinstance(k, str) else "_".join(k)): _plain(td.get(k)) for k in self._additional_keys
            }
        # The entries stay until the next call or the exit, so that backward hooks (a
        # ``.backward()`` after the call) see the labels of the forward they belong to.
        return call_next(td, **kwargs)

    def _enter(self, context: HookingContext) -> None:
        self._extras.items = {}
        self._extras.fired = set()
        self._planned = []

    def _exit(self, context: HookingContext) -> None:
        silent = [(n, d) for n, d in self._planned if (n, d) not in self._extras.fired]
        self._extras.items = {}
        self._extras.fired = set()
        self._planned = []
        if silent and sys.exc_info()[1] is None:  # an exit by an exception says enough
            backward = any(d in (HookDirection.BWD, HookDirection.BWD_PRE) for _, d in silent)
            listed = ", ".join(f"{n!r} ({d.value})" for n, d in silent[:5]) + (
                " ..." if len(silent) > 5 else ""
            )
            warnings.warn(
                f"Probing: {len(silent)} probe(s) never fired in this context: {listed}; their estimators "
                "saw no data and have no metrics. "
                + (
                    "Backward probes fire only when you call .backward() on an output inside the `with` block."
                    if backward
                    else "Those modules did not run: call the hooked module inside the `with` block."
                ),
                ProbesNeverFiredWarning,
                stacklevel=3,
            )

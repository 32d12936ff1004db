"""The values behind :class:`~tdhook.session.HookSession`: its results, its program and its hooks.

Every hook here is a small callable the core registers (:func:`tdhook._core.directions.register`).
A session's bookkeeping is one :class:`_Passes` on the model's root: each call of the model is a
*pass*, one forward of the core's :class:`~tdhook._core.forward_state.ForwardState` (the same
per-forward state ``run()`` uses), so call indices (``occurrences``) count from the start of
each forward, values kept without a copy are protected from in-place operations, and a routed
replacement can tell whether its source fired in this pass. Every hook acts only in the thread
that entered the session.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._core.boundary import compiled_reason
from ._core.directions import HookDirection
from ._core.forward_state import ForwardState
from ._core.paths import parse_path, resolve_path
from ._targets import Target, map_leaf
from .errors import CompiledModelError, ContextStateError, TargetError

__all__ = [
    "CapturedTarget",
    "EarlyStopResult",
    "HookProgram",
    "ProgramEntry",
    "SessionStop",
    "check_compiled",
]

_FWD = HookDirection.FWD


def check_compiled(model: nn.Module, path: str, module: nn.Module | None = None) -> None:
    """Refuse to hook ``path`` when it, or a module between it and ``model``, runs compiled code.

    Compiled code ignores hooks added after compilation, so a capture would stay empty and a
    replacement would do nothing (the core's rule, :func:`~tdhook._core.boundary.check_not_compiled`).
    Only the modules whose hooks the session relies on are checked (a few attribute reads per
    module), not the whole model, so the cost stays per operation. With ``module`` (the resolved
    path), ``model`` itself is taken as checked already (at the session's enter).

    Raises:
        CompiledModelError: Naming the compiled module and the fix.
    """
    if module is not None and "." not in path and "[" not in path and compiled_reason(module) is None:
        return  # a one-step path: the module itself is all there is to check (no parse, no walk)
    steps = parse_path(path)
    for i in range(1 if module is not None else 0, len(steps) + 1):
        part = module if i == len(steps) and module is not None else resolve_path(model, steps[:i])
        how = compiled_reason(part)
        if how is not None:
            name = "<root>" if not i else path if i == len(steps) else f"{path!r} up to step {i}"
            raise CompiledModelError(
                f"Module {name!r} {how}. Compiled code ignores hooks added after compilation, so a HookSession "
                "cannot hook it (captures would stay empty, replacements would do nothing). Open the session "
                "on the eager model, e.g. HookSession(compiled._orig_mod)."
            )


class SessionStop(BaseException):
    """The signal :meth:`HookSession.stop` raises to end a forward pass early.

    A ``BaseException`` (not an ``Exception``), so a model's own ``except Exception`` does not
    swallow it. The session that raised it suppresses it in :meth:`HookSession.run` and when it
    leaves its ``with`` block; another session's signal passes through.
    """

    def __init__(self, session_id: int, module_path: str) -> None:
        super().__init__(f"forward stopped after module {module_path!r} by a HookSession")
        self.session_id = session_id
        self.module_path = module_path


# ------------------------------------------------------------------------------------------------
# Results and the program
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True, init=False)
class CapturedTarget:
    """What :meth:`HookSession.capture` records: one entry per observation, in observation order.

    Attributes:
        target: The target captured.
        direction: The hook point (``None`` for a parameter snapshot).
        values: Every observation (the selected sub-tensor), in the order the hooks fired:
            forward order for activations, backward order for gradients (the last call of a
            module first). Detached clones unless the capture was made with ``detach=False``.
        calls: The call index (within its forward pass) of each value; ``None`` for parameters.
        passes: The pass of each value: the n-th call of the model (from 0) since the session installed
            its first hook.
    """

    target: Target
    direction: HookDirection | None
    detach: bool = True
    values: list[torch.Tensor] = field(default_factory=list)
    calls: list[int | None] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)

    def __init__(  # written out: a third of the generated one's cost (a session per call makes several)
        self,
        target: Target,
        direction: HookDirection | None,
        detach: bool = True,
        values: list[torch.Tensor] | None = None,
        calls: list[int | None] | None = None,
        passes: list[int] | None = None,
    ) -> None:
        self.target = target
        self.direction = direction
        self.detach = detach
        self.values = [] if values is None else values
        self.calls = [] if calls is None else calls
        self.passes = [] if passes is None else passes

    def _record(self, value: torch.Tensor, call: int | None, pass_id: int) -> None:
        if self.detach:
            if value.requires_grad:  # only a tensor that requires grad carries a graph (detach costs ~1 µs)
                value = value.detach()
            if self.target.indices is None:  # index_select already copied a sub-selection
                value = value.clone()
        self.values.append(value)
        self.calls.append(call)
        self.passes.append(pass_id)

    def take(self) -> list[torch.Tensor]:
        """Return the values recorded so far and forget them (with their ``calls`` and ``passes``).

        For a session kept open across many calls (a policy called once per environment step),
        so that the lists do not grow with every call.
        """
        values = self.values
        self.values, self.calls, self.passes = [], [], []
        return values

    def __repr__(self) -> str:
        return f"CapturedTarget({self.target}, direction={getattr(self.direction, 'value', None)!r}, {len(self.values)} values)"


@dataclass(eq=False)
class EarlyStopResult:
    """What :meth:`HookSession.stop` reports: whether the module was reached, and its output."""

    module_path: str
    reached: bool = False
    output: Any = None


@dataclass(frozen=True)
class ProgramEntry:
    """One thing a session installed: an operation on a module at a hook point.

    Attributes:
        operation: ``"capture"``, ``"replace"``, ``"stop"``, ``"parameter_capture"``,
            ``"parameter_replace"``, or the session's own hooks: ``"pass_start"`` (a pre-hook on
            the model's root), ``"pass_end"`` (its last forward hook, present while a target
            has ``occurrences`` or a capture keeps values without a copy) and
            ``"inplace_guard"`` (pre-hooks of in-place modules, for those captures).
        module_path: The module (``""`` for the root).
        direction: The hook point (``None`` for parameter operations, which install no hook).
        target: The target, for capture and replace.
        hooks: How many torch hooks the operation registered (0 for parameter operations).
    """

    operation: str
    module_path: str
    direction: str | None
    target: Target | None = None
    hooks: int = 1


@dataclass(frozen=True)
class HookProgram:
    """The inspectable list of what a session installed, in installation order."""

    entries: tuple[ProgramEntry, ...] = ()

    def __iter__(self) -> Iterator[ProgramEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def hook_count(self) -> int:
        """The number of torch hooks the session holds on the model."""
        return sum(e.hooks for e in self.entries)

    def to_list(self) -> list[dict[str, Any]]:
        """The entries as plain dicts (targets as :meth:`Target.to_dict`)."""
        return [
            {
                "operation": e.operation,
                "module_path": e.module_path,
                "direction": e.direction,
                "target": None if e.target is None else e.target.to_dict(),
                "hooks": e.hooks,
            }
            for e in self.entries
        ]


# ------------------------------------------------------------------------------------------------
# Hook values (small callables; the core registers them)
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True, init=False)
class _Passes:
    """The session's root hooks: every call of the model (in the entering thread) is one *pass*.

    A pass is one forward of the core's :class:`~tdhook._core.forward_state.ForwardState`, the
    per-forward bookkeeping ``run()`` uses too: it counts each hook's calls (``occurrences``) and
    protects values kept without a copy (``detach=False``) from later in-place operations. The
    end hook (``ends``) is installed only for those two; without it, a new call of the model
    ends the previous pass.
    """

    state: ForwardState
    thread: int
    session_id: int
    watched: list[_SiteHook]
    pass_id: int
    active: bool
    ends: bool

    def __init__(self, state: ForwardState, thread: int, session_id: int) -> None:
        self.state = state
        self.thread = thread
        self.session_id = session_id
        self.watched = []
        self.pass_id = -1
        self.active = True
        self.ends = False

    def begin(self, module: Any, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        state = self.state
        if state.depth and not self.ends:
            state.end(check=False)
        if not state.depth:
            self.pass_id += 1
        state.begin()

    def end(self, module: Any, args: Any, output: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        state = self.state
        try:
            if output is not None and state.depth == 1:
                for hook in self.watched:  # fail closed: every requested call index was reached
                    seen, wanted = state.counts.get(id(hook), 0), hook.target.occurrences
                    assert wanted is not None
                    if seen <= wanted[-1]:
                        raise TargetError(
                            f"{hook.target}: call(s) {[o for o in wanted if o >= seen]} of module "
                            f"{hook.target.module_path!r} were never reached; it ran {seen} time(s) in this "
                            "forward pass. Use call indices below that count, or occurrences=None for every call."
                        )
        finally:
            state.end(check=output is not None)

    def reset(self) -> None:
        """Close the current pass without checks (cut short by a stop, or before the end hook exists)."""
        while self.state.depth:
            self.state.end(check=False)


class _GradTap(torch.autograd.Function):
    """Identity in the forward; in the backward, hands the gradient to ``tap`` (which may replace it).

    The forward returns a copy, not a view, so the model may modify it in place afterwards
    (``nn.ReLU(inplace=True)``), which torch's own full backward hooks refuse.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, tap: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> torch.Tensor:
        ctx.tap = tap
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        new = ctx.tap(grad)
        return (grad if new is None else new), None


@dataclass(eq=False, slots=True)
class _Replacement:
    """Where a replacement value comes from: a fixed value, or a capture routed through a transform."""

    value: Any
    transform: Callable[[torch.Tensor], Any] | None
    passes: _Passes
    target: Target

    def resolve(self) -> Any:
        value = self.value
        if not isinstance(value, CapturedTarget):
            return value
        if not value.values or value.passes[-1] != self.passes.pass_id:
            raise ContextStateError(
                f"Routed replacement of {self.target} fired before its source {value.target} in this forward pass. "
                "Route a value from a module that runs earlier in the pass (or capture the source in an earlier call)."
            )
        routed = value.values[-1]
        return routed if self.transform is None else self.transform(routed)


@dataclass(eq=False, slots=True)
class _SiteHook:
    """What a capture or a replacement at one hook point holds; ``__call__`` is the subclass's."""

    target: Target
    direction: HookDirection
    passes: _Passes
    wanted: frozenset[int] | None
    captured: CapturedTarget | None = None
    replacement: _Replacement | None = None

    def _call_index(self) -> int | None:
        """The index of the call now firing, or None when the target skips it (or another thread runs)."""
        passes = self.passes
        if threading.get_ident() != passes.thread:
            return None
        index = passes.state.index(self)
        if self.wanted is not None and index not in self.wanted:
            return None
        return index

    def _apply(self, value: Any, index: int) -> Any:
        """Record the selection of ``value`` (a capture), or return ``value`` with it replaced."""
        captured = self.captured
        if captured is None:
            assert self.replacement is not None
            return self.target.replace_output(value, self.replacement.resolve())
        selected = self.target.select_output(value)
        captured._record(selected, index, self.passes.pass_id)
        if not captured.detach and not self.direction.is_backward:  # kept without a copy: protect it
            values = captured.values
            self.passes.state.hold(selected, values, len(values) - 1, str(self.target))
        return None


class _CaptureHook:
    """The common capture: a module's output at every call, copied (``capture("path")``).

    What :class:`_ActivationHook` does for it, in one call: this runs once per hooked module per
    call of the model, and a small policy's session captures a few modules per environment step.
    """

    __slots__ = ("captured", "passes")

    def __init__(self, captured: CapturedTarget, passes: _Passes) -> None:
        self.captured = captured
        self.passes = passes

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        passes = self.passes
        if threading.get_ident() != passes.thread:
            return
        captured = self.captured
        if type(output) is not torch.Tensor and not isinstance(output, torch.Tensor):
            output = captured.target.select_output(output)  # raises, naming what the module returned
        captured._record(output, passes.state.index(self), passes.pass_id)


@dataclass(eq=False, slots=True)
class _ActivationHook(_SiteHook):
    """Capture or replace a target's value at a forward hook point."""

    def __call__(self, *args: Any) -> Any:
        index = self._call_index()
        if index is None:
            return None
        direction = self.direction
        if direction is _FWD:
            return self._apply(args[2], index)
        if direction is HookDirection.FWD_PRE:
            return self._apply(args[1], index)
        return self._apply((args[1], args[2]), index)  # FWD_PRE_KWARGS: the value is (args, kwargs)


@dataclass(eq=False, slots=True)
class _GradientHook(_SiteHook):
    """At the forward, wrap the target's tensor in a :class:`_GradTap` for the selected calls.

    The tap sees exactly the gradient of that call's tensor, so ``occurrences`` index forward
    calls for gradients too. ``bwd_pre`` taps the module's output (its gradient is the
    ``grad_output`` of a full backward pre-hook), ``bwd`` taps its inputs (``grad_input``).
    """

    def __call__(self, *args: Any) -> Any:
        index = self._call_index()
        if index is None:
            return None
        value = args[2] if self.direction is HookDirection.BWD_PRE else args[1]
        if not self.target.leaf(value).requires_grad:
            return None
        tap = functools.partial(self._tap, index, self.passes.pass_id)
        return map_leaf(self.target, value, lambda x: _GradTap.apply(x, tap))

    def _tap(self, index: int, pass_id: int, grad: torch.Tensor) -> torch.Tensor | None:
        if not self.passes.active:  # the session has ended: the graph may outlive it
            return None
        if self.captured is not None:
            self.captured._record(self.target.select_output(grad), index, pass_id)
            return None
        return self._apply(grad, index)


@dataclass(eq=False, slots=True)
class _StopHook:
    result: EarlyStopResult
    passes: _Passes

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        if threading.get_ident() != self.passes.thread:
            return
        self.result.reached = True
        self.result.output = output
        self.passes.reset()  # a BaseException: the root's end hook will not run for this pass
        raise SessionStop(self.passes.session_id, self.result.module_path)

"""Interactive sessions: capture, replace and stop on a live model, with exact cleanup.

``with HookSession(model) as s:`` gives an eager, imperative counterpart of the methods: each
``s.capture(target)``, ``s.replace(target, value)`` or ``s.stop(path)`` registers hooks at once
through the hook core (:func:`tdhook._core.directions.register`, one :class:`HandleGroup`), every
call of the model inside the block fires them, and leaving the block removes every hook and
restores every edited parameter, also when the body raised. The session holds the model weakly.

Bookkeeping that spans hooks lives in one :class:`_PassState`: a pre-hook on the model's root
starts a new *pass* at every call of the model, so call indices (``occurrences``) count from the
start of each forward, and a routed replacement can tell whether its source fired in this pass.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase
from torch import nn

from ._core.claims import check_no_foreign_exclusive
from ._core.directions import HandleGroup, HookDirection, register
from ._core.forward_state import ForwardState
from ._core.paths import parse_path, resolve_path
from ._targets import Target, TargetKind, map_leaf
from .errors import (
    CompiledModelError,
    ConcurrencyError,
    ContextStateError,
    InvalidDirectionError,
    InvalidInputError,
    TargetError,
)

__all__ = ["CapturedTarget", "EarlyStopResult", "HookProgram", "HookSession", "ProgramEntry", "SessionStop"]

_FWD = HookDirection.FWD
_ACTIVATION_DIRECTIONS = (HookDirection.FWD, HookDirection.FWD_PRE, HookDirection.FWD_PRE_KWARGS)
_GRADIENT_DIRECTIONS = (HookDirection.BWD_PRE, HookDirection.BWD)


def compiled_reason(module: nn.Module) -> str | None:
    """Why ``module`` itself (not its children) runs compiled code that ignores new hooks, or None."""
    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return "is a torch.compile OptimizedModule; pass its `._orig_mod` (same parameters)"
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "was compiled with `module.compile()`; use an uncompiled copy of the model"
    for forward in (module.__dict__.get("forward"), getattr(type(module), "forward", None)):
        if forward is not None and hasattr(forward, "_torchdynamo_orig_callable"):
            return "has a torch.compile'd forward; keep an uncompiled forward for hooking"
    return None


def check_compiled(model: nn.Module, path: str) -> None:
    """Refuse to hook ``path`` when it or a module on the way to it from ``model`` is compiled.

    Compiled code ignores hooks added after compilation, so a capture would stay empty and a
    replacement would do nothing. Only the modules whose hooks the session relies on are
    checked (a few attribute reads), not the whole model.

    Raises:
        CompiledModelError: Naming the compiled module and the fix.
    """
    module: nn.Module = model
    steps = parse_path(path)
    for i in range(len(steps) + 1):
        if i:
            module = resolve_path(model, steps[:i])
        how = compiled_reason(module)
        if how is not None:
            name = "<root>" if not i else path if i == len(steps) else f"{path} (step {i} of the path)"
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


@dataclass(eq=False)
class CapturedTarget:
    """What :meth:`HookSession.capture` records: one entry per observation, in observation order.

    Attributes:
        target: The target captured.
        direction: The hook point (``None`` for a parameter snapshot).
        values: Every observation (the selected sub-tensor), in the order the hooks fired:
            forward order for activations, backward order for gradients (the last call of a
            module first). Detached clones unless the capture was made with ``detach=False``.
        calls: The call index (within its forward pass) of each value; ``None`` for parameters.
        passes: The pass (the n-th call of the model in the session, from 0) of each value.
    """

    target: Target
    direction: HookDirection | None
    detach: bool = True
    values: list[torch.Tensor] = field(default_factory=list)
    calls: list[int | None] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)

    def _record(self, value: torch.Tensor, call: int | None, pass_id: int) -> None:
        if self.detach:
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
            ``"parameter_replace"``, or the session's own ``"pass_counter"`` and
            ``"occurrence_check"`` hooks on the model's root.
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


@dataclass(eq=False, slots=True)
class _Passes:
    """The session's root hooks: every call of the model (in the entering thread) is one *pass*.

    A pass is one forward of the core's :class:`~tdhook._core.hooks.ForwardState`, the per-forward
    bookkeeping ``run()`` uses too: it counts each hook's calls (``occurrences``), and protects
    values kept without a copy (``detach=False``) from later in-place operations.
    """

    state: ForwardState
    thread: int
    session_id: int
    watched: list[_SiteHook] = field(default_factory=list)
    pass_id: int = -1
    active: bool = True

    def begin(self, module: Any, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        if not self.state.depth:
            self.pass_id += 1
        self.state.begin()

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
        """Close a pass that a :class:`SessionStop` (a ``BaseException``) cut short."""
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


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------


class HookSession:
    """Capture, replace and stop on a live model, then undo everything on exit.

    ``with HookSession(model) as s:`` opens the session. Inside, :meth:`capture`,
    :meth:`replace` and :meth:`stop` install hooks at once (through the hook core), and every call
    of the model in the block (``model(x)`` or :meth:`run`) fires them. Leaving the block, also on
    an exception, removes every hook and writes back every parameter a :meth:`replace` changed,
    bit for bit. :attr:`program` lists what is installed.

    Targets are :class:`~tdhook.targets.Target` values, or a module path (the module's whole
    activation). Directions: ``fwd`` (output, the default), ``fwd_pre`` (positional inputs; one
    input is unwrapped) and ``fwd_pre_kwargs`` (the value ``(args, kwargs)``) for activations;
    ``bwd_pre`` (gradient of the output, the default) and ``bwd`` (gradient of the inputs) for
    gradients. A parameter target is read (``capture``) or written (``replace``, in place under
    ``no_grad``) immediately.

    Call indices (``Target.occurrences``) count the calls of a module from the start of each call
    of ``model``; a requested index that a forward pass never reaches raises
    :class:`~tdhook.errors.TargetError` at the end of that pass (fail closed).

    Args:
        model: The model (held by a weak reference: the session never keeps it alive).

    Raises:
        InvalidInputError: If ``model`` is not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> from tdhook.targets import Target
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> with HookSession(model) as s:
        ...     hidden = s.capture(Target("1", indices=(0, 2)))
        ...     s.replace(Target("0", indices=(1,)), 0.0)
        ...     out = model(x)
        >>> hidden.values[0].shape
        torch.Size([5, 2])
        >>> len(model[0]._forward_hooks)
        0
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"HookSession expects an nn.Module, got {type(model).__name__}.")
        self._model_ref = weakref.ref(model)
        self._passes: _Passes | None = None
        self._handles = HandleGroup()
        self._entries: list[ProgramEntry] = []
        self._backups: list[tuple[weakref.ref[nn.Parameter], torch.Tensor]] = []
        self._captures: list[CapturedTarget] = []
        self._end_handle: Any = None
        self._inplace_hooked = False
        self._has_gradient = self._has_stop = False

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model (raises if it was garbage-collected)."""
        model = self._model_ref()
        if model is None:
            raise ContextStateError("The session's model was garbage-collected; keep a reference to it.")
        return model

    @property
    def is_active(self) -> bool:
        return self._passes is not None

    @property
    def program(self) -> HookProgram:
        """What the session installed so far (empty outside the ``with`` block)."""
        end = () if self._end_handle is None else (ProgramEntry("pass_end", "", _FWD.value),)
        return HookProgram((*self._entries, *end))

    def __enter__(self) -> HookSession:
        if self._passes is not None:
            raise ContextStateError("Cannot enter a HookSession twice; leave the `with` block first.")
        model = self.model
        check_compiled(model, "")
        check_no_foreign_exclusive(model)
        passes = _Passes(ForwardState(), threading.get_ident(), id(self))
        self._handles.append(register(model, passes.begin, HookDirection.FWD_PRE, prepend=True))
        self._entries.append(ProgramEntry("pass_start", "", HookDirection.FWD_PRE.value))
        self._passes = passes
        self._keep_end_last()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        passes = self._passes
        if passes is not None:
            self._check_thread(passes, "leave")
        try:
            self._handles.remove()
            if self._end_handle is not None:
                self._end_handle.remove()
        finally:
            try:
                self._restore_parameters()
            finally:
                if passes is not None:
                    passes.active = False
                self._passes = self._end_handle = None
                self._entries, self._captures = [], []
                self._inplace_hooked = self._has_gradient = self._has_stop = False
        return isinstance(exc, SessionStop) and passes is not None and exc.session_id == passes.session_id

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model; return its output, or ``None`` when this session's :meth:`stop` ended it."""
        passes = self._require_active("run")
        try:
            return self.model(*args, **kwargs)
        except SessionStop as stop:
            if stop.session_id != passes.session_id:
                raise
            return None

    # -- operations -------------------------------------------------------------------------------
    def capture(
        self, target: Target | str, *, direction: str | HookDirection | None = None, detach: bool = True
    ) -> CapturedTarget:
        """Record the target's value at every (selected) call; a parameter is snapshotted now.

        Args:
            target: A :class:`~tdhook.targets.Target` or a module path (its whole activation).
            direction: The hook point (see the class docstring); defaults to ``fwd`` for
                activations and ``bwd_pre`` for gradients. Not allowed for parameters.
            detach: Store detached clones (True) or the values themselves, graph included.

        Returns:
            A :class:`CapturedTarget` whose ``values`` fill as the model runs.

        Raises:
            ModulePathError: If the module does not exist (the nearest names are listed).
            InvalidDirectionError: If the direction does not fit the target's kind.
            ContextStateError: Outside the ``with`` block, or for a gradient target in a session
                that has a :meth:`stop`.
        """
        passes = self._require_active("capture")
        target, direction, module = self._prepare(target, direction)
        captured = CapturedTarget(target, direction, detach)
        if target.kind is TargetKind.PARAMETER:
            captured._record(target.select_output(target.parameter_tensor(module)), None, passes.pass_id)
            self._entries.append(ProgramEntry("parameter_capture", target.module_path, None, target, hooks=0))
            return captured
        self._install(module, target, direction, "capture", captured=captured)
        self._captures.append(captured)
        return captured

    def replace(
        self,
        target: Target | str,
        value: torch.Tensor | float | CapturedTarget,
        *,
        direction: str | HookDirection | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        """Replace the target's selected entries at every (selected) call; a parameter is written now.

        Args:
            target: A :class:`~tdhook.targets.Target` or a module path (its whole activation).
            value: A tensor broadcasting to the selected shape, a number, or a
                :class:`CapturedTarget` of this session whose latest value *in the same forward
                pass* is routed here (through ``transform`` if given).
            direction: As for :meth:`capture`.
            transform: ``fn(captured_value) -> tensor``, only with a routed capture.

        Raises:
            ModulePathError: If the module does not exist.
            InvalidInputError: If ``value`` has an unsupported type, or ``transform`` is given
                without a routed capture.
            TargetError: For a parameter replacement of the wrong shape.
            ContextStateError: Outside the ``with`` block, or when a routed replacement fires
                before its source in a pass.
        """
        passes = self._require_active("replace")
        if isinstance(value, CapturedTarget):
            if transform is not None and not callable(transform):
                raise InvalidInputError(f"transform must be callable, got {type(transform).__name__}.")
        else:
            if transform is not None:
                raise InvalidInputError(
                    "transform= applies to a routed capture only (replace(target, s.capture(...), transform=fn)); "
                    "apply it to a fixed value yourself."
                )
            if not isinstance(value, torch.Tensor) and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            ):
                raise InvalidInputError(
                    f"replace() takes a tensor, a number or a CapturedTarget, got {type(value).__name__}."
                )
        target, direction, module = self._prepare(target, direction)
        if target.kind is TargetKind.PARAMETER:
            if isinstance(value, CapturedTarget):
                raise InvalidInputError(
                    "A parameter is replaced at once, so it cannot route a capture; pass captured.values[-1] instead."
                )
            self._replace_parameter(target, module, value)
            return
        if isinstance(value, CapturedTarget) and not any(c is value for c in self._captures):
            raise InvalidInputError(
                f"The routed capture of {value.target} is not one of this session's captures; capture it with this "
                "session first."
            )
        replacement = _Replacement(value, transform, passes, target)
        self._install(module, target, direction, "replace", replacement=replacement)

    def stop(self, module_path: str) -> EarlyStopResult:
        """End every forward pass after ``module_path`` ran (the rest of the model is skipped).

        :meth:`run` then returns ``None``; a direct ``model(x)`` call raises :class:`SessionStop`,
        which the session suppresses when it reaches the end of the ``with`` block (skipping the
        rest of the block). Cannot be combined with gradient targets.

        Returns:
            An :class:`EarlyStopResult` whose ``reached`` and ``output`` are set when the module runs.
        """
        passes = self._require_active("stop")
        if self._has_gradient:
            raise ContextStateError(
                "stop() cannot be combined with gradient targets in one session: the forward pass it cuts has no "
                "backward. Use a separate session."
            )
        module = Target(module_path).validate(self.model)
        check_compiled(self.model, module_path)
        result = EarlyStopResult(module_path)
        self._handles.append(register(module, _StopHook(result, passes), HookDirection.FWD))
        self._entries.append(ProgramEntry("stop", module_path, HookDirection.FWD.value))
        self._has_stop = True
        self._keep_end_last(module)
        return result

    # -- internals --------------------------------------------------------------------------------
    def _require_active(self, name: str) -> _Passes:
        passes = self._passes
        if passes is None:
            raise ContextStateError(
                f"HookSession.{name}() must be called inside `with HookSession(model) as s:` (the session is not active)."
            )
        self._check_thread(passes, name)
        return passes

    @staticmethod
    def _check_thread(passes: _Passes, name: str) -> None:
        if threading.get_ident() != passes.thread:
            raise ConcurrencyError(
                f"HookSession.{name}() called from thread {threading.get_ident()}, but the session was entered in "
                f"thread {passes.thread}; its hooks act only in that thread. Open a session in each thread "
                "(on its own model copy if they use gradients: copy.deepcopy(model))."
            )

    def _prepare(
        self, target: Target | str, direction: str | HookDirection | None
    ) -> tuple[Target, HookDirection, nn.Module]:
        """Normalise and check a target and its direction, and resolve its module (nothing installed)."""
        if isinstance(target, str):
            target = Target(target)
        if not isinstance(target, Target):
            raise InvalidInputError(f"Expected a Target or a module path, got {type(target).__name__}.")
        kind = target.kind
        if kind is TargetKind.PARAMETER:
            if direction is not None:
                raise InvalidDirectionError(
                    f"{target}: parameters are read and written directly, without a hook; drop direction={direction!r}."
                )
            return target, _FWD, target.validate(self.model)
        allowed = _ACTIVATION_DIRECTIONS if kind is TargetKind.ACTIVATION else _GRADIENT_DIRECTIONS
        parsed = allowed[0] if direction is None else HookDirection.parse(direction)
        if parsed not in allowed:
            raise InvalidDirectionError(
                f"{target}: direction {parsed.value!r} does not apply to a {target.kind_value} target; "
                f"use one of {[d.value for d in allowed]}."
            )
        if kind is TargetKind.GRADIENT and self._has_stop:
            raise ContextStateError(
                f"{target}: gradient targets cannot be combined with stop() in one session. Use a separate session."
            )
        module = target.validate(self.model)
        check_compiled(self.model, target.module_path)
        return target, parsed, module

    def _install(
        self,
        module: nn.Module,
        target: Target,
        direction: HookDirection,
        operation: str,
        *,
        captured: CapturedTarget | None = None,
        replacement: _Replacement | None = None,
    ) -> None:
        passes = self._passes
        assert passes is not None
        wanted = None if target.occurrences is None else frozenset(target.occurrences)
        hook: _SiteHook
        if target.kind is TargetKind.GRADIENT:
            hook = _GradientHook(target, direction, passes, wanted, captured, replacement)
            point = _FWD if direction is HookDirection.BWD_PRE else HookDirection.FWD_PRE
            self._has_gradient = True
        else:
            hook = _ActivationHook(target, direction, passes, wanted, captured, replacement)
            point = direction
            if captured is not None and not captured.detach:
                self._protect_inplace(passes)
        self._handles.append(register(module, hook, point))
        self._entries.append(ProgramEntry(operation, target.module_path, direction.value, target))
        if target.occurrences is not None:
            passes.watched.append(hook)
        self._keep_end_last(module)

    def _keep_end_last(self, module: nn.Module | None = None) -> None:
        """(Re)register the pass-end hook so it stays the model's last forward hook (after ``module``'s)."""
        model = self.model
        if self._end_handle is not None and module is not model:
            return
        passes = self._passes
        assert passes is not None
        if self._end_handle is not None:
            self._end_handle.remove()
        self._end_handle = model.register_forward_hook(passes.end, always_call=True)

    def _protect_inplace(self, passes: _Passes) -> None:
        """For values kept without a copy: copy them just before an in-place module modifies them."""
        if self._inplace_hooked:
            return
        self._inplace_hooked = passes.state.track_storage = True
        for module in self.model.modules():
            if getattr(module, "inplace", False) is True and not isinstance(module, TensorDictModuleBase):
                self._handles.append(register(module, passes.state.before_inplace, HookDirection.FWD_PRE))
                self._entries.append(ProgramEntry("inplace_guard", "", HookDirection.FWD_PRE.value))

    def _replace_parameter(self, target: Target, module: nn.Module, value: Any) -> None:
        param = target.parameter_tensor(module)
        new = target.replace_output(param.detach(), value)  # checks the shape before any write
        if not any(ref() is param for ref, _ in self._backups):
            self._backups.append((weakref.ref(param), param.detach().clone()))
        with torch.no_grad():
            param.copy_(new)
        self._entries.append(ProgramEntry("parameter_replace", target.module_path, None, target, hooks=0))

    def _restore_parameters(self) -> None:
        backups, self._backups = self._backups, []
        with torch.no_grad():
            for ref, saved in reversed(backups):
                param = ref()
                if param is not None:
                    param.copy_(saved)

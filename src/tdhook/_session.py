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

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._core.directions import HandleGroup, HookDirection, register
from ._targets import Target, TargetKind, map_leaf
from .errors import ContextStateError, InvalidDirectionError, InvalidInputError, TargetError

__all__ = ["CapturedTarget", "EarlyStopResult", "HookProgram", "HookSession", "ProgramEntry", "SessionStop"]

_ACTIVATION_DIRECTIONS = (HookDirection.FWD, HookDirection.FWD_PRE, HookDirection.FWD_PRE_KWARGS)
_GRADIENT_DIRECTIONS = (HookDirection.BWD_PRE, HookDirection.BWD)


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


@dataclass(eq=False)
class _PassState:
    """The session's pass counter, shared by its hooks (they never reference the session)."""

    session_id: int
    pass_id: int = -1
    active: bool = True


@dataclass(eq=False)
class _PassCounter:
    """Pre-hook on the model's root: every call of the model starts a new pass."""

    state: _PassState

    def __call__(self, *args: Any) -> None:
        self.state.pass_id += 1


@dataclass(eq=False)
class _Occurrences:
    """Counts one hook's calls within the current pass and says which calls to act on."""

    state: _PassState
    wanted: frozenset[int] | None
    last_pass: int = -2
    count: int = 0

    def next_call(self) -> tuple[int, bool]:
        """The index of the call now firing, and whether the target acts on it."""
        if self.last_pass != self.state.pass_id:
            self.last_pass = self.state.pass_id
            self.count = 0
        index = self.count
        self.count += 1
        return index, self.wanted is None or index in self.wanted

    def calls_in(self, pass_id: int) -> int:
        return self.count if self.last_pass == pass_id else 0


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


@dataclass(eq=False)
class _Replacement:
    """Where a replacement value comes from: a fixed value, or a capture routed through a transform."""

    value: Any
    transform: Callable[[torch.Tensor], Any] | None
    state: _PassState
    target: Target

    def resolve(self) -> Any:
        value = self.value
        if not isinstance(value, CapturedTarget):
            return value
        if not value.values or value.passes[-1] != self.state.pass_id:
            raise ContextStateError(
                f"Routed replacement of {self.target} fired before its source {value.target} in this forward pass. "
                "Route a value from a module that runs earlier in the pass (or capture the source in an earlier call)."
            )
        routed = value.values[-1]
        return routed if self.transform is None else self.transform(routed)


@dataclass(eq=False)
class _ActivationHook:
    """Capture (``captured``) or replace (``replacement``) a target's value at a forward hook point."""

    target: Target
    direction: HookDirection
    calls: _Occurrences
    captured: CapturedTarget | None = None
    replacement: _Replacement | None = None

    def __call__(self, *args: Any) -> Any:
        index, selected = self.calls.next_call()
        if not selected:
            return None
        direction = self.direction
        if direction is HookDirection.FWD:
            value = args[2]
        elif direction is HookDirection.FWD_PRE:
            value = args[1]
        else:  # FWD_PRE_KWARGS: the value is (args, kwargs)
            value = (args[1], args[2])
        if self.captured is not None:
            self.captured._record(self.target.select_output(value), index, self.calls.state.pass_id)
            return None
        assert self.replacement is not None
        return self.target.replace_output(value, self.replacement.resolve())


@dataclass(eq=False)
class _GradientHook:
    """At the forward, wrap the target's tensor in a :class:`_GradTap` for the selected calls.

    The tap sees exactly the gradient of that call's tensor, so ``occurrences`` index forward
    calls for gradients too. ``bwd_pre`` taps the module's output (its gradient is the
    ``grad_output`` of a full backward pre-hook), ``bwd`` taps its inputs (``grad_input``).
    """

    target: Target
    direction: HookDirection
    calls: _Occurrences
    captured: CapturedTarget | None = None
    replacement: _Replacement | None = None

    def __call__(self, *args: Any) -> Any:
        index, selected = self.calls.next_call()
        if not selected:
            return None
        value = args[2] if self.direction is HookDirection.BWD_PRE else args[1]
        leaf = self.target.leaf(value)
        if not leaf.requires_grad:
            return None
        tap = _Tap(self, index, self.calls.state.pass_id)
        return map_leaf(self.target, value, lambda x: _GradTap.apply(x, tap))


@dataclass(eq=False)
class _Tap:
    hook: _GradientHook
    call: int
    pass_id: int

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        hook = self.hook
        if not hook.calls.state.active:  # the session has ended: the graph may outlive it
            return None
        if hook.captured is not None:
            hook.captured._record(hook.target.select_output(grad), self.call, self.pass_id)
            return None
        assert hook.replacement is not None
        return hook.target.replace_output(grad, hook.replacement.resolve())


@dataclass(eq=False)
class _StopHook:
    result: EarlyStopResult
    state: _PassState

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        self.result.reached = True
        self.result.output = output
        raise SessionStop(self.state.session_id, self.result.module_path)


@dataclass(eq=False)
class _OccurrenceCheck:
    """Post-hook on the model's root: every requested call index must have been reached."""

    state: _PassState
    watched: list[tuple[Target, _Occurrences]]

    def __call__(self, *args: Any) -> None:
        pass_id = self.state.pass_id
        for target, calls in self.watched:
            assert target.occurrences is not None
            seen = calls.calls_in(pass_id)
            if seen <= target.occurrences[-1]:
                raise TargetError(
                    f"{target}: call(s) {[o for o in target.occurrences if o >= seen]} of module "
                    f"{target.module_path!r} were never reached; it ran {seen} time(s) in this forward pass. "
                    "Use call indices below that count, or occurrences=None for every call."
                )


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
        self._state: _PassState | None = None
        self._handles = HandleGroup()
        self._entries: list[ProgramEntry] = []
        self._backups: list[tuple[weakref.ref[nn.Parameter], torch.Tensor]] = []
        self._watched: list[tuple[Target, _Occurrences]] = []
        self._captures: list[CapturedTarget] = []
        self._check_handle: Any = None
        self._has_gradient = False
        self._has_stop = False

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
        return self._state is not None

    @property
    def program(self) -> HookProgram:
        """What the session installed so far (empty outside the ``with`` block)."""
        return HookProgram(tuple(self._entries))

    def __enter__(self) -> HookSession:
        if self._state is not None:
            raise ContextStateError("Cannot enter a HookSession twice; leave the `with` block first.")
        model = self.model
        state = _PassState(id(self))
        self._handles.append(register(model, _PassCounter(state), HookDirection.FWD_PRE, prepend=True))
        self._entries.append(ProgramEntry("pass_counter", "", HookDirection.FWD_PRE.value))
        self._state = state
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        state = self._state
        try:
            self._remove_check()
            self._handles.remove()
        finally:
            try:
                self._restore_parameters()
            finally:
                if state is not None:
                    state.active = False
                self._state = None
                self._entries = []
                self._watched = []
                self._captures = []
                self._has_gradient = self._has_stop = False
        return isinstance(exc, SessionStop) and state is not None and exc.session_id == state.session_id

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model; return its output, or ``None`` when this session's :meth:`stop` ended it."""
        state = self._require_active("run")
        try:
            return self.model(*args, **kwargs)
        except SessionStop as stop:
            if stop.session_id != state.session_id:
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
        state = self._require_active("capture")
        target, direction, module = self._prepare(target, direction)
        captured = CapturedTarget(target, direction, detach)
        if target.kind is TargetKind.PARAMETER:
            captured._record(target.select_output(target.parameter_tensor(module)), None, state.pass_id)
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
        state = self._require_active("replace")
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
        replacement = _Replacement(value, transform, state, target)
        self._install(module, target, direction, "replace", replacement=replacement)

    def stop(self, module_path: str) -> EarlyStopResult:
        """End every forward pass after ``module_path`` ran (the rest of the model is skipped).

        :meth:`run` then returns ``None``; a direct ``model(x)`` call raises :class:`SessionStop`,
        which the session suppresses when it reaches the end of the ``with`` block (skipping the
        rest of the block). Cannot be combined with gradient targets.

        Returns:
            An :class:`EarlyStopResult` whose ``reached`` and ``output`` are set when the module runs.
        """
        state = self._require_active("stop")
        if self._has_gradient:
            raise ContextStateError(
                "stop() cannot be combined with gradient targets in one session: the forward pass it cuts has no "
                "backward. Use a separate session."
            )
        module = Target(module_path).validate(self.model)
        result = EarlyStopResult(module_path)
        self._handles.append(register(module, _StopHook(result, state), HookDirection.FWD))
        self._entries.append(ProgramEntry("stop", module_path, HookDirection.FWD.value))
        self._has_stop = True
        return result

    # -- internals --------------------------------------------------------------------------------
    def _require_active(self, name: str) -> _PassState:
        if self._state is None:
            raise ContextStateError(
                f"HookSession.{name}() must be called inside `with HookSession(model) as s:` (the session is not active)."
            )
        return self._state

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
            return target, HookDirection.FWD, target.validate(self.model)
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
        return target, parsed, target.validate(self.model)

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
        state = self._state
        assert state is not None
        wanted = None if target.occurrences is None else frozenset(target.occurrences)
        calls = _Occurrences(state, wanted)
        hook: Any
        if target.kind is TargetKind.GRADIENT:
            hook = _GradientHook(target, direction, calls, captured, replacement)
            point = HookDirection.FWD if direction is HookDirection.BWD_PRE else HookDirection.FWD_PRE
            self._has_gradient = True
        else:
            hook = _ActivationHook(target, direction, calls, captured, replacement)
            point = direction
        self._handles.append(register(module, hook, point))
        self._entries.append(ProgramEntry(operation, target.module_path, direction.value, target))
        if target.occurrences is not None:
            self._watched.append((target, calls))
            self._reinstall_check()

    def _reinstall_check(self) -> None:
        """Keep the occurrence check the last forward hook of the root, after any entry on the root."""
        state = self._state
        assert state is not None
        self._remove_check()
        self._check_handle = register(self.model, _OccurrenceCheck(state, self._watched), HookDirection.FWD)
        self._entries = [e for e in self._entries if e.operation != "occurrence_check"]
        self._entries.append(ProgramEntry("occurrence_check", "", HookDirection.FWD.value))

    def _remove_check(self) -> None:
        handle, self._check_handle = self._check_handle, None
        if handle is not None:
            handle.remove()

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

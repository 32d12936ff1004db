"""Interactive sessions: capture, replace and stop on a live model, with exact cleanup.

``with HookSession(model) as s:`` gives an eager, imperative counterpart of the methods: each
``s.capture(target)``, ``s.replace(target, value)`` or ``s.stop(path)`` registers hooks at once
through the hook core (:func:`tdhook._core.directions.register`, one :class:`HandleGroup`), every
call of the model inside the block fires them, and leaving the block removes every hook and
restores every edited parameter, also when the body raised. The session holds the model weakly.
Its hooks and results live in :mod:`tdhook._session_hooks`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._core.boundary import compiled_reason
from ._core.claims import _ACTIVE, _check_claimable, _claim_model, _release_claim
from ._core.directions import HandleGroup, HookDirection, register
from ._core.forward_state import ForwardState, inplace_modules
from ._core.paths import resolution_chain
from ._session_hooks import (
    CapturedTarget,
    EarlyStopResult,
    HookProgram,
    ProgramEntry,
    SessionStop,
    _ActivationHook,
    _CaptureHook,
    _GradientHook,
    _Passes,
    _Replacement,
    _SiteHook,
    _StopHook,
    check_compiled,
)
from ._targets import Target, TargetKind
from .errors import ConcurrencyError, ContextStateError, InvalidDirectionError, InvalidInputError

__all__ = ["CapturedTarget", "EarlyStopResult", "HookProgram", "HookSession", "ProgramEntry", "SessionStop"]

_FWD = HookDirection.FWD
_ACTIVATION_DIRECTIONS = (_FWD, HookDirection.FWD_PRE, HookDirection.FWD_PRE_KWARGS)
_GRADIENT_DIRECTIONS = (HookDirection.BWD_PRE, HookDirection.BWD)
#: ``Target(path)`` for plain module paths (a target is a frozen value; building one costs ~5 µs).
_PATH_TARGETS: dict[str, Target] = {}


def _path_target(path: str) -> Target:
    target = _PATH_TARGETS.get(path)
    if target is None:
        target = Target(path)
        if len(_PATH_TARGETS) < 4096:
            _PATH_TARGETS[path] = target
    return target


#: A resolved module path, held weakly: ``(parent, child name, child)`` per step (``child`` None for a
#: name a ``TensorDictModule`` forwards to its wrapped ``module``); the last step's child is the module.
_WeakChain = tuple[tuple["weakref.ref[nn.Module]", str, "weakref.ref[nn.Module] | None"], ...]

#: id(model) -> (weak reference to it, {module path: weak chain}). A session opened per call (a
#: policy hooked once per environment step) walks each path once; every later use re-checks each
#: step (a dict look-up) and whether its modules run compiled code, so a swapped or newly compiled
#: submodule is always seen. Everything is held weakly: sessions never keep a model alive.
_CHAINS: dict[int, tuple[weakref.ref[nn.Module], dict[str, _WeakChain]]] = {}


def _weak_chain(model: nn.Module, path: str) -> _WeakChain | None:
    """:func:`~tdhook._core.paths.resolution_chain` with parents and children held weakly."""
    chain = resolution_chain(model, path)
    if chain is None:
        return None
    steps = []
    parent = model
    for _, name, child in chain:
        steps.append((weakref.ref(parent), name, None if child is None else weakref.ref(child)))
        if child is not None:
            parent = child
    return tuple(steps)


def _cached_module(chain: _WeakChain) -> nn.Module | None:
    """The module ``chain`` resolved to, if every step still holds it and none is compiled; else None."""
    child = None
    for parent_ref, name, child_ref in chain:
        parent = parent_ref()
        if parent is None:
            return None
        child = parent._modules.get(name)
        if child is not (None if child_ref is None else child_ref()):
            return None
        if child is not None and compiled_reason(child) is not None:
            return None  # compiled since: the full check names it
    return child  # the last step always names a module


def _module_at(model: nn.Module, target: Target) -> nn.Module:
    """The module a (non-parameter) target names in ``model``, checked not to run compiled code."""
    path = target.module_path
    key = id(model)
    entry = _CHAINS.get(key)
    if entry is not None and entry[0]() is model:
        chain = entry[1].get(path)
        if chain is not None:
            module = _cached_module(chain)
            if module is not None:
                return module
    module = target.validate(model)
    check_compiled(model, path, module)
    weak = _weak_chain(model, path)
    if weak is not None:
        if entry is None or entry[0]() is not model:
            entry = (weakref.ref(model, lambda _, key=key: _CHAINS.pop(key, None)), {})  # type: ignore[misc]
            _CHAINS[key] = entry
        if len(entry[1]) < 4096:
            entry[1][path] = weak
    return module


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

    Threads and compilation follow the core's rules (:doc:`guarantees`): the hooks act only in
    the thread that entered the session (other threads' calls of the model are not seen), the
    session's methods refuse other threads, a session cannot open while another thread holds
    backward hooks on the model, from its first hook or parameter edit to its end no context with
    backward hooks can start on the model in another thread (a session that installed nothing holds
    nothing), and a ``torch.compile``d model or hooked module is refused.

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
        # every attribute is set here, in one order (CPython's fast attribute access relies on it)
        self._model_ref = weakref.ref(model)
        self._thread: int | None = None  # the entering thread, while the session is active
        #: the per-pass bookkeeping and the claim on the model (its key), both made with the first
        #: hook or parameter edit: a session that installed nothing holds nothing
        self._passes: _Passes | None = None
        self._claim_key = 0
        self._start_handle: Any = None  # the root hooks that delimit passes, installed when first needed
        self._end_handle: Any = None
        self._inplace_guarded = self._has_gradient = self._has_stop = False
        self._handles = HandleGroup()
        #: (operation, module_path, direction, target, hooks) of each ProgramEntry, built on demand
        self._entries: list[tuple[str, str, HookDirection | None, Target | None, int]] = []
        self._backups: list[tuple[weakref.ref[nn.Parameter], torch.Tensor]] = []
        self._captures: list[CapturedTarget] = []

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
        return self._thread is not None

    @property
    def program(self) -> HookProgram:
        """What the session installed so far (empty outside the ``with`` block)."""
        entries = [
            ProgramEntry(op, path, None if d is None else d.value, t, n)
            for op, path, d, t, n in self._entries
        ]
        if self._start_handle is not None:
            entries.insert(0, ProgramEntry("pass_start", "", HookDirection.FWD_PRE.value))
        if self._end_handle is not None:
            entries.append(ProgramEntry("pass_end", "", _FWD.value))
        return HookProgram(tuple(entries))

    def __enter__(self) -> HookSession:
        if self._thread is not None:
            raise ContextStateError("Cannot enter a HookSession twice; leave the `with` block first.")
        model = self.model
        if compiled_reason(model) is not None:
            check_compiled(model, "")  # raises, naming the fix
        thread = threading.get_ident()
        # refused while another thread holds backward hooks on the model; the claim itself (which
        # keeps such a context from starting in another thread) comes with the first hook or edit
        if _ACTIVE:  # else: nothing is claimed anywhere
            _check_claimable(self, model, thread, exclusive=False)
        self._thread = thread
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        thread = self._thread
        if thread is not None and threading.get_ident() != thread:
            self._check_thread(thread, "__exit__")  # raises
        passes = self._passes
        if passes is None:  # nothing installed, claimed or edited (parameter edits make the passes)
            self._thread = None
            if self._entries:
                self._entries = []  # parameter captures
            return False
        try:
            self._handles.remove()
            for handle in (self._end_handle, self._start_handle):
                if handle is not None:
                    handle.remove()
        finally:
            try:
                if self._backups:
                    self._restore_parameters()
            finally:
                passes.active = False
                _release_claim(self, self._claim_key)
                self._thread = self._passes = self._start_handle = self._end_handle = None
                self._entries, self._captures = [], []
                self._inplace_guarded = self._has_gradient = self._has_stop = False
        return isinstance(exc, SessionStop) and exc.session_id == passes.session_id

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model; return its output, or ``None`` when this session's :meth:`stop` ended it."""
        self._require_active("run")
        try:
            return self.model(*args, **kwargs)
        except SessionStop as stop:
            if stop.session_id != id(self):
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
        thread = self._thread
        if thread is None or threading.get_ident() != thread:
            self._require_active("capture")  # raises
        if type(target) is str and direction is None and detach is True:
            # the common capture (a module's whole output, copied) without _prepare's checks: a
            # session opened per call (a policy per environment step) runs this per path per call
            target = _PATH_TARGETS.get(target) or _path_target(target)
            model = self.model
            module = _module_at(model, target)
            captured = CapturedTarget(target, _FWD, True)
            passes = self._passes or self._hold(model)
            self._attach(
                passes,
                module,
                _CaptureHook(captured, passes),
                _FWD,
                ("capture", target.module_path, _FWD, target, 1),
            )
            self._captures.append(captured)
            return captured
        target, direction, module = self._prepare(target, direction)
        captured = CapturedTarget(target, direction, detach)
        if target.kind is TargetKind.PARAMETER:
            pass_id = -1 if self._passes is None else self._passes.pass_id
            captured._record(target.select_output(target.parameter_tensor(module)), None, pass_id)
            self._entries.append(("parameter_capture", target.module_path, None, target, 0))
            return captured
        self._install(self._passes or self._hold(), module, target, direction, "capture", captured, None)
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
        self._require_active("replace")
        if isinstance(value, CapturedTarget):
            if transform is not None and not callable(transform):
                raise InvalidInputError(f"transform must be callable, got {type(transform).__name__}.")
        elif transform is not None:
            raise InvalidInputError(
                "transform= applies to a routed capture only (replace(target, s.capture(...), transform=fn)); "
                "apply it to a fixed value yourself."
            )
        elif not isinstance(value, torch.Tensor) and not (
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
            if self._passes is None:
                self._hold()  # an edit of the model: claimed like a hook
            self._replace_parameter(target, module, value)
            return
        if isinstance(value, CapturedTarget) and not any(c is value for c in self._captures):
            raise InvalidInputError(
                f"The routed capture of {value.target} is not one of this session's captures; capture it with this "
                "session first."
            )
        passes = self._passes or self._hold()
        replacement = _Replacement(value, transform, passes, target)
        self._install(passes, module, target, direction, "replace", None, replacement)

    def stop(self, module_path: str) -> EarlyStopResult:
        """End every forward pass after ``module_path`` ran (the rest of the model is skipped).

        :meth:`run` then returns ``None``; a direct ``model(x)`` call raises :class:`SessionStop`,
        which the session suppresses when it reaches the end of the ``with`` block (skipping the
        rest of the block). Cannot be combined with gradient targets.

        Returns:
            An :class:`EarlyStopResult` whose ``reached`` and ``output`` are set when the module runs.
        """
        self._require_active("stop")
        if self._has_gradient:
            raise ContextStateError(
                "stop() cannot be combined with gradient targets in one session: the forward pass it cuts has no "
                "backward. Use a separate session."
            )
        module = _module_at(self.model, _path_target(module_path))
        passes = self._passes or self._hold()
        result = EarlyStopResult(module_path)
        self._handles.append(register(module, _StopHook(result, passes), _FWD))
        self._entries.append(("stop", module_path, _FWD, None, 1))
        self._has_stop = True
        return result

    # -- internals --------------------------------------------------------------------------------
    def _require_active(self, name: str) -> None:
        thread = self._thread
        if thread is None:
            raise ContextStateError(
                f"HookSession.{name}() must be called inside `with HookSession(model) as s:` (the session is not active)."
            )
        self._check_thread(thread, name)

    @staticmethod
    def _check_thread(thread: int, name: str) -> None:
        if threading.get_ident() != thread:
            raise ConcurrencyError(
                f"HookSession.{name}() called from thread {threading.get_ident()}, but the session was entered in "
                f"thread {thread}, the only one its hooks act in. Open a session in each thread instead "
                "(on its own model copy, copy.deepcopy(model), if the threads use gradients)."
            )

    def _hold(self, model: nn.Module | None = None) -> _Passes:
        """Claim the model (as a context does) and start the per-pass bookkeeping: the first hook or edit.

        The claim is refused while another thread holds backward hooks on the model, and keeps such
        a context from starting in another thread until the session ends.
        """
        thread = self._thread
        assert thread is not None
        self._claim_key = _claim_model(self, self.model if model is None else model, thread, exclusive=False)
        self._passes = passes = _Passes(ForwardState(), thread, id(self))
        return passes

    def _prepare(
        self, target: Target | str, direction: str | HookDirection | None
    ) -> tuple[Target, HookDirection, nn.Module]:
        """Normalise and check a target and its direction, and resolve its module (nothing installed)."""
        if isinstance(target, str):
            target = _path_target(target)
        if not isinstance(target, Target):
            raise InvalidInputError(f"Expected a Target or a module path, got {type(target).__name__}.")
        kind = target.kind
        if kind is TargetKind.ACTIVATION and direction is None:  # the common case: no direction checks
            return target, _FWD, _module_at(self.model, target)
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
        return target, parsed, _module_at(self.model, target)

    def _install(
        self,
        passes: _Passes,
        module: nn.Module,
        target: Target,
        direction: HookDirection,
        operation: str,
        captured: CapturedTarget | None,
        replacement: _Replacement | None,
    ) -> None:
        occurrences = target.occurrences
        wanted = None if occurrences is None else frozenset(occurrences)
        hook: _SiteHook
        if direction in _GRADIENT_DIRECTIONS:
            hook = _GradientHook(target, direction, passes, wanted, captured, replacement)
            point = _FWD if direction is HookDirection.BWD_PRE else HookDirection.FWD_PRE
            self._has_gradient = True
        else:
            hook = _ActivationHook(target, direction, passes, wanted, captured, replacement)
            point = direction
        if occurrences is not None:
            passes.watched.append(hook)
        self._attach(
            passes,
            module,
            hook,
            point,
            (operation, target.module_path, direction, target, 1),
            ends=occurrences is not None,
            uncopied=captured is not None and not captured.detach and point is direction,  # a forward value
        )

    def _attach(
        self,
        passes: _Passes,
        module: nn.Module,
        hook: Callable[..., Any],
        point: HookDirection,
        entry: tuple[str, str, HookDirection | None, Target | None, int],
        ends: bool = False,
        uncopied: bool = False,
    ) -> None:
        """Register a site hook (after the pass-start hook, the first time) and list it in the program.

        ``ends``: the hook needs the pass-end hook (call indices checked at the end of each pass);
        once installed, the pass-end hook is kept the root's last forward hook. ``uncopied``: the
        hook keeps forward values without a copy, so in-place modules get their guards, after the
        hook (on an in-place module, the hook holds the input before its guard copies it).
        """
        if self._start_handle is None:  # every call of the model from now on starts a pass
            self._start_handle = register(self.model, passes.begin, HookDirection.FWD_PRE, prepend=True)
        self._handles.append(register(module, hook, point))
        self._entries.append(entry)
        if uncopied:
            self._guard_inplace(passes)
        if ends or self._inplace_guarded:
            self._keep_end_last(passes, module)

    def _keep_end_last(self, passes: _Passes, module: nn.Module) -> None:
        """Install the pass-end hook, or move it back to the last place after a new hook on the root."""
        model = self.model
        if self._end_handle is not None and module is not model:
            return
        if self._end_handle is None:
            passes.reset()  # the pass in progress began without an end hook
        else:
            self._end_handle.remove()
        passes.ends = True
        self._end_handle = register(model, passes.end, _FWD, always_call=True)

    def _guard_inplace(self, passes: _Passes) -> None:
        """For values kept without a copy: copy them just before an in-place module modifies them."""
        if self._inplace_guarded:
            return
        self._inplace_guarded = passes.state.track_storage = True
        for module in inplace_modules(self.model):
            self._handles.append(register(module, passes.state.before_inplace, HookDirection.FWD_PRE))
            self._entries.append(("inplace_guard", "", HookDirection.FWD_PRE, None, 1))

    def _replace_parameter(self, target: Target, module: nn.Module, value: Any) -> None:
        param = target.parameter_tensor(module)
        new = target.replace_output(param.detach(), value)  # checks the shape before any write
        if not any(ref() is param for ref, _ in self._backups):
            self._backups.append((weakref.ref(param), param.detach().clone()))
        with torch.no_grad():
            param.copy_(new)
        self._entries.append(("parameter_replace", target.module_path, None, target, 0))

    def _restore_parameters(self) -> None:
        backups, self._backups = self._backups, []
        with torch.no_grad():
            for ref, saved in reversed(backups):
                param = ref()
                if param is not None:
                    param.copy_(saved)

"""The one generic LRP mechanism: a rule is a small object handed to a single forward hook.

Part of :mod:`tdhook.attribution.lrp`. A :class:`Rule` says how relevance at a module's outputs
becomes relevance at its inputs (:meth:`Rule.relevance`). :class:`RuleHook`, a forward hook,
routes the module's output through :class:`_RelevanceFunction`, an autograd function whose value
is a copy of the output and whose backward calls the rule. The model's ``forward`` is never
replaced and nothing is written onto the module: removing the hook undoes everything.

Inside a rule, ``relevance`` is what flows backwards (the "gradient"). Rules that need the
module's local Jacobian use the module's own autograd graph (no second forward pass); rules that
modify parameters re-run the layer functionally with modified copies of the parameters.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from ...core import HookDirection, HookSpec
from ._errors import RuleDefinitionError, RuleInputError

__all__ = [
    "RemovableRuleHandle",
    "Rule",
    "RuleHook",
    "bypass_rules",
    "gradient_x_input",
    "stabilize",
]


def stabilize(tensor: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Push ``tensor`` away from zero: ``t + ε`` where ``t ≥ 0``, ``t - ε`` elsewhere.

    Args:
        tensor: The denominator to stabilise.
        epsilon: The distance added.

    Returns:
        A new tensor of the same shape.

    Examples:
        >>> stabilize(torch.tensor([0.0, -1.0, 2.0]), 0.5)
        tensor([ 0.5000, -1.5000,  2.5000])
    """
    # = torch.where(t >= 0, t + ε, t − ε), bit for bit, in four cheap in-place passes
    sign = (tensor >= 0).to(tensor.dtype)
    return sign.mul_(2 * epsilon).sub_(epsilon).add_(tensor)


class _Bypass(threading.local):
    active = False


_BYPASS = _Bypass()


@contextlib.contextmanager
def bypass_rules() -> Iterator[None]:
    """Make every :class:`RuleHook` a no-op in this thread (used when a rule re-runs a module)."""
    previous = _BYPASS.active
    _BYPASS.active = True
    try:
        yield
    finally:
        _BYPASS.active = previous


def gradient_x_input(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    *,
    multiply: bool = True,
) -> list[torch.Tensor | None]:
    """Return ``x ⊙ Jᵀw`` (or ``Jᵀw``) for every input, through the outputs' autograd graph.

    Args:
        outputs: Tensors computed from ``inputs`` (with their graph).
        inputs: The tensors to differentiate with respect to; those that do not require grad
            get ``None``.
        weights: One vector per output (the grad_outputs).
        multiply: Multiply the vector-Jacobian product by the input.

    Returns:
        One entry per input.
    """
    pairs = [(o, w) for o, w in zip(outputs, weights) if o.requires_grad]
    wanted = [i for i, x in enumerate(inputs) if x.requires_grad]
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wanted],
        [w for _, w in pairs],
        retain_graph=True,
        allow_unused=True,
    )
    for i, grad in zip(wanted, grads):
        if grad is not None:
            result[i] = inputs[i].detach() * grad if multiply else grad
    return result


@dataclass(frozen=True, eq=False)
class _Call:
    rule: Rule
    module: nn.Module
    n_outputs: int


class _RelevanceFunction(torch.autograd.Function):
    """Value: the module's outputs. Backward: the rule's relevance for the inputs.

    Arguments are ``(call, *outputs, *inputs)``; the outputs keep their graph, so rules can take
    vector-Jacobian products through the module without running it again. No gradient flows
    along the original output edges: relevance reaches the inputs only through the rule.

    Rules that read the outputs get a copy as the new output (so in-place code after the module,
    such as ``out += x``, cannot alter what they read); the others get an alias (no copy) and
    keep only the inputs.
    """

    @staticmethod
    def forward(ctx: Any, call: _Call, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.call = call
        n = call.n_outputs
        if call.rule.uses_outputs:
            ctx.save_for_backward(*tensors)
            return tuple(t.clone() for t in tensors[:n])
        ctx.save_for_backward(*tensors[n:])
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        call: _Call = ctx.call
        n = call.n_outputs
        saved = ctx.saved_tensors
        if call.rule.uses_outputs:
            outputs, inputs = saved[:n], saved[n:]
        else:
            outputs, inputs = (), saved
        with torch.enable_grad(), bypass_rules():
            result = tuple(call.rule.relevance(call.module, inputs, outputs, relevance))
        if len(result) != len(inputs):
            raise RuleInputError(
                f"{type(call.rule).__name__}.relevance returned {len(result)} value(s) for "
                f"{len(inputs)} input(s) of {type(call.module).__name__}. Return one tensor (or None) per input."
            )
        needs = ctx.needs_input_grad[1 + n :]
        grads = tuple(_detached(r) if need else None for r, need in zip(result, needs))
        return (None, *([None] * n), *grads)


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    # Rules may build their result from tensors with a graph; the relevance itself has none.
    return value.detach() if value is not None and value.requires_grad else value


@dataclass(frozen=True, eq=False)
class RuleHook:
    """The forward hook every rule uses: route the output through the rule's backward.

    The rule's :meth:`Rule.check` runs on every call (also under ``no_grad`` and when no input
    requires grad). The output depends on the autograd graph only through the module's positional
    tensor inputs: when none requires grad (or gradients are disabled) it is returned detached,
    so parameters never receive gradient through a rule. Inside :func:`bypass_rules` the hook
    does nothing.

    Args:
        rule: The rule computing relevance in the backward pass.
    """

    rule: Rule

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if _BYPASS.active:
            return None
        rule = self.rule
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        single = isinstance(output, torch.Tensor)
        outputs = (output,) if single else output
        if not isinstance(outputs, tuple) or not all(isinstance(o, torch.Tensor) for o in outputs):
            raise RuleInputError(
                f"{type(rule).__name__} on {type(module).__name__}: LRP rules need a module that returns "
                f"a tensor or a tuple of tensors, got {type(output).__name__}. Map this module to IgnoreRule "
                "(or no rule) and put rules on its submodules instead."
            )
        rule.check(module, inputs, outputs)
        value = rule.forward_value(module, inputs, outputs)
        changed = value is not None
        outputs = tuple(value) if value is not None else outputs
        if not torch.is_grad_enabled() or not any(x.requires_grad for x in inputs):
            if not changed and not any(o.requires_grad for o in outputs):
                return None
            detached = tuple(o.detach() for o in outputs)
            return detached[0] if single else detached
        new = _RelevanceFunction.apply(_Call(rule, module, len(outputs)), *outputs, *inputs)
        return new[0] if single else tuple(new)


_PROTOCOL_FUNCTIONS: weakref.WeakKeyDictionary[type, type[torch.autograd.Function]] = (
    weakref.WeakKeyDictionary()
)


def _is_protocol_rule(rule: Rule) -> bool:
    """A rule written to tdhook 0.1's protocol: static ``forward(ctx, ...)``/``backward(ctx, ...)``."""
    cls = type(rule)
    forward = inspect.getattr_static(cls, "forward", None)
    backward = inspect.getattr_static(cls, "backward", None)
    return isinstance(forward, staticmethod) and isinstance(backward, staticmethod)


def _protocol_function(cls: type) -> type[torch.autograd.Function]:
    """An autograd Function running a 0.1-protocol rule class's own forward and backward."""
    fn = _PROTOCOL_FUNCTIONS.get(cls)
    if fn is None:
        fn = type(
            f"_{cls.__name__}Function",
            (torch.autograd.Function,),
            {
                "forward": staticmethod(inspect.getattr_static(cls, "forward").__func__),
                "backward": staticmethod(inspect.getattr_static(cls, "backward").__func__),
            },
        )
        _PROTOCOL_FUNCTIONS[cls] = fn
    return fn


@dataclass(frozen=True, eq=False)
class _ProtocolRuleHook:
    """Forward hook (with kwargs) running a 0.1-protocol rule: its ``forward`` gives the output.

    The rule's static ``forward(ctx, apply_kwargs, module, model_kwargs, *inputs)`` calls
    ``module._prev_forward`` (the module's own forward, set while the rule is registered); its
    ``backward(ctx, *relevance)`` returns three ``None`` then one relevance per input.
    """

    rule: Rule

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if _BYPASS.active:
            return None
        fn = _protocol_function(type(self.rule))
        return fn.apply(dict(self.rule._apply_kwargs), module, dict(kwargs), *args)


class RemovableRuleHandle:
    """Undo one :meth:`Rule.register`: ``.remove()`` (idempotent), or use it as a context manager.

    ``RemovableRuleHandle(rule, module)`` (tdhook 0.1's signature) makes a handle whose
    ``remove()`` unregisters ``rule`` from ``module`` while the module is alive, and does nothing
    once it is gone.

    Args:
        rule: The registered rule.
        module: The module it was registered on.
        handle: The torch hook handle (``None``: remove every registration of ``rule`` on
            ``module``).
        prev_forward: Whether registering set ``module._prev_forward`` (a 0.1-protocol rule),
            deleted again on removal.
    """

    def __init__(
        self,
        rule: Rule,
        module: nn.Module,
        handle: RemovableHandle | None = None,
        *,
        prev_forward: bool = False,
    ) -> None:
        self.rule = rule
        self._module = weakref.ref(module)
        self._handle = handle
        self._owned = handle is not None or not rule.installs_hook
        self._prev_forward = prev_forward
        self._removed = False

    def remove(self) -> None:
        """Remove the rule from the module (a no-op the second time, or once the module is gone)."""
        if self._removed:
            return
        self._removed = True
        module = self._module()
        if not self._owned:  # a 0.1-style handle built by the user: unregister the rule
            if module is not None:
                self.rule.unregister(module)
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if module is not None:
            if self._prev_forward and "_prev_forward" in module.__dict__:
                del module.__dict__["_prev_forward"]
            self.rule._forget(module, self)

    def __enter__(self) -> RemovableRuleHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True, eq=False)
class _BoundRule:
    """An :class:`~tdhook.core.Installable`: ``install()`` registers ``rule`` on ``module``."""

    rule: Rule
    module: nn.Module

    def install(self) -> RemovableRuleHandle:
        return self.rule.register(self.module)


class Rule:
    """Base class of LRP rules: how relevance at a module's outputs reaches its inputs.

    Subclasses implement :meth:`relevance` (and optionally :meth:`check`). One instance can be
    registered on many modules. Registration adds one forward hook (:class:`RuleHook`); the
    module's ``forward`` is never replaced.

    Examples:
        >>> lin = torch.nn.Linear(3, 2)
        >>> from tdhook.attribution.lrp import EpsilonRule
        >>> with EpsilonRule().register(lin):
        ...     x = torch.randn(4, 3, requires_grad=True)
        ...     y = lin(x)
        ...     relevance = torch.autograd.grad(y, x, y.detach())[0]
        >>> relevance.shape
        torch.Size([4, 3])
    """

    #: False for rules that leave the module alone (IgnoreRule).
    installs_hook = True
    #: Keyword arguments handed to a 0.1-protocol rule's static ``forward`` (``apply_kwargs``).
    _apply_kwargs: Mapping[str, Any] = MappingProxyType({})
    #: False for rules whose ``relevance`` does not read ``outputs`` (they then get ``()``),
    #: which saves a copy of the outputs per call.
    uses_outputs = True

    def relevance(
        self,
        module: nn.Module,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        relevance: Sequence[torch.Tensor],
    ) -> Sequence[torch.Tensor | None]:
        """Return the relevance of every input (``None``: no relevance flows there).

        Args:
            module: The module the rule is registered on.
            inputs: Its positional tensor inputs (with their graph).
            outputs: Its outputs (with their graph: ``gradient_x_input(outputs, inputs, w)``
                computes ``x ⊙ Jᵀw`` without running the module again); ``()`` for rules with
                ``uses_outputs = False``.
            relevance: The relevance of every output.
        """
        raise RuleDefinitionError(
            f"{type(self).__name__} does not implement relevance(module, inputs, outputs, relevance); "
            "define it (returning one relevance per input), or the tdhook 0.1 pair of static methods "
            "forward(ctx, apply_kwargs, module, model_kwargs, *inputs) / backward(ctx, *relevance)."
        )

    def check(
        self, module: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
    ) -> None:
        """Validate a forward call (raise :class:`RuleInputError` early, with context).

        Runs on every call of the module, with or without gradients.
        """

    def forward_value(
        self, module: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor] | None:
        """The module's output while the rule is registered (``None``: its own output)."""
        return None

    # -- registration ------------------------------------------------------------------------
    def bind(self, module: nn.Module) -> _BoundRule:
        """Return an Installable that registers this rule on ``module`` (for a method's plan)."""
        return _BoundRule(self, module)

    def register(self, module: nn.Module) -> RemovableRuleHandle:
        """Register the rule on ``module`` and return the handle that removes it.

        A rule written to tdhook 0.1's protocol (static ``forward``/``backward``) is detected and
        run through its own ``forward`` and ``backward``; ``module._prev_forward`` is the module's
        own forward while it is registered.
        """
        handle = None
        prev_forward = False
        if self.installs_hook and _is_protocol_rule(self):
            if "_prev_forward" not in module.__dict__:
                module.__dict__["_prev_forward"] = module.forward
                prev_forward = True
            handle = HookSpec(module, _ProtocolRuleHook(self), HookDirection.FWD_KWARGS).install()
        elif self.installs_hook:
            handle = HookSpec(module, RuleHook(self), HookDirection.FWD).install()
        rule_handle = RemovableRuleHandle(self, module, handle, prev_forward=prev_forward)
        self._registry().setdefault(module, []).append(rule_handle)
        return rule_handle

    def unregister(self, module: nn.Module) -> None:
        """Remove every registration of this rule from ``module`` (no-op if there is none)."""
        for handle in list(self._registry().get(module, ())):
            handle.remove()

    def _registry(self) -> weakref.WeakKeyDictionary[nn.Module, list[RemovableRuleHandle]]:
        registry = self.__dict__.get("_registered")
        if registry is None:
            registry = weakref.WeakKeyDictionary()
            self.__dict__["_registered"] = registry
        return registry

    def _forget(self, module: nn.Module, handle: RemovableRuleHandle) -> None:
        handles = self._registry().get(module)
        if handles is not None and handle in handles:
            handles.remove(handle)
            if not handles:
                del self._registry()[module]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

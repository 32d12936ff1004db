"""The implementation of :mod:`tdhook.interventions` (described there)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from ._core.directions import HookDirection
from ._session import HookSession
from ._targets import Target, TargetKind
from .errors import InvalidDirectionError, InvalidInputError, InvalidParameterError, TargetError

__all__ = [
    "EarlyStoppingConfig",
    "InterventionObjective",
    "InterventionSpec",
    "InterventionStage",
    "InterventionStatus",
    "OptimizedInterventionResult",
    "OptimizerConfig",
    "optimize_intervention",
    "optimize_interventions",
]

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
#: How a stage ended (``InterventionStage.status``).
InterventionStatus = Literal["converged", "stalled", "budget_exhausted", "non_finite"]
_DIRECTIONS = (HookDirection.FWD, HookDirection.FWD_PRE, HookDirection.FWD_PRE_KWARGS)


@dataclass(frozen=True)
class OptimizerConfig:
    """Which torch optimiser runs a stage.

    Args:
        name: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        learning_rate: The optimiser's ``lr``.
        kwargs: Further optimiser arguments (``{"momentum": 0.9}``).
    """

    name: str = "adam"
    learning_rate: float = 0.05
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise InvalidParameterError(
                f"Unknown optimizer {self.name!r}; expected one of {sorted(_OPTIMIZERS)}, "
                "e.g. OptimizerConfig('adam', learning_rate=0.05)."
            )
        if not self.learning_rate > 0:
            raise InvalidParameterError(
                f"learning_rate must be a number > 0, got {self.learning_rate!r}; e.g. learning_rate=0.05."
            )


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """When a stage stops before ``max_steps``.

    Args:
        objective_threshold: ``converged`` once the loss is at or below this value.
        min_delta: An improvement smaller than this does not count for ``patience``.
        patience: ``stalled`` after this many evaluations without an improvement (None: never).
    """

    objective_threshold: float | None = None
    min_delta: float = 0.0
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise InvalidParameterError(
                f"patience must be a positive int (evaluations without improvement) or None (never stall), "
                f"got {self.patience!r}; e.g. patience=10."
            )
        if not self.min_delta >= 0:
            raise InvalidParameterError(
                f"min_delta must be a number >= 0 (the smallest loss decrease that counts as an improvement), "
                f"got {self.min_delta!r}; e.g. min_delta=0.0."
            )


@dataclass(frozen=True)
class InterventionObjective:
    """What an objective may return: the loss to minimise, and named terms to record."""

    loss: torch.Tensor
    terms: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class InterventionSpec:
    """One stage: which target to optimise, for what, and how.

    Args:
        target: An activation :class:`~tdhook.targets.Target`; its selected entries become the
            free tensor. The target must fire once per forward pass (use ``occurrences`` for a
            module called several times).
        objective: ``objective(output, value) -> loss`` (a 0-d tensor to *minimise*) or an
            :class:`InterventionObjective`; ``output`` is the model's output, ``value`` the free
            tensor.
        objective_name: Name of the stage (and of the loss in the history).
        max_steps: At most this many optimisation passes of the model.
        optimizer: The optimiser.
        early_stopping: The stopping rules.
        initial_value: Start from this tensor (the selected shape) instead of the captured value.
        preservation_regularizer: Adds ``weight * mean((value - initial) ** 2)`` to the loss,
            keeping the intervention close to the unmodified activation.
        direction: ``"fwd"`` (the output, default), ``"fwd_pre"`` or ``"fwd_pre_kwargs"``.
    """

    target: Target
    objective: Callable[[Any, torch.Tensor], Any]
    objective_name: str = "objective"
    max_steps: int = 100
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    initial_value: torch.Tensor | None = None
    preservation_regularizer: float = 0.0
    direction: str = "fwd"

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target) or self.target.kind is not TargetKind.ACTIVATION:
            raise TargetError(f"An intervention optimises an activation Target, got {self.target!r}.")
        if not callable(self.objective):
            raise InvalidInputError(
                f"objective must be callable as objective(output, value), got {self.objective!r}."
            )
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise InvalidParameterError(
                f"max_steps must be a positive int (the most optimisation passes), got {self.max_steps!r}; "
                "e.g. max_steps=100."
            )
        if not self.preservation_regularizer >= 0:
            raise InvalidParameterError(
                f"preservation_regularizer must be a number >= 0 (the weight of mean((value - initial) ** 2)), "
                f"got {self.preservation_regularizer!r}; use 0.0 to switch it off."
            )
        if HookDirection.parse(self.direction) not in _DIRECTIONS:
            raise InvalidDirectionError(
                f"An intervention replaces a forward value; direction must be one of {[d.value for d in _DIRECTIONS]}, "
                f"got {self.direction!r}."
            )
        if self.initial_value is not None and not isinstance(self.initial_value, torch.Tensor):
            raise InvalidInputError(
                f"initial_value must be a tensor, got {type(self.initial_value).__name__}."
            )


@dataclass(frozen=True)
class InterventionStage:
    """The record of one stage.

    Attributes:
        target: The target optimised.
        objective_name: The stage's name.
        status: ``"converged"``, ``"stalled"``, ``"budget_exhausted"`` or ``"non_finite"``.
        steps: How many optimisation passes ran.
        history: One dict per pass: ``step``, ``loss`` (what was minimised), the objective under
            ``objective_name``, and any named terms.
        initial_value: The captured (or given) starting value.
        value: The optimised value: the one with the lowest finite loss seen.
        best_loss: Its loss.
    """

    target: Target
    objective_name: str
    status: InterventionStatus
    steps: int
    history: tuple[Mapping[str, float], ...]
    initial_value: torch.Tensor
    value: torch.Tensor
    best_loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "objective_name": self.objective_name,
            "status": self.status,
            "steps": self.steps,
            "history": [dict(h) for h in self.history],
            "initial_value": _describe(self.initial_value),
            "value": _describe(self.value),
            "best_loss": self.best_loss,
        }


@dataclass(frozen=True)
class OptimizedInterventionResult:
    """What :func:`optimize_interventions` returns.

    Attributes:
        output: The model's output in a final no-grad pass with every optimised value applied.
        interventions: ``(target, value)`` pairs, in stage order.
        stages: One :class:`InterventionStage` per spec.
        model_pass_budget: The most model passes the call could have used.
        model_passes: The passes it used (captures, optimisation steps and the final pass).
    """

    output: Any
    interventions: tuple[tuple[Target, torch.Tensor], ...]
    stages: tuple[InterventionStage, ...]
    model_pass_budget: int
    model_passes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible summary; each tensor is given by shape, dtype and SHA-256 of its bytes."""
        return {
            "interventions": [{"target": t.to_dict(), "value": _describe(v)} for t, v in self.interventions],
            "stages": [s.to_dict() for s in self.stages],
            "model_pass_budget": self.model_pass_budget,
            "model_passes": self.model_passes,
        }


def _describe(value: torch.Tensor) -> dict[str, Any]:
    data = value.detach().cpu().contiguous()
    return {
        "shape": list(data.shape),
        "dtype": str(data.dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest(),
    }


# ------------------------------------------------------------------------------------------------
# State saved and restored around the optimisation
# ------------------------------------------------------------------------------------------------


@dataclass
class _ModelState:
    params: list[tuple[nn.Parameter, torch.Tensor, bool, torch.Tensor | None]]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]
    training: list[tuple[nn.Module, bool]]

    @classmethod
    def save(cls, model: nn.Module) -> _ModelState:
        return cls(
            params=[(p, p.detach().clone(), p.requires_grad, p.grad) for p in model.parameters()],
            buffers=[(b, b.detach().clone()) for b in model.buffers()],
            training=[(m, m.training) for m in model.modules()],
        )

    def restore(self) -> None:
        with torch.no_grad():
            for param, saved, requires_grad, grad in self.params:
                if not torch.equal(param, saved):
                    param.copy_(saved)
                param.requires_grad_(requires_grad)
                param.grad = grad
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        for module, training in self.training:
            module.training = training


# ------------------------------------------------------------------------------------------------
# The optimisation
# ------------------------------------------------------------------------------------------------


def optimize_intervention(
    model: nn.Module,
    model_args: Any,
    spec: InterventionSpec,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    frozen_modules: Sequence[str] | None = None,
    seed: int | None = None,
) -> OptimizedInterventionResult:
    """Optimise one intervention: :func:`optimize_interventions` with a single spec."""
    return optimize_interventions(
        model, model_args, [spec], model_kwargs=model_kwargs, frozen_modules=frozen_modules, seed=seed
    )


def optimize_interventions(
    model: nn.Module,
    model_args: Any,
    specs: Sequence[InterventionSpec],
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    frozen_modules: Sequence[str] | None = None,
    seed: int | None = None,
) -> OptimizedInterventionResult:
    """Optimise free tensors that replace targets, stage by stage, with the model frozen.

    For each spec in order: capture the target's value with the earlier stages' optimised
    values applied (one no-grad pass), then optimise a free tensor that replaces it (one model
    pass per step) until a stopping rule fires. A final no-grad pass applies every optimised
    value and gives ``output``.

    Args:
        model: The model (never modified: every parameter is frozen during the call).
        model_args: The positional input(s): a tuple of arguments, or one argument.
        specs: The stages.
        model_kwargs: Keyword arguments of the model call.
        frozen_modules: Paths of modules put in eval mode for the call (dropout off, batch-norm
            statistics fixed); ``None`` puts the whole model in eval mode, ``[]`` leaves the
            modes as they are.
        seed: Seeds torch's RNG for the call (the caller's RNG state is restored after).

    Returns:
        An :class:`OptimizedInterventionResult`.

    Raises:
        ModulePathError: If a target's module does not exist (checked before anything runs).
        TargetError: If a target does not fire exactly once per pass, or an objective does not
            return a scalar.
    """
    if isinstance(specs, InterventionSpec) or not all(isinstance(s, InterventionSpec) for s in specs):
        raise InvalidInputError(
            "specs must be a sequence of InterventionSpec; use optimize_intervention for one."
        )
    if not specs:
        raise InvalidParameterError(
            "optimize_interventions got no InterventionSpec (an empty sequence); pass at least one, "
            "e.g. optimize_interventions(model, x, [InterventionSpec(target, objective)])."
        )
    args = model_args if isinstance(model_args, tuple) else (model_args,)
    kwargs = dict(model_kwargs or {})
    for spec in specs:
        spec.target.validate(model)
    eval_modules = [model] if frozen_modules is None else [Target(p).validate(model) for p in frozen_modules]

    state = _ModelState.save(model)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for module in eval_modules:
                module.eval()
            for param in model.parameters():
                param.requires_grad_(False)
            return _run(model, args, kwargs, specs)
    finally:
        state.restore()


def _run(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], specs: Sequence[InterventionSpec]
) -> OptimizedInterventionResult:
    applied: list[tuple[InterventionSpec, torch.Tensor]] = []
    stages = []
    passes = 0
    for spec in specs:
        initial = _capture(model, args, kwargs, spec, applied)
        passes += 1
        stage, used = _optimise(model, args, kwargs, spec, applied, initial)
        passes += used
        stages.append(stage)
        applied.append((spec, stage.value))
    with torch.no_grad(), HookSession(model) as session:
        _apply(session, applied)
        output = model(*args, **kwargs)
    passes += 1
    budget = sum(1 + s.max_steps for s in specs) + 1
    return OptimizedInterventionResult(
        output=output,
        interventions=tuple((s.target, v) for s, v in applied),
        stages=tuple(stages),
        model_pass_budget=budget,
        model_passes=passes,
    )


def _apply(session: HookSession, applied: list[tuple[InterventionSpec, torch.Tensor]]) -> None:
    for spec, value in applied:
        session.replace(spec.target, value, direction=spec.direction)


def _capture(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    spec: InterventionSpec,
    applied: list[tuple[InterventionSpec, torch.Tensor]],
) -> torch.Tensor:
    with torch.no_grad(), HookSession(model) as session:
        _apply(session, applied)
        captured = session.capture(spec.target, direction=spec.direction)
        model(*args, **kwargs)
    if len(captured.values) != 1:
        raise TargetError(
            f"{spec.target} fired {len(captured.values)} times in one forward pass; an intervention needs exactly one "
            "call. Pick one with occurrences=(i,)."
        )
    initial = captured.values[0]
    if spec.initial_value is not None:
        if spec.initial_value.shape != initial.shape:
            raise TargetError(
                f"initial_value has shape {tuple(spec.initial_value.shape)} but {spec.target} selects "
                f"{tuple(initial.shape)}."
            )
        return spec.initial_value.detach().to(initial).clone()
    return initial


def _loss(
    spec: InterventionSpec, output: Any, value: torch.Tensor, initial: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    result: Any = spec.objective(output, value)
    terms: Mapping[str, Any] = {}
    if isinstance(result, InterventionObjective):
        terms = result.terms
        result = result.loss
    if not isinstance(result, torch.Tensor) or result.numel() != 1:
        raise TargetError(
            f"The objective {spec.objective_name!r} must return a scalar tensor (or an InterventionObjective), got "
            f"{type(result).__name__}{tuple(result.shape) if isinstance(result, torch.Tensor) else ''}."
        )
    objective = result.reshape(())
    record = {spec.objective_name: float(objective.detach())}
    record.update({name: float(torch.as_tensor(t).detach()) for name, t in terms.items()})
    loss = objective
    if spec.preservation_regularizer:
        penalty = (value - initial).pow(2).mean()
        record["preservation"] = float(penalty.detach())
        loss = loss + spec.preservation_regularizer * penalty
    return loss, record


def _optimise(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    spec: InterventionSpec,
    applied: list[tuple[InterventionSpec, torch.Tensor]],
    initial: torch.Tensor,
) -> tuple[InterventionStage, int]:
    value = initial.clone().requires_grad_(True)
    config = spec.optimizer
    optimizer = _OPTIMIZERS[config.name]([value], lr=config.learning_rate, **dict(config.kwargs))
    rules = spec.early_stopping
    history: list[dict[str, float]] = []
    best_loss, best_value = math.inf, initial.clone()
    since_best = 0
    status: InterventionStatus = "budget_exhausted"
    with torch.enable_grad(), HookSession(model) as session:
        _apply(session, applied)
        session.replace(spec.target, value, direction=spec.direction)
        for step in range(spec.max_steps):
            output = model(*args, **kwargs)
            loss, record = _loss(spec, output, value, initial)
            current = float(loss.detach())
            history.append({"step": float(step), "loss": current, **record})
            if not math.isfinite(current):
                status = "non_finite"
                break
            if current < best_loss - rules.min_delta:
                since_best = 0
            else:
                since_best += 1
            if current < best_loss:
                best_loss, best_value = current, value.detach().clone()
            if rules.objective_threshold is not None and current <= rules.objective_threshold:
                status = "converged"
                break
            if rules.patience is not None and since_best >= rules.patience:
                status = "stalled"
                break
            if step == spec.max_steps - 1:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    stage = InterventionStage(
        target=spec.target,
        objective_name=spec.objective_name,
        status=status,
        steps=len(history),
        history=tuple(MappingProxyType(h) for h in history),
        initial_value=initial,
        value=best_value,
        best_loss=best_loss,
    )
    return stage, len(history)

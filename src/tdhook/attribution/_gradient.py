"""The shared gradient engine of ``tdhook.attribution`` and the plain gradient methods.

Every gradient method (Saliency, InputXGradient, IntegratedGradients, GradientShap, SmoothGrad,
GuidedBackpropagation, GradCAM, LRP...) is one :class:`GradientAttribution` parameterisation.
One call runs, per chunk of sample points, ONE forward pass of the model over all points of the
chunk (batch ``N * c``) and ONE ``torch.autograd.grad`` (one batched vector-Jacobian product with
``is_grads_batched=True`` when ``separate_targets=True``), then weights and sums the gradients
over the points and hands them to the method's ``_grad_attr``.

Extension API (for method authors, e.g. LRP)
--------------------------------------------
Subclass :class:`GradientAttribution` once and override only what differs:

* ``__init__``: take the shared arguments (see :class:`GradientAttribution`) and pass them to
  ``super().__init__(...)``; store your own options.
* ``_plan(self, hooked) -> list[Installable]``: return ``[*super()._plan(hooked), *yours]``.
  ``super()._plan`` installs the engine's capture hooks (``input_modules``, ``target_modules``,
  ``output_grad_callbacks``). Add your reversible edits (rule patches, canonizers, backward hooks)
  as :class:`~tdhook._core.directions.HookSpec` values or objects with ``install() -> handle``; the core
  installs them in order and undoes them in reverse at exit, also after an exception.
* ``_grad_attr(self, grads, inputs) -> dict``: turn gradients into attributions. ``grads`` and
  ``inputs`` map each attribution sub-key (an in_key, or an ``input_modules`` key) to a tensor of
  shape ``(*B, *feature)`` (``(*B, K, *feature)`` with ``separate_targets``); ``inputs`` holds the
  input values (the activation for a module key), ``(*B, 1, *feature)`` with ``separate_targets``
  so that ``grads[k] * inputs[k]`` broadcasts. The default returns ``grads`` unchanged, which
  is what LRP needs (its rules already multiply by the input; the seed is the initial relevance:
  pass ``init_attr_grads=lambda targets, _: targets`` to seed with the logits).
* Sampling methods (IG, GradientShap) override ``_n_points``, ``_points``,
  ``_point_weights``, ``_point_factors`` and ``_module_transforms`` (see their docstrings) and set
  ``self._chunk_size``; ``_prepare_job``/``_finish_job`` add per-call state and extra outputs.

Minimal LRP sketch::

    class LRP(GradientAttribution):
        def __init__(self, use_inputs=True, ..., cache_callback=None, rule_mapper=None):
            super().__init__(use_inputs, ..., cache_callback)
            self._rule_mapper = rule_mapper

        def _plan(self, hooked):
            return [*super()._plan(hooked), *(_RulePatch(m, rule) for m, rule in ...)]

Contract of every call: the caller's TensorDict is returned, holding its inputs, the model
outputs (at the real inputs, detached, batch ``B``) and ``(attribution_key, k)`` entries; no
intermediate key is ever written into it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from .._core.directions import HookDirection, HookSpec, Installable
from .._core.factory import HookingContextFactory
from .._core.hook_types import SettingHook
from .._core.hooked import HookedModule
from .._core.keys import check_keys
from .._core.lifecycle import HookingContext
from .._core.signatures import check_callback
from ._errors import KEYS, AttributionError, IntegerInputError, TargetError

__all__ = [
    "AttrCallback",
    "GradientAttribution",
    "InputXGradient",
    "Saliency",
]

#: ``f(td, additional) -> TensorDict``: the signature of every ``init_attr_*`` callback.
AttrCallback = Callable[[TensorDictBase, TensorDictBase], TensorDictBase]


#: ``targets=``: an output index, a list of indices (summed, or one map each with
#: ``separate_targets``), or an integer tensor with one index per sample (captum's ``target=``).
TargetsArg = int | Sequence[int] | torch.Tensor | None


def parse_targets(targets: Any, separate: bool = False) -> int | list[int] | torch.Tensor | None:
    """Validate ``targets=`` once, at construction, and give it one meaning.

    * ``None``: every output element (the gradient of their sum);
    * an ``int`` (or a 0-dim integer tensor): that index of the last output dimension;
    * a list/tuple of ints: those indices, summed (one map each with ``separate_targets``);
    * an integer tensor (or NumPy array) with one or more dimensions: **per-sample** indices,
      one per sample (shape ``B``, or ``(prod(B),)``), as captum's ``target=`` tensor.

    Raises:
        TargetError: For a string, a float, a bool, a non-integer tensor, an empty list, or a
            per-sample tensor combined with ``separate_targets`` (a ``ValueError``).
    """
    if targets is None:
        return None
    if type(targets).__module__ == "numpy" and hasattr(targets, "ndim"):  # an array reads as a tensor
        targets = torch.as_tensor(targets)
    if isinstance(targets, torch.Tensor):
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TargetError(
                f"targets tensor has dtype {targets.dtype}, expected integer class indices. Convert it: "
                "targets=labels.long()."
            )
        if targets.dim() == 0:
            return int(targets)
        if separate:
            raise TargetError(
                f"separate_targets=True takes a list of output indices, not a per-sample tensor (got shape "
                f"{tuple(targets.shape)}). Use targets=[i, j, ...] with separate_targets, or the tensor alone."
            )
        return targets.detach().long()
    if isinstance(targets, (str, bytes)):
        raise TargetError(
            f"targets={targets!r} is a string; expected an int output index, a list of ints, or an integer "
            f"tensor with one index per sample. Write targets=int({targets!r}) if you mean one index."
        )
    if isinstance(targets, Sequence) or (hasattr(targets, "__iter__") and not isinstance(targets, Mapping)):
        values = list(targets)
        if not values:
            raise TargetError("targets is empty; pass at least one output index, or None.")
        return [_target_index(v) for v in values]
    return _target_index(targets)


def _target_index(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TargetError(
            f"targets entry {value!r} is a bool; expected an int output index (e.g. targets=1)."
        )
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TargetError(
            f"targets entry {value!r} ({type(value).__name__}) is not an int output index; a float is never "
            "rounded. Pass int indices (targets=[3]) or an integer tensor with one index per sample."
        ) from None


def module_names(value: Any, what: str) -> list[str]:
    """A list of module paths: one string is ONE path (never its characters).

    Raises:
        AttributionError: For an entry that is not a string (a ``ValueError``).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value)
    if not isinstance(value, Iterable):
        raise AttributionError(
            f"{what} must be a module path or a list of module paths, got {type(value).__name__} {value!r}."
        )
    names = list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise AttributionError(
            f"{what} must hold module paths (strings), got {bad[0]!r} ({type(bad[0]).__name__}) in {names!r}. "
            f"Write {what}=['fc1', ...]."
        )
    return names


def check_finite(value: torch.Tensor, what: str) -> None:
    """Refuse a floating tensor holding NaN or Inf (its attributions would be NaN).

    Raises:
        AttributionError: Naming ``what`` and the count of bad entries (a ``ValueError``).
    """
    if not (torch.is_floating_point(value) or torch.is_complex(value)):
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise AttributionError(
            f"{what} holds {bad} NaN/Inf value(s) out of {value.numel()}; its attributions would be NaN. "
            "Clean it (torch.nan_to_num), or pass check_finite=False to skip this check."
        )


def check_per_sample_targets(index: torch.Tensor, batch: torch.Size) -> None:
    """A per-sample ``targets`` tensor must have one entry per sample: shape ``B`` or ``(prod(B),)``.

    Raises:
        TargetError: For another shape (a ``ValueError``).
    """
    if tuple(index.shape) == tuple(batch) or (index.dim() == 1 and index.numel() == batch.numel()):
        return
    raise TargetError(
        f"targets tensor of shape {tuple(index.shape)} is read as one class index per sample, but the batch "
        f"is {tuple(batch)} ({batch.numel()} samples). Give shape {tuple(batch)}, or a list of ints to select "
        "the same indices for every sample."
    )


def _per_sample_seed(target: torch.Tensor, index: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """One-hot seed selecting ``target[s, ..., index[s]]`` for every sample ``s``."""
    k = next((k for k in range(len(batch) + 1) if math.prod(batch[:k]) == index.numel()), None)
    if k is None or target.dim() <= k:
        raise TargetError(
            f"per-sample targets of shape {tuple(index.shape)} do not fit a target of shape "
            f"{tuple(target.shape)} (batch {tuple(batch)}): give one class index per sample, for a target "
            "with a class dimension last."
        )
    size = target.shape[-1]
    index = index.to(target.device)
    if bool(((index < -size) | (index >= size)).any()):
        bad = index[(index < -size) | (index >= size)].tolist()
        raise TargetError(
            f"per-sample targets {bad} out of range for a target of shape {tuple(target.shape)}: indices "
            f"select the last dimension (size {size})."
        )
    index = index.remainder(size).reshape(torch.Size((*batch[:k], *([1] * (target.dim() - k)))))
    index = index.expand(*target.shape[:-1], 1)
    return torch.zeros_like(target).scatter_(-1, index, 1)


# ----------------------------------------------------------------------------------------------
# Per-call state shared with the hooks (hooks are frozen values holding a reference to it)
# ----------------------------------------------------------------------------------------------


@dataclass
class _CallState:
    """What the capture hooks of one context share with the running call.

    ``active`` is False outside the differentiated forward, so extra passes (outputs at the real
    input, baselines) run the plain model.
    """

    active: bool = False
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    record: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self.active = False
        self.inputs = {}
        self.targets = {}
        self.transforms = {}
        self.record = None


@dataclass(frozen=True)
class _InputModuleHook:
    """Forward hook on an ``input_modules`` entry: capture (or replace) its output.

    The output is captured as it is when it is part of the graph; otherwise (frozen weights, an
    embedding of integer ids) it is replaced by a leaf that requires grad. A sampling method may
    register a transform (e.g. IG's interpolation in activation space) that replaces it.
    """

    key: str
    state: _CallState
    callback: Callable[..., Any] | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        state = self.state
        value = output
        if self.callback is not None:
            value = self.callback(module=module, args=args, output=output, key=self.key, direction="fwd")
        if state.record is not None:
            state.record[self.key] = value.detach() if isinstance(value, torch.Tensor) else value
            return None
        if not state.active:
            return None
        if not isinstance(value, torch.Tensor):
            raise AttributionError(
                f"input module {self.key!r} returned a {type(value).__name__}, expected a tensor. "
                "Pass cache_callback=lambda output, **_: output[0] to select the tensor to attribute to."
            )
        transform = state.transforms.get(self.key)
        replaced = False
        if transform is not None:
            value = transform(value)
            replaced = True
        elif not value.requires_grad:
            value = value.detach().requires_grad_(True)
            replaced = True
        if replaced and self.callback is not None:
            raise AttributionError(
                f"input module {self.key!r}: the value selected by cache_callback must be part of the "
                "autograd graph to be replaced. Attribute to a module whose whole output is a tensor."
            )
        state.inputs[self.key] = value
        return value if replaced else None


@dataclass(frozen=True)
class _TargetModuleHook:
    """Forward hook on a ``target_modules`` entry: capture its output as a target."""

    key: str
    state: _CallState

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.state.active or self.state.record is not None:
            if not isinstance(output, torch.Tensor):
                raise AttributionError(
                    f"target module {self.key!r} returned a {type(output).__name__}, expected a tensor. "
                    "Target a submodule whose output is a tensor."
                )
            self.state.targets[self.key] = output


@dataclass
class _Job:
    """Everything one call needs, in flat layout (batch ``N = prod(B)`` first)."""

    td: TensorDictBase
    batch: torch.Size
    n: int
    model_inputs: dict[NestedKey, torch.Tensor]
    attributed: list[NestedKey]
    additional: TensorDictBase | None
    #: Model outputs at the real inputs, batch ``B`` (set by a method's extra pass, if any).
    outputs: dict[NestedKey, Any] | None = None
    #: Per-sample target indices (flat ``(N,)``), from a ``targets`` tensor.
    target_index: torch.Tensor | None = None
    #: The ``inputs`` given to ``_grad_attr`` (flat), when not the values differentiated.
    attr_inputs: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _flat(value: torch.Tensor, n_batch_dims: int, n: int) -> torch.Tensor:
    return value.reshape(n, *value.shape[n_batch_dims:])


def _unflat(value: Any, batch: torch.Size) -> Any:
    if isinstance(value, TensorDictBase):
        return value.reshape(batch)
    return value.reshape(torch.Size((*batch, *value.shape[1:])))


def _key_str(key: NestedKey) -> str:
    return key if isinstance(key, str) else ".".join(key)


def _leaves(name: Any, value: Any) -> Iterable[tuple[Any, torch.Tensor]]:
    if isinstance(value, TensorDictBase):
        for k, v in value.items(include_nested=True, leaves_only=True):
            yield ((name, *k) if isinstance(k, tuple) else (name, k)), v
    else:
        yield name, value


def _check_callback_result(value: Any, name: str) -> TensorDictBase:
    if not isinstance(value, TensorDictBase):
        raise AttributionError(
            f"{name} function must return a TensorDict, got {type(value).__name__}. "
            f"Wrap the result: TensorDict(out=..., batch_size=td.batch_size)."
        )
    return value


class GradientAttribution(HookingContextFactory):
    """Base of every gradient method: attribute targets to inputs and latent activations.

    With the defaults, ``(attribution_key, in_key)`` is the gradient of the sum of all model
    outputs with respect to each model input. The targets, the seeds of the backward pass, the
    inputs and the latent activations attributed to are configurable; see the module docstring
    for the extension API.

    Args:
        use_inputs: Attribute to the model inputs (``hooked.in_keys``: a subset if ``prepare``
            got ``in_keys``).
        use_outputs: Use the model outputs (``hooked.out_keys``) as targets.
        input_modules: Module paths (relative to the model) whose outputs are also attributed
            to, under ``(attribution_key, path)``. Use it with ``use_inputs=False`` for integer
            inputs (attribute to the embedding output).
        target_modules: Module paths whose outputs are targets too (keyed by path).
        init_attr_targets: ``f(targets, additional) -> TensorDict`` choosing the targets from the
            outputs (batch ``B``, or ``(*B, n_points)`` for sampling methods; ``additional`` has
            the same batch).
        init_attr_inputs: ``f(inputs, additional) -> TensorDict`` returning the inputs to
            attribute to (a subset, possibly transformed); replaces ``use_inputs``' choice.
        init_attr_cache_in: ``f(activations, additional) -> TensorDict`` selecting the captured
            ``input_modules`` activations to attribute to.
        init_attr_grads: ``f(targets, additional) -> TensorDict`` giving the seeds of the
            backward pass (default: ones, i.e. the gradient of the sum of the targets). With
            ``separate_targets`` each seed has a leading ``K`` dimension.
        additional_init_keys: TensorDict keys passed to the callbacks as ``additional``.
        output_grad_callbacks: ``{module_path: cb}``; ``cb(module=, grad_output=, value=None,
            direction=)`` returns a replacement ``grad_output`` tuple (e.g. masking).
        attribution_key: Root key of the results.
        clean_intermediate_keys: ``False`` also writes the model outputs at
            ``("_mod_out", out_key)`` as tdhook 0.1 did (batch ``B``; ``(*B, n_points)`` for
            sampling methods such as IG). Other intermediates are never written.
        cache_callback: ``f(module=, args=, output=, key=, direction=)`` selecting the tensor of
            an ``input_modules`` output to attribute to (e.g. ``output[0]``).
        targets: Output indices (last dimension of every target) to attribute. ``None``: the
            whole targets. An ``int`` or a list of ints selects the same indices for every sample
            (summed); an integer tensor with one entry per sample (shape ``B``) selects one index
            per sample, like captum's ``target=`` tensor. Strings, floats and bools are refused.
        separate_targets: With ``targets``, compute one map per index in one forward pass and one
            batched backward pass; results have shape ``(*B, K, *feature)``.
        check_finite: Refuse attributed inputs (and baselines) holding NaN or Inf, whose
            attributions would be NaN. ``False`` skips the check.

    Raises:
        AttributionError: For invalid arguments (a ``ValueError``).
    """

    _needs_tensordict = True

    def __init__(
        self,
        use_inputs: bool = True,
        use_outputs: bool = True,
        input_modules: Sequence[str] | None = None,
        target_modules: Sequence[str] | None = None,
        init_attr_targets: AttrCallback | None = None,
        init_attr_inputs: AttrCallback | None = None,
        init_attr_cache_in: AttrCallback | None = None,
        init_attr_grads: AttrCallback | None = None,
        additional_init_keys: Sequence[NestedKey] | None = None,
        output_grad_callbacks: Mapping[str, Callable[..., Any]] | None = None,
        attribution_key: str = KEYS.attr,
        clean_intermediate_keys: bool = True,
        cache_callback: Callable[..., Any] | None = None,
        *,
        targets: TargetsArg = None,
        separate_targets: bool = False,
        check_finite: bool = True,
    ) -> None:
        self.use_inputs = bool(use_inputs)
        self.use_outputs = bool(use_outputs)
        self.input_modules = module_names(input_modules, "input_modules")
        self.target_modules = module_names(target_modules, "target_modules")
        for name, fn in (
            ("init_attr_targets", init_attr_targets),
            ("init_attr_inputs", init_attr_inputs),
            ("init_attr_cache_in", init_attr_cache_in),
            ("init_attr_grads", init_attr_grads),
        ):
            if fn is not None and not callable(fn):
                raise AttributionError(
                    f"{name} must be callable as f(td, additional) -> TensorDict, got {type(fn).__name__}."
                )
        self.init_attr_targets = init_attr_targets
        self.init_attr_inputs = init_attr_inputs
        self.init_attr_cache_in = init_attr_cache_in
        self.init_attr_grads = init_attr_grads
        self.additional_init_keys = list(additional_init_keys or [])
        self.output_grad_callbacks = dict(output_grad_callbacks or {})
        for cb in self.output_grad_callbacks.values():
            check_callback(cb, HookDirection.BWD_PRE, ("value", "direction"))
        self.attribution_key = attribution_key
        self.clean_intermediate_keys = clean_intermediate_keys
        self.cache_callback = cache_callback
        targets = parse_targets(targets, separate_targets)
        if separate_targets and (targets is None or isinstance(targets, int)) and init_attr_grads is None:
            raise AttributionError(
                f"separate_targets=True needs several targets (targets=[i, j, ...]) or an init_attr_grads "
                f"returning seeds with a leading K dimension; got targets={targets!r}."
            )
        self.targets = targets
        self.separate_targets = bool(separate_targets)
        self.check_finite = bool(check_finite)
        self._chunk_size: int | None = None
        #: At most this many rows (``N × points``) per forward pass (a memory budget), or None.
        self._max_rows: int | None = None
        self._state = _CallState()

    # -- extension points (see the module docstring) -------------------------------------------
    def _plan(self, hooked: HookedModule) -> list[Installable]:
        plan: list[Installable] = []
        for key in self.input_modules:
            plan.append(
                HookSpec(
                    hooked.resolve(key), _InputModuleHook(key, self._state, self.cache_callback), once=True
                )
            )
        for key in self.target_modules:
            plan.append(HookSpec(hooked.resolve(key), _TargetModuleHook(key, self._state), once=True))
        for key, cb in self.output_grad_callbacks.items():
            plan.append(
                HookSpec(
                    hooked.resolve(key), SettingHook(None, HookDirection.BWD_PRE, cb), HookDirection.BWD_PRE
                )
            )
        return plan

    def _enter(self, context: HookingContext) -> None:
        clash = [k for k in self.additional_init_keys if k in context.in_keys or k in context.out_keys]
        if clash:
            raise AttributionError(
                f"Additional init keys must not be in the in_keys or out_keys: {clash} "
                f"(in_keys={context.in_keys}, out_keys={context.out_keys}). Store them under other keys."
            )
        self._state.reset()

    def _exit(self, context: HookingContext) -> None:
        self._state.reset()

    def _grad_attr(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Turn gradients into attributions (per sub-key; shapes ``(*B[, K], *feature)``)."""
        return grads

    def _n_points(self, job: _Job) -> int:
        """Number of sample points per input (IG steps, noise samples). 1: the input itself."""
        return 1

    def _points(self, job: _Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        """Attributed inputs at points ``start:stop``, flat ``(N * (stop - start), ...)``, N-major."""
        return {k: job.model_inputs[k] for k in job.attributed}

    def _point_weights(self, job: _Job, start: int, stop: int) -> torch.Tensor | None:
        """Weights of points ``start:stop`` in the sum over points (``None``: plain sum)."""
        return None

    def _point_factors(self, job: _Job, start: int, stop: int) -> dict[str, torch.Tensor] | None:
        """Per-point factors multiplying the gradients before the sum (e.g. GradientShap's ``x − b``)."""
        return None

    def _module_transforms(
        self, job: _Job, start: int, stop: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Replacements of ``input_modules`` outputs at points ``start:stop`` (leaves needing grad)."""
        return {}

    def _prepare_job(self, hooked: HookedModule, job: _Job, call_next: Callable[..., Any]) -> None:
        """Per-call set-up (read baselines, draw noise...), before the gradient passes."""

    def _finish_job(
        self,
        hooked: HookedModule,
        job: _Job,
        call_next: Callable[..., Any],
        attrs: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
    ) -> None:
        """Per-call extras (e.g. IG's convergence delta), written into ``job.td``."""

    # -- the engine -----------------------------------------------------------------------------
    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        return self._attribute(hooked, td, call_next, kwargs)

    def _attribute(
        self,
        hooked: HookedModule,
        td: TensorDictBase,
        call_next: Callable[..., Any],
        kwargs: dict[str, Any],
        target_index: torch.Tensor | None = None,
    ) -> Any:
        """One attribution call; ``target_index`` (flat ``(N,)``) overrides per-sample targets."""
        job = self._make_job(hooked, td, target_index)
        self._prepare_job(hooked, job, call_next)
        grads, inputs, outputs = self._gradients(hooked, job, call_next, **kwargs)
        if job.attr_inputs is not None:
            inputs = job.attr_inputs
        elif not inputs:
            inputs = {_key_str(k): job.model_inputs[k] for k in job.attributed}
        if outputs is None:
            outputs = job.outputs
        if outputs is None:
            outputs = self._plain_outputs(hooked, job, call_next, **kwargs)
        batch = job.batch
        grads_b = {k: _unflat_k(v, batch, self.separate_targets) for k, v in grads.items()}
        inputs_b = {k: _unflat_k(v, batch, False) for k, v in inputs.items()}
        if self.separate_targets:  # broadcast against (*B, K, *feature)
            inputs_b = {k: v.unsqueeze(len(batch)) for k, v in inputs_b.items()}
        attrs = self._grad_attr(grads_b, inputs_b)
        for key in hooked.out_keys:
            td.set(key, outputs[key])
        if not self.clean_intermediate_keys:
            self._write_mod_out(hooked, job, outputs)
        for key, value in attrs.items():
            td.set((self.attribution_key, key), value)
        self._finish_job(hooked, job, call_next, attrs, inputs_b)
        return td

    def _write_mod_out(self, hooked: HookedModule, job: _Job, outputs: dict[NestedKey, Any]) -> None:
        """With ``clean_intermediate_keys=False``, also write the outputs at ``("_mod_out", k)`` (0.1).

        Single-pass methods write the outputs of the attribution pass (batch ``B``); sampling
        methods (IG, noise tunnels) the outputs of the sampled pass (batch ``(*B, n_points)``).
        """
        sampled = job.extras.get("sampled_outputs")
        nb = len(job.batch)
        for key in hooked.out_keys:
            value = outputs[key] if sampled is None else torch.cat(sampled[key], nb)
            job.td.set((KEYS.mod_out, *((key,) if isinstance(key, str) else key)), value)

    def _make_job(
        self, hooked: HookedModule, td: TensorDictBase, target_index: torch.Tensor | None = None
    ) -> _Job:
        if not isinstance(td, TensorDictBase):
            raise AttributionError(f"{type(self).__name__} needs a TensorDict, got {type(td).__name__}.")
        model_keys = list(hooked.td_module.in_keys)
        check_keys(td, model_keys)
        batch = td.batch_size
        nb = len(batch)
        n = batch.numel()
        model_inputs = {k: _flat(td.get(k), nb, n) for k in model_keys}
        additional = None
        if self.additional_init_keys:
            check_keys(td, self.additional_init_keys, what="additional_init_keys")
            additional = td.select(*self.additional_init_keys)
        if self.init_attr_inputs is not None:
            inputs_td = td.select(*model_keys)
            chosen = _check_callback_result(
                self.init_attr_inputs(inputs_td, _empty(additional, batch)), "init_attr_inputs"
            )
            attributed = list(chosen.keys(include_nested=True, leaves_only=True))
            for k in attributed:
                model_inputs[k] = _flat(chosen.get(k), nb, n)
        elif self.use_inputs:
            attributed = list(hooked.in_keys)
        else:
            attributed = []
        for k in attributed:
            value = model_inputs[k]
            if not torch.is_floating_point(value) and not torch.is_complex(value):
                raise IntegerInputError(
                    f"Cannot differentiate input {k!r} of dtype {value.dtype}: only floating point inputs "
                    f"have gradients. For token ids, attribute to the embedding output instead: "
                    f"{type(self).__name__}(input_modules=['embedding'], use_inputs=False) "
                    "(the path of your embedding module)."
                )
        if self.check_finite:
            for k in attributed:
                check_finite(model_inputs[k], f"input {k!r}")
        if target_index is None and isinstance(self.targets, torch.Tensor):
            check_per_sample_targets(self.targets, batch)
            target_index = self.targets.reshape(n)
        if not attributed and not self.input_modules:
            raise AttributionError(
                f"{type(self).__name__} has nothing to attribute to: use_inputs=False and no input_modules. "
                "Set use_inputs=True or pass input_modules=[...]."
            )
        if not self.use_outputs and not self.target_modules and self.init_attr_targets is None:
            raise AttributionError(
                "No targets: use_outputs=False and no target_modules. Set use_outputs=True or pass "
                "target_modules=[...]."
            )
        return _Job(td, batch, n, model_inputs, attributed, additional, target_index=target_index)

    def _gradients(
        self, hooked: HookedModule, job: _Job, call_next: Callable[..., Any], **kwargs: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[NestedKey, Any] | None]:
        n = job.n
        n_points = self._n_points(job)
        chunk = self._chunk_size or n_points
        if self._max_rows is not None:
            chunk = min(chunk, max(1, self._max_rows // max(n, 1)))
        state = self._state
        acc: dict[str, torch.Tensor] = {}
        inputs_at: dict[str, torch.Tensor] = {}
        outputs: dict[NestedKey, Any] | None = None
        separate = self.separate_targets
        for start in range(0, n_points, chunk):
            stop = min(n_points, start + chunk)
            c = stop - start
            points = self._points(job, start, stop)
            work = TensorDict(batch_size=[n * c], device=job.td.device)
            leaves: dict[NestedKey, torch.Tensor] = {}
            for key, value in job.model_inputs.items():
                if key in points:
                    leaf = points[key].detach().requires_grad_(True)
                    leaves[key] = leaf
                    work.set(key, leaf)
                elif c == 1:
                    work.set(key, value)
                else:
                    work.set(key, value.repeat_interleave(c, dim=0))
            state.inputs = {}
            state.targets = {}
            state.transforms = self._module_transforms(job, start, stop)
            state.active = True
            try:
                out = call_next(work, **kwargs)
            finally:
                state.active = False
                state.transforms = {}
            captured = state.inputs
            state.inputs = {}
            module_targets = state.targets
            state.targets = {}
            if n_points == 1:
                outputs = {k: _unflat(_detach(out.get(k)), job.batch) for k in hooked.out_keys}
            elif not self.clean_intermediate_keys:  # 0.1's ("_mod_out", k): batch (*B, n_points)
                sampled = job.extras.setdefault("sampled_outputs", {})
                for k in hooked.out_keys:
                    part = _unflat(_detach(out.get(k)), torch.Size((*job.batch, c)))
                    sampled.setdefault(k, []).append(part)
            diff_names: list[str] = [_key_str(k) for k in leaves]
            diff: list[torch.Tensor] = list(leaves.values())
            values = dict(zip(diff_names, (job.model_inputs[k] for k in leaves)))
            if self.init_attr_cache_in is not None and captured:
                sel = _check_callback_result(
                    self.init_attr_cache_in(
                        TensorDict(captured, batch_size=[n * c]), _empty(job.additional, [n * c])
                    ),
                    "init_attr_cache_in",
                )
                captured = {_key_str(k): v for k, v in sel.items(include_nested=True, leaves_only=True)}
            for key, value in captured.items():
                diff_names.append(key)
                diff.append(value)
                values[key] = value.detach()
            shape = torch.Size((*job.batch, c) if c > 1 else job.batch)
            t_list, s_list = self._targets_and_seeds(
                hooked,
                out,
                module_targets,
                shape,
                _expand_additional(job.additional, job.batch, c),
                index=job.target_index,
            )
            grads = torch.autograd.grad(
                t_list, diff, s_list, allow_unused=True, is_grads_batched=separate, materialize_grads=False
            )
            weights = self._point_weights(job, start, stop)
            factors = self._point_factors(job, start, stop)
            for name, grad in zip(diff_names, grads):
                if grad is None:
                    raise TargetError(
                        f"The targets do not depend on {name!r}: its gradient is undefined. Check "
                        "init_attr_targets / target_modules (a target computed from detached values or "
                        "from another input), or drop this input (init_attr_inputs / in_keys)."
                    )
                if factors is not None and name in factors:
                    grad = grad * factors[name]
                reduced = _reduce_points(grad, n, c, weights, separate)
                acc[name] = reduced if name not in acc else acc[name] + reduced
                if n_points == 1:
                    inputs_at[name] = values[name]
        return acc, inputs_at, outputs

    def _targets_and_seeds(
        self,
        hooked: HookedModule,
        out: TensorDictBase,
        module_targets: dict[str, torch.Tensor],
        shape: torch.Size,
        additional: TensorDictBase | None,
        *,
        check_grad: bool = True,
        index: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The targets and their backward seeds, in the callbacks' layout ``(*shape, *feature)``.

        ``shape`` is the batch the callbacks see (the caller's ``B``, or ``(*B, c)`` for ``c``
        points); ``out`` and ``module_targets`` hold flat rows (``prod(shape)`` first). Both
        ``init_attr_targets`` and ``init_attr_grads`` receive a TensorDict of batch ``shape`` whose
        leaves are ``[*shape, ...]``; the seeds must have the targets' keys and shapes.
        """
        entries: list[tuple[Any, torch.Tensor]] = []
        if self.use_outputs:
            for key in hooked.out_keys:
                entries.extend(_leaves(key, out.get(key)))
        for key in self.target_modules:
            if key not in module_targets:
                raise TargetError(
                    f"target module {key!r} did not run during the forward pass. Target a module on the "
                    "path from the inputs to the outputs."
                )
            entries.append((key, module_targets[key]))
        entries = [(key, value.reshape(torch.Size((*shape, *value.shape[1:])))) for key, value in entries]
        if self.init_attr_targets is not None:
            targets_td = (
                TensorDict(dict(entries), batch_size=shape) if entries else TensorDict(batch_size=shape)
            )
            targets_td = _check_callback_result(
                self.init_attr_targets(targets_td, _empty(additional, shape)), "init_attr_targets"
            )
            entries = list(targets_td.items(include_nested=True, leaves_only=True))
        for key, value in entries:
            if check_grad and value.grad_fn is None:
                raise TargetError(
                    f"Target {key!r} has no grad_fn: it does not depend on the attributed inputs. Attribute "
                    "to inputs the target is computed from, and do not detach or compute it under no_grad."
                )
        t_list = [v for _, v in entries]
        if self.init_attr_grads is None:
            return t_list, [self._default_seed(v, shape, index) for v in t_list]
        n_lead = len(shape)
        if not all(tuple(v.shape[:n_lead]) == tuple(shape) for v in t_list):
            # a target reduced over the batch by init_attr_targets: the largest common batch
            n_lead = 0
        t_td = TensorDict(dict(entries), batch_size=shape[:n_lead])
        seeds_td = _check_callback_result(
            self.init_attr_grads(t_td, _empty(additional, shape)), "init_attr_grads"
        )
        keys_t = {_key_str(k) for k, _ in entries}
        keys_s = {_key_str(k) for k in seeds_td.keys(include_nested=True, leaves_only=True)}
        if keys_t != keys_s:
            raise AttributionError(
                f"Targets and init_grads must have the same keys: targets {sorted(keys_t)}, "
                f"seeds {sorted(keys_s)}. Return one seed per target key (e.g. targets.apply(torch.ones_like))."
            )
        s_list = []
        for key, value in entries:
            seed = seeds_td.get(key)
            if not isinstance(seed, torch.Tensor):
                raise AttributionError(
                    f"init_grads returned a {type(seed).__name__} for {key!r}, expected a tensor of shape "
                    f"{tuple(value.shape)}."
                )
            lead = (seed.shape[0],) if self.separate_targets and seed.dim() > value.dim() else ()
            expected = lead + tuple(value.shape)
            if tuple(seed.shape) != expected:
                raise AttributionError(
                    f"init_grads should have the same batch size as targets: seed {key!r} has shape "
                    f"{tuple(seed.shape)}, expected {expected}"
                    + (
                        " (with a leading K dimension for separate_targets)."
                        if self.separate_targets
                        else " (the target's shape; e.g. torch.ones_like(target))."
                    )
                )
            if self.separate_targets and not lead:
                raise AttributionError(
                    f"init_grads should have the same batch size as targets: with separate_targets, seed "
                    f"{key!r} needs a leading K dimension, shape (K, {', '.join(map(str, value.shape))})."
                )
            s_list.append(seed.to(device=value.device, dtype=value.dtype))
        return t_list, s_list

    def _default_seed(
        self, target: torch.Tensor, batch: torch.Size, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Seed of one target ``(*batch, *feature)``: ones, or one-hot rows for ``targets``.

        ``index`` holds the per-sample target indices (flat ``(N,)``), if any.
        """
        if index is not None:
            return _per_sample_seed(target, index, batch)
        idx = self.targets
        if idx is None:
            return torch.ones_like(target)
        if isinstance(idx, torch.Tensor):  # no job index: flat, one per row of ``batch``
            return _per_sample_seed(target, idx.reshape(-1), batch)
        size = target.shape[-1] if target.dim() else 1
        indices = [idx] if isinstance(idx, int) else idx
        bad = [i for i in indices if not -size <= i < size]
        if bad or target.dim() == 0:
            raise TargetError(
                f"targets {bad or indices} out of range for a target of shape {tuple(target.shape)}: indices "
                f"select the last dimension (size {size})."
            )
        if not self.separate_targets:
            seed = torch.zeros_like(target)
            seed[..., indices] = 1
            return seed
        k = len(indices)
        eye = torch.eye(size, dtype=target.dtype, device=target.device)[indices]
        # a broadcast view, not a (K, *target) copy: one-hot rows expanded over the batch
        return eye.view(k, *([1] * (target.dim() - 1)), size).expand(k, *target.shape)

    def _plain_outputs(
        self, hooked: HookedModule, job: _Job, call_next: Callable[..., Any], **kwargs: Any
    ) -> dict[NestedKey, Any]:
        """Model outputs at the real inputs (one no-grad pass; used by sampling methods)."""
        work = TensorDict(batch_size=[job.n], device=job.td.device)
        for key, value in job.model_inputs.items():
            work.set(key, value)
        with torch.no_grad():
            out = call_next(work, **kwargs)
        return {k: _unflat(out.get(k), job.batch) for k in hooked.out_keys}


def _detach(value: Any) -> Any:
    return value.detach()


def _empty(additional: TensorDictBase | None, batch: Sequence[int]) -> TensorDictBase:
    return additional if additional is not None else TensorDict(batch_size=batch)


def _expand_additional(additional: TensorDictBase | None, batch: torch.Size, c: int) -> TensorDictBase | None:
    if additional is None or c == 1:
        return additional
    return additional.unsqueeze(len(batch)).expand(*batch, c)


def _reduce_points(
    grad: torch.Tensor, n: int, c: int, weights: torch.Tensor | None, separate: bool
) -> torch.Tensor:
    """Sum (weighted) over the ``c`` points of each of the ``n`` rows; keep a leading K if separate."""
    if c == 1 and weights is None:
        return grad
    lead = 1 if separate else 0
    g = grad.unflatten(lead, (n, c))
    if weights is None:
        return g.sum(lead + 1)
    w = weights.to(g.dtype).view(c, *([1] * (g.dim() - lead - 2)))
    return (g * w).sum(lead + 1)


def _unflat_k(value: torch.Tensor, batch: torch.Size, separate: bool) -> torch.Tensor:
    """``(N, ...)`` → ``(*B, ...)``; ``(K, N, ...)`` → ``(*B, K, ...)``."""
    if separate:
        value = value.movedim(0, 1)
    return value.reshape(torch.Size((*batch, *value.shape[1:])))


# ----------------------------------------------------------------------------------------------
# Saliency and InputXGradient
# ----------------------------------------------------------------------------------------------


def gradient_times_input(
    grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], *, absolute: bool, multiply: bool
) -> dict[str, torch.Tensor]:
    """``|grad|`` and/or ``grad × input``, per key (broadcasting over a ``K`` dimension)."""
    out = {}
    for key, grad in grads.items():
        value = grad.abs() if absolute else grad
        if multiply:
            value = value * inputs[key]
        out[key] = value
    return out


class Saliency(GradientAttribution):
    """The gradient of the targets with respect to the inputs (Simonyan et al., 2014).

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        absolute: Return ``|grad|`` (captum ``Saliency(abs=True)``; captum's default).
        multiply_by_inputs: Return ``grad × input`` (= :class:`InputXGradient`); for
            ``input_modules`` the input is the activation.
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Linear(3, 2)
        >>> with Saliency(targets=[1]).prepare(model) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(4, 3), batch_size=[4]))
        >>> td["attr", "input"].shape
        torch.Size([4, 3])
    """

    def __init__(
        self, *args: Any, absolute: bool = False, multiply_by_inputs: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.absolute = bool(absolute)
        self.multiply_by_inputs = bool(multiply_by_inputs)

    def _grad_attr(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return gradient_times_input(grads, inputs, absolute=self.absolute, multiply=self.multiply_by_inputs)


class InputXGradient(Saliency):
    """Gradient × input (captum ``InputXGradient``): :class:`Saliency` with ``multiply_by_inputs``.

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, multiply_by_inputs=True, **kwargs)

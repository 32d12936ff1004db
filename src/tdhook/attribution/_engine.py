"""The gradient engine of ``tdhook.attribution``: one engine, configured by values.

Every gradient method (Saliency, InputXGradient, IntegratedGradients, GradientShap,
GuidedBackpropagation, GradCAM, LRP...) is :class:`GradientAttribution` configured by three
values, given to :meth:`GradientAttribution._configure` by the method's constructor:

* a :class:`~tdhook.attribution.GradientOptions`: what every method shares (inputs and modules
  attributed, targets, callbacks, keys);
* a :class:`Sampler`: where the gradients are taken (the input itself; IG's path points;
  GradientShap's random baselines) and how they are weighted and summed over those points;
* a :class:`Combine`: how the summed gradients become attributions (as they are, ``|grad|``,
  ``grad × input``, Grad-CAM's pooling);

plus, for methods that edit the model while the context is active (LRP's rules and canonizers,
guided backpropagation's clamps), a function planning those edits.

One call runs, per chunk of sample points, ONE forward pass of the model over all points of the
chunk (batch ``N * c``) and ONE ``torch.autograd.grad`` (one batched vector-Jacobian product with
``is_grads_batched=True`` when ``separate_targets=True``), weights and sums the gradients over
the points and hands them to the :class:`Combine`.

Contract of every call: the caller's TensorDict is returned, holding its inputs, the model
outputs (at the real inputs, detached, batch ``B``) and ``(attribution_key, k)`` entries; no
intermediate key is ever written into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from typing_extensions import Unpack

from ..core import (
    HookDirection,
    HookedModule,
    HookingContext,
    HookingContextFactory,
    HookSpec,
    Installable,
    SettingHook,
    check_keys,
)
from ._capture import CallState, InputModuleHook, TargetModuleHook
from ._errors import KEYS, AttributionError, IntegerInputError, TargetError
from ._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional
from ._strategies import PLAIN, Combine, Job, PlanEdits, Run, Sampler, as_is
from ._targets import (
    check_callback_result,
    check_finite,
    check_per_sample_targets,
    empty_additional,
    key_str,
)

__all__ = ["GradientAttribution"]


class GradientAttribution(HookingContextFactory):
    """The gradient engine; on its own, the gradient of the targets (tdhook 0.1's base class).

    With the defaults, ``(attribution_key, in_key)`` is the gradient of the sum of all model
    outputs with respect to each model input. The shared settings (keywords, or ``options=``) are
    those of :class:`~tdhook.attribution.GradientOptions`; tdhook 0.1's positional order
    (``use_inputs, use_outputs, input_modules, ...``) is accepted too.

    Args:
        options: A ready :class:`~tdhook.attribution.GradientOptions` (the keyword settings
            update it).
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`.

    Raises:
        AttributionError: For invalid settings (a ``ValueError``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> with GradientAttribution(targets=[1]).prepare(torch.nn.Linear(3, 2)) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(4, 3), batch_size=[4]))
        >>> td["attr", "input"].shape
        torch.Size([4, 3])
    """

    _needs_tensordict = True

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self, *, options: GradientOptions | None = None, **settings: Unpack[GradientSettings]
    ) -> None:
        self._configure(GradientOptions.build(options, settings, type(self).__name__))

    def _configure(
        self,
        options: GradientOptions,
        sampler: Sampler = PLAIN,
        combine: Combine = as_is,
        *,
        edits_before: PlanEdits | None = None,
        edits_after: PlanEdits | None = None,
        seed_times_target: bool = False,
    ) -> None:
        """Set the engine's values (called once by each method's constructor).

        Args:
            options: The shared settings.
            sampler: Where gradients are taken and how they are summed.
            combine: How gradients become attributions.
            edits_before: Model edits planned before the engine's capture hooks (so targets and
                ``input_modules`` see their effect; LRP's rules).
            edits_after: Model edits planned after the capture hooks (guided backpropagation).
            seed_times_target: Multiply the default seeds by the targets' values (LRP's
                ``init_relevance="outputs"``).
        """
        self.options = options
        self.sampler = sampler
        self.combine = combine
        self.edits_before = edits_before
        self.edits_after = edits_after
        self.seed_times_target = seed_times_target
        self.state = CallState()

    @property
    def attribution_key(self) -> str:
        """Root key of the results (``options.attribution_key``)."""
        return self.options.attribution_key

    # -- lifecycle --------------------------------------------------------------------------------
    def _plan(self, hooked: HookedModule) -> list[Installable]:
        o = self.options
        plan: list[Installable] = [] if self.edits_before is None else list(self.edits_before(hooked))
        for key in o.input_modules or ():
            hook = InputModuleHook(key, self.state, o.cache_callback)
            plan.append(HookSpec(hooked.resolve(key), hook, once=True))
        for key in o.target_modules or ():
            plan.append(HookSpec(hooked.resolve(key), TargetModuleHook(key, self.state), once=True))
        for key, cb in (o.output_grad_callbacks or {}).items():
            hook_value = SettingHook(None, HookDirection.BWD_PRE, cb)
            plan.append(HookSpec(hooked.resolve(key), hook_value, HookDirection.BWD_PRE))
        if self.edits_after is not None:
            plan.extend(self.edits_after(hooked))
        return plan

    def _enter(self, context: HookingContext) -> None:
        keys = self.options.additional_init_keys or ()
        clash = [k for k in keys if k in context.in_keys or k in context.out_keys]
        if clash:
            raise AttributionError(
                f"Additional init keys must not be in the in_keys or out_keys: {clash} "
                f"(in_keys={context.in_keys}, out_keys={context.out_keys}). Store them under other keys."
            )
        self.state.reset()

    def _exit(self, context: HookingContext) -> None:
        self.state.reset()

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        return self.attribute(hooked, td, call_next, kwargs)

    # -- the engine -----------------------------------------------------------------------------
    def run(self, hooked: HookedModule, call_next: Callable[..., Any], kwargs: Mapping[str, Any]) -> Run:
        """The model as this call's sampler sees it."""
        return Run(
            self.options, self.state, hooked, call_next, kwargs, seed_times_target=self.seed_times_target
        )

    def attribute(
        self,
        hooked: HookedModule,
        td: TensorDictBase,
        call_next: Callable[..., Any],
        kwargs: Mapping[str, Any],
        target_index: torch.Tensor | None = None,
    ) -> TensorDictBase:
        """One attribution call (wrappers such as SmoothGrad call it on their own batches).

        ``target_index`` (flat ``(N,)``) overrides per-sample targets.
        """
        run = self.run(hooked, call_next, kwargs)
        job = self.make_job(hooked, td, target_index)
        self.sampler.prepare(run, job)
        grads, inputs, outputs = self.gradients(run, job)
        if job.attr_inputs is not None:
            inputs = job.attr_inputs
        elif not inputs:
            inputs = {key_str(k): job.model_inputs[k] for k in job.attributed}
        if outputs is None:
            outputs = job.outputs
        if outputs is None:
            outputs = self.plain_outputs(run, job)
        batch, separate = job.batch, self.options.separate_targets
        grads_b = {k: _unflat_k(v, batch, separate) for k, v in grads.items()}
        inputs_b = {k: _unflat_k(v, batch, False) for k, v in inputs.items()}
        if separate:  # broadcast against (*B, K, *feature)
            inputs_b = {k: v.unsqueeze(len(batch)) for k, v in inputs_b.items()}
        attrs = self.combine(grads_b, inputs_b)
        for key in hooked.out_keys:
            td.set(key, outputs[key])
        if not self.options.clean_intermediate_keys:
            self._write_mod_out(hooked, job, outputs)
        for key, value in attrs.items():
            td.set((self.options.attribution_key, key), value)
        self.sampler.finish(run, job, attrs)
        return td

    def _write_mod_out(self, hooked: HookedModule, job: Job, outputs: dict[NestedKey, Any]) -> None:
        """With ``clean_intermediate_keys=False``, also write the outputs at ``("_mod_out", k)`` (0.1).

        Single-pass methods write the outputs of the attribution pass (batch ``B``); sampling
        methods (IG, noise tunnels) the outputs of the sampled pass (batch ``(*B, n_points)``).
        """
        sampled = job.extras.get("sampled_outputs")
        nb = len(job.batch)
        for key in hooked.out_keys:
            value = outputs[key] if sampled is None else torch.cat(sampled[key], nb)
            job.td.set((KEYS.mod_out, *((key,) if isinstance(key, str) else key)), value)

    def make_job(
        self, hooked: HookedModule, td: TensorDictBase, target_index: torch.Tensor | None = None
    ) -> Job:
        """Validate one call's TensorDict (before the model runs) and lay its inputs out flat.

        Raises:
            AttributionError: For a TensorDict holding NaN/Inf inputs, nothing to attribute or no
                target (a ``ValueError``).
            IntegerInputError: For an attributed input that is not floating point.
            MissingKeyError: For a missing model input or additional key (a ``KeyError``).
        """
        o = self.options
        if not isinstance(td, TensorDictBase):
            raise AttributionError(
                f"{type(self).__name__} needs a TensorDict, got {type(td).__name__}. Wrap the input: "
                "TensorDict(input=x, batch_size=x.shape[:1])."
            )
        model_keys = list(hooked.td_module.in_keys)
        check_keys(td, model_keys)
        batch = td.batch_size
        nb, n = len(batch), batch.numel()
        model_inputs = {k: _flat(td.get(k), nb, n) for k in model_keys}
        additional = None
        if o.additional_init_keys:
            check_keys(td, list(o.additional_init_keys), what="additional_init_keys")
            additional = td.select(*o.additional_init_keys)
        if o.init_attr_inputs is not None:
            chosen = check_callback_result(
                o.init_attr_inputs(td.select(*model_keys), empty_additional(additional, batch)),
                "init_attr_inputs",
            )
            attributed = list(chosen.keys(include_nested=True, leaves_only=True))
            for k in attributed:
                model_inputs[k] = _flat(chosen.get(k), nb, n)
        else:
            attributed = list(hooked.in_keys) if o.use_inputs else []
        for k in attributed:
            value = model_inputs[k]
            if not torch.is_floating_point(value) and not torch.is_complex(value):
                raise IntegerInputError(
                    f"Cannot differentiate input {k!r} of dtype {value.dtype}: only floating point inputs "
                    f"have gradients. For token ids, attribute to the embedding output instead: "
                    f"{type(self).__name__}(input_modules=['embedding'], use_inputs=False) "
                    "(the path of your embedding module)."
                )
        if o.check_finite:  # every floating input: a NaN anywhere makes the attributions NaN
            for k, value in model_inputs.items():
                check_finite(value, f"input {k!r}")
        if target_index is None and isinstance(o.targets, torch.Tensor):
            check_per_sample_targets(o.targets, batch)
            target_index = o.targets.reshape(n)
        if not attributed and not o.input_modules:
            raise AttributionError(
                f"{type(self).__name__} has nothing to attribute to: use_inputs=False and no input_modules. "
                "Set use_inputs=True or pass input_modules=[...]."
            )
        if not o.use_outputs and not o.target_modules and o.init_attr_targets is None:
            raise AttributionError(
                "No targets: use_outputs=False and no target_modules. Set use_outputs=True or pass "
                "target_modules=[...]."
            )
        return Job(td, batch, n, model_inputs, attributed, additional, target_index=target_index)

    def gradients(
        self, run: Run, job: Job
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[NestedKey, Any] | None]:
        """The gradients summed over the sampler's points (flat), the inputs at the single point
        (empty for several points), and the model outputs (batch ``B``) when one pass gave them."""
        o, sampler, state = self.options, self.sampler, self.state
        n, n_points = job.n, sampler.n_points(job)
        chunk = sampler.chunk_size or n_points
        if sampler.max_rows is not None:
            chunk = min(chunk, max(1, sampler.max_rows // max(n, 1)))
        acc: dict[str, torch.Tensor] = {}
        inputs_at: dict[str, torch.Tensor] = {}
        outputs: dict[NestedKey, Any] | None = None
        separate = o.separate_targets
        out_keys = run.hooked.out_keys
        for start in range(0, n_points, chunk):
            stop = min(n_points, start + chunk)
            c = stop - start
            points = sampler.points(job, start, stop)
            work = TensorDict(batch_size=[n * c], device=job.td.device)
            leaves: dict[NestedKey, torch.Tensor] = {}
            for key, value in job.model_inputs.items():
                if key in points:
                    leaf = points[key].detach().requires_grad_(True)
                    leaves[key] = leaf
                    work.set(key, leaf)
                else:
                    work.set(key, value if c == 1 else value.repeat_interleave(c, dim=0))
            state.inputs, state.targets = {}, {}
            state.transforms = sampler.module_transforms(job, start, stop)
            state.active = True
            try:
                out = run(work)
            finally:
                state.active = False
                state.transforms = {}
            captured, state.inputs = state.inputs, {}
            module_targets, state.targets = state.targets, {}
            if n_points == 1:
                outputs = {k: _unflat(out.get(k).detach(), job.batch) for k in out_keys}
            elif not o.clean_intermediate_keys:  # 0.1's ("_mod_out", k): batch (*B, n_points)
                sampled = job.extras.setdefault("sampled_outputs", {})
                for k in out_keys:
                    part = _unflat(out.get(k).detach(), torch.Size((*job.batch, c)))
                    sampled.setdefault(k, []).append(part)
            names = [key_str(k) for k in leaves]
            diff = list(leaves.values())
            values = dict(zip(names, (job.model_inputs[k] for k in leaves)))
            if o.init_attr_cache_in is not None and captured:
                sel = check_callback_result(
                    o.init_attr_cache_in(
                        TensorDict(captured, batch_size=[n * c]), empty_additional(job.additional, [n * c])
                    ),
                    "init_attr_cache_in",
                )
                captured = {key_str(k): v for k, v in sel.items(include_nested=True, leaves_only=True)}
            for key, value in captured.items():
                names.append(key)
                diff.append(value)
                values[key] = value.detach()
            shape = torch.Size((*job.batch, c) if c > 1 else job.batch)
            additional = _expand_additional(job.additional, job.batch, c)
            t_list, s_list = run.targets_and_seeds(
                out, module_targets, shape, additional, index=job.target_index
            )
            grads = torch.autograd.grad(
                t_list, diff, s_list, allow_unused=True, is_grads_batched=separate, materialize_grads=False
            )
            weights = sampler.weights(job, start, stop)
            factors = sampler.factors(job, start, stop)
            for name, grad in zip(names, grads):
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

    def plain_outputs(self, run: Run, job: Job) -> dict[NestedKey, Any]:
        """Model outputs at the real inputs (one no-grad pass; used by sampling methods)."""
        work = TensorDict(batch_size=[job.n], device=job.td.device)
        for key, value in job.model_inputs.items():
            work.set(key, value)
        out = run(work, grad=False)
        return {k: _unflat(out.get(k), job.batch) for k in run.hooked.out_keys}


def _flat(value: torch.Tensor, n_batch_dims: int, n: int) -> torch.Tensor:
    return value.reshape(n, *value.shape[n_batch_dims:])


def _unflat(value: Any, batch: torch.Size) -> Any:
    if isinstance(value, TensorDictBase):
        return value.reshape(batch)
    return value.reshape(torch.Size((*batch, *value.shape[1:])))


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

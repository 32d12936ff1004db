"""Path methods: integrated gradients along baseline → input (``tdhook.attribution``).

:func:`read_baselines` reads ``(baseline_key, k)`` for every attributed input and checks it;
:class:`PathSampler` places IG's points on the straight path from the baseline to the input with
a Riemann or Gauss-Legendre rule (:mod:`._quadrature`) and weights their gradients. All steps of
a chunk go through the model in one forward pass and one backward pass; ``chunk_size`` bounds
the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from typing_extensions import Unpack

from ..core import check_keys
from ._engine import GradientAttribution
from ._errors import KEYS, AttributionError, BaselineError
from ._gradient import GradTimesInput
from ._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional, positive_int
from ._quadrature import IntegrationMethod, approximation_parameters
from ._strategies import Job, Run, Sampler, as_is
from ._targets import check_finite, key_str

__all__ = ["GradientAttributionWithBaseline", "IntegratedGradients", "PathSampler", "read_baselines"]


def _shape_fits(baseline: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(baseline, target) == target
    except RuntimeError:
        return False


def baseline_key(root: str, key: NestedKey) -> tuple[str, ...]:
    """``(root, *key)``: where the baseline of input ``key`` is read."""
    return (root, *((key,) if isinstance(key, str) else key))


def read_baselines(job: Job, root: str, *, finite: bool) -> dict[NestedKey, torch.Tensor]:
    """Baselines of the attributed inputs, flat ``(N, *feature)`` (broadcast).

    A baseline may have the input's shape or any shape that broadcasts to it (e.g. a scalar or
    one value per feature, without batch dimensions).

    Raises:
        MissingKeyError: For a missing baseline (a ``KeyError``), with the fix.
        BaselineError: For a baseline of the wrong shape or device, or holding NaN/Inf.
    """
    td = job.td
    keys = [baseline_key(root, k) for k in job.attributed]
    present = td.keys(include_nested=True)
    missing = [k for k in keys if k not in present]
    if missing:
        check_keys(
            td, keys, what=f"baseline (e.g. td[{missing[0]!r}] = torch.zeros_like(td[{missing[0][1:]!r}]));"
        )
    nb = len(job.batch)
    out = {}
    for key, bkey in zip(job.attributed, keys):
        x = job.model_inputs[key]
        full = (*job.batch, *x.shape[1:])
        b = td.get(bkey)
        if not isinstance(b, torch.Tensor):
            b = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        if b.device != x.device:
            raise BaselineError(
                f"Baseline {bkey!r} is on {b.device} but input {key!r} is on {x.device}. "
                f"Move it: td[{bkey!r}] = td[{bkey!r}].to({str(x.device)!r})."
            )
        if not _shape_fits(b.shape, torch.Size(full)):
            raise BaselineError(
                f"Baseline {bkey!r} has shape {tuple(b.shape)}, which does not broadcast to the shape "
                f"{tuple(full)} of input {key!r}. Give it the input's shape (e.g. torch.zeros_like)."
            )
        if not torch.is_floating_point(b):
            b = b.to(x.dtype)
        b = b.expand(full).reshape(job.n, *x.shape[1:]) if b.dim() >= nb else b.expand(x.shape)
        if finite:
            check_finite(b, f"baseline {bkey!r}")
        out[key] = b.to(x.dtype)
    return out


@dataclass(frozen=True)
class _BaselineDiff(Sampler):
    """Sampler of :class:`GradientAttributionWithBaseline`: the input itself, ``x − b`` as input."""

    root: str

    def prepare(self, run: Run, job: Job) -> None:
        baselines = read_baselines(job, self.root, finite=run.options.check_finite)
        job.attr_inputs = {key_str(k): job.model_inputs[k] - b for k, b in baselines.items()}


class GradientAttributionWithBaseline(GradientAttribution):
    """The gradient, with a baseline per attributed input read at ``(baseline_key, k)``.

    With ``multiply_by_inputs`` the gradient is multiplied by ``input − baseline`` (the "global"
    variant); otherwise the baseline is not read and this is the plain gradient.

    Args:
        baseline_key: Root key of the baselines.
        multiply_by_inputs: Multiply the result by ``input − baseline``.
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`.

    Raises:
        BaselineError: At call time, for a baseline of the wrong shape, dtype or device.
        MissingKeyError: At call time, for a missing baseline (a ``KeyError``).
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self,
        *,
        baseline_key: str = KEYS.baseline,
        multiply_by_inputs: bool = False,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        self.baseline_key = baseline_key
        self.multiply_by_inputs = bool(multiply_by_inputs)
        resolved = GradientOptions.build(options, settings, type(self).__name__)
        if self.multiply_by_inputs:
            self._configure(resolved, _BaselineDiff(baseline_key), GradTimesInput(multiply=True))
        else:
            self._configure(resolved, combine=as_is)


@dataclass(frozen=True)
class PathSampler(Sampler):
    """IG's points: ``b + α_i (x − b)``, weighted by the rule's step sizes.

    With ``use_inputs=False`` and ``input_modules`` (layer mode), the path runs in activation
    space: each module output is interpolated between its value on the baseline inputs (or
    ``(baseline_key, module)`` if present) and on the inputs.
    """

    alphas: torch.Tensor
    step_sizes: torch.Tensor
    baseline_key: str
    compute_convergence_delta: bool
    chunk_size: int | None = None
    max_rows: int | None = None

    def n_points(self, job: Job) -> int:
        return int(self.alphas.shape[0])

    def prepare(self, run: Run, job: Job) -> None:
        o = run.options
        modules = tuple(o.input_modules or ())
        x = job.model_inputs
        baselines = read_baselines(job, self.baseline_key, finite=o.check_finite)
        first = next(iter(x.values()))
        job.extras["alphas"] = self.alphas.to(dtype=torch.float32, device=first.device)
        job.extras["baselines"] = baselines
        job.extras["diffs"] = {k: x[k] - baselines[k] for k in job.attributed}
        layer_mode = not job.attributed and bool(modules)
        attr_inputs = {key_str(k): v for k, v in job.extras["diffs"].items()}
        job.attr_inputs = attr_inputs
        if not modules and not self.compute_convergence_delta:
            return
        # One no-grad pass over [x; baseline] (2N rows): outputs at x, F(x) and F(b) for the delta,
        # and the activations of input_modules at both ends of the path.
        work = TensorDict(batch_size=[2 * job.n])
        present = job.td.keys(include_nested=True)
        if layer_mode and not all((self.baseline_key, m) in present for m in modules):
            check_keys(
                job.td,
                [baseline_key(self.baseline_key, k) for k in x],
                what=f"baseline (or activation baselines {[(self.baseline_key, m) for m in modules]})",
            )
        for key, value in x.items():
            base = baselines.get(key)
            if base is None:
                bkey = baseline_key(self.baseline_key, key)
                base = job.td.get(bkey).reshape(value.shape) if layer_mode and bkey in present else value
            work.set(key, torch.cat([value, base.to(value.dtype)]))
        out, record, module_targets = run.record(work)
        job.outputs = {k: _halves(out.get(k), job.batch)[0] for k in run.hooked.out_keys}
        module_ends = {}
        for key in modules:
            act = record[key]
            act_x, act_b = act[: job.n], act[job.n :]
            bkey = (self.baseline_key, key)
            if bkey in present:
                act_b = job.td.get(bkey).reshape(act_x.shape).to(act_x)
            module_ends[key] = (act_x, act_b)
            attr_inputs[key] = act_x - act_b
        job.extras["module_ends"] = module_ends
        job.extras["layer_mode"] = layer_mode
        if self.compute_convergence_delta:
            # F(x) and F(b): the callbacks see the caller's batch B for each end (not (2, *B)).
            ends = []
            for half in (slice(0, job.n), slice(job.n, 2 * job.n)):
                t_list, s_list = run.targets_and_seeds(
                    out[half],
                    {k: v[half] for k, v in module_targets.items()},
                    job.batch,
                    job.additional,
                    check_grad=False,
                    index=job.target_index,
                )
                ends.append(_seeded_sum(t_list, s_list, job.batch, o.separate_targets))
            job.extras["f_ends"] = ends

    def points(self, job: Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        alphas = job.extras["alphas"][start:stop]
        c = stop - start
        out = {}
        for key in job.attributed:
            b = job.extras["baselines"][key]
            d = job.extras["diffs"][key]
            a = alphas.view(1, c, *([1] * (d.dim() - 1))).to(d.dtype)
            out[key] = torch.addcmul(b.unsqueeze(1), a, d.unsqueeze(1)).reshape(job.n * c, *d.shape[1:])
        return out

    def weights(self, job: Job, start: int, stop: int) -> torch.Tensor | None:
        return self.step_sizes[start:stop]

    def module_transforms(
        self, job: Job, start: int, stop: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if not job.extras.get("layer_mode"):
            return {}
        alphas = job.extras["alphas"][start:stop]
        return {
            key: _Interpolated(act_b, act_x - act_b, alphas)
            for key, (act_x, act_b) in job.extras["module_ends"].items()
        }

    def finish(self, run: Run, job: Job, attrs: dict[str, torch.Tensor]) -> None:
        if not self.compute_convergence_delta:
            return
        separate = run.options.separate_targets
        lead = len(job.batch) + (1 if separate else 0)
        total = torch.stack([_feature_sum(a, lead) for a in attrs.values()]).sum(0)
        f_x, f_b = job.extras["f_ends"]  # ([K,] N) each
        diff = f_x - f_b
        if separate:
            diff = diff.movedim(0, 1)
        diff = diff.reshape(torch.Size((*job.batch, *diff.shape[1:])))
        job.td.set(KEYS.convergence_delta, (total - diff.to(total.dtype)).detach())


class IntegratedGradients(GradientAttribution):
    """Integrated gradients (Sundararajan et al., 2017) along the straight path baseline → input.

    ``(attr, k) = Σ_i w_i ∂F/∂x(b + α_i (x − b))`` (times ``x − b`` with ``multiply_by_inputs``),
    with the steps ``α_i`` and weights ``w_i`` of ``method`` (captum's values). ``chunk_size``
    steps go through the model at once (default: all), so peak memory is bounded by the chunk.

    With ``use_inputs=False`` and ``input_modules``, the path runs in activation space (captum's
    ``LayerIntegratedGradients``): each module output is interpolated between its value on the
    baseline inputs (or ``(baseline_key, module)`` if present) and on the inputs. This is how to
    attribute token ids (through the embedding module).

    An empty batch (0 samples) gives empty attributions (and an empty ``"convergence_delta"``).

    Args:
        compute_convergence_delta: Write ``"convergence_delta"`` (batch ``B``, ``(*B, K)`` with
            ``separate_targets``): ``Σ attr − (F(x) − F(b))``, where ``F`` is the seeded target.
        baseline_key: Root key of the baselines.
        multiply_by_inputs: Multiply by ``x − b`` (captum's default is True; tdhook 0.1's False).
        method: One of :data:`SUPPORTED_METHODS`.
        n_steps: Number of steps (≥ 2 for Riemann rules, ≥ 1 for Gauss-Legendre).
        chunk_size: Steps per forward/backward pass (``None``: all at once).
        max_batch_size: A memory budget: at most this many rows (batch × steps) per forward
            pass; the chunk shrinks to fit.
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`; also
            accepted in tdhook 0.1's positional order.

    Raises:
        AttributionError: For an unknown method, too few steps or a bad chunk size
            (``ValueError``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> td = TensorDict(input=torch.randn(5, 3), batch_size=[5])
        >>> td["baseline", "input"] = torch.zeros(5, 3)
        >>> ig = IntegratedGradients(targets=[1], multiply_by_inputs=True, compute_convergence_delta=True)
        >>> with ig.prepare(model) as hooked:
        ...     td = hooked(td)
        >>> bool(td["convergence_delta"].abs().max() < 1e-2)
        True
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self,
        *,
        compute_convergence_delta: bool = False,
        baseline_key: str = KEYS.baseline,
        multiply_by_inputs: bool = False,
        method: str = "gausslegendre",
        n_steps: int = 50,
        chunk_size: int | None = None,
        max_batch_size: int | None = None,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        self.method = IntegrationMethod.parse(method)
        if not isinstance(n_steps, int) or isinstance(n_steps, bool):
            raise AttributionError(f"n_steps must be an int, got {type(n_steps).__name__}. E.g. n_steps=50.")
        minimum = 1 if self.method is IntegrationMethod.GAUSS_LEGENDRE else 2
        if n_steps < minimum:
            raise AttributionError(
                f"n_steps={n_steps} is too few for method {self.method.value!r}: at least {minimum} "
                "steps are needed. Use n_steps=50 (the default)."
            )
        self.n_steps = n_steps
        self.compute_convergence_delta = bool(compute_convergence_delta)
        self.baseline_key = baseline_key
        self.multiply_by_inputs = bool(multiply_by_inputs)
        step_fn, alpha_fn = approximation_parameters(self.method)
        sampler = PathSampler(
            alphas=torch.tensor(alpha_fn(n_steps), dtype=torch.float64),
            step_sizes=torch.tensor(step_fn(n_steps), dtype=torch.float64),
            baseline_key=baseline_key,
            compute_convergence_delta=self.compute_convergence_delta,
            chunk_size=positive_int(chunk_size, "chunk_size", optional=True),
            max_rows=positive_int(max_batch_size, "max_batch_size", optional=True, example=1024),
        )
        resolved = GradientOptions.build(options, settings, type(self).__name__)
        self._configure(resolved, sampler, GradTimesInput(multiply=self.multiply_by_inputs))

    @staticmethod
    def init_attr_targets_with_labels(
        outputs: TensorDictBase,
        additional: TensorDictBase,
        selected_out_keys: list[NestedKey],
        label_key: str = "label",
    ) -> TensorDictBase:
        """Pick, for each selected output, the logit of the class in ``additional[label_key][out_key]``.

        Works for any batch of ``outputs`` (``B``, ``(*B, n_steps)``...): the labels are broadcast.

        Raises:
            AttributionError: If the labels do not broadcast to the targets' batch.
        """
        result = TensorDict(batch_size=outputs.batch_size)
        for key in selected_out_keys:
            target = outputs.get(key)
            labels = additional.get((label_key, *((key,) if isinstance(key, str) else key)))
            batch = outputs.batch_size
            while labels.dim() < len(batch):
                labels = labels.unsqueeze(-1)
            try:
                labels = labels.expand(batch)
            except RuntimeError:
                raise AttributionError(
                    f"One-hot labels shape {tuple(labels.shape)} does not match target shape "
                    f"{tuple(target.shape)}: labels need the batch shape {tuple(batch)}: store one class index per sample at "
                    f"additional[{label_key!r}][{key!r}]."
                ) from None
            result.set(key, target.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1))
        return result


def _halves(value: Any, batch: torch.Size) -> tuple[Any, Any]:
    n = value.shape[0] // 2
    first, second = value[:n], value[n:]
    if isinstance(value, TensorDictBase):
        return first.reshape(batch), second.reshape(batch)
    shape = torch.Size((*batch, *value.shape[1:]))
    return first.reshape(shape), second.reshape(shape)


def _seeded_sum(
    t_list: list[torch.Tensor], s_list: list[torch.Tensor], batch: torch.Size, separate: bool
) -> torch.Tensor:
    """``Σ seed ⊙ target`` per row (``(K, N)`` with separate targets); also for an empty batch."""
    rows = batch.numel()
    total = torch.zeros(())
    for t, s in zip(t_list, s_list):
        prod = s * t
        if rows == 0:  # nothing to sum: one empty value per (absent) row
            part = prod.new_zeros((prod.shape[0], 0) if separate else (0,))
        else:
            part = (prod.reshape(prod.shape[0], rows, -1) if separate else prod.reshape(rows, -1)).sum(-1)
        total = total.to(part) + part
    return total


def _feature_sum(value: torch.Tensor, lead: int) -> torch.Tensor:
    """Sum over every dimension after the first ``lead`` (none: the value itself)."""
    return value.sum(dim=list(range(lead, value.dim()))) if value.dim() > lead else value


class _Interpolated:
    """Replace a module output by ``b + α (x − b)`` for the chunk's steps (a leaf needing grad)."""

    __slots__ = ("alphas", "base", "diff")

    def __init__(self, base: torch.Tensor, diff: torch.Tensor, alphas: torch.Tensor) -> None:
        self.base = base
        self.diff = diff
        self.alphas = alphas

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        n, c = self.base.shape[0], self.alphas.shape[0]
        if output.shape[0] != n * c or output.shape[1:] != self.base.shape[1:]:
            raise AttributionError(
                f"input module output has shape {tuple(output.shape)} during the path pass, expected "
                f"{(n * c, *self.base.shape[1:])}: the module must run once per sample."
            )
        a = self.alphas.view(1, c, *([1] * (self.base.dim() - 1))).to(self.base.dtype)
        value = torch.addcmul(self.base.unsqueeze(1), a, self.diff.unsqueeze(1))
        return value.reshape(output.shape).requires_grad_(True)

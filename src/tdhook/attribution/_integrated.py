"""Path methods: integrated gradients and its quadrature rules (``tdhook.attribution``).

:class:`GradientAttributionWithBaseline` reads ``(baseline_key, k)`` for every attributed input
and checks it; :class:`IntegratedGradients` integrates the gradient along the straight path from
the baseline to the input with a Riemann or Gauss-Legendre rule. All steps of a chunk go through
the model in one forward pass and one backward pass; ``chunk_size`` bounds the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from .._core.hooked import HookedModule
from .._core.keys import check_keys
from ._errors import KEYS, AttributionError, BaselineError
from ._gradient import GradientAttribution, _Job, _key_str, check_finite, gradient_times_input

__all__ = [
    "SUPPORTED_METHODS",
    "SUPPORTED_RIEMANN_METHODS",
    "GradientAttributionWithBaseline",
    "IntegratedGradients",
    "IntegrationMethod",
    "Riemann",
    "approximation_parameters",
    "gauss_legendre_builders",
    "riemann_builders",
]


class Riemann(Enum):
    """Riemann sum variants (captum's ``Riemann``)."""

    left = 1
    right = 2
    middle = 3
    trapezoid = 4


class IntegrationMethod(str, Enum):
    """The quadrature rules of :class:`IntegratedGradients` (the reference's strings)."""

    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"
    RIEMANN_TRAPEZOID = "riemann_trapezoid"
    GAUSS_LEGENDRE = "gausslegendre"

    @classmethod
    def parse(cls, value: str | IntegrationMethod) -> IntegrationMethod:
        """Convert a method name to a member.

        Raises:
            AttributionError: For an unknown name (a ``ValueError``), listing the valid ones.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise AttributionError(
                f"Invalid integral approximation method name: {value!r}. Expected one of "
                f"{[m.value for m in cls]}."
            ) from None


SUPPORTED_RIEMANN_METHODS = [m.value for m in IntegrationMethod if m.value.startswith("riemann")]
SUPPORTED_METHODS = [m.value for m in IntegrationMethod]
_RIEMANN = {
    IntegrationMethod.RIEMANN_LEFT: Riemann.left,
    IntegrationMethod.RIEMANN_RIGHT: Riemann.right,
    IntegrationMethod.RIEMANN_MIDDLE: Riemann.middle,
    IntegrationMethod.RIEMANN_TRAPEZOID: Riemann.trapezoid,
}

StepFn = Callable[[int], list[float]]


def _riemann_step_sizes(method: Riemann, n: int) -> list[float]:
    if n < 2:
        raise AttributionError(f"Riemann rules need n_steps >= 2, got {n}. Use more steps.")
    if method is Riemann.trapezoid:
        # captum's weights (they sum to (n - 1) / n; kept for value compatibility)
        return [1 / (2 * n)] + [1 / n] * (n - 2) + [1 / (2 * n)]
    return [1 / n] * n


def _riemann_alphas(method: Riemann, n: int) -> list[float]:
    if n < 2:
        raise AttributionError(f"Riemann rules need n_steps >= 2, got {n}. Use more steps.")
    if method is Riemann.left:
        return torch.linspace(0, 1 - 1 / n, n).tolist()
    if method is Riemann.right:
        return torch.linspace(1 / n, 1, n).tolist()
    if method is Riemann.middle:
        return torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    if method is Riemann.trapezoid:
        return torch.linspace(0, 1, n).tolist()
    raise AttributionError(f"Unknown Riemann method {method!r}; expected one of {list(Riemann)}.")


def riemann_builders(method: Riemann = Riemann.trapezoid) -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` of a Riemann rule (captum's values)."""

    def step_sizes(n: int) -> list[float]:
        return _riemann_step_sizes(method, n)

    def alphas(n: int) -> list[float]:
        return _riemann_alphas(method, n)

    return step_sizes, alphas


def _gl_step_sizes(n: int) -> list[float]:
    if n < 1:
        raise AttributionError(f"Gauss-Legendre needs n_steps >= 1, got {n}.")
    return (0.5 * np.polynomial.legendre.leggauss(n)[1]).tolist()


def _gl_alphas(n: int) -> list[float]:
    if n < 1:
        raise AttributionError(f"Gauss-Legendre needs n_steps >= 1, got {n}.")
    return (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0])).tolist()


def gauss_legendre_builders() -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` of Gauss-Legendre quadrature on ``[0, 1]``."""
    return _gl_step_sizes, _gl_alphas


def approximation_parameters(method: str | IntegrationMethod) -> tuple[StepFn, StepFn]:
    """Return ``(step_sizes(n), alphas(n))`` for a method name (same values as captum).

    Raises:
        AttributionError: For an unknown method (a ``ValueError``).
    """
    parsed = IntegrationMethod.parse(method)
    if parsed is IntegrationMethod.GAUSS_LEGENDRE:
        return gauss_legendre_builders()
    return riemann_builders(_RIEMANN[parsed])


def _shape_fits(baseline: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(baseline, target) == target
    except RuntimeError:
        return False


class GradientAttributionWithBaseline(GradientAttribution):
    """A gradient method with a baseline per attributed input, read at ``(baseline_key, k)``.

    A baseline may have the input's shape or any shape that broadcasts to it (e.g. a scalar or one
    value per feature, without batch dimensions).

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        baseline_key: Root key of the baselines.
        multiply_by_inputs: Multiply the result by ``input - baseline`` (the "global" variant).
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.

    Raises:
        BaselineError: At call time, for a baseline of the wrong shape, dtype or device.
        MissingKeyError: At call time, for a missing baseline (a ``KeyError``).
    """

    def __init__(
        self, *args: Any, baseline_key: str = KEYS.baseline, multiply_by_inputs: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.baseline_key = baseline_key
        self.multiply_by_inputs = bool(multiply_by_inputs)

    def _baseline_key(self, key: NestedKey) -> tuple[str, ...]:
        return (self.baseline_key, *((key,) if isinstance(key, str) else key))

    def _read_baselines(self, job: _Job) -> dict[NestedKey, torch.Tensor]:
        """Baselines of the attributed inputs, flat ``(N, *feature)`` (broadcast)."""
        td = job.td
        keys = [self._baseline_key(k) for k in job.attributed]
        if keys and not all(k in td.keys(include_nested=True) for k in keys):
            missing = [k for k in keys if k not in td.keys(include_nested=True)]
            check_keys(
                td,
                keys,
                what=f"baseline (e.g. td[{missing[0]!r}] = torch.zeros_like(td[{missing[0][1:]!r}]));",
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
            if self.check_finite:
                check_finite(b, f"baseline {bkey!r}")
            out[key] = b.to(x.dtype)
        return out


class IntegratedGradients(GradientAttributionWithBaseline):
    """Integrated gradients (Sundararajan et al., 2017) along the straight path baseline → input.

    ``(attr, k) = Σ_i w_i ∂F/∂x(b + α_i (x − b))`` (times ``x − b`` with ``multiply_by_inputs``),
    with the steps ``α_i`` and weights ``w_i`` of ``method`` (captum's values). ``chunk_size``
    steps go through the model at once (default: all), so peak memory is bounded by the chunk.

    With ``use_inputs=False`` and ``input_modules``, the path runs in activation space (captum's
    ``LayerIntegratedGradients``): each module output is interpolated between its value on the
    baseline inputs (or ``(baseline_key, module)`` if present) and on the inputs. This is how to
    attribute token ids (through the embedding module).

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        compute_convergence_delta: Write ``"convergence_delta"`` (batch ``B``, ``(*B, K)`` with
            ``separate_targets``): ``Σ attr − (F(x) − F(b))``, where ``F`` is the seeded target.
        baseline_key: Root key of the baselines.
        multiply_by_inputs: Multiply by ``x − b`` (captum's default is True; tdhook 0.1's False).
        method: One of :data:`SUPPORTED_METHODS`.
        n_steps: Number of steps (≥ 2 for Riemann rules, ≥ 1 for Gauss-Legendre).
        chunk_size: Steps per forward/backward pass (``None``: all at once).
        max_batch_size: A memory budget: at most this many rows (batch × steps) per forward
            pass; the chunk shrinks to fit.
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.

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

    def __init__(
        self,
        *args: Any,
        compute_convergence_delta: bool = False,
        baseline_key: str = KEYS.baseline,
        multiply_by_inputs: bool = False,
        method: str = "gausslegendre",
        n_steps: int = 50,
        chunk_size: int | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, baseline_key=baseline_key, multiply_by_inputs=multiply_by_inputs, **kwargs)
        self.method = IntegrationMethod.parse(method)
        if not isinstance(n_steps, int) or isinstance(n_steps, bool):
            raise AttributionError(f"n_steps must be an int, got {type(n_steps).__name__}.")
        minimum = 1 if self.method is IntegrationMethod.GAUSS_LEGENDRE else 2
        if n_steps < minimum:
            raise AttributionError(
                f"n_steps={n_steps} is too few for method {self.method.value!r}: at least {minimum} "
                "steps are needed. Use n_steps=50 (the default)."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise AttributionError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.n_steps = n_steps
        self.compute_convergence_delta = bool(compute_convergence_delta)
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise AttributionError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}.")
        self._chunk_size = chunk_size
        self._max_rows = max_batch_size
        step_fn, alpha_fn = approximation_parameters(self.method)
        self._step_sizes = torch.tensor(step_fn(n_steps), dtype=torch.float64)
        self._alphas = torch.tensor(alpha_fn(n_steps), dtype=torch.float64)

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
                    f"{tuple(target.shape)}: labels need the batch shape {tuple(batch)}."
                ) from None
            result.set(key, target.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1))
        return result

    # -- sampling --------------------------------------------------------------------------------
    def _n_points(self, job: _Job) -> int:
        return self.n_steps

    def _prepare_job(self, hooked: HookedModule, job: _Job, call_next: Callable[..., Any]) -> None:
        x = job.model_inputs
        baselines = self._read_baselines(job)
        dtype_device = next(iter(x.values()))
        job.extras["alphas"] = self._alphas.to(dtype=torch.float32, device=dtype_device.device)
        job.extras["baselines"] = baselines
        job.extras["diffs"] = {k: x[k] - baselines[k] for k in job.attributed}
        layer_mode = not job.attributed and bool(self.input_modules)
        need_pass = bool(self.input_modules) or self.compute_convergence_delta
        attr_inputs = {_key_str(k): v for k, v in job.extras["diffs"].items()}
        if not need_pass:
            job.attr_inputs = attr_inputs
            return
        # One no-grad pass over [x; baseline] (2N rows): outputs at x, F(x) and F(b) for the delta,
        # and the activations of input_modules at both ends of the path.
        work = TensorDict(batch_size=[2 * job.n])
        present = job.td.keys(include_nested=True)
        if layer_mode and not all((self.baseline_key, m) in present for m in self.input_modules):
            check_keys(
                job.td,
                [self._baseline_key(k) for k in x],
                what=f"baseline (or activation baselines {[(self.baseline_key, m) for m in self.input_modules]})",
            )
        for key, value in x.items():
            base = baselines.get(key)
            if base is None:
                bkey = self._baseline_key(key)
                base = job.td.get(bkey).reshape(value.shape) if layer_mode and bkey in present else value
            work.set(key, torch.cat([value, base.to(value.dtype)]))
        state = self._state
        state.record = {}
        state.targets = {}
        try:
            with torch.no_grad():
                out = call_next(work)
        finally:
            record, state.record = state.record, None
            module_targets, state.targets = state.targets, {}
        job.outputs = {k: _halves(out.get(k), job.batch)[0] for k in hooked.out_keys}
        module_ends = {}
        for key in self.input_modules:
            act = record[key]
            act_x, act_b = act[: job.n], act[job.n :]
            bkey = (self.baseline_key, key)
            if bkey in job.td.keys(include_nested=True):
                act_b = job.td.get(bkey).reshape(act_x.shape).to(act_x)
            module_ends[key] = (act_x, act_b)
            attr_inputs[key] = act_x - act_b
        job.extras["module_ends"] = module_ends
        job.extras["layer_mode"] = layer_mode
        job.attr_inputs = attr_inputs
        if self.compute_convergence_delta:
            # F(x) and F(b): the callbacks see the caller's batch B for each end (not (2, *B)).
            ends = []
            for half in (slice(0, job.n), slice(job.n, 2 * job.n)):
                t_list, s_list = self._targets_and_seeds(
                    hooked,
                    out[half],
                    {k: v[half] for k, v in module_targets.items()},
                    job.batch,
                    job.additional,
                    check_grad=False,
                    index=job.target_index,
                )
                ends.append(_seeded_sum(t_list, s_list, job.n, self.separate_targets))
            job.extras["f_ends"] = ends

    def _points(self, job: _Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        alphas = job.extras["alphas"][start:stop]
        c = stop - start
        out = {}
        for key in job.attributed:
            b = job.extras["baselines"][key]
            d = job.extras["diffs"][key]
            a = alphas.view(1, c, *([1] * (d.dim() - 1))).to(d.dtype)
            out[key] = torch.addcmul(b.unsqueeze(1), a, d.unsqueeze(1)).reshape(job.n * c, *d.shape[1:])
        return out

    def _point_weights(self, job: _Job, start: int, stop: int) -> torch.Tensor | None:
        return self._step_sizes[start:stop]

    def _module_transforms(
        self, job: _Job, start: int, stop: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if not job.extras.get("layer_mode"):
            return {}
        alphas = job.extras["alphas"][start:stop]
        return {
            key: _Interpolated(act_b, act_x - act_b, alphas)
            for key, (act_x, act_b) in job.extras["module_ends"].items()
        }

    def _grad_attr(
        self, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return gradient_times_input(grads, inputs, absolute=False, multiply=self.multiply_by_inputs)

    def _finish_job(
        self,
        hooked: HookedModule,
        job: _Job,
        call_next: Callable[..., Any],
        attrs: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
    ) -> None:
        if not self.compute_convergence_delta:
            return
        nb = len(job.batch)
        lead = nb + (1 if self.separate_targets else 0)
        total = torch.stack([a.reshape(*a.shape[:lead], -1).sum(-1) for a in attrs.values()]).sum(0)
        f_x, f_b = job.extras["f_ends"]  # ([K,] N) each
        diff = f_x - f_b
        if self.separate_targets:
            diff = diff.movedim(0, 1)
        diff = diff.reshape(torch.Size((*job.batch, *diff.shape[1:])))
        job.td.set(KEYS.convergence_delta, (total - diff.to(total.dtype)).detach())


def _halves(value: Any, batch: torch.Size) -> tuple[Any, Any]:
    n = value.shape[0] // 2
    first, second = value[:n], value[n:]
    if isinstance(value, TensorDictBase):
        return first.reshape(batch), second.reshape(batch)
    shape = torch.Size((*batch, *value.shape[1:]))
    return first.reshape(shape), second.reshape(shape)


def _seeded_sum(
    t_list: list[torch.Tensor], s_list: list[torch.Tensor], rows: int, separate: bool
) -> torch.Tensor:
    """``Σ seed ⊙ target`` per row (``(K, rows)`` with separate targets)."""
    total: torch.Tensor | int = 0
    for t, s in zip(t_list, s_list):
        prod = (s * t).reshape(s.shape[0], rows, -1) if separate else (s * t).reshape(rows, -1)
        total = total + prod.sum(-1)
    assert isinstance(total, torch.Tensor)
    return total


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

"""GradientShap (Lundberg & Lee, 2017): expected gradients over random baselines and path points.

For each input row and each of ``n_samples`` samples: add Gaussian noise to the input, draw a
baseline from the baseline distribution and a point ``α ~ U(0, 1)`` on the path, and take
``grad(b + α (x̃ − b)) × (x̃ − b)``; the attribution is the mean over samples. All samples of a
chunk go through the model in one forward and one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensordict.utils import NestedKey

from .._core.hooked import HookedModule
from ._errors import KEYS, AttributionError, BaselineError
from ._gradient import _Job, _key_str, check_finite
from ._integrated import GradientAttributionWithBaseline

__all__ = ["GradientShap"]


@dataclass
class ShapDraws:
    """The random draws of one GradientShap call (all ``(N, n_samples, ...)``).

    Attributes:
        noise: Per attributed input, the noise added to the input.
        index: Index of the baseline drawn from the distribution (``(N, n_samples)``).
        alpha: Position on the path (``(N, n_samples)``).
    """

    noise: dict[NestedKey, torch.Tensor]
    index: torch.Tensor
    alpha: torch.Tensor


class GradientShap(GradientAttributionWithBaseline):
    """GradientShap: SmoothGrad-noised, randomly-baselined input × gradient (captum's values).

    Baselines: ``baselines={in_key: tensor[M, *feature]}`` is a distribution shared by all rows;
    otherwise each row uses its own ``(baseline_key, in_key)`` entry.

    Args:
        *args: The shared arguments of :class:`GradientAttribution`, in order.
        n_samples: Samples per input row.
        stdevs: Standard deviation of the noise added to the inputs.
        baselines: Baseline distributions per in_key (``None``: read from the TensorDict).
        multiply_by_inputs: Multiply each sample's gradient by ``x̃ − b`` (captum's default).
        chunk_size: Samples per forward/backward pass (``None``: all).
        max_batch_size: A memory budget: at most this many rows (batch × samples) per forward
            pass; the chunk shrinks to fit.
        generator: A ``torch.Generator`` for reproducible draws.
        baseline_key: Root key of the per-row baselines.
        **kwargs: The shared keyword arguments of :class:`GradientAttribution`.
    """

    def __init__(
        self,
        *args: Any,
        n_samples: int = 5,
        stdevs: float = 0.0,
        baselines: Mapping[NestedKey, torch.Tensor] | None = None,
        multiply_by_inputs: bool = True,
        chunk_size: int | None = None,
        max_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        baseline_key: str = KEYS.baseline,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, baseline_key=baseline_key, multiply_by_inputs=multiply_by_inputs, **kwargs)
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise AttributionError(f"n_samples must be a positive int, got {n_samples!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise AttributionError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        if (
            isinstance(stdevs, bool)
            or not isinstance(stdevs, (int, float))
            or not math.isfinite(stdevs)
            or stdevs < 0
        ):
            raise AttributionError(
                f"stdevs must be a finite number >= 0 (the noise standard deviation), got {stdevs!r}."
            )
        self.n_samples = n_samples
        self.stdevs = float(stdevs)
        self.baselines = dict(baselines) if baselines is not None else None
        self.generator = generator
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise AttributionError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}.")
        self._chunk_size = chunk_size
        self._max_rows = max_batch_size

    def _draw(self, job: _Job, sizes: dict[NestedKey, int]) -> ShapDraws:
        """Draw noise, baseline indices and path positions (override to replay other draws)."""
        n, s, g = job.n, self.n_samples, self.generator
        x0 = job.model_inputs[job.attributed[0]]
        noise = {}
        for key in job.attributed:
            x = job.model_inputs[key]
            eps = torch.randn((n, s, *x.shape[1:]), generator=g, dtype=x.dtype, device="cpu")
            noise[key] = (eps * self.stdevs).to(x.device)
        m = min(sizes.values())
        index = torch.randint(0, m, (n, s), generator=g, device="cpu").to(x0.device)
        alpha = torch.rand((n, s), generator=g, device="cpu").to(x0.device, x0.dtype)
        return ShapDraws(noise, index, alpha)

    def _n_points(self, job: _Job) -> int:
        return self.n_samples

    def _prepare_job(self, hooked: HookedModule, job: _Job, call_next: Callable[..., Any]) -> None:
        if not job.attributed:
            raise AttributionError("GradientShap attributes to model inputs; set use_inputs=True.")
        n, s = job.n, self.n_samples
        if self.baselines is not None:
            dists = {}
            for key in job.attributed:
                if key not in self.baselines:
                    raise BaselineError(
                        f"No baseline distribution for input {key!r}; baselines has {list(self.baselines)}. "
                        "Add one (a tensor [M, *feature])."
                    )
                b = torch.as_tensor(self.baselines[key])
                x = job.model_inputs[key]
                if tuple(b.shape[1:]) != tuple(x.shape[1:]) or b.device != x.device:
                    raise BaselineError(
                        f"Baseline distribution for {key!r} has shape {tuple(b.shape)} on {b.device}; expected "
                        f"[M, {', '.join(map(str, x.shape[1:]))}] on {x.device}."
                    )
                if self.check_finite:
                    check_finite(b, f"baseline distribution {key!r}")
                dists[key] = b.to(x.dtype)
            draws = self._draw(job, {k: v.shape[0] for k, v in dists.items()})
            chosen = {k: dists[k][draws.index] for k in job.attributed}
        else:
            per_row = self._read_baselines(job)
            draws = self._draw(job, dict.fromkeys(job.attributed, 1))
            chosen = {k: b.unsqueeze(1).expand(n, s, *b.shape[1:]) for k, b in per_row.items()}
        noisy = {k: job.model_inputs[k].unsqueeze(1) + draws.noise[k] for k in job.attributed}
        job.extras["chosen"] = chosen
        job.extras["diff"] = {k: noisy[k] - chosen[k] for k in job.attributed}
        job.extras["alpha"] = draws.alpha
        job.attr_inputs = {_key_str(k): torch.ones_like(job.model_inputs[k]) for k in job.attributed}

    def _points(self, job: _Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        out = {}
        a = job.extras["alpha"][:, start:stop]
        for key in job.attributed:
            b = job.extras["chosen"][key][:, start:stop]
            d = job.extras["diff"][key][:, start:stop]
            av = a.view(*a.shape, *([1] * (d.dim() - 2)))
            out[key] = (b + av * d).reshape(-1, *d.shape[2:])
        return out

    def _point_weights(self, job: _Job, start: int, stop: int) -> torch.Tensor | None:
        return torch.full((stop - start,), 1.0 / self.n_samples, dtype=torch.float64)

    def _point_factors(self, job: _Job, start: int, stop: int) -> dict[str, torch.Tensor] | None:
        if not self.multiply_by_inputs:
            return None
        return {
            _key_str(k): d[:, start:stop].reshape(-1, *d.shape[2:]) for k, d in job.extras["diff"].items()
        }

"""GradientShap (Lundberg & Lee, 2017): expected gradients over random baselines and path points.

For each input row and each of ``n_samples`` samples: add Gaussian noise to the input, draw a
baseline from the baseline distribution and a point ``α ~ U(0, 1)`` on the path, and take
``grad(b + α (x̃ − b)) × (x̃ − b)``; the attribution is the mean over samples. All samples of a
chunk go through the model in one forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tensordict.utils import NestedKey
from typing_extensions import Unpack

from ._engine import GradientAttribution
from ._errors import KEYS, AttributionError, BaselineError
from ._integrated import read_baselines
from ._options import (
    SHARED_POSITIONAL,
    GradientOptions,
    GradientSettings,
    accepts_positional,
    noise_stdevs,
    positive_int,
)
from ._strategies import Job, Run, Sampler, as_is
from ._targets import check_finite, key_str

__all__ = ["GradientShap", "ShapDraws", "ShapSampler"]


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


@dataclass(frozen=True)
class ShapSampler(Sampler):
    """GradientShap's points: ``b + α (x̃ − b)`` for random noise, baselines and ``α``.

    Each point's gradient is multiplied by ``x̃ − b`` (with ``multiply_by_inputs``) and the mean
    is taken over the ``n_samples`` points.
    """

    n_samples: int
    stdevs: float
    baselines: Mapping[NestedKey, torch.Tensor] | None
    multiply_by_inputs: bool
    baseline_key: str
    generator: torch.Generator | None = field(default=None, compare=False)
    chunk_size: int | None = None
    max_rows: int | None = None

    def draw(self, job: Job, sizes: dict[NestedKey, int]) -> ShapDraws:
        """Draw noise, baseline indices and path positions."""
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

    def n_points(self, job: Job) -> int:
        return self.n_samples

    def prepare(self, run: Run, job: Job) -> None:
        if not job.attributed:
            raise AttributionError(
                "GradientShap attributes to model inputs, and none is attributed; set use_inputs=True "
                "(or init_attr_inputs returning inputs)."
            )
        n, s = job.n, self.n_samples
        finite = run.options.check_finite
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
                if finite:
                    check_finite(b, f"baseline distribution {key!r}")
                dists[key] = b.to(x.dtype)
            draws = self.draw(job, {k: v.shape[0] for k, v in dists.items()})
            chosen = {k: dists[k][draws.index] for k in job.attributed}
        else:
            per_row = read_baselines(job, self.baseline_key, finite=finite)
            draws = self.draw(job, dict.fromkeys(job.attributed, 1))
            chosen = {k: b.unsqueeze(1).expand(n, s, *b.shape[1:]) for k, b in per_row.items()}
        noisy = {k: job.model_inputs[k].unsqueeze(1) + draws.noise[k] for k in job.attributed}
        job.extras["chosen"] = chosen
        job.extras["diff"] = {k: noisy[k] - chosen[k] for k in job.attributed}
        job.extras["alpha"] = draws.alpha
        job.attr_inputs = {key_str(k): torch.ones_like(job.model_inputs[k]) for k in job.attributed}

    def points(self, job: Job, start: int, stop: int) -> dict[NestedKey, torch.Tensor]:
        out = {}
        a = job.extras["alpha"][:, start:stop]
        for key in job.attributed:
            b = job.extras["chosen"][key][:, start:stop]
            d = job.extras["diff"][key][:, start:stop]
            av = a.view(*a.shape, *([1] * (d.dim() - 2)))
            out[key] = (b + av * d).reshape(-1, *d.shape[2:])
        return out

    def weights(self, job: Job, start: int, stop: int) -> torch.Tensor | None:
        return torch.full((stop - start,), 1.0 / self.n_samples, dtype=torch.float64)

    def factors(self, job: Job, start: int, stop: int) -> dict[str, torch.Tensor] | None:
        if not self.multiply_by_inputs:
            return None
        return {key_str(k): d[:, start:stop].reshape(-1, *d.shape[2:]) for k, d in job.extras["diff"].items()}


class GradientShap(GradientAttribution):
    """GradientShap: SmoothGrad-noised, randomly-baselined input × gradient (captum's values).

    Baselines: ``baselines={in_key: tensor[M, *feature]}`` is a distribution shared by all rows;
    otherwise each row uses its own ``(baseline_key, in_key)`` entry.

    Args:
        n_samples: Samples per input row.
        stdevs: Standard deviation of the noise added to the inputs.
        baselines: Baseline distributions per in_key (``None``: read from the TensorDict).
        multiply_by_inputs: Multiply each sample's gradient by ``x̃ − b`` (captum's default).
        chunk_size: Samples per forward/backward pass (``None``: all).
        max_batch_size: A memory budget: at most this many rows (batch × samples) per forward
            pass; the chunk shrinks to fit.
        generator: A ``torch.Generator`` for reproducible draws.
        baseline_key: Root key of the per-row baselines.
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`; also
            accepted in tdhook 0.1's positional order.

    Raises:
        AttributionError: For a bad ``n_samples``, ``stdevs``, ``chunk_size`` or
            ``max_batch_size`` (a ``ValueError``).
    """

    @accepts_positional(*SHARED_POSITIONAL)
    def __init__(
        self,
        *,
        n_samples: int = 5,
        stdevs: float = 0.0,
        baselines: Mapping[NestedKey, torch.Tensor] | None = None,
        multiply_by_inputs: bool = True,
        chunk_size: int | None = None,
        max_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        baseline_key: str = KEYS.baseline,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        positive_int(n_samples, "n_samples", example=5)
        positive_int(chunk_size, "chunk_size", optional=True)
        positive_int(max_batch_size, "max_batch_size", optional=True, example=1024)
        self.n_samples = n_samples
        self.stdevs = noise_stdevs(stdevs)
        self.baseline_key = baseline_key
        self.multiply_by_inputs = bool(multiply_by_inputs)
        sampler = ShapSampler(
            n_samples=n_samples,
            stdevs=self.stdevs,
            baselines=dict(baselines) if baselines is not None else None,
            multiply_by_inputs=self.multiply_by_inputs,
            baseline_key=baseline_key,
            generator=generator,
            chunk_size=chunk_size,
            max_rows=max_batch_size,
        )
        resolved = GradientOptions.build(options, settings, type(self).__name__)
        self._configure(resolved, sampler, as_is)

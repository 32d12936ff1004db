"""Noise tunnels: SmoothGrad and VarGrad around any gradient method (``tdhook.attribution``).

The wrapped method runs on ``n_samples`` noisy copies of every row (Gaussian noise on the
attributed inputs), ``chunk_size`` copies at a time, in one call of the wrapped method per chunk
(so one forward and one backward pass per chunk for Saliency-like methods). SmoothGrad returns
the mean of the maps, VarGrad their variance (captum's ``NoiseTunnel`` "smoothgrad" and
"vargrad"). The wrapped method's hooks (e.g. guided backpropagation) are installed once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ..core import HookedModule, HookingContext, HookingContextFactory, Installable, check_keys
from ._engine import GradientAttribution
from ._errors import AttributionError
from ._gradient import Saliency
from ._options import noise_stdevs, positive_int
from ._targets import check_finite, check_per_sample_targets, write_unflattened

__all__ = ["SmoothGrad", "VarGrad"]


class _NoiseTunnel(HookingContextFactory):
    """Run a gradient method on noisy copies of the inputs and reduce the maps."""

    _needs_tensordict = True
    _variance = False

    def __init__(
        self,
        method: GradientAttribution | None = None,
        *,
        n_samples: int = 10,
        stdevs: float = 1.0,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        method = Saliency() if method is None else method
        if not isinstance(method, GradientAttribution):
            raise AttributionError(
                f"{type(self).__name__} wraps a gradient method (e.g. Saliency(), IntegratedGradients()), "
                f"got {type(method).__name__}."
            )
        self.method = method
        positive_int(n_samples, "n_samples", example=10)
        self.n_samples = n_samples
        self.stdevs = noise_stdevs(stdevs)
        self.chunk_size = positive_int(chunk_size, "chunk_size", optional=True)
        self.generator = generator

    @property
    def attribution_key(self) -> str:
        return self.method.attribution_key

    def _plan(self, hooked: HookedModule) -> list[Installable]:
        return list(self.method._plan(hooked))  # the wrapped method's hooks, installed once

    def _enter(self, context: HookingContext) -> None:
        self.method._enter(context)

    def _exit(self, context: HookingContext) -> None:
        self.method._exit(context)

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise of std ``stdevs`` (override to replay other draws)."""
        eps = torch.randn(shape, generator=self.generator, dtype=like.dtype, device="cpu")
        return (eps * self.stdevs).to(like.device)

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        model_keys = list(hooked.td_module.in_keys)
        check_keys(td, model_keys)
        batch, n = td.batch_size, td.batch_size.numel()
        noisy_keys = [k for k in hooked.in_keys if torch.is_floating_point(td.get(k))]
        index = None
        if isinstance(self.method.options.targets, torch.Tensor):
            check_per_sample_targets(self.method.options.targets, batch)
            index = self.method.options.targets.reshape(n)
        if self.method.options.check_finite:
            for key in noisy_keys:
                check_finite(td.get(key), f"input {key!r}")
        attr_key = self.method.attribution_key
        flat = td.exclude(attr_key).reshape(n)
        s = self.n_samples
        chunk = self.chunk_size or s
        total: dict[Any, torch.Tensor] = {}
        total_sq: dict[Any, torch.Tensor] = {}
        for start in range(0, s, chunk):
            c = min(s, start + chunk) - start
            rep = flat.unsqueeze(1).expand(n, c).reshape(n * c)
            for key in noisy_keys:
                x = rep.get(key)
                rep.set(key, x + self._noise(tuple(x.shape), x))
            rep_index = None if index is None else index.repeat_interleave(c)
            out = self.method.attribute(hooked, rep, call_next, kwargs, rep_index)
            for key, value in out.get(attr_key).items(include_nested=True, leaves_only=True):
                v = value.reshape(n, c, *value.shape[1:])
                part = v.sum(1)
                total[key] = part if key not in total else total[key] + part
                if self._variance:
                    part_sq = (v * v).sum(1)
                    total_sq[key] = part_sq if key not in total_sq else total_sq[key] + part_sq
        work = TensorDict(batch_size=[n])
        for key in model_keys:
            work.set(key, flat.get(key))
        with torch.no_grad():
            plain = call_next(work, **kwargs)
        write_unflattened(td, plain, hooked.out_keys, batch)
        for key, value in total.items():
            mean = value / s
            result = total_sq[key] / s - mean * mean if self._variance else mean
            full_key = (attr_key, *key) if isinstance(key, tuple) else (attr_key, key)
            td.set(full_key, result.reshape(torch.Size((*batch, *result.shape[1:]))))
        return td


class SmoothGrad(_NoiseTunnel):
    """SmoothGrad (Smilkov et al., 2017): the mean of a method's maps over noisy inputs.

    Args:
        method: The wrapped gradient method (default ``Saliency()``); its targets, keys and
            options apply.
        n_samples: Noisy copies per row.
        stdevs: Standard deviation of the Gaussian noise added to the attributed inputs.
        chunk_size: Copies per call of the wrapped method (``None``: all).
        generator: A ``torch.Generator`` for reproducible noise.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> with SmoothGrad(Saliency(targets=0), n_samples=4, stdevs=0.1).prepare(torch.nn.Linear(3, 2)) as h:
        ...     td = h(TensorDict(input=torch.randn(5, 3), batch_size=[5]))
        >>> td["attr", "input"].shape
        torch.Size([5, 3])
    """


class VarGrad(_NoiseTunnel):
    """VarGrad (Adebayo et al., 2018): the variance of a method's maps over noisy inputs.

    Args:
        method: The wrapped gradient method (default ``Saliency()``).
        n_samples: Noisy copies per row.
        stdevs: Standard deviation of the Gaussian noise added to the attributed inputs.
        chunk_size: Copies per call of the wrapped method (``None``: all).
        generator: A ``torch.Generator`` for reproducible noise.
    """

    _variance = True

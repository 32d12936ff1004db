"""Attribution quality metrics: infidelity and sensitivity, for any key layout.

Both take the *hooked* module of an attribution method (``with Method().prepare(model) as
hooked``) and a TensorDict, and return a TensorDict with batch ``B`` holding one value per
attributed input key. Keys are explicit (``attr_key``, ``output_key``/``target_fn``); nothing
relies on intermediate keys. All perturbation samples run in one batched call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from ._core.keys import DEFAULT_OUT_KEY
from .attribution import AttributionKeys
from .errors import InvalidInputError, MissingKeyError, TdhookError

__all__ = ["InfidelityMetric", "MetricError", "SensitivityMetric"]


class MetricError(TdhookError, ValueError):
    """A metric was configured with an out-of-range parameter or given unusable data."""


PerturbFn = Callable[[torch.Tensor], torch.Tensor]
_KEYS = AttributionKeys()


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetricError(f"{name} must be a positive int, got {value!r}.")
    return value


def _scale(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise MetricError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _key_list(keys: Any) -> list[NestedKey] | None:
    """One key (a string or a tuple of strings) is one key, never its characters."""
    if keys is None:
        return None
    if isinstance(keys, str) or (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)):
        return [keys]
    return list(keys)


def _checked_keys(module: Any, data: Any, keys: Sequence[NestedKey] | None) -> list[NestedKey]:
    """The input keys to perturb (``keys``, else ``module.in_keys``), after refusing what would give a
    silently wrong metric: no rows, a missing input, NaN/Inf in a perturbed input."""
    keys = _in_keys(module, keys)
    if not isinstance(data, TensorDictBase):
        raise InvalidInputError(f"Metrics need a TensorDict, got {type(data).__name__}.")
    if data.batch_size.numel() == 0:
        raise MetricError(
            f"The TensorDict has batch {tuple(data.batch_size)} (no rows): there is nothing to measure."
        )
    for key in keys:
        if key not in data.keys(include_nested=True):
            raise MissingKeyError(
                f"No input at {key!r} to perturb; keys present: "
                f"{list(data.keys(include_nested=True, leaves_only=True))}. Pass input_keys=[...]."
            )
        value = data.get(key)
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            raise MetricError(
                f"Input {key!r} holds NaN/Inf values; the metric would be NaN. Clean it (torch.nan_to_num)."
            )
    return keys


def _in_keys(module: Any, keys: Sequence[NestedKey] | None) -> list[NestedKey]:
    if keys is not None:
        return list(keys)
    found = getattr(module, "in_keys", None)
    if found is None:
        raise InvalidInputError(
            f"Cannot tell which inputs to perturb for {type(module).__name__}; pass input_keys=[...]."
        )
    return list(found)


def _repeat(td: TensorDictBase, s: int) -> TensorDictBase:
    n = td.batch_size.numel()
    return td.reshape(n).unsqueeze(1).expand(n, s).reshape(n * s)


def _attr(td: TensorDictBase, attr_key: str, key: NestedKey) -> torch.Tensor:
    full = (attr_key, *((key,) if isinstance(key, str) else key))
    if full not in td.keys(include_nested=True):
        raise MissingKeyError(
            f"No attribution at {full!r}; keys present: {list(td.keys(include_nested=True, leaves_only=True))}. "
            "Pass attr_key=... (the method's attribution_key)."
        )
    return td.get(full)


class SensitivityMetric:
    """Max-sensitivity (Yeh et al., 2019; captum ``sensitivity_max``) of attributions.

    For ``n_perturb_samples`` perturbations of each row (uniform in ``[-r, r]`` by default):
    ``max ‖attr(x̃) − attr(x)‖ / ‖attr(x)‖`` (Frobenius norms over the features).

    Args:
        perturb_radius: Radius ``r`` of the default uniform perturbation.
        n_perturb_samples: Perturbations per row.
        attr_key: Root key of the attributions the module writes.
        input_keys: Inputs to perturb (default: the module's ``in_keys``).
        perturb_fn: ``f(x) -> x̃`` replacing the default perturbation.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tdhook.attribution import Saliency
        >>> model = torch.nn.Linear(3, 2)  # a constant gradient: the saliency cannot move
        >>> td = TensorDict(input=torch.randn(4, 3), batch_size=[4])
        >>> with Saliency(targets=[1]).prepare(model) as hooked:
        ...     sensitivity = SensitivityMetric(n_perturb_samples=4)(hooked, td)
        >>> sensitivity["input"]
        tensor([0., 0., 0., 0.])
    """

    def __init__(
        self,
        perturb_radius: float = 0.02,
        n_perturb_samples: int = 10,
        *,
        attr_key: str = _KEYS.attr,
        input_keys: Sequence[NestedKey] | None = None,
        perturb_fn: PerturbFn | None = None,
    ) -> None:
        self.perturb_radius = _scale(perturb_radius, "perturb_radius")
        self.n_perturb_samples = _count(n_perturb_samples, "n_perturb_samples")
        self.attr_key = attr_key
        self.input_keys = _key_list(input_keys)
        self.perturb_fn = perturb_fn

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturb_fn is not None:
            return self.perturb_fn(x)
        return x + (torch.rand_like(x) * 2 - 1) * self.perturb_radius

    def __call__(
        self, module: Callable[[TensorDictBase], TensorDictBase], original_data: TensorDictBase
    ) -> TensorDictBase:
        """Return ``TensorDict({in_key: sensitivity[B]}, batch_size=B)``."""
        keys = _checked_keys(module, original_data, self.input_keys)
        batch, n, s = original_data.batch_size, original_data.batch_size.numel(), self.n_perturb_samples
        base = module(original_data.clone(False))
        rep = _repeat(original_data.exclude(self.attr_key), s).clone(False)
        for key in keys:
            rep.set(key, self._perturb(rep.get(key)))
        pert = module(rep)
        result = TensorDict(batch_size=batch)
        for key in keys:
            a = _attr(base, self.attr_key, key).reshape(n, 1, -1)
            ap = _attr(pert, self.attr_key, key).reshape(n, s, -1)
            num = (ap - a).norm(dim=-1)
            den = a.norm(dim=-1)
            ratio = torch.where(den > 0, num / den.clamp_min(torch.finfo(a.dtype).tiny), num)
            result.set(key, ratio.max(1).values.reshape(batch))
        return result


class InfidelityMetric:
    """Infidelity (Yeh et al., 2019; captum ``infidelity``) of attributions.

    ``E_I[(Σ attr · I − (F(x) − F(x − I)))²]`` over ``n_perturb_samples`` Gaussian perturbations
    ``I ~ N(0, noise_std²)`` of each input key in turn, where ``F`` is the target: the output at
    ``output_key`` (its ``target`` index on the last dimension, or its sum), or ``target_fn(td)``.

    Args:
        n_perturb_samples: Perturbations per row.
        noise_std: Standard deviation of the default perturbation.
        attr_key: Root key of the attributions the module writes.
        output_key: Model output the target is read from.
        target: Index on the last dimension of ``output_key`` (``None``: the sum).
        target_fn: ``f(td) -> tensor[N]`` replacing ``output_key``/``target``.
        input_keys: Inputs to perturb (default: the module's ``in_keys``).
        perturb_fn: ``f(x) -> I`` (the perturbation; ``x − I`` is evaluated).
        normalize: Rescale the attributions by the least-squares factor first (captum's
            ``normalize=True``).
    """

    def __init__(
        self,
        n_perturb_samples: int = 10,
        noise_std: float = 0.01,
        *,
        attr_key: str = _KEYS.attr,
        output_key: NestedKey = DEFAULT_OUT_KEY,
        target: int | None = None,
        target_fn: Callable[[TensorDictBase], torch.Tensor] | None = None,
        input_keys: Sequence[NestedKey] | None = None,
        perturb_fn: PerturbFn | None = None,
        normalize: bool = False,
    ) -> None:
        self.n_perturb_samples = _count(n_perturb_samples, "n_perturb_samples")
        self.noise_std = _scale(noise_std, "noise_std")
        self.attr_key = attr_key
        self.output_key = output_key
        if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
            raise MetricError(
                f"target must be an int index on the last dimension of {output_key!r} (or None for the sum), got "
                f"{target!r} ({type(target).__name__}). For per-sample or custom targets pass target_fn=..."
            )
        self.target = target
        self.target_fn = target_fn
        self.input_keys = _key_list(input_keys)
        self.perturb_fn = perturb_fn
        self.normalize = bool(normalize)

    def _f(self, model: Callable[[TensorDictBase], TensorDictBase], td: TensorDictBase) -> torch.Tensor:
        with torch.no_grad():
            out = model(td)
        if self.target_fn is not None:
            return self.target_fn(out).reshape(-1)
        if self.output_key not in out.keys(include_nested=True):
            raise MissingKeyError(
                f"No model output at {self.output_key!r}; keys present: "
                f"{list(out.keys(include_nested=True, leaves_only=True))}. Pass output_key=... or target_fn=..."
            )
        y = out.get(self.output_key)
        if self.target is not None:
            y = y[..., self.target]
        return y.reshape(td.batch_size.numel(), -1).sum(-1)

    def __call__(
        self, module: Callable[[TensorDictBase], TensorDictBase], original_data: TensorDictBase
    ) -> TensorDictBase:
        """Return ``TensorDict({in_key: infidelity[B]}, batch_size=B)``."""
        keys = _checked_keys(module, original_data, self.input_keys)
        batch, n, s = original_data.batch_size, original_data.batch_size.numel(), self.n_perturb_samples
        attributed = module(original_data.clone(False))
        model = getattr(module, "td_module", module)
        clean = original_data.exclude(self.attr_key)
        f_x = self._f(model, clean.reshape(n).clone(False)).repeat_interleave(s)
        result = TensorDict(batch_size=batch)
        for key in keys:
            rep = _repeat(clean, s).clone(False)
            x = rep.get(key)
            noise = (
                self.perturb_fn(x) if self.perturb_fn is not None else torch.randn_like(x) * self.noise_std
            )
            rep.set(key, x - noise)
            f_p = self._f(model, rep)
            a = _attr(attributed, self.attr_key, key).reshape(n, 1, -1)
            dot = (a * noise.reshape(n, s, -1)).sum(-1)
            diff = (f_x - f_p).reshape(n, s)
            if self.normalize:
                beta = (dot * diff).mean(1, keepdim=True) / (dot * dot).mean(1, keepdim=True).clamp_min(1e-30)
                dot = dot * beta
            result.set(key, ((dot - diff) ** 2).mean(1).reshape(batch))
        return result

"""Perturbation attribution: feature ablation and occlusion (``tdhook.attribution``).

Both replace groups of input features by a baseline and attribute to each group the drop of the
target: ``attr = F(x) − F(x with the group ablated)``, spread over the group's positions
(occlusion averages the overlapping windows, as captum does). All perturbations of a chunk run
in one batched, gradient-free forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from typing_extensions import Unpack

from ..core import HookedModule, HookingContextFactory, check_keys
from ._errors import KEYS, AttributionError, BaselineError, TargetError
from ._options import AttrCallback, TargetsArg, parse_targets, positive_int
from ._targets import check_finite, check_per_sample_targets, key_str, write_unflattened

__all__ = ["FeatureAblation", "Occlusion", "PerturbationSettings"]


class PerturbationSettings(TypedDict, total=False):
    """The settings shared by the perturbation methods (keyword arguments)."""

    targets: TargetsArg
    separate_targets: bool
    init_attr_targets: AttrCallback | None
    additional_init_keys: Sequence[NestedKey] | None
    baseline_key: str
    baseline_value: float
    chunk_size: int | None
    attribution_key: str
    check_finite: bool


class _Masks(Protocol):
    """What varies between perturbation methods: the masks, and how overlapping ones combine."""

    def masks(self, key: NestedKey, feature_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """``(W, *feature)`` float masks: 1 where the perturbation replaces the input."""
        ...

    def normalise(self, attr: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The attribution from the summed target drops of the masks covering each position."""
        ...


class _Perturbation(HookingContextFactory):
    """Shared machinery: targets per row, baselines, batched perturbed passes."""

    _needs_tensordict = True

    def _configure(
        self,
        masks: _Masks,
        *,
        targets: TargetsArg = None,
        separate_targets: bool = False,
        init_attr_targets: AttrCallback | None = None,
        additional_init_keys: Sequence[NestedKey] | None = None,
        baseline_key: str = KEYS.baseline,
        baseline_value: float = 0.0,
        chunk_size: int | None = None,
        attribution_key: str = KEYS.attr,
        check_finite: bool = True,
    ) -> None:
        targets = parse_targets(targets, separate_targets)
        if separate_targets and not isinstance(targets, list):
            raise AttributionError(
                f"separate_targets=True needs several targets, got targets={targets!r}. Pass targets=[i, j, ...]."
            )
        positive_int(chunk_size, "chunk_size", optional=True, example=64)
        self.targets = targets
        self.separate_targets = bool(separate_targets)
        self.init_attr_targets = init_attr_targets
        self.additional_init_keys = list(additional_init_keys or [])
        self.baseline_key = baseline_key
        if not isinstance(baseline_value, (int, float)) or not math.isfinite(baseline_value):
            raise AttributionError(
                f"baseline_value must be a finite number, got {baseline_value!r}. Pass e.g. baseline_value=0.0."
            )
        self.baseline_value = float(baseline_value)
        self.check_finite = bool(check_finite)
        self.chunk_size = chunk_size
        self.attribution_key = attribution_key
        self.masks = masks

    def _target_rows(
        self,
        hooked: HookedModule,
        out: TensorDictBase,
        additional: TensorDictBase | None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(rows, K)`` target values (K = 1 unless ``separate_targets``).

        ``index`` holds the per-sample class of every row (a per-sample ``targets`` tensor).
        """
        rows = out.batch_size[0]
        if self.init_attr_targets is not None:
            sel = TensorDict(batch_size=[rows])
            for key in hooked.out_keys:
                sel.set(key, out.get(key))
            extra = additional if additional is not None else TensorDict(batch_size=[rows])
            chosen = self.init_attr_targets(sel, extra)
            if not isinstance(chosen, TensorDictBase):
                raise AttributionError(
                    f"init_attr_targets function must return a TensorDict, got {type(chosen).__name__}."
                )
            leaves = list(chosen.values(include_nested=True, leaves_only=True))
        else:
            leaves = [v for k in hooked.out_keys for v in _tensor_leaves(out.get(k))]
        total: torch.Tensor | None = None
        for value in leaves:
            if self.targets is None or self.init_attr_targets is not None:
                part = value.reshape(rows, -1).sum(-1, keepdim=True)
            elif index is not None:
                size = value.shape[-1] if value.dim() > 1 else 0
                if bool(((index < -size) | (index >= size)).any()):
                    raise TargetError(
                        f"per-sample targets {index.unique().tolist()} out of range for an output of shape "
                        f"{tuple(value.shape)}: indices select the last dimension (size {size})."
                    )
                gather = (
                    index.remainder(size).view(rows, *([1] * (value.dim() - 1))).expand(*value.shape[:-1], 1)
                )
                part = value.gather(-1, gather).reshape(rows, -1).sum(-1, keepdim=True)
            else:
                idx = [self.targets] if isinstance(self.targets, int) else list(self.targets)
                picked = value[..., idx].reshape(rows, -1, len(idx))
                part = picked.sum(1) if self.separate_targets else picked.sum((1, 2)).unsqueeze(-1)
            total = part if total is None else total + part
        if total is None:
            raise AttributionError(
                "No targets: the model wrote no outputs to attribute. Check the model's out_keys, or return "
                "the targets from init_attr_targets."
            )
        return total

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        model_keys = list(hooked.td_module.in_keys)
        check_keys(td, model_keys)
        batch = td.batch_size
        nb, n = len(batch), batch.numel()
        inputs = {k: td.get(k).reshape(n, *td.get(k).shape[nb:]) for k in model_keys}
        index = None
        if isinstance(self.targets, torch.Tensor):
            check_per_sample_targets(self.targets, batch)
            index = self.targets.reshape(n).to(next(iter(inputs.values())).device)
        for key in hooked.in_keys:
            x = inputs[key]
            if not torch.is_floating_point(x):
                raise AttributionError(
                    f"Cannot perturb input {key!r} of dtype {x.dtype} with a float baseline; attribute "
                    "float inputs (prepare(..., in_keys=[...]) selects them)."
                )
            if self.check_finite:
                check_finite(x, f"input {key!r}")
        if n == 0:
            raise AttributionError(
                f"{type(self).__name__} got a TensorDict with batch {tuple(batch)} (no rows); there is nothing "
                "to perturb. Pass at least one sample."
            )
        additional = None
        if self.additional_init_keys:
            check_keys(td, self.additional_init_keys, what="additional_init_keys")
            additional = td.select(*self.additional_init_keys).reshape(n)
        work = TensorDict(batch_size=[n])
        for key, value in inputs.items():
            work.set(key, value)
        with torch.no_grad():
            out = call_next(work, **kwargs)
            write_unflattened(td, out, hooked.out_keys, batch)
            f_x = self._target_rows(hooked, out, additional, index)  # (N, K)
            for key in hooked.in_keys:
                x = inputs[key]
                base = self._baseline(td, key, x, batch)
                masks = self.masks.masks(key, x.shape[1:], x)
                w_total = masks.shape[0]
                chunk = self.chunk_size or w_total
                diffs = []
                for start in range(0, w_total, chunk):
                    m = masks[start : start + chunk]
                    c = m.shape[0]
                    pert = torch.lerp(x.unsqueeze(1), base.unsqueeze(1), m.unsqueeze(0)).reshape(
                        n * c, *x.shape[1:]
                    )
                    pwork = TensorDict(batch_size=[n * c])
                    for other, value in inputs.items():
                        pwork.set(other, pert if other == key else value.repeat_interleave(c, dim=0))
                    rep_add = (
                        None if additional is None else additional.unsqueeze(1).expand(n, c).reshape(n * c)
                    )
                    rep_index = None if index is None else index.repeat_interleave(c)
                    f_p = self._target_rows(hooked, call_next(pwork, **kwargs), rep_add, rep_index)
                    diffs.append(f_x.unsqueeze(1) - f_p.reshape(n, c, -1))
                diff = torch.cat(diffs, 1)  # (N, W, K)
                attr = torch.einsum("nwk,wf->nkf", diff.to(masks.dtype), masks.reshape(w_total, -1))
                attr = self.masks.normalise(attr, masks).reshape(n, -1, *x.shape[1:])
                attr = attr if self.separate_targets else attr.squeeze(1)
                td.set(
                    (self.attribution_key, key),
                    attr.reshape(torch.Size((*batch, *attr.shape[1:]))).to(x.dtype),
                )
        return td

    def _baseline(
        self, td: TensorDictBase, key: NestedKey, x: torch.Tensor, batch: torch.Size
    ) -> torch.Tensor:
        bkey = (self.baseline_key, *((key,) if isinstance(key, str) else key))
        if bkey not in td.keys(include_nested=True):
            return torch.full_like(x, self.baseline_value)
        b = td.get(bkey)
        full = (*batch, *x.shape[1:])
        if tuple(b.shape) != full or b.device != x.device:
            raise BaselineError(
                f"Baseline {bkey!r} has shape {tuple(b.shape)} on {b.device}, expected the shape {full} of "
                f"input {key!r} on {x.device}. Give it the input's shape (e.g. torch.zeros_like)."
            )
        if self.check_finite:
            check_finite(b, f"baseline {bkey!r}")
        return b.reshape(x.shape).to(x.dtype)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, TensorDictBase):
        return list(value.values(include_nested=True, leaves_only=True))
    return [value]


@dataclass(frozen=True)
class _GroupMasks:
    """Feature ablation's perturbations: one mask per group id (every element its own group)."""

    groups: Mapping[NestedKey, torch.Tensor]

    def masks(self, key: NestedKey, feature_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        ids = self.groups.get(key)
        if ids is None:
            size = math.prod(feature_shape)
            return torch.eye(size, dtype=like.dtype, device=like.device).reshape(size, *feature_shape)
        ids = torch.as_tensor(ids, device=like.device)
        while ids.dim() > len(feature_shape) and ids.shape[0] == 1:
            ids = ids[0]
        try:
            ids = ids.expand(feature_shape)
        except RuntimeError:
            raise AttributionError(
                f"feature_mask[{key_str(key)!r}] has shape {tuple(ids.shape)}, which does not broadcast to the "
                f"feature shape {tuple(feature_shape)}. Give group ids of the feature shape (no batch dimension)."
            ) from None
        groups = torch.unique(ids)
        return (ids.unsqueeze(0) == groups.view(-1, *([1] * len(feature_shape)))).to(like.dtype)

    def normalise(self, attr: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return attr


@dataclass(frozen=True)
class _WindowMasks:
    """Occlusion's perturbations: sliding windows; overlapping windows are averaged."""

    shapes: Sequence[int] | Mapping[NestedKey, Sequence[int]]
    strides: int | Sequence[int] | Mapping[NestedKey, Any] | None

    def _per_key(self, value: Any, key: NestedKey) -> Any:
        return value[key] if isinstance(value, Mapping) else value

    def masks(self, key: NestedKey, feature_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        window = tuple(self._per_key(self.shapes, key))
        strides = self._per_key(self.strides, key)
        strides = (1,) * len(window) if strides is None else strides
        strides = (strides,) * len(window) if isinstance(strides, int) else tuple(strides)
        if len(window) != len(feature_shape) or len(strides) != len(window):
            raise AttributionError(
                f"sliding window {window} / strides {strides} for {key!r} must have one entry per feature "
                f"dimension of shape {tuple(feature_shape)}. Give e.g. sliding_window_shapes={tuple(1 for _ in feature_shape)}."
            )
        axes = []
        for size, w, s in zip(feature_shape, window, strides):
            if w > size or s < 1 or (w < size and s > w):
                raise AttributionError(
                    f"window {w} / stride {s} do not fit a dimension of size {size} (need window <= size and "
                    "1 <= stride <= window). Use a smaller window or stride."
                )
            count = math.ceil((size - w) / s) + 1
            pos = torch.arange(size, device=like.device)
            starts = torch.arange(count, device=like.device) * s
            axes.append(
                ((pos >= starts[:, None]) & (pos < starts[:, None] + w)).to(like.dtype)
            )  # (count, size)
        mask = axes[0]
        for axis in axes[1:]:
            mask = _outer(mask, axis)
        return mask.reshape(-1, *feature_shape)

    def normalise(self, attr: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        counts = masks.sum(0).reshape(1, 1, -1)
        return attr / counts


class FeatureAblation(_Perturbation):
    """Feature ablation: each feature (or group) replaced by its baseline, one at a time.

    Args:
        feature_mask: ``{in_key: LongTensor[*feature]}`` group ids (features with the same id are
            ablated together; ids ``0..G-1``). Default: every element is its own group.
        **settings: ``targets``, ``separate_targets``, ``init_attr_targets``,
            ``additional_init_keys``, ``baseline_key`` (per-row baselines, read if present),
            ``baseline_value`` (otherwise; default 0), ``chunk_size`` (perturbations per forward
            pass), ``attribution_key``, ``check_finite`` (see :class:`PerturbationSettings`).
    """

    def __init__(
        self,
        feature_mask: Mapping[NestedKey, torch.Tensor] | None = None,
        **settings: Unpack[PerturbationSettings],
    ) -> None:
        self.feature_mask = dict(feature_mask or {})
        self._configure(_GroupMasks(self.feature_mask), **settings)


class Occlusion(_Perturbation):
    """Occlusion (Zeiler & Fergus, 2014): a sliding window of baseline values (captum's values).

    Each position's attribution is the mean, over the windows covering it, of the target drop.

    Args:
        sliding_window_shapes: Window shape over the feature dimensions (one tuple for every
            input, or ``{in_key: tuple}``).
        strides: Window strides (an int, a tuple, or ``{in_key: ...}``; default 1).
        **settings: As :class:`FeatureAblation`.
    """

    def __init__(
        self,
        sliding_window_shapes: Sequence[int] | Mapping[NestedKey, Sequence[int]],
        strides: int | Sequence[int] | Mapping[NestedKey, Any] | None = None,
        **settings: Unpack[PerturbationSettings],
    ) -> None:
        self.sliding_window_shapes = sliding_window_shapes
        self.strides = strides
        self._configure(_WindowMasks(sliding_window_shapes, strides), **settings)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Window masks of two axis groups: ``(Wa, *Sa) x (Wb, Sb) -> (Wa, Wb, *Sa, Sb)`` flattened on W."""
    wa, sa = a.shape[0], a.shape[1:]
    wb, sb = b.shape
    out = a.reshape(wa, 1, *sa, 1) * b.reshape(1, wb, *([1] * len(sa)), sb)
    return out.reshape(wa * wb, *sa, sb)

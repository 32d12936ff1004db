"""Targets and backward seeds of the gradient engine, and input checks (``tdhook.attribution``).

The engine differentiates *targets* (model outputs, ``target_modules`` outputs, or what
``init_attr_targets`` makes of them) seeded by *seeds* (ones, one-hot rows for ``targets=``, or
``init_attr_grads``). Both callbacks see a TensorDict in the caller's batch layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from ._errors import AttributionError, TargetError
from ._options import AttrCallback, GradientOptions

__all__ = [
    "check_callback_result",
    "check_finite",
    "check_per_sample_targets",
    "default_seed",
    "key_str",
    "targets_and_seeds",
]


def key_str(key: NestedKey) -> str:
    """The attribution sub-key of an input key (``("a", "b")`` → ``"a.b"``)."""
    return key if isinstance(key, str) else ".".join(key)


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


def check_callback_result(value: Any, name: str) -> TensorDictBase:
    """A callback's result must be a TensorDict.

    Raises:
        AttributionError: Otherwise (a ``ValueError``; tdhook 0.1's message).
    """
    if not isinstance(value, TensorDictBase):
        raise AttributionError(
            f"{name} function must return a TensorDict, got {type(value).__name__}. "
            f"Wrap the result: TensorDict(out=..., batch_size=td.batch_size)."
        )
    return value


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
            f"select the last dimension (size {size}). Give indices in [-{size}, {size})."
        )
    index = index.remainder(size).reshape(torch.Size((*batch[:k], *([1] * (target.dim() - k)))))
    index = index.expand(*target.shape[:-1], 1)
    return torch.zeros_like(target).scatter_(-1, index, 1)


def default_seed(
    options: GradientOptions, target: torch.Tensor, batch: torch.Size, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Seed of one target ``(*batch, *feature)``: ones, or one-hot rows for ``targets``.

    ``index`` holds the per-sample target indices (flat ``(N,)``), if any.

    Raises:
        TargetError: For ``targets`` out of range of the target's last dimension.
    """
    if index is not None:
        return _per_sample_seed(target, index, batch)
    idx = options.targets
    if idx is None:
        return torch.ones_like(target)
    if isinstance(idx, torch.Tensor):  # no job index: flat, one per row of ``batch``
        return _per_sample_seed(target, idx.reshape(-1), batch)
    size = target.shape[-1] if target.dim() else 1
    indices = [idx] if isinstance(idx, int) else list(idx)
    bad = [i for i in indices if not -size <= i < size]
    if bad or target.dim() == 0:
        raise TargetError(
            f"targets {bad or indices} out of range for a target of shape {tuple(target.shape)}: indices "
            f"select the last dimension (size {size}). Give indices in [-{size}, {size})."
        )
    if not options.separate_targets:
        seed = torch.zeros_like(target)
        seed[..., indices] = 1
        return seed
    k = len(indices)
    eye = torch.eye(size, dtype=target.dtype, device=target.device)[indices]
    # a broadcast view, not a (K, *target) copy: one-hot rows expanded over the batch
    return eye.view(k, *([1] * (target.dim() - 1)), size).expand(k, *target.shape)


def leaves(name: Any, value: Any) -> Iterable[tuple[Any, torch.Tensor]]:
    """``(key, tensor)`` pairs of an output (a tensor, or the leaves of a TensorDict under ``name``)."""
    if isinstance(value, TensorDictBase):
        for k, v in value.items(include_nested=True, leaves_only=True):
            yield ((name, *k) if isinstance(k, tuple) else (name, k)), v
    else:
        yield name, value


def write_unflattened(
    td: TensorDictBase, out: TensorDictBase, keys: Iterable[Any], batch: torch.Size
) -> None:
    """Write ``out``'s entries at ``keys`` into ``td``, their flat leading dim reshaped to ``batch``."""
    for key in keys:
        value = out.get(key)
        td.set(
            key,
            value.reshape(batch)
            if isinstance(value, TensorDictBase)
            else value.reshape(torch.Size((*batch, *value.shape[1:]))),
        )


def empty_additional(additional: TensorDictBase | None, batch: Sequence[int]) -> TensorDictBase:
    """``additional``, or an empty TensorDict of batch ``batch`` for the callbacks."""
    return additional if additional is not None else TensorDict(batch_size=batch)


def targets_and_seeds(
    options: GradientOptions,
    out_keys: Sequence[NestedKey],
    out: TensorDictBase,
    module_targets: dict[str, torch.Tensor],
    shape: torch.Size,
    additional: TensorDictBase | None,
    *,
    check_grad: bool = True,
    index: torch.Tensor | None = None,
    seed_times_target: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The targets and their backward seeds, in the callbacks' layout ``(*shape, *feature)``.

    ``shape`` is the batch the callbacks see (the caller's ``B``, or ``(*B, c)`` for ``c``
    points); ``out`` and ``module_targets`` hold flat rows (``prod(shape)`` first). Both
    ``init_attr_targets`` and ``init_attr_grads`` receive a TensorDict of batch ``shape`` whose
    leaves are ``[*shape, ...]``; the seeds must have the targets' keys and shapes. With
    ``seed_times_target`` the default seeds are multiplied by the (detached) targets.

    Raises:
        TargetError: For a target without ``grad_fn`` or a target module that did not run.
        AttributionError: For seeds whose keys or shapes differ from the targets'.
    """
    entries: list[tuple[Any, torch.Tensor]] = []
    if options.use_outputs:
        for key in out_keys:
            entries.extend(leaves(key, out.get(key)))
    for key in options.target_modules or ():
        if key not in module_targets:
            raise TargetError(
                f"target module {key!r} did not run during the forward pass. Target a module on the "
                "path from the inputs to the outputs."
            )
        entries.append((key, module_targets[key]))
    entries = [(key, value.reshape(torch.Size((*shape, *value.shape[1:])))) for key, value in entries]
    if options.init_attr_targets is not None:
        targets_td = TensorDict(dict(entries), batch_size=shape) if entries else TensorDict(batch_size=shape)
        targets_td = check_callback_result(
            options.init_attr_targets(targets_td, empty_additional(additional, shape)), "init_attr_targets"
        )
        entries = list(targets_td.items(include_nested=True, leaves_only=True))
    for key, value in entries:
        if check_grad and value.grad_fn is None:
            raise TargetError(
                f"Target {key!r} has no grad_fn: it does not depend on the attributed inputs. Attribute "
                "to inputs the target is computed from, and do not detach or compute it under no_grad."
            )
    t_list = [v for _, v in entries]
    init_grads = options.init_attr_grads
    if init_grads is None:
        seeds = [default_seed(options, v, shape, index) for v in t_list]
        if seed_times_target:
            seeds = [s * v.detach() for s, v in zip(seeds, t_list)]
        return t_list, seeds
    return t_list, _user_seeds(init_grads, options.separate_targets, entries, shape, additional)


def _user_seeds(
    init_grads: AttrCallback,
    separate: bool,
    entries: list[tuple[Any, torch.Tensor]],
    shape: torch.Size,
    additional: TensorDictBase | None,
) -> list[torch.Tensor]:
    t_list = [v for _, v in entries]
    n_lead = len(shape)
    if not all(tuple(v.shape[:n_lead]) == tuple(shape) for v in t_list):
        # a target reduced over the batch by init_attr_targets: the largest common batch
        n_lead = 0
    t_td = TensorDict(dict(entries), batch_size=shape[:n_lead])
    seeds_td = check_callback_result(init_grads(t_td, empty_additional(additional, shape)), "init_attr_grads")
    keys_t = {key_str(k) for k, _ in entries}
    keys_s = {key_str(k) for k in seeds_td.keys(include_nested=True, leaves_only=True)}
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
                f"{tuple(value.shape)}. Return one tensor per target key (e.g. targets.apply(torch.ones_like))."
            )
        lead = (seed.shape[0],) if separate and seed.dim() > value.dim() else ()
        expected = lead + tuple(value.shape)
        if tuple(seed.shape) != expected:
            raise AttributionError(
                f"init_grads should have the same batch size as targets: seed {key!r} has shape "
                f"{tuple(seed.shape)}, expected {expected}"
                + (
                    " (with a leading K dimension for separate_targets)."
                    if separate
                    else " (the target's shape; e.g. torch.ones_like(target))."
                )
            )
        if separate and not lead:
            raise AttributionError(
                f"init_grads should have the same batch size as targets: with separate_targets, seed "
                f"{key!r} needs a leading K dimension, shape (K, {', '.join(map(str, value.shape))})."
            )
        s_list.append(seed.to(device=value.device, dtype=value.dtype))
    return s_list

"""The only place the streaming estimators talk to ``torch.distributed``.

Every accumulator reduces by *summing* tensors across ranks; this module checks that a process
group exists and performs the sum in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DistributedNotInitializedError

__all__ = ["all_reduce_sum", "require_process_group"]


def require_process_group(owner: str) -> None:
    """Raise :class:`DistributedNotInitializedError` unless a default process group is initialised.

    Args:
        owner: Name of the calling estimator, for the message.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedNotInitializedError(
            f"{owner}.all_reduce() needs an initialised torch.distributed process group, and none is. "
            f"Call torch.distributed.init_process_group(backend='gloo' (CPU) or 'nccl' (GPU), ...) on every "
            f"rank first, or launch the script with torchrun (e.g. torchrun --nproc-per-node 2 script.py) "
            f"and call torch.distributed.init_process_group() without arguments."
        )


def all_reduce_sum(tensors: list[Tensor], group: Any = None) -> None:
    """Sum each tensor across the ranks of ``group``, in place.

    Args:
        tensors: Tensors with the same shape, dtype and device on every rank.
        group: A process group, or ``None`` for the default group.
    """
    if not tensors:
        return
    first = tensors[0]
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        # one collective for all the statistics instead of one per tensor
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

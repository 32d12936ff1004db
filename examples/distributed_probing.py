"""Probe every layer of a model over a dataset split across processes (or machines).

Each process feeds its shard of the data, batch by batch, to streaming linear probes through
``Probing`` and ``ProbeManager`` (``step_type="partial_fit"``); ``manager.all_reduce()`` then sums
the probes' sufficient statistics with ``torch.distributed``, so every process holds the fit on
all the data, and each one scores its own shard of the test set.

Run it with torchrun (or plain ``python`` for one process)::

    torchrun --standalone --nproc-per-node 2 examples/distributed_probing.py
    # several machines: the same command on each, with a shared rendezvous endpoint
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
        examples/distributed_probing.py

``--check`` also fits the same probes in one process on all the data and prints the largest
difference of the test R² (float64 round-off: about 1e-15).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import nn

from tdhook.latent.probing import ProbeManager, Probing
from tdhook.latent.stats import StreamingLinearRegression

N_TRAIN, N_TEST, BATCH = 4096, 1024, 256
IN, WIDTH, DEPTH = 16, 64, 4


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # every process builds the same model
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(IN if i == 0 else WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers).eval()


def make_data(n: int, seed: int) -> TensorDict:
    """Inputs and a nonlinear 2-d target; the same on every process (each takes its shard)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, 2, generator=torch.Generator().manual_seed(99))
    labels = torch.sin(x @ w / 4) + 0.05 * torch.randn(n, 2, generator=g)
    return TensorDict({"input": x, "labels": labels}, batch_size=[n])


def r2(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    preds, labels = torch.as_tensor(preds, dtype=torch.float64), labels.double()
    residual = ((labels - preds) ** 2).sum(0)
    total = ((labels - labels.mean(0)) ** 2).sum(0)
    return {"r2": float((1 - residual / total).mean())}


def fit_probes(model: nn.Module, train: TensorDict, test: TensorDict, *, reduce: bool) -> ProbeManager:
    """Stream ``train`` through streaming probes on every Tanh, all-reduce, then score ``test``."""
    manager = ProbeManager(StreamingLinearRegression, {}, r2)
    probing = Probing(r"\d+$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with torch.no_grad(), probing.prepare(model) as hooked:
        for batch in train.split(BATCH):
            batch = batch.clone(False)
            batch["step_type"] = "partial_fit"
            hooked(batch)
        if reduce:
            manager.all_reduce()  # every process, same order: sums the statistics of all shards
        test = test.clone(False)
        test["step_type"] = "predict"
        hooked(test)
    return manager


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare with a one-process fit on all the data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # "nccl" with one GPU per process (and the data on it)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model = make_model()
    train, test = make_data(N_TRAIN, seed=1), make_data(N_TEST, seed=2)
    shard = slice(rank, None, world)  # or a DistributedSampler
    manager = fit_probes(model, train[shard], test[shard], reduce=distributed)

    if rank == 0:
        print(f"{world} process(es), {N_TRAIN} training samples in all; test R² on process 0's shard:")
        for name, metrics in manager.predict_metrics.items():
            print(f"  {name}: {metrics['r2']:.4f}")
    if args.check:
        single = fit_probes(model, train, test[shard], reduce=False)
        diff = max(
            abs(manager.predict_metrics[k]["r2"] - single.predict_metrics[k]["r2"])
            for k in single.predict_metrics
        )
        if rank == 0:
            print(f"max |R² difference| vs one process on all the data: {diff:.1e}")
        if diff > 1e-9:
            raise SystemExit(
                f"process {rank}: the all-reduced probes differ from the one-process fit by {diff:.1e}"
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Integrated gradients: tdhook vs captum vs the raw-autograd limit (one process, 2 threads).

The limit is a hand-written loop: one forward over all interpolated steps, then one
``autograd.grad`` (for K separate targets, one batched VJP with ``is_grads_batched=True``).
captum needs one call per target (summed targets: the sum of single-target calls).

Usage::

    .venv/bin/python bench/bench_ig.py            # timings at width 256 and 1000
    .venv/bin/python bench/bench_ig.py --memory   # peak memory vs n_steps, with and without chunks
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from captum.attr import IntegratedGradients as CaptumIG
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import IntegratedGradients

N_STEPS = 50
#: The clock timings use: wall time, or the process's CPU time (robust on a loaded machine).
CLOCK: Callable[[], float] = time.perf_counter


def mlp(depth: int, width: int, n_out: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers).eval()


def gl(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (1 + x), dtype=torch.float32), torch.tensor(0.5 * w, dtype=torch.float32)


def limit(
    model: nn.Module, x: torch.Tensor, b: torch.Tensor, targets: list[int], separate: bool
) -> torch.Tensor:
    """The physical limit: one forward over all steps, one autograd.grad (or one batched VJP)."""
    alphas, weights = gl(N_STEPS)
    n, f = x.shape
    d = x - b
    pts = (b.unsqueeze(1) + alphas.view(1, -1, 1) * d.unsqueeze(1)).reshape(n * N_STEPS, f).requires_grad_()
    out = model(pts)
    if separate:
        seeds = torch.zeros(len(targets), *out.shape)
        for k, t in enumerate(targets):
            seeds[k, :, t] = 1
        (g,) = torch.autograd.grad(out, pts, seeds, is_grads_batched=True)
        return (g.view(len(targets), n, N_STEPS, f) * weights.view(1, 1, -1, 1)).sum(2) * d
    seed = torch.zeros_like(out)
    seed[:, targets] = 1
    (g,) = torch.autograd.grad(out, pts, seed)
    return (g.view(n, N_STEPS, f) * weights.view(1, -1, 1)).sum(1) * d


def captum(model: nn.Module, x: torch.Tensor, b: torch.Tensor, targets: list[int], separate: bool):
    ig = CaptumIG(model)
    maps = [ig.attribute(x, b, target=t, n_steps=N_STEPS) for t in targets]
    return torch.stack(maps) if separate else sum(maps)


def ours_factory(targets: list[int], separate: bool) -> IntegratedGradients:
    return IntegratedGradients(
        targets=targets, separate_targets=separate, multiply_by_inputs=True, n_steps=N_STEPS
    )


def _call_ours(hooked: Callable[[TensorDict], TensorDict], td: TensorDict) -> TensorDict:
    return hooked(td.clone(False))


def interleaved_medians(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median time of each function, run round-robin so that load changes hit all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = CLOCK()
            fn()
            times[i].append(CLOCK() - start)
    return [statistics.median(t) for t in times]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_timings(widths: list[int], depth: int, batch: int, repeats: int, cases: list[str]) -> None:
    clock = "CPU time" if CLOCK is time.process_time else "wall time"
    print(
        f"IG, MLP depth {depth}, batch {batch}, {N_STEPS} steps, {torch.get_num_threads()} threads, {clock}"
    )
    print(
        f"{'width':>6} {'case':>12} {'limit ms':>9} {'captum ms':>10} {'ours ms':>8} {'ours/captum':>12} {'ours/limit':>11} {'limit/captum':>13}"
    )
    for width in widths:
        model = mlp(depth, width)
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1)
        x = torch.randn(batch, width)
        b = torch.zeros(batch, width)
        td = TensorDict(input=x, batch_size=[batch])
        td["baseline", "input"] = b
        for case, targets, separate in (
            ("single", [3], False),
            ("2 summed", [3, 5], False),
            ("K=8 separate", list(range(8)), True),
        ):
            if case not in cases:
                continue
            ref = limit(model, x, b, targets, separate)
            with ours_factory(targets, separate).prepare(model) as hooked:
                got = hooked(td.clone(False))["attr", "input"]
                got = got.movedim(1, 0) if separate else got
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
                t_ours, t_limit, t_captum = interleaved_medians(
                    [
                        functools.partial(_call_ours, hooked, td),
                        functools.partial(limit, model, x, b, targets, separate),
                        functools.partial(captum, model, x, b, targets, separate),
                    ],
                    repeats,
                )
            print(
                f"{width:>6} {case:>12} {t_limit * 1e3:>9.1f} {t_captum * 1e3:>10.1f} {t_ours * 1e3:>8.1f} "
                f"{t_ours / t_captum:>12.2f} {t_ours / t_limit:>11.2f} {t_limit / t_captum:>13.2f}"
            )


def memory_one(n_steps: int, chunk: int | None, width: int, depth: int, batch: int) -> float:
    """Peak RSS growth (MiB) of one IG call, in this (fresh) process."""
    model = mlp(depth, width)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, width)
    td = TensorDict(input=x, batch_size=[batch])
    td["baseline", "input"] = torch.zeros(batch, width)
    ig = IntegratedGradients(targets=[1], n_steps=n_steps, chunk_size=chunk)
    with ig.prepare(model) as hooked:
        small = IntegratedGradients(targets=[1], n_steps=2)
        with small.prepare(model) as warm:
            warm(td.clone(False))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hooked(td.clone(False))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def run_memory(width: int, depth: int, batch: int) -> None:
    """Peak memory vs n_steps, each measurement in a fresh process (ru_maxrss growth)."""
    print(f"peak RSS growth (MiB) of one IG call vs n_steps, MLP depth {depth} width {width} batch {batch}")
    print(f"{'n_steps':>8} {'no chunks':>10} {'chunk_size=16':>14}")
    for n_steps in (16, 64, 256):
        row = []
        for chunk in ("none", "16"):
            cmd = [sys.executable, __file__, "--memory-one", str(n_steps), chunk]
            cmd += ["--widths", str(width), "--depth", str(depth), "--batch", str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row.append(float(out.strip().splitlines()[-1]))
        print(f"{n_steps:>8} {row[0]:>10.1f} {row[1]:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (for loaded machines)"
    )
    parser.add_argument("--cases", nargs="+", default=["single", "2 summed", "K=8 separate"])
    parser.add_argument("--memory-one", nargs=2, metavar=("N_STEPS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.memory_one:
        n_steps, chunk = args.memory_one
        size = memory_one(
            int(n_steps), None if chunk == "none" else int(chunk), args.widths[0], args.depth, args.batch
        )
        print(f"{size:.1f}")
    elif args.memory:
        run_memory(args.widths[0], args.depth, args.batch)
    else:
        run_timings(args.widths, args.depth, args.batch, args.repeats, args.cases)


if __name__ == "__main__":
    main()

"""Interleaved A/B comparison in one process, for profiling on a busy machine.

``python -m bench.ab TASK '{"param": ...}' [ROUNDS]`` (run it with the task's environment's
python, e.g. ``bench/.envs/captum/bin/python``). Every library is set up once; then, round after
round, each library runs 3 times and the median CPU time of the process is kept; the minimum
over rounds is reported. One thread, so a loaded machine inflates it least. This is *not* the
benchmark (no fresh process per library, no gate): ``python -m bench.run`` is; use this to see
where a ratio comes from.

``python -m bench.ab --paired TASK '{"param": ...}' [CYCLES] [INNER]`` times the libraries in
turn within each cycle instead, and reports the median over cycles of each library's time per
call minus the baseline's *in the same cycle*. A machine whose speed drifts (a shared VM, where a
plain call may take 200 µs one minute and 350 µs the next) shifts every library of a cycle
alike, so the paired differences keep overheads of a few µs that separate processes lose.

Each library's turn is ``INNER`` calls in a row, timed together: by default its ``inner``, the
calls that make one timing sample in the benchmark itself (``bench.run``), so that the code is
as warm as there. ``INNER=1`` times single calls, each right after the other libraries' calls:
colder (each library's code partly evicted by the others'), which weighs code size as well as
work.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from ._harness import Skip, pin
from .tasks import load


def _ready(task: Any, params: dict) -> dict[str, Any]:
    """Every library of ``task`` set up on ``params`` and run once, by name (unavailable ones skipped)."""
    impls = {}
    for cls in task.impls:
        try:
            impl = cls()
            impl.setup(params)
            impl.run()
        except (ImportError, Skip) as err:
            print(f"  {cls.name}: skipped ({err})")
            continue
        impls[cls.name] = impl
    return impls


def paired(task_name: str, params: dict, cycles: int, inner: int | None = None) -> dict[str, float]:
    """Median over cycles of (library - baseline) per call, for turns of ``inner`` calls; µs.

    ``inner=None`` takes each library's own ``inner`` (as the benchmark's timing samples do).
    """
    task = load(task_name)
    impls = _ready(task, params)
    for _ in range(100):
        for impl in impls.values():
            impl.run()
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {n: [] for n in impls}
    order = list(impls.items())
    for cycle in range(cycles):
        # the order rotates each cycle: a library called right after another that ran the same
        # code (the baseline after raw hooks, both calling TensorDictModule) would find it warmer
        shift = cycle % len(order)
        for name, impl in order[shift:] + order[:shift]:
            calls = inner or getattr(impl, "inner", 1)
            run = impl.run
            t0 = clock()
            for _ in range(calls):
                run()
            samples[name].append((clock() - t0) / calls)
    base = samples[task.baseline] if task.baseline else [0] * cycles
    return {n: statistics.median(a - b for a, b in zip(v, base)) / 1e3 for n, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pin(1)
    if args and args[0] == "--paired":
        task_name, params = args[1], json.loads(args[2])
        inner = int(args[4]) if len(args) > 4 else None
        above = paired(task_name, params, int(args[3]) if len(args) > 3 else 3000, inner)
        turns = "each library's own inner calls" if inner is None else f"{inner} call(s)"
        print(
            f"{task_name} {params} (paired, turns of {turns}, µs per call above {load(task_name).baseline}, median over cycles)"
        )
        peers = [n for n in above if n != load(task_name).baseline]
        for name in peers:
            ratios = "  ".join(
                f"{name}/{other} {above[name] / above[other]:.2f}"
                for other in peers
                if other != name and above[other] > 0
            )
            print(f"  {name:18s} {above[name]:+8.1f} µs   {ratios}")
        return 0
    task = load(args[0])
    params = json.loads(args[1])
    rounds = int(args[2]) if len(args) > 2 else 5
    impls = _ready(task, params)
    samples: dict[str, list[float]] = {n: [] for n in impls}
    for _ in range(rounds):
        for name, impl in impls.items():
            times = []
            for _ in range(3):
                c0 = time.process_time()
                for _ in range(impl.inner):
                    impl.run()
                times.append((time.process_time() - c0) / impl.inner)
            samples[name].append(statistics.median(times))
    best = {n: min(v) for n, v in samples.items()}
    base = best.get(task.baseline, 0.0) if task.baseline else 0.0
    ours = best[task.ours] - base
    print(f"{task.name} {params}")
    for name, value in best.items():
        above = value - base
        ratio = f"{ours / above:.2f}" if above > 0 and name not in (task.ours, task.baseline) else ""
        print(f"  {name:18s} {value * 1e3:10.3f} ms CPU  ours/this {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

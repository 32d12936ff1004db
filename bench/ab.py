"""Interleaved A/B comparison in one process, for profiling on a busy machine.

``python -m bench.ab TASK '{"param": ...}' [ROUNDS]`` (run it with the task's environment's
python, e.g. ``bench/.envs/captum/bin/python``). Every library is set up once; then, round after
round, each library runs 3 times and the median CPU time of the process is kept; the minimum
over rounds is reported. One thread, so a loaded machine inflates it least. This is *not* the
benchmark (no fresh process per library, no gate): ``python -m bench.run`` is; use this to see
where a ratio comes from.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from ._harness import Skip, pin
from .tasks import load


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pin(1)
    task = load(args[0])
    params = json.loads(args[1])
    rounds = int(args[2]) if len(args) > 2 else 5
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

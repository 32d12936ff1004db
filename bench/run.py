"""Run the benchmarks and write ``docs/benchmarks.md`` and ``docs/benchmarks.png``.

Usage::

    python -m bench.envs                 # build bench/.envs/* (once; several GB)
    python -m bench.run                  # every task, every case
    python -m bench.run --tasks hook_overhead intervention --quick
    python -m bench.run --report-only    # rewrite the report from bench/results/results.json
    python -m bench.run --smoke          # correctness gates only, tiny sizes, dev environment

Results accumulate in ``bench/results/results.json`` (one entry per task and case, replaced
when rerun), so tasks can be run one at a time and the report stays complete.

The published report (``docs/benchmarks.md``/``.png``) is only ever replaced by a complete one:
when an environment a task needs is missing, nothing runs, the command says how to build it and
exits with status 2; when a case is unavailable, the report goes to ``bench/results/`` (git-ignored)
instead and the command exits with status 1. When the results lack tasks that the published report
has tables for (``bench/results/`` is git-ignored, so a fresh machine starts empty), only the
tables of the tasks that ran are replaced and the rest of the page is kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import _report
from ._harness import ROOT, THREADS, child_env, env_python, run_case, run_in_process
from .tasks import TASKS, load

RESULTS = ROOT / "bench" / "results" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
PARTIAL_DOC = ROOT / "bench" / "results" / "benchmarks.md"
PARTIAL_PLOT = ROOT / "bench" / "results" / "benchmarks.png"
IMPORT_SIZE_ENVS = ("tdhook", "transformer-lens")

QUICK_TIMING = {"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 5.0}


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"cases": {}, "envs": {}, "extra": {}}


def save_results(results: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


_VERSIONS = (
    "import importlib.metadata as m, json, sys\n"
    "out = {'python': sys.version.split()[0]}\n"
    "for d in ('torch', 'torchvision', 'tensordict', 'tdhook', 'captum', 'zennit', 'nnsight',\n"
    "          'transformer-lens', 'transformers', 'numpy'):\n"
    "    try:\n"
    "        out[d] = m.version(d)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps(out))\n"
)


def env_versions(env: str) -> dict[str, str]:
    python = env_python(env)
    if not python.exists():
        return {}
    out = subprocess.run(
        [str(python), "-c", _VERSIONS], capture_output=True, text=True, env=child_env(), check=False
    )
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}


def smoke(names: list[str]) -> int:
    """Run the correctness gate of every case's ``smoke`` parameters in this process."""
    from ._harness import Skip, compare_outputs

    failures = 0
    for name in names:
        task = load(name)
        for case in task.cases:
            if case.smoke is None:
                continue
            outputs = {}
            for impl in task.impls:
                try:
                    outputs[impl.name] = run_in_process(task, impl.name, case.smoke)
                except (ImportError, Skip) as err:
                    print(f"{name}/{case.id}/{impl.name}: skipped ({err})")
            ours = outputs.pop(task.ours, None)
            for lib, out in outputs.items():
                if out is None:
                    continue
                ok, why = compare_outputs(ours, out, task.rtol, task.atol)
                print(f"{name}/{case.id}: {task.ours} vs {lib}: {'ok' if ok else 'FAILED'} ({why})")
                failures += not ok
    return failures


def missing_envs(names: list[str]) -> list[str]:
    """The environments the given tasks need that are not built, in first-use order."""
    needed = [
        env for name in names for env in (IMPORT_SIZE_ENVS if name == "import_size" else (load(name).env,))
    ]
    return [env for env in dict.fromkeys(needed) if not env_python(env).exists()]


def unavailable_cases(results: dict[str, Any]) -> list[str]:
    """Keys (``task/case``) of the saved results that could not run."""
    return [key for key, entry in results["cases"].items() if entry.get("status") == "unavailable"]


def publish(results: dict[str, Any]) -> int:
    """Write the report: to ``docs/`` when every case ran, else to ``bench/results/`` (returns 1).

    Results that lack some of the published tasks update only their own tables (see
    :func:`bench._report.update`).
    """
    missing = unavailable_cases(results)
    if missing:
        _report.write(results, PARTIAL_DOC, PARTIAL_PLOT)
        print(
            f"{len(missing)} case(s) unavailable ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
            f"the published {DOC.relative_to(ROOT)} is unchanged; this partial report is in "
            f"{PARTIAL_DOC.relative_to(ROOT)}. Build the environments (python -m bench.envs) and rerun those tasks.",
            file=sys.stderr,
        )
        return 1
    absent = _report.missing_tasks(results, DOC)
    if absent:
        updated = _report.update(results, DOC)
        print(
            f"updated the tables of {', '.join(updated)} in {DOC.relative_to(ROOT)}; the results hold no entry for "
            f"{', '.join(absent)}, so their tables and {PLOT.relative_to(ROOT)} stay as published.",
            file=sys.stderr,
        )
        return 0
    _report.write(results, DOC, PLOT)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=None, help=f"among {', '.join(TASKS)}, import_size")
    parser.add_argument("--cases", nargs="*", default=None, help="case ids to run (default: all)")
    parser.add_argument("--libs", nargs="*", default=None, help="libraries to run (ours always runs)")
    parser.add_argument("--quick", action="store_true", help="only the quick cases, few repeats")
    parser.add_argument("--smoke", action="store_true", help="correctness gates only, tiny sizes, in-process")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from saved results")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.*")
    args = parser.parse_args(argv)
    names = list(args.tasks) if args.tasks else [*TASKS, "import_size"]
    if args.smoke:
        return 1 if smoke([n for n in names if n != "import_size"]) else 0
    absent = [] if args.report_only else missing_envs(names)
    if absent:
        print(
            f"missing benchmark environment(s): {', '.join(absent)} (bench/.envs/<name>).\n"
            f"Build them first (several GB, once): python -m bench.envs {' '.join(absent)}   (or: make bench)\n"
            "Nothing was run, and docs/benchmarks.md / .png were not touched.",
            file=sys.stderr,
        )
        return 2
    results = load_results()
    if not args.report_only:
        for name in names:
            if name == "import_size":
                from .tasks import import_size

                results["extra"]["import_size"] = import_size.measure_all(quick=args.quick)
                save_results(results)
                continue
            task = load(name)
            results["envs"][task.env] = env_versions(task.env)
            for case in task.cases:
                if args.cases and case.id not in args.cases:
                    continue
                if args.quick and not case.quick and not args.cases:  # named cases always run
                    continue
                start = time.perf_counter()
                print(f"[{name}] {case.id}", flush=True)
                res = run_case(task, case, timing=QUICK_TIMING if args.quick else None, libs=args.libs)
                entry = res.to_json()
                entry["wall_s"] = round(time.perf_counter() - start, 1)
                entry["quick"] = args.quick
                entry["threads"] = THREADS
                results["cases"][f"{name}/{case.id}"] = entry
                save_results(results)
                print(f"[{name}] {case.id}: {res.status} {res.reason} ({entry['wall_s']} s)", flush=True)
    if not args.no_report:
        return publish(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark harness: tasks, child processes, timing, the correctness gate and the report.

A *task* (one module in ``bench/tasks``) declares a :class:`Task`: the environment its libraries
run in, its cases (parameter sets) and one :class:`Impl` subclass per library, ours first. For
every case the parent process:

1. runs each library once in a fresh child process (``python -m bench._child``) and collects its
   output: the **correctness gate**. Every peer must agree with ours (``allclose`` with the task's
   tolerances), or the case is reported as failed and nothing is timed;
2. runs each library again in a fresh child that warms up, then repeats the call and reports the
   median, p10 and p90 wall time and the peak RSS above the baseline after set-up (the model,
   the inputs and the library are already loaded then);
3. writes ratios ours / peer (lower is better) next to the task's targets.

Children pin threads to 2, use float32 and fixed seeds. Only the standard library and torch are
imported at module level, so this file runs in every peer's environment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENVS_DIR = ROOT / "bench" / ".envs"
#: Threads of every child (the issue's 2; ``TDHOOK_BENCH_THREADS`` overrides it on a busy machine).
THREADS = int(os.environ.get("TDHOOK_BENCH_THREADS", "2"))
SEED = 0

__all__ = [
    "Case",
    "CaseResult",
    "Impl",
    "LibResult",
    "Skip",
    "Task",
    "compare_outputs",
    "extrapolated",
    "measure",
    "run_case",
]


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------


class Skip(Exception):
    """Raised by ``Impl.setup`` when a library does not take part in a case (the reason is shown)."""


class Impl:
    """One library's way of doing a task. Subclasses live in the task module.

    ``setup(params)`` builds the model, inputs and anything the library prepares once;
    ``run()`` is the timed call; ``output()`` returns what the gate compares (a tensor or a dict
    of tensors) after one ``run()``. ``inner`` calls of ``run()`` make one timing sample (for
    micro-benchmarks), reported per call.

    ``extrapolate`` (set in ``setup``) is for a call too long to repeat: ``run()`` then does a
    measured part of it, made of identical sub-calls (e.g. 26 of the 242 forwards of patching
    every site), and every reported time is multiplied by ``extrapolate`` (242 / 26); the
    report marks those times as extrapolated.
    """

    name: str = ""
    label: str = ""
    inner: int = 1
    extrapolate: float = 1.0

    def setup(self, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def run(self) -> Any:
        raise NotImplementedError

    def output(self) -> Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Case:
    """One parameter set of a task; ``id`` names it in the table."""

    id: str
    params: Mapping[str, Any]
    quick: bool = True  # part of --quick
    gate: Mapping[str, Any] | None = None  # parameters overridden for the gate (e.g. no noise)
    smoke: Mapping[str, Any] | None = None  # tiny parameters for the CI smoke test (gate only)


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark task.

    Args:
        name: Module name under ``bench/tasks`` (also the table's section).
        title: One line for the report.
        env: The environment (``bench/.envs/<env>``) every library of the task runs in.
        impls: Library implementations; the first is ours.
        cases: Parameter sets.
        rtol, atol: Gate tolerances.
        targets: ``{peer name: highest acceptable ours/peer ratio}``.
        case_targets: ``{case id: {peer name: ratio}}``, overriding ``targets`` for one case.
        baseline: An impl (not a library, e.g. the plain forward) whose median is subtracted:
            the table then reports overhead in µs above it, and ratios of overheads.
        memory: Report peak RSS (off for micro-benchmarks where it is noise).
    """

    name: str
    title: str
    env: str
    impls: Sequence[type[Impl]]
    cases: Sequence[Case]
    rtol: float = 1e-5
    atol: float = 1e-5
    targets: Mapping[str, float] = dataclasses.field(default_factory=dict)
    case_targets: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    baseline: str | None = None
    memory: bool = True
    timing: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""

    @property
    def ours(self) -> str:
        return self.impls[0].name

    def target(self, case_id: str, peer: str) -> float | None:
        """The highest acceptable ours / ``peer`` ratio on ``case_id`` (None: no target)."""
        return {**self.targets, **self.case_targets.get(case_id, {})}.get(peer)

    def impl(self, name: str) -> type[Impl]:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"Task {self.name!r} has no library {name!r}; it has {[i.name for i in self.impls]}.")


# --------------------------------------------------------------------------------------------
# In the child: pinning, timing, memory
# --------------------------------------------------------------------------------------------


def pin(threads: int = THREADS, seed: int = SEED) -> None:
    """Pin torch to ``threads`` threads, float32 and a fixed seed (call before building anything)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(seed)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(
    run: Callable[[], Any],
    *,
    inner: int = 1,
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 50,
    budget_s: float = 20.0,
    memory: bool = True,
) -> dict[str, Any]:
    """Warm up, then time ``run`` (``inner`` calls per sample) until the repeats or the budget are spent.

    Returns:
        ``median_s``, ``p10_s``, ``p90_s``, ``min_s`` (wall time per call), ``cpu_median_s``
        (process CPU time per call, all threads: less sensitive to a busy machine), ``repeats``, and ``peak_rss_mib`` (peak RSS
        during the warm-up and the repeats, above the RSS before them) when ``memory``.
    """
    import gc

    gc.collect()
    base_kib = _status_kib("VmRSS")
    can_reset = memory and _reset_peak()
    for _ in range(warmup):
        for _ in range(inner):
            run()
    samples: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            run()
        samples.append((time.perf_counter() - t0) / inner)
        cpu.append((time.process_time() - c0) / inner)
        if len(samples) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    samples.sort()
    result: dict[str, Any] = {
        "median_s": statistics.median(samples),
        "p10_s": _quantile(samples, 0.1),
        "p90_s": _quantile(samples, 0.9),
        "min_s": samples[0],
        "cpu_median_s": statistics.median(cpu),
        "repeats": len(samples),
    }
    if can_reset:
        result["peak_rss_mib"] = max(0, _status_kib("VmHWM") - base_kib) / 1024
    return result


_TIMES = ("median_s", "p10_s", "p90_s", "min_s", "cpu_median_s")


def extrapolated(timing: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``timing`` with every time multiplied by ``factor`` and ``extrapolated: factor`` recorded."""
    if factor == 1.0:
        return dict(timing)
    return {**timing, **{k: timing[k] * factor for k in _TIMES if k in timing}, "extrapolated": factor}


def compare_outputs(ours: Any, theirs: Any, rtol: float, atol: float) -> tuple[bool, str]:
    """``allclose`` on tensors or dicts of tensors; returns ``(ok, reason)``."""
    import torch

    if isinstance(ours, Mapping) or isinstance(theirs, Mapping):
        if not (isinstance(ours, Mapping) and isinstance(theirs, Mapping)):
            return False, f"output kinds differ: {type(ours).__name__} vs {type(theirs).__name__}"
        if set(ours) != set(theirs):
            return False, f"output keys differ: {sorted(map(str, ours))} vs {sorted(map(str, theirs))}"
        worst = ""
        for key in ours:
            ok, reason = compare_outputs(ours[key], theirs[key], rtol, atol)
            if not ok:
                return False, f"{key}: {reason}"
            worst = worst or reason
        return True, worst
    a = torch.as_tensor(ours).detach().float()
    b = torch.as_tensor(theirs).detach().float()
    if a.shape != b.shape:
        return False, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    ok = bool(torch.allclose(a, b, rtol=rtol, atol=atol))
    return ok, f"max |Δ| = {max_abs:.2e} (max |ref| = {scale:.2e}, rtol={rtol:g}, atol={atol:g})"


# --------------------------------------------------------------------------------------------
# In the parent: environments and child processes
# --------------------------------------------------------------------------------------------


def env_python(env: str) -> Path:
    """The interpreter of ``bench/.envs/<env>`` (``"dev"`` is the project's own ``.venv``)."""
    if env == "dev":
        return ROOT / ".venv" / "bin" / "python"
    return ENVS_DIR / env / "bin" / "python"


def child_env() -> dict[str, str]:
    """The environment of every child: threads pinned, our sources importable, no user site."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(THREADS)
    # this checkout's sources first: an environment's editable install may point at another tree
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT / "src"), str(ROOT)))
    env["PYTHONNOUSERSITE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TQDM_DISABLE"] = "1"
    return env


@dataclasses.dataclass
class LibResult:
    """What one library did on one case."""

    name: str
    status: str = "ok"  # ok | unavailable | error | mismatch | skipped
    reason: str = ""
    gate: str = ""
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CaseResult:
    task: str
    case: str
    params: dict[str, Any]
    status: str  # ok | failed | unavailable
    reason: str
    libs: list[LibResult]
    load: list[float] = dataclasses.field(default_factory=list)  # 1-min load average, before/after

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _run_child(python: Path, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tdhook-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec = {**spec, "out_dir": tmp}
        spec_path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run(
                [str(python), "-m", "bench._child", str(spec_path)],
                cwd=ROOT,
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
        result_path = Path(tmp) / "result.json"
        if not result_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"status": "error", "reason": f"child exited {proc.returncode}: {' | '.join(tail)}"}
        result = json.loads(result_path.read_text())
        output_path = Path(tmp) / "output.pt"
        if output_path.exists():
            import torch

            result["output"] = torch.load(output_path, weights_only=True)
        return result


def run_in_process(task: Task, lib: str, params: Mapping[str, Any]) -> Any:
    """Set up ``lib`` and return its output, in this process (the CI smoke test uses it)."""
    pin()
    impl = task.impl(lib)()
    impl.setup(params)
    impl.run()
    return impl.output()


def run_case(
    task: Task,
    case: Case,
    *,
    params: Mapping[str, Any] | None = None,
    timing: dict[str, Any] | None = None,
    libs: Sequence[str] | None = None,
    timeout_s: float = 900.0,
    log: Callable[[str], None] = print,
) -> CaseResult:
    """Gate, then time, every library of ``task`` on ``case`` (each in fresh child processes)."""
    params = dict(case.params if params is None else params)
    names = [i.name for i in task.impls if libs is None or i.name in libs or i.name == task.ours]
    python = env_python(task.env)
    if not python.exists():
        reason = f"environment {task.env!r} is missing: run `python -m bench.envs {task.env}`"
        return CaseResult(task.name, case.id, params, "unavailable", reason, [])
    base = {"task": task.name, "params": params}
    gate_base = {"task": task.name, "params": {**params, **(case.gate or {})}}
    results = {n: LibResult(n) for n in names}
    outputs: dict[str, Any] = {}
    # 1. correctness gate
    for name in names:
        log(f"  [{task.name}/{case.id}] gate: {name}")
        r = _run_child(python, {**gate_base, "lib": name, "mode": "output"}, timeout_s)
        if r.get("status") != "ok":
            results[name].status = r.get("status", "error")
            results[name].reason = r.get("reason", "")
            continue
        outputs[name] = r.get("output")
    ours = task.ours
    if ours not in outputs:
        res = results[ours]
        return CaseResult(
            task.name, case.id, params, "unavailable", f"{ours}: {res.reason}", list(results.values())
        )
    failed = []
    for name in names:
        if name == ours or name not in outputs or (name == task.baseline and outputs[name] is None):
            continue
        ok, why = compare_outputs(outputs[ours], outputs[name], task.rtol, task.atol)
        results[name].gate = why
        if not ok:
            results[name].status = "mismatch"
            failed.append(f"{name}: {why}")
    if failed:
        return CaseResult(task.name, case.id, params, "failed", "; ".join(failed), list(results.values()))
    # 2. timing: `rounds` fresh processes per library, interleaved; the round with the lowest
    # median is kept (one process's memory layout alone moved GPT-2's forward by ~10% here)
    load = [os.getloadavg()[0]]
    settings = {**task.timing, **(timing or {})}
    rounds = int(settings.pop("rounds", 1))
    for round_ in range(rounds):
        for name in names:
            if results[name].status != "ok":
                continue
            log(
                f"  [{task.name}/{case.id}] time: {name}"
                + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else "")
            )
            r = _run_child(
                python,
                {**base, "lib": name, "mode": "time", "timing": settings, "memory": task.memory},
                timeout_s,
            )
            if r.get("status") != "ok":
                results[name].status = r.get("status", "error")
                results[name].reason = r.get("reason", "")
                continue
            best = results[name].timing
            if not best or r["timing"]["median_s"] < best["median_s"]:
                results[name].timing = {**r["timing"], "rounds": rounds}
    load.append(os.getloadavg()[0])
    return CaseResult(task.name, case.id, params, "ok", "", list(results.values()), load)


def child_main(spec_path: str) -> None:
    """Entry point of a child process (see :mod:`bench._child`)."""
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])

    def finish(payload: dict[str, Any]) -> None:
        (out_dir / "result.json").write_text(json.dumps(payload))

    pin()
    import importlib

    import torch

    module = importlib.import_module(f"bench.tasks.{spec['task']}")
    task: Task = module.TASK
    impl = task.impl(spec["lib"])()
    try:
        impl.setup(spec["params"])
    except ImportError as err:
        finish({"status": "unavailable", "reason": f"{type(err).__name__}: {err}"})
        return
    except Skip as err:
        finish({"status": "skipped", "reason": str(err)})
        return
    except Exception as err:
        finish({"status": "error", "reason": f"set-up failed: {type(err).__name__}: {err}"})
        raise
    try:
        if spec["mode"] == "output":
            impl.run()
            output = impl.output()
            if output is not None:
                torch.save(_detach(output), out_dir / "output.pt")
            finish({"status": "ok"})
        else:
            timing = measure(impl.run, inner=impl.inner, memory=spec.get("memory", True), **spec["timing"])
            timing = extrapolated(timing, float(impl.extrapolate))
            finish({"status": "ok", "timing": timing})
    except Exception as err:
        finish({"status": "error", "reason": f"{type(err).__name__}: {err}"})
        raise


def _detach(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _detach(v) for k, v in value.items()}
    return value.detach().clone().contiguous()


def machine_description() -> dict[str, str]:
    """CPU model, cores, memory and OS, for the report."""
    info: dict[str, str] = {"python": sys.version.split()[0]}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        info["memory"] = f"{kib / 2**20:.0f} GiB"
    except OSError:
        pass
    info["os"] = " ".join(os.uname()[i] for i in (0, 2))
    return info

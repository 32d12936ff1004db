"""CI smoke test of the benchmark harness: correctness gates only, tiny sizes, in-process.

Only peers available in the dev environment take part (captum, raw torch); the others are
skipped. Nothing is timed here: timing lives in ``bench/`` (``python -m bench.run``).
"""

from __future__ import annotations

import pytest
import torch

from bench._harness import Skip, compare_outputs, measure, run_in_process
from bench.tasks import TASKS, load

SMOKE = [(name, case.id) for name in TASKS for case in load(name).cases if case.smoke is not None]


@pytest.mark.parametrize(("task_name", "case_id"), SMOKE, ids=[f"{t}/{c}" for t, c in SMOKE])
def test_correctness_gate(task_name: str, case_id: str) -> None:
    task = load(task_name)
    case = next(c for c in task.cases if c.id == case_id)
    assert case.smoke is not None
    ours = run_in_process(task, task.ours, case.smoke)
    compared = []
    for impl in task.impls[1:]:
        if impl.name == task.baseline:
            continue
        try:
            theirs = run_in_process(task, impl.name, case.smoke)
        except (ImportError, Skip):
            continue  # peer not in the dev environment, or not part of this case
        ok, why = compare_outputs(ours, theirs, task.rtol, task.atol)
        assert ok, f"{task_name}/{case_id}: {task.ours} vs {impl.name}: {why}"
        compared.append(impl.name)
    assert compared, f"{task_name}/{case_id}: no peer available to compare with"


def test_every_task_module_declares_a_valid_task() -> None:
    for name in TASKS:
        task = load(name)
        assert task.name == name
        names = [i.name for i in task.impls]
        assert len(set(names)) == len(names)
        assert set(task.targets) <= set(names)
        assert task.baseline is None or task.baseline in names


def test_gate_rejects_a_mismatch() -> None:
    a = {"x": torch.zeros(3)}
    ok, why = compare_outputs(a, {"x": torch.full((3,), 1e-3)}, rtol=0.0, atol=1e-4)
    assert not ok
    assert "max |Δ| = 1.00e-03" in why
    assert not compare_outputs(a, {"y": torch.zeros(3)}, 0.0, 0.0)[0]
    assert not compare_outputs(torch.zeros(2), torch.zeros(3), 0.0, 0.0)[0]


def test_measure_reports_quantiles() -> None:
    result = measure(lambda: None, warmup=1, min_repeats=3, max_repeats=5, budget_s=0.0, memory=True)
    assert result["repeats"] == 3
    assert result["p10_s"] <= result["median_s"] <= result["p90_s"]
    assert result["peak_rss_mib"] >= 0


def test_import_size_measures_an_environment(tmp_path, monkeypatch) -> None:
    """``import_size`` (not a Task: no gate) on a stand-in environment: this interpreter, a fake
    site-packages with a known file and a torch folder that the second size leaves out."""
    import sys
    from pathlib import Path

    from bench.tasks import import_size

    site = tmp_path / "tdhook" / "lib" / "python3.11" / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "big.bin").write_bytes(b"\0" * 2**20)
    (site / "small.py").write_bytes(b"\0" * 2**16)
    monkeypatch.setattr(import_size, "ENVS_DIR", tmp_path)
    monkeypatch.setattr(import_size, "env_python", lambda env: Path(sys.executable))
    monkeypatch.setattr(import_size, "STATEMENTS", (("tdhook", "import json"),))
    (row,) = import_size.measure_all(quick=True)
    assert row["env"] == "tdhook"
    assert row["statement"] == "import json"
    assert row["p10_s"] <= row["import_s"] <= row["p90_s"]
    assert row["size_mib"] - row["size_wo_torch_mib"] >= 1.0  # the torch folder, 1 MiB at least
    assert row["size_wo_torch_mib"] >= 2**16 / 2**20


def test_every_task_has_a_smoke_case() -> None:
    missing = [name for name in TASKS if not any(case.smoke is not None for case in load(name).cases)]
    assert not missing, f"benchmark tasks without a smoke case (Case(..., smoke={{...}})): {missing}"


def test_extrapolated_times_scale_and_are_marked() -> None:
    """A timed part of a long call (e.g. 26 of activation patching's 242 forwards) scales to the whole."""
    from bench._harness import extrapolated
    from bench.tasks.attribution_patching_gpt2 import MEASURED_SITES, spread

    timing = {"median_s": 1.0, "p10_s": 0.5, "p90_s": 2.0, "min_s": 0.4, "cpu_median_s": 1.5, "repeats": 3}
    scaled = extrapolated({**timing, "peak_rss_mib": 7.0}, 242 / 26)
    assert scaled["median_s"] == pytest.approx(242 / 26)
    assert scaled["cpu_median_s"] == pytest.approx(1.5 * 242 / 26)
    assert scaled["repeats"] == 3
    assert scaled["peak_rss_mib"] == 7.0  # memory is not scaled
    assert scaled["extrapolated"] == pytest.approx(242 / 26)
    assert "extrapolated" not in extrapolated(timing, 1.0)
    sites = spread(240, MEASURED_SITES)
    assert len(sites) == MEASURED_SITES == 24
    assert sites[0] == 0
    assert sites[-1] == 239  # the residual-stream sites (first 96) and the heads (last 144) both sampled
    assert sum(s < 96 for s in sites) == 10
    assert spread(240, None) == list(range(240))

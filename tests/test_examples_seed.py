"""End-to-end checks of the RL examples: the seed notebook's code and the PPO train-and-probe demo.

The seed script runs in a subprocess exactly as a user would run it; its printed metric lines are the
contract (26 layers per section, `relative=False` names, finite R²). The demo is imported and its
`main()` called with a tiny budget.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrl")
pytest.importorskip("mujoco")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.rl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

ACTOR_LAYERS = [f"td_module.actor_network.module.0.module.0.{i}_fwd" for i in range(13)]
CRITIC_LAYERS = [f"td_module.critic_network.module.{i}_fwd" for i in range(13)]
EXPECTED_LAYERS = ACTOR_LAYERS + CRITIC_LAYERS

SECTIONS = {"Training R² scores:": "fit", "Test R² scores:": "predict"}
METRIC_LINE = re.compile(r"^  (?P<key>\S+): (?P<value>\S+)$")


def _parse_seed_output(stdout: str) -> dict[str, dict[str, float]]:
    """Metric lines grouped by the section header that precedes them."""
    metrics: dict[str, dict[str, float]] = {}
    section = None
    for line in stdout.splitlines():
        if line.strip() in SECTIONS:
            section = SECTIONS[line.strip()]
            metrics[section] = {}
            continue
        match = METRIC_LINE.match(line)
        if section is not None and match:
            assert match["key"] not in metrics[section], f"duplicate metric line {line!r}"
            metrics[section][match["key"]] = float(match["value"])
    return metrics


def _load_demo(monkeypatch: pytest.MonkeyPatch):
    """Import the demo script as a module (registered in sys.modules only for this test)."""
    spec = importlib.util.spec_from_file_location("_ppo_train_and_probe", EXAMPLES / "ppo_train_and_probe.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_seed_notebook_runs_unchanged_and_prints_26_finite_metrics_per_section():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "torchrl_ppo_action_probing.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"seed example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    metrics = _parse_seed_output(proc.stdout)
    assert set(metrics) == {"fit", "predict"}, proc.stdout[-3000:]
    for section, values in metrics.items():
        assert sorted(values) == sorted(EXPECTED_LAYERS), f"{section}: {sorted(values)}"
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        assert not bad, f"{section}: non-finite R² {bad}"


@pytest.mark.slow
def test_ppo_demo_main_tiny_budget_writes_table_plot_and_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    demo = _load_demo(monkeypatch)
    result = demo.main(
        [
            "--frames",
            "400",
            "--frames-per-batch",
            "200",
            "--probe-frames",
            "300",
            "--epochs",
            "1",
            "--eval-episodes",
            "1",
            "--eval-max-steps",
            "50",
            "--out",
            str(tmp_path),
        ]
    )
    rows = result["layers"]
    assert [r["layer"] for r in rows] == EXPECTED_LAYERS
    columns = ("train_r2_untrained", "test_r2_untrained", "train_r2_trained", "test_r2_trained")
    for row in rows:
        assert all(math.isfinite(row[c]) for c in columns), row
    assert set(result["returns"]) == {"untrained", "trained"}
    assert all(math.isfinite(v) and v > 0 for v in result["returns"].values())

    plot = tmp_path / "ppo_probing.png"
    assert plot.is_file()
    assert plot.stat().st_size > 0
    saved = json.loads((tmp_path / "ppo_probing.json").read_text())
    assert [r["layer"] for r in saved["layers"]] == EXPECTED_LAYERS
    assert saved["returns"] == result["returns"]


def test_ppo_demo_returns_of_finished_episodes_span_batches(monkeypatch):
    demo = _load_demo(monkeypatch)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    dones = torch.tensor([False, True, False, False, True])
    returns, carry = demo.finished_returns(rewards, dones, carry=10.0)
    assert returns == [13.0, 12.0]  # the first episode began in the previous batch
    assert carry == 0.0
    returns, carry = demo.finished_returns(torch.tensor([1.0, 1.0]), torch.tensor([False, False]), carry=2.0)
    assert (returns, carry) == ([], 4.0)


def test_ppo_demo_table_uses_short_names_with_a_legend_and_quiet_torchrl(monkeypatch):
    import logging

    demo = _load_demo(monkeypatch)
    assert demo.short_name("td_module.actor_network.module.0.module.0.3_fwd") == "actor.3"
    assert demo.short_name("td_module.critic_network.module.12_fwd") == "critic.12"
    row = dict.fromkeys(
        ("train_r2_untrained", "test_r2_untrained", "train_r2_trained", "test_r2_trained"), 0.5
    )
    table = demo.format_table([{"layer": "td_module.critic_network.module.1_fwd", **row}])
    assert "critic.1 " in table
    assert "td_module" not in table
    assert "td_module.critic_network.module.i" in demo.LEGEND
    assert "share an R²" in demo.LEGEND
    assert logging.getLogger("torchrl").getEffectiveLevel() >= logging.WARNING

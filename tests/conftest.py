"""Fixtures shared across test folders (a small three-layer network and a batch for it), and the
``--fail-on-skip`` option: CI installs every extra, so a skipped test there is a test that cannot
fail (e.g. an ``importorskip`` whose package went missing); with the option the run fails and lists
what was skipped."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests build Hugging Face models from configs: never download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from tensordict import TensorDict
from torch import nn

_SKIPPED: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        help="fail the run if any test or test module was skipped (CI: every extra is installed)",
    )


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid or '<module>'}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if config.getoption("--fail-on-skip") and _SKIPPED:
        terminalreporter.section("skipped, and --fail-on-skip is set")
        for line in _SKIPPED:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--fail-on-skip") and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(6, 6)
        self.linear3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def td() -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(input=torch.randn(5, 4), batch_size=[5])

"""``--fail-on-skip`` (tests/conftest.py) turns any skip, at collection or in a test, into a failure."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


@pytest.mark.slow
def test_a_skip_fails_the_run_only_with_the_option(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(CONFTEST, tests / "conftest.py")
    (tests / "test_skips.py").write_text(
        "import pytest\n\n\ndef test_skipped():\n    pytest.skip('in a test')\n\n\ndef test_passes():\n    pass\n"
    )
    (tests / "test_missing.py").write_text("import pytest\n\npytest.importorskip('no_such_package_tdhook')\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]

    lenient = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert lenient.returncode == 0, lenient.stdout
    strict = subprocess.run(
        [*command, "--fail-on-skip"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert strict.returncode == 1, strict.stdout
    assert "tests/test_skips.py::test_skipped: Skipped: in a test" in strict.stdout
    assert "tests/test_missing.py" in strict.stdout
    assert "no_such_package_tdhook" in strict.stdout

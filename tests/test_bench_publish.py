"""``python -m bench.run`` never replaces the published benchmark report with an incomplete one."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    paths = {
        "DOC": tmp_path / "docs" / "benchmarks.md",
        "PLOT": tmp_path / "docs" / "benchmarks.png",
        "PARTIAL_DOC": tmp_path / "results" / "benchmarks.md",
        "PARTIAL_PLOT": tmp_path / "results" / "benchmarks.png",
    }
    paths["DOC"].parent.mkdir()
    paths["DOC"].write_text("published\n")
    paths["PLOT"].write_bytes(b"png")
    for name, path in paths.items():
        monkeypatch.setattr(run, name, path)
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path / "results" / "results.json")

    def write(results, doc: Path, plot: Path) -> None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"report of {sorted(results['cases'])}\n")
        plot.write_bytes(b"new png")

    monkeypatch.setattr(run._report, "write", write)
    return paths


def test_missing_environment_runs_nothing_says_how_to_build_and_exits_non_zero(
    published: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run, "env_python", lambda env: Path("/nonexistent") / env / "bin" / "python")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a case ran although its environment is missing")

    monkeypatch.setattr(run, "run_case", must_not_run)
    assert run.main(["--tasks", "ig_captum", "lrp_zennit"]) == 2
    err = capsys.readouterr().err
    assert "missing benchmark environment(s): captum, zennit" in err
    assert "python -m bench.envs captum zennit" in err
    assert published["DOC"].read_text() == "published\n"
    assert published["PLOT"].read_bytes() == b"png"


def test_unavailable_case_goes_to_a_partial_report_and_exits_non_zero(
    published: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    results = {"cases": {"ig_captum/a": {"status": "ok"}, "lrp_zennit/b": {"status": "unavailable"}}}
    assert run.publish(results) == 1
    assert published["DOC"].read_text() == "published\n"
    assert published["PLOT"].read_bytes() == b"png"
    assert "lrp_zennit/b" in published["PARTIAL_DOC"].read_text()
    assert "lrp_zennit/b" in capsys.readouterr().err


def test_complete_results_replace_the_published_report(published: dict[str, Path]) -> None:
    assert (
        run.publish({"cases": {"ig_captum/a": {"status": "ok"}, "lrp_zennit/b": {"status": "failed"}}}) == 0
    )
    assert published["DOC"].read_text() == "report of ['ig_captum/a', 'lrp_zennit/b']\n"
    assert not published["PARTIAL_DOC"].exists()

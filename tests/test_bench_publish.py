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


def _entry(case: str, ours_s: float, peer_s: float) -> dict:
    def lib(name: str, seconds: float) -> dict:
        timing = {
            "median_s": seconds,
            "p10_s": seconds,
            "p90_s": seconds,
            "cpu_median_s": seconds,
            "repeats": 3,
        }
        return {"name": name, "status": "ok", "reason": "", "gate": "", "timing": timing}

    return {
        "task": "caching_gpt2_hf",
        "case": case,
        "status": "ok",
        "reason": "",
        "libs": [lib("tdhook", ours_s), lib("raw", peer_s)],
        "load": [1.0, 1.0],
        "threads": 2,
    }


def test_results_of_some_tasks_update_only_their_tables(
    published: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``results.json`` is git-ignored: results of a few tasks must not wipe the other published tables."""
    from bench import _report
    from bench.tasks import load

    monkeypatch.setattr(run._report, "write", _report.write)  # the fixture's stand-in would hide the update
    hf, tl = load("caching_gpt2_hf"), load("caching_gpt2_tl")
    page = [
        "# Benchmarks",
        "- generated: 2026-11-26",
        "## Where we fall short",
        "",
        "- `caching_gpt2_tl` blocks vs TransformerLens: wall 1.20, CPU 1.20 (target ≤ 1.05).",
        "- `caching_gpt2_hf` old shortfall.",
        "",
        "## Results",
        "",
        f"### {tl.title}",
        "",
        "| the TransformerLens table, kept verbatim |",
        "",
        f"### {hf.title}",
        "",
        "| an old table of the HF task |",
        "",
        "## Analysis: where the time goes",
        "",
        "kept",
    ]
    published["DOC"].write_text("\n".join(page) + "\n")
    results = {"cases": {"caching_gpt2_hf/all modules (1,64)": _entry("all modules (1,64)", 1.3, 1.0)}}
    assert run.publish(results) == 0
    text = published["DOC"].read_text()
    assert "| the TransformerLens table, kept verbatim |" in text
    assert "| an old table of the HF task |" not in text
    assert "| all modules (1,64) (load 1.0→1.0) | tdhook ActivationCaching('.+') (ours) |" in text
    assert text.count(f"### {hf.title}") == 1
    assert "- `caching_gpt2_tl` blocks vs TransformerLens" in text  # another task's shortfall is kept
    assert "old shortfall" not in text
    assert (
        "- `caching_gpt2_hf` all modules (1,64) vs raw torch hooks: wall 1.30, CPU 1.30 (target ≤ 1.15)."
        in text
    )
    assert "tables of caching_gpt2_hf (the others as generated)" in text
    assert text.rstrip().endswith("kept")
    assert published["PLOT"].read_bytes() == b"png"  # the plot needs every task's data: kept
    assert "caching_gpt2_tl" in capsys.readouterr().err
    # a task without a table yet is inserted in report order, before the next task's table
    published["DOC"].write_text("\n".join(page[:13] + page[17:]) + "\n")
    assert run.publish(results) == 0
    text = published["DOC"].read_text()
    assert text.index(tl.title) < text.index(hf.title) < text.index("## Analysis")

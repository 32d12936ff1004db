"""Every ```python code block in README.md and docs/*.md runs as written.

Blocks of one page run in order in one namespace, as a reader would paste them into one session (a
later block may use what an earlier one defined). A block whose info string is ``python notest`` is
shown but not run (it needs a process group, a download or a peer library); tutorials under
``docs/tutorials/`` are executed by the site build (``make docs``), not here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every block whose info string is exactly ``python`` (``python notest`` skipped)."""
    blocks = []
    for match in FENCE.finditer(text):
        info = match["info"].strip().split()
        if info[:1] != ["python"] or "notest" in info[1:]:
            continue
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 2, body))
    return blocks


def test_the_extractor_reads_fences_and_honours_notest() -> None:
    text = "x\n```python\na = 1\n```\n```python notest\nb = 2\n```\n```bash\nls\n```\n  ```python\n  c = 3\n  ```\n"
    assert python_blocks(text) == [(3, "a = 1"), (12, "c = 3")]


@pytest.mark.slow  # about a minute for all pages together; CI runs it (make test-all)
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_python_block_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text())
    if not blocks:
        return
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    try:
        for line, source in blocks:
            code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("MASTER_ADDR", None)

"""The built site (``make docs``) renders in a real browser: headless Chromium (Debian package).

The index and one executed tutorial are loaded; a small script shipped with the site
(``docs/javascripts/figures.js``) records how many of the page's images the browser decoded, and the
DOM dump must show all of them rendered. A screenshot of the tutorial is written to
``site/_screenshots/`` (git-ignored; a CI artefact).

``make docs`` runs this file after building the site, with ``TDHOOK_REQUIRE_SITE=1``; elsewhere it
is collected only when a site is built and Chromium is installed (``tests/docs/conftest.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "site"
TUTORIAL = SITE / "tutorials" / "attribution-digits" / "index.html"


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("no chromium on PATH: apt-get install chromium (Debian package)")
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no site at {SITE}: build it with make docs")
    return browser


def _run(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )


def _figures(dom: str) -> tuple[int, int]:
    found = re.search(r'data-figures="(\d+)"[^>]*data-figures-rendered="(\d+)"', dom)
    assert found, "figures.js did not run: no data-figures attribute on <body>"
    return int(found[1]), int(found[2])


@pytest.mark.parametrize(
    ("page", "title", "min_figures"),
    [(SITE / "index.html", "tdhook", 1), (TUTORIAL, "Integrated gradients and LRP on a digits CNN", 1)],
    ids=["index", "tutorial"],
)
def test_page_renders_with_its_figures(page: Path, title: str, min_figures: int) -> None:
    browser = _chromium()
    dom = _run(browser, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    assert "<h1" in dom
    assert title in dom
    assert "Tutorials" in dom  # the navigation rendered
    assert "API reference" in dom
    total, rendered = _figures(dom)
    assert total >= min_figures
    assert rendered == total, f"{total - rendered} of {total} images did not render on {page}"


def test_tutorial_screenshot_is_a_real_picture() -> None:
    browser = _chromium()
    shots = SITE / "_screenshots"
    shots.mkdir(exist_ok=True)
    shot = shots / "tutorial-attribution-digits.png"
    shot.unlink(missing_ok=True)
    _run(
        browser,
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        "--virtual-time-budget=10000",
        TUTORIAL.as_uri(),
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 0.05  # text, code and heatmaps: not a blank page

"""A real browser on a real server: ``moetrace dashboard`` in a subprocess, Debian's
headless Chromium driven by Playwright, every page visited and screenshotted.

Screenshots go to ``$MOETRACE_TEST_ARTIFACTS/dashboard`` (default: ``test-artifacts/
dashboard`` at the repository root). Skipped when playwright or chromium is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dashkit import dashboard_server

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MOETRACE_CHROMIUM", "/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE_TIMEOUT_MS = 60_000
PAGES = (
    # url path, page title, texts that must show, charts at least
    ("", "Overview", ("Verdict", "Trace facts", "Caching"), 1),
    ("experts", "Experts", ("Hottest experts per layer",), 1),
    (
        "reuse",
        "Skew and reuse",
        ("Reuse and miss-ratio curves of one layer", "Hit rate vs cache size of every layer"),
        6,
    ),
    ("groups", "Groups", ("Strongest pairs", "Transitions to the next MoE layer"), 2),
    ("requests", "Requests", ("One request", "Requests in 2-D"), 3),
    (
        "plans",
        "Plans",
        ("Plans against the baselines", "Plan plan-a", "Compare two plans", "Runtime statistics"),
        6,
    ),
    ("timeline", "Timeline", ("What the cache did",), 1),
)


def _artifacts() -> Path:
    base = Path(os.environ.get("MOETRACE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    out = base / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(fixture_paths: dict[str, Path]) -> Iterator[str]:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM}")
    p = fixture_paths
    args = [
        str(p["trace"]), str(p["trace2"]), "--plan", str(p["plan"]), "--plan", str(p["plan2"]),
        "--stats", str(p["stats"]),
    ]  # fmt: skip
    with dashboard_server(args) as (url, log_path):
        assert log_path.is_file()  # printed, and there while the server runs
        yield url
    assert log_path is not None and not log_path.exists()  # removed on a clean stop


def _screenshot(page: Any, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport."""
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
        " return m ? m.scrollHeight : document.body.scrollHeight; }"
    )
    page.set_viewport_size({"width": 1400, "height": min(max(int(height), 1000), 6000)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_every_page_in_chromium(server: str) -> None:
    from playwright.sync_api import sync_playwright

    out = _artifacts()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            for path, title, texts, charts in PAGES:
                page.goto(f"{server}/{path}")
                page.get_by_role("heading", name=title, exact=True).wait_for()
                for text in texts:
                    page.get_by_text(text).first.wait_for()
                page.wait_for_function(
                    'n => document.querySelectorAll(\'[data-testid="stVegaLiteChart"] canvas, '
                    '[data-testid="stVegaLiteChart"] svg\').length >= n',
                    arg=charts,
                )
                page.wait_for_function(  # the script run has finished
                    "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                )
                page.wait_for_timeout(1000)  # let the last charts finish drawing
                _screenshot(page, out / f"{path or 'overview'}.png")
                assert page.locator('[data-testid="stException"]').count() == 0, path
        finally:
            browser.close()
    host = urlsplit(server).netloc
    outside = [u for u in requested if not u.startswith(("data:", "blob:"))
               and urlsplit(u).netloc != host]  # fmt: skip
    assert not outside, f"the dashboard fetched from outside hosts (fails offline): {outside[:3]}"

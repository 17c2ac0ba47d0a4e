"""The web page in a real browser: Debian's headless Chromium driven by Playwright for Python (the system
browser through ``executable_path``; nothing downloads a browser). Upload a photo, wait for the grid, the
first neighbour is the photo itself with score ~1, click a neighbour, change k. The screenshot is kept in
pytest's temporary directory; ``docs/img/serve_page.png`` (the README's) is written when it is missing, and
refreshed with ``SIMSIAM_KIT_UPDATE_SCREENSHOT=1``.

It skips only outside CI when Chromium or Playwright is missing; under CI=true (``.ci/run``) it fails
instead, so CI cannot pass without running it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import REPO

CHROMIUM = Path(os.environ.get("SIMSIAM_KIT_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "docs" / "img" / "serve_page.png"


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright)")
        sync_playwright = None
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test needs {', '.join(missing)} under CI=true")
        pytest.skip(f"browser test needs {', '.join(missing)}")
    return sync_playwright


def test_page_in_a_real_browser(photo_server, photos, tmp_path):
    sync_playwright = _browser_or_skip()
    base, proc, _ = photo_server
    query = photos[7]
    requests_outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            local = (base, f"blob:{base}")  # the server, and the page's own object URL of the picked file
            page.on("request", lambda r: None if r.url.startswith(local) else requests_outside.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/")
            page.wait_for_function("document.getElementById('index-info').textContent.includes('102 images')")
            page.fill("#k", "8")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("body[data-ready='1'] #grid .tile", timeout=30_000)
            tiles = page.locator("#grid .tile")
            assert tiles.count() == 8
            first = tiles.nth(0)
            assert first.get_attribute("data-row") == str(photos.index(query))
            assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
            scores = [float(s) for s in page.locator("#grid .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            # every thumbnail loaded (naturalWidth > 0)
            page.wait_for_function(
                "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if not SCREENSHOT.is_file() or os.environ.get("SIMSIAM_KIT_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_path / "page.png", SCREENSHOT)
            # click the second neighbour: the page searches from it, and it comes first
            clicked = tiles.nth(1).get_attribute("data-row")
            tiles.nth(1).click()
            page.wait_for_function(
                f"document.body.dataset.ready === '1' && "
                f"document.querySelector('#grid .tile').dataset.row === '{clicked}'",
                timeout=30_000,
            )
            assert float(page.locator("#grid .tile").nth(0).locator(".score").inner_text()) == pytest.approx(
                1.0, abs=1e-3
            )
            assert f"row {clicked}" in page.inner_text("#query-caption")
            # change k: the same query again with 3 neighbours
            page.fill("#k", "3")
            page.press("#k", "Enter")
            page.wait_for_function(
                "document.body.dataset.ready === '1' && document.querySelectorAll('#grid .tile').length === 3",
                timeout=30_000,
            )
            assert page.locator("#grid .tile").nth(0).get_attribute("data-row") == clicked
            # a bad file shows the server's one message
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("body[data-ready='error']", timeout=30_000)
            assert "not an image" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()
    assert not requests_outside, requests_outside
    assert proc.poll() is None

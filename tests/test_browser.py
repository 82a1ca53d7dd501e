"""The demo's HTML report in a real browser: headless Chromium loads it without errors and
shows every section and every figure."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gallery():
    spec = importlib.util.spec_from_file_location("make_gallery", ROOT / "docs" / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gallery = _gallery()
pytestmark = [
    pytest.mark.skipif(not os.path.exists(gallery.CHROMIUM) and shutil.which("chromium") is None,
                       reason="Chromium is not installed (Debian package 'chromium'; .ci/run "
                              "installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright package is not installed"),
]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    from skdebias._demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    # one epoch and P-ClArC (no training) as the correction: every section, in seconds
    result = run_demo(epochs=1, verbose=False, device="cpu", report=out / "report.html",
                      methods=("vanilla", "P-ClArC"))
    return Path(result["report"])


def test_demo_report_renders_in_chromium(demo_report, tmp_path):
    from playwright.sync_api import sync_playwright

    from skdebias.report import AuditReport

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=gallery.CHROMIUM, args=gallery.CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(demo_report.as_uri(), wait_until="load")
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            images = page.evaluate("Array.from(document.images).map(i => "
                                   "[i.complete, i.naturalWidth, i.alt])")
            notes = page.eval_on_selector_all(".note", "els => els.map(e => e.textContent)")
            page.screenshot(path=tmp_path / "first.png")
        finally:
            browser.close()
    assert errors == []
    assert headings == [title for _, title in AuditReport.SECTIONS]
    assert notes == []  # the demo fills every section
    # SpRAy (2), spuriosity, CAV, TCAV, sensitivity, heatmaps, comparison, corrected TCAV/heatmaps
    assert len(images) >= 10
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert {alt for *_, alt in images} >= {"relevance heatmaps", "spuriosity grid",
                                           "CAV alignment", "TCAV scores",
                                           "concept sensitivity per layer",
                                           "correction comparison"}
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # offline
    assert (tmp_path / "first.png").read_bytes().startswith(b"\x89PNG")

"""Headless Debian chromium (`make setup-browser` installs it), driven by Playwright:
no Playwright browser download. Page tests share this one launcher."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots land here (kept by CI as artefacts when it keeps any); git ignores it.
SCREENSHOTS = Path(os.environ.get("VALIDATOR_SCREENSHOTS", "test-artifacts/screenshots"))


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900):
    """A fresh page; `page.js_errors` collects uncaught script errors for the test to assert on."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.js_errors = []
            page.on("pageerror", lambda e: page.js_errors.append(str(e)))
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

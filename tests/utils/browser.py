"""Headless Chromium for end-to-end tests, driven by Playwright's Python client.

Uses the system browser (Debian's `chromium` package at /usr/bin/chromium, or ALIGND_CHROMIUM): Playwright's own
browser download does not work offline. The flags keep Chromium from phoning home, which a closed network refuses.

    with chromium() as browser:
        page = browser.new_page()
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return os.environ.get("ALIGND_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def chromium() -> Iterator[playwright.sync_api.Browser]:  # noqa: F821
    """A launched browser, closed (with its Playwright driver) on exit.

    A developer without Chromium gets a skip; under CI (CI=true, where .ci/run installs it) a missing browser fails.
    """
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]'")
    path = chromium_path()
    if path is None:
        missing("no Chromium: apt-get install -y chromium (or set ALIGND_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()

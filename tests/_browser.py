"""Headless Chromium for the run-page tests: the rendered DOM of a page (a file or a URL)."""

import shutil
import subprocess
import tempfile

import pytest


def chromium(request) -> str:
    """The browser's path; skips the test when it is missing, unless --require-browser (CI) makes that a failure."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if request.config.getoption("--require-browser"):
            pytest.fail("chromium is not installed, and --require-browser was given (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    return path


def dump_dom(browser: str, url: str, budget_ms: int = 5000, timeout: float = 90) -> str:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                           capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout

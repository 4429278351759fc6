"""Give the browser tests a Chromium (run by `make test` before pytest; idempotent).

Playwright's own download where it works; otherwise the system's Chromium, installed from
the distribution's packages when it is missing and we are root. The executable to use is
written to .venv/.chromium (empty: Playwright's own), where tests/test_ui_browser.py reads it.
Usage: python tests/setup_browser.py PATH_OF_THE_RECORD
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SYSTEM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def playwright_own() -> bool:
    """Whether Playwright's own Chromium is there, or can be downloaded now."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        if Path(playwright.chromium.executable_path).exists():
            return True
    try:
        done = subprocess.run(
            [sys.executable, "-m", "playwright", "install", "chromium"],
            timeout=300,
            capture_output=True,
            text=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    if done.returncode != 0:
        print("Playwright's Chromium download failed; using the system's Chromium")
    return done.returncode == 0


def system_chromium() -> str | None:
    for name in SYSTEM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_system_chromium() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(
            "no Chromium for the browser tests: install the distribution's chromium package "
            "(or set STEPSOURCE_CHROMIUM to a Chromium executable)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
        check=True,
        env=env,
    )


def main() -> None:
    record = Path(sys.argv[1])
    chosen = os.environ.get("STEPSOURCE_CHROMIUM", "")
    if not chosen and not playwright_own():
        chosen = system_chromium() or ""
        if not chosen:
            install_system_chromium()
            chosen = system_chromium() or ""
        if not chosen:
            sys.exit("Chromium was installed but is not on PATH")
    record.write_text(chosen)
    print("browser tests use", chosen or "Playwright's own Chromium")


if __name__ == "__main__":
    main()

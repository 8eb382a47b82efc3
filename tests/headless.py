"""Headless Chromium for tests that look at report.html as a browser renders it (no network, no profile)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

_NAMES = ("chromium", "chromium-browser", "google-chrome")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def chromium() -> str:
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium not found on PATH: `make test` installs it (apt-get install -y chromium)")


def _run(page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([chromium(), *_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120, check=True)


def dump_dom(page: Path) -> str:
    """The DOM after Chromium has loaded and laid out the page, serialised as HTML."""
    return _run(page, "--dump-dom").stdout


def dump_dom_and_console(page: Path) -> tuple[str, list[str]]:
    """The DOM as ``dump_dom`` gives it, and the messages the page wrote to the browser console (errors and
    uncaught exceptions included), one line each."""
    proc = _run(page, "--enable-logging=stderr", "--v=0", "--dump-dom")
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page: Path, png: Path, width: int = 1000, height: int = 1400) -> Path:
    _run(page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    return png

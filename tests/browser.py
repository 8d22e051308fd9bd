"""Open a page in Debian's chromium (headless) and check it: text, axe-core WCAG 2.2 A/AA violations, screenshot.

    page = check_page(path, "phone", screenshot_path("test_name", "phone"))
    assert page["violations"] == []

The work is done by `peers/browser/check_page.mjs` (playwright-core drives /usr/bin/chromium with
--no-sandbox --disable-background-networking; every request that is not a local file or loopback is aborted
and listed in `requests_blocked`). Its npm packages are installed on first use (`npm ci`, under a file lock so
parallel workers do not install over each other). Without chromium the calling test is skipped, except in CI
(CI set), where it fails: CI must have `apt-get install chromium`.

Screenshots are CI artefacts: under $SCHOOLSLINK_ARTIFACTS, else <repo>/artifacts/screenshots/.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / "peers" / "browser"
SCRIPT = PEER_DIR / "check_page.mjs"
CHROMIUM = Path(os.environ.get("SCHOOLSLINK_CHROMIUM", "/usr/bin/chromium"))
VIEWPORTS = ("desktop", "phone")  # 1280x900 and 390x844 (check_page.mjs)


class BrowserCheckError(RuntimeError):
    """The page could not be opened or checked (not: the page has violations; those are data)."""


def require_chromium() -> None:
    """Skip the calling test when chromium is missing, unless in CI, where that is a failure."""
    if CHROMIUM.exists() and shutil.which("node"):
        return
    why = f"{CHROMIUM} or node is missing (apt-get install chromium nodejs npm)"
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need chromium in CI: {why}")
    pytest.skip(why)


def ensure_npm_packages(timeout: float = 600.0) -> None:
    """`npm ci` in peers/browser if its node_modules is missing (serialised with a lock file)."""
    markers = [PEER_DIR / "node_modules" / name / "package.json" for name in ("playwright-core", "axe-core")]
    if all(m.exists() for m in markers):
        return
    npm = shutil.which("npm")
    if not npm:
        raise BrowserCheckError(f"{PEER_DIR / 'node_modules'} is missing and npm is not on PATH")
    with open(Path(tempfile.gettempdir()) / "schoolslink-browser-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if all(m.exists() for m in markers):  # another worker installed while we waited
                return
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_DIR,
                                  capture_output=True, text=True, timeout=timeout, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
                raise BrowserCheckError(f"npm ci in {PEER_DIR} failed ({done.returncode}):\n{tail}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifacts_dir() -> Path:
    env = os.environ.get("SCHOOLSLINK_ARTIFACTS")
    return Path(env).resolve() if env else REPO / "artifacts" / "screenshots"


def screenshot_path(test_name: str, viewport: str, label: str = "") -> Path:
    """<artifacts>/<test>[-<label>]-<viewport>.png, with anything odd in the names made safe."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", part) for part in (test_name, label, viewport) if part)
    return artifacts_dir() / f"{stem}.png"


def check_page(target: str | Path, viewport: str, screenshot: Path, *, print_media: bool = False,
               timeout: float = 120.0) -> dict[str, Any]:
    """Run check_page.mjs on a file path or loopback URL; the parsed JSON document it prints."""
    if viewport not in VIEWPORTS:
        raise ValueError(f"viewport must be one of {VIEWPORTS}")
    require_chromium()
    ensure_npm_packages()
    node = shutil.which("node")
    assert node is not None
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    cmd = [node, str(SCRIPT), "--url", str(target), "--viewport", viewport, "--screenshot", str(screenshot),
           "--chromium", str(CHROMIUM)]
    if print_media:
        cmd.append("--print")
    try:
        res = subprocess.run(cmd, cwd=PEER_DIR, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrowserCheckError(f"check_page.mjs timed out after {timeout:.0f}s on {target}") from exc
    if res.returncode != 0:
        raise BrowserCheckError(f"check_page.mjs failed ({res.returncode}) on {target}:\n{res.stderr[-3000:]}")
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc


def describe_violations(doc: dict[str, Any]) -> str:
    """The axe violations, one line each, for an assertion message."""
    return "\n".join(f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes']}" for v in doc.get("violations", []))

"""Where state lives: `SCHOOLSLINK_HOME` (default ./.schoolslink) and `SCHOOLSLINK_DB_URL`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("SCHOOLSLINK_HOME", ".schoolslink")).resolve()


def db_url() -> str:
    url = os.environ.get("SCHOOLSLINK_DB_URL")
    if url:
        return url
    return f"sqlite:///{home() / 'state.db'}"


def landing_dir() -> Path:
    return home() / "landing"


def work_dir() -> Path:
    return home() / "work"


def out_dir() -> Path:
    return home() / "out"


def feeds_dir() -> Path:
    """Where school feeds are written: SCHOOLSLINK_FEEDS_DIR, or out/feeds under SCHOOLSLINK_HOME."""
    env = os.environ.get("SCHOOLSLINK_FEEDS_DIR")
    return Path(env).resolve() if env else out_dir() / "feeds"

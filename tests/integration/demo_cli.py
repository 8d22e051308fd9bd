"""`schoolslink demo` as the end-to-end tests run it: a child process through the real DAGs and peers, its JSON
summary (the last line of its output) back, and its whole output for the tests that read the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_demo(home: Path, base: str, night: str, *extra: str, schools: int | str = 2, pupils: int | str = 300,
             seed: int | None = 3, clean_input: bool = True, key: str | None = None,
             env: dict[str, str] | None = None, extra_env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run the demo for `night` into `home` against the FHIR server at `base`; it must exit 0. The environment is
    `env` as given, or this process's with SCHOOLSLINK_HOME, SCHOOLSLINK_KEY (`key`) and `extra_env` set."""
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", str(schools), "--pupils", str(pupils)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    cmd += ["--date", night, "--out", str(home), "--fhir-base", base, *(["--clean-input"] if clean_input else []),
            "--json", *extra]
    if env is None:
        env = {**os.environ, "SCHOOLSLINK_HOME": str(home), **({"SCHOOLSLINK_KEY": key} if key else {}),
               **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc, res.stdout + res.stderr

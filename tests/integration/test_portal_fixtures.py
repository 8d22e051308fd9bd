"""What the portal's integration tests share (no tests here): a state store and feeds the pipeline really built,
portal accounts made with the real CLI, the portal running as its own process, and the browser flow runner.

The seeded home: `schoolslink synth` (2 schools, 160 pupils, seed 3), the trust's FHIR data in a real Medplum
server, then the pipeline's own stages night by night (pull and match, MIS ingest, delivery, school feeds) for
two nights, with one referral moved on between them (received -> being assessed), and the month's partnership
summary. Everything on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from schoolslink.portal.server import PortalServer
from tests.browser import CHROMIUM, PEER_DIR, ensure_npm_packages, require_chromium, screenshot_path

KEY = "portal-test-key"
NIGHTS = (date(2026, 11, 25), date(2026, 11, 26))
MONTH = "2026-11"
SCHOOLS = ("900001", "900002")
FLOW = PEER_DIR / "portal_flow.mjs"


@dataclass
class Seeded:
    home: Path
    rows: dict[str, list[dict[str, Any]]]  # URN -> the second night's feed rows
    changed_upn: str  # the pupil whose referral moved on between the nights
    users: dict[str, User] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"SCHOOLSLINK_HOME": str(self.home), "SCHOOLSLINK_KEY": KEY}

    def surnames(self, urn: str) -> set[str]:
        return {r["surname"] for r in self.rows[urn]}

    def upns(self, urn: str) -> set[str]:
        return {r["upn"] for r in self.rows[urn]}


@dataclass(frozen=True)
class User:
    user_id: str
    email: str
    role: str
    organisations: tuple[str, ...]
    password: str | None
    totp_secret: str | None


def cli(seed: Seeded, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`schoolslink portal ...` or `schoolslink audit ...` on the seeded home."""
    env = {**os.environ, **seed.env}
    env.pop("SCHOOLSLINK_DB_URL", None)
    res = subprocess.run([sys.executable, "-m", "schoolslink.cli", *args], capture_output=True, text=True, input=stdin,
                         env=env, timeout=120, check=False, cwd=Path(__file__).resolve().parents[2])
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


_LAST_STEP: dict[str, int] = {}


def totp_code(user: User) -> str:
    """The user's TOTP code for a step not used before (the portal accepts each code once, and the steps from one
    before now to one after): tests sign the same user in several times a minute, so this may wait a little."""
    import pyotp

    step = max(int(time.time()) // 30, _LAST_STEP.get(user.user_id, -1) + 1)
    while step > int(time.time()) // 30 + 1:
        time.sleep(0.5)
    _LAST_STEP[user.user_id] = step
    assert user.totp_secret is not None
    return str(pyotp.TOTP(user.totp_secret).at(step * 30))


def add_user(seed: Seeded, email: str, role: str, *organisations: str, auth: str = "local") -> User:
    flag = "--trust" if role == "link_worker" else "--school"
    doc = json.loads(cli(seed, "portal", "user", "add", "--email", email, "--role", role, flag, *organisations,
                         "--auth", auth, "--json").stdout)
    found = re.search(r"secret=([A-Z2-7]+)", doc.get("totp_uri") or "")
    secret = found.group(1) if found else None
    user = User(doc["user_id"], email, role, tuple(organisations), doc.get("password"), secret)
    seed.users[email] = user
    return user


def _seed(home: Path, mp: pytest.MonkeyPatch) -> Seeded:
    from connectors.fhir.client import FhirClient
    from connectors.fhir.server import MedplumServer
    from schoolslink import summary
    from schoolslink.demo import seed_trust
    from schoolslink.feeds import build_school_feeds
    from schoolslink.pipeline import ingest, sync
    from schoolslink.store.db import migrate
    from schoolslink.synth import synthesise

    manifest = synthesise(home, schools=2, pupils=160, seed=3, as_of=NIGHTS[0])
    assert tuple(manifest.school_urns) == SCHOOLS
    migrate()
    changed = next(c for c in manifest.cases if c.expect_trust_to_school and c.referral_status == "received")
    with MedplumServer(log_path=home / "medplum.log") as server:
        mp.setenv("SCHOOLSLINK_FHIR_BASE_R9X", server.base_url)
        seed_trust(server.base_url, home / "seed" / "fhir", "R9X")
        for n, day in enumerate(NIGHTS, 1):
            if n == 2:  # the trust starts assessing one referral between the nights
                with FhirClient(server.base_url) as client:
                    [sr] = client.search("ServiceRequest", {"subject": f"Patient/{changed.patient_id}"})
                    assert all(r.ok for r in client.put_batch([{**sr, "status": "active"}]))
            run, at = f"night-{n}", datetime(day.year, day.month, day.day, 2, tzinfo=UTC)
            for ods in sync.trusts_to_pull():
                sync.pull_trust(run, ods)
            sync.match_all(run)
            parts = [ingest.govern_map(run, ingest.parse_validate(run, chunk, day), day)
                     for chunk in ingest.plan(run, 1)]
            ingest.deliver(run, parts, day, at)
            build_school_feeds(run, list(SCHOOLS), day, at)
    summary.build_summaries(MONTH, home / "out" / "summaries" / MONTH)
    rows = {urn: json.loads((home / "out" / "feeds" / urn / NIGHTS[1].isoformat() / "feed.json").read_text())["rows"]
            for urn in SCHOOLS}
    assert all(rows.values()), "each school's feed has pupils"
    return Seeded(home, rows, changed.upn)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    home = tmp_path_factory.mktemp("portal") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCHOOLSLINK_HOME", str(home))
        mp.setenv("SCHOOLSLINK_KEY", KEY)
        mp.delenv("SCHOOLSLINK_DB_URL", raising=False)
        mp.delenv("SCHOOLSLINK_FEEDS_DIR", raising=False)
        from schoolslink.store.db import engine_for

        engine_for.cache_clear()
        yield _seed(home, mp)
        engine_for.cache_clear()


@contextmanager
def running_portal(seed: Seeded, log: Path, *, port: int = 0, tls: tuple[Path, Path] | None = None,
                   **env: str) -> Iterator[PortalServer]:
    """The portal as its own process on the seeded home (`env`: more SCHOOLSLINK_PORTAL_* settings)."""
    with PortalServer({**seed.env, **env}, port=port, log_path=log, tls=tls) as server:
        yield server


def pupil_url(base: str, urn: str, row: dict[str, Any], night: date = NIGHTS[1]) -> str:
    from schoolslink.portal.published import pupil_id

    return f"{base}/schools/{urn}/feeds/{night.isoformat()}/pupils/{pupil_id(urn, row)}"


# -- the browser --------------------------------------------------------------------------------------------------


def flow(steps: list[dict[str, Any]], *, viewport: str = "desktop", tmp: Path, timeout: float = 300.0,
         ignore_https_errors: bool = False, on_pause: dict[str, Callable[[], None]] | None = None,
         blocked_ok: str | None = None) -> list[dict[str, Any]]:
    """Run portal_flow.mjs; its records, one per step (a failed step fails the test with the runner's reason).
    At a step {"pause": NAME} the browser waits while `on_pause[NAME]()` runs here (e.g. to end a session).
    Every request the browser tried to send off the machine fails the test, except those starting `blocked_ok`
    (the OIDC peer's development pages ask for a web font: aborted, like any other, but not the portal's)."""
    require_chromium()
    ensure_npm_packages()
    n = len(list(tmp.glob("steps-*.json")))
    spec = tmp / f"steps-{n}.json"
    pauses = tmp / f"pauses-{n}"
    pauses.mkdir()
    steps = [{**s, "dir": str(pauses)} if "pause" in s else s for s in steps]
    spec.write_text(json.dumps({"viewport": viewport, "steps": steps, "ignore_https_errors": ignore_https_errors}))
    node = shutil.which("node")
    assert node is not None
    with subprocess.Popen([node, str(FLOW), "--steps", str(spec), "--chromium", str(CHROMIUM)], cwd=PEER_DIR,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + timeout
        waiting = dict(on_pause or {})
        while waiting and proc.poll() is None and time.monotonic() < deadline:
            for name in [k for k in waiting if (pauses / f"{k}.paused").exists()]:
                waiting.pop(name)()
                (pauses / f"{name}.go").write_text("")
            time.sleep(0.05)
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    out = stdout.strip().splitlines()
    doc = json.loads(out[-1]) if out else {}
    assert proc.returncode == 0, f"{stderr[-3000:]}\n{json.dumps(doc.get('failed'))}"
    assert [u for u in doc["requests_blocked"] if not (blocked_ok and u.startswith(blocked_ok))] == [], \
        doc["requests_blocked"]
    results: list[dict[str, Any]] = doc["results"]
    return results


def check(label: str, test: str, viewport: str = "desktop", *, printed: bool = False) -> dict[str, Any]:
    return {"check": label, "screenshot": str(screenshot_path(test, viewport, label)), "print": printed}


def sign_in_steps(base: str, user: User, test: str, viewport: str = "desktop", *, checked: bool = False
                  ) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"goto": f"{base}/sign-in"}]
    if checked:
        steps.append(check("sign-in", test, viewport))
    steps += [{"fill": {"#email": user.email, "#password": user.password}}, {"click": "button[type=submit]"}]
    if checked:
        steps.append(check("code", test, viewport))
    steps += [{"fill": {"#code": totp_code(user)}}, {"click": "button[type=submit]"}]
    return steps


def no_violations(rec: dict[str, Any]) -> None:
    assert rec["lang"] == "en-GB", rec["label"]
    assert rec["violations"] == [], f"{rec['label']}: " + "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}" for v in rec["violations"])
    assert rec["csp_violations"] == [], rec["csp_violations"]  # nothing of the page's own is blocked
    assert Path(rec["screenshot"]).stat().st_size > 0


def checks(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The check records by label (each also asserted free of WCAG 2.2 A/AA violations)."""
    out = {r["label"]: r for r in results if "label" in r}
    for rec in out.values():
        no_violations(rec)
    return out

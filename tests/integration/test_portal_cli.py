"""`schoolslink portal user add | list | disable | enable` and `portal events`, run as commands on a fresh
SCHOOLSLINK_HOME: exit codes (0 / 1 refused with the field named / 2 usage), one JSON document with --json, the
TOTP provisioning URI and a generated password printed once, a password read from stdin, and account changes in
the portal's audit log. Then the server itself: it refuses a half-given TLS pair, and serves on the port asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp

from schoolslink.portal.server import PortalServer

REPO = Path(__file__).resolve().parents[2]


def run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": "portal-cli-test"}
    env.pop("SCHOOLSLINK_DB_URL", None)
    return subprocess.run([sys.executable, "-m", "schoolslink.cli", "portal", *args], capture_output=True,
                          text=True, input=stdin, env=env, cwd=REPO, timeout=120, check=False)


def test_user_add_list_disable_enable_and_events(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run(home, "user", "add", "--email", "DSL@School.Example.sch.uk", "--role", "dsl", "--school", "900001",
            "900002", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["email"] == "dsl@school.example.sch.uk" and doc["organisations"] == ["900001", "900002"]
    uri = urlsplit(doc["totp_uri"])
    assert uri.scheme == "otpauth" and uri.netloc == "totp"
    secret = parse_qs(uri.query)["secret"][0]
    assert len(pyotp.TOTP(secret).now()) == 6 and len(doc["password"]) >= 20

    r = run(home, "user", "add", "--email", "smhl@school.example.sch.uk", "--role", "smhl", "--school", "900001",
            "--password-stdin", stdin="correct horse battery staple\n")
    assert r.returncode == 0 and "TOTP provisioning URI" in r.stdout and "password (give" not in r.stdout
    r = run(home, "user", "add", "--email", "link@cypmhs.example.nhs.uk", "--role", "link_worker", "--trust", "r9x")
    assert r.returncode == 0 and "R9X" in r.stdout
    r = run(home, "user", "add", "--email", "oidc@school.example.sch.uk", "--role", "dsl", "--school", "900001",
            "--auth", "oidc", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["totp_uri"] is None and json.loads(r.stdout)["password"] is None

    listed = json.loads(run(home, "user", "list", "--school", "900001", "--json").stdout)["users"]
    assert sorted(u["email"] for u in listed) == ["dsl@school.example.sch.uk", "oidc@school.example.sch.uk",
                                                 "smhl@school.example.sch.uk"]
    assert "link@cypmhs.example.nhs.uk" in run(home, "user", "list").stdout

    assert run(home, "user", "disable", "smhl@school.example.sch.uk").returncode == 0
    assert "disabled" in run(home, "user", "list").stdout
    assert run(home, "user", "enable", doc["user_id"]).returncode == 0
    r = run(home, "user", "disable", "nobody@school.example.sch.uk", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False

    events = json.loads(run(home, "events", "--json").stdout)["events"]
    assert [e["event"] for e in events] == ["user_added"] * 4 + ["user_disabled", "user_enabled"]
    assert "correct horse" not in json.dumps(events) and secret not in json.dumps(events)


def test_refusals_name_the_field_and_usage_errors_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args, field in ((("--email", "not-an-address", "--role", "dsl", "--school", "900001"), "email"),
                        (("--email", "a@school.example.sch.uk", "--role", "dsl", "--school", "R9X"), "school"),
                        (("--email", "a@school.example.sch.uk", "--role", "link_worker", "--trust", "R-9"), "trust"),
                        (("--email", "a@school.example.sch.uk", "--role", "dsl"), "school or trust")):
        r = run(home, "user", "add", *args)
        assert r.returncode == 1 and f"{field}:" in r.stderr, (args, r.stderr)
    r = run(home, "user", "add", "--email", "a@school.example.sch.uk", "--role", "dsl", "--school", "900001",
            "--password-stdin", stdin="short\n")
    assert r.returncode == 1 and "password: use at least 12 characters" in r.stderr
    assert run(home, "user", "add", "--email", "a@school.example.sch.uk", "--role", "headteacher").returncode == 2
    assert run(home, "user").returncode == 2
    assert run(home, "--tls-cert", "x.pem").returncode == 2  # a certificate without its key


def test_the_server_serves_on_the_port_asked(tmp_path: Path) -> None:
    env = {"SCHOOLSLINK_HOME": str(tmp_path / "home"), "SCHOOLSLINK_KEY": "portal-cli-test"}
    with PortalServer(env, log_path=tmp_path / "portal.log") as server:
        r = httpx.get(f"{server.base_url}/sign-in")
        assert r.status_code == 200 and "Sign in" in r.text and "Sign in with" not in r.text  # no OIDC configured
    assert "LISTENING" not in (tmp_path / "portal.log").read_text()  # stdout (the port) is not the log

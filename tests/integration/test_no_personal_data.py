"""No pupil or patient data where it should not be (docs/governance/logging.md).

First the safety net on its own: an identifier logged by mistake, through our logger, httpx's logger (a real request
whose URL carries an NHS number), a process with no logging set up, an Airflow task run through `dag.test()`, and
Airflow's task-log write path (the processors its supervisor writes task log files with), reaches the output only
as a keyed token. Then the demo, once, through Airflow: every synthetic identity (UPN, NHS number with and without
spaces, names alone and as SURNAME^FORENAME, DOB, postcode, street, the contacts' and workers' phone numbers, the
workers' email addresses, FHIR and CSV forms) is absent from every log, every
XCom value and every table of the Airflow metadata database, the GX results, reports, and the state store's
reasons, errors and dead letters. Places that legitimately hold pupil data (plain learner data for consented
pupils, the sealed landing zone, the schools' feeds, the FHIR server) are not scanned.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest

from schoolslink import logfilter
from schoolslink.airflow_runner import REPO, airflow_env, ensure_metadata_db
from schoolslink.identifiers import make_test_nhs_number, make_upn
from tests import leakscan

pytestmark = pytest.mark.slow
KEY = "no-personal-data-test-key"
NHS = make_test_nhs_number(31337)
UPN = make_upn(999, 1001, 4242)
NAME = "QWYLBRANDT^ZOPHIELA"
RUN_DATE = "2026-11-26"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", KEY)


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


def _assert_pseudonymised(text: str) -> None:
    for value in (NHS, f"{NHS[:3]} {NHS[3:6]} {NHS[6:]}", UPN, NAME):
        assert value not in text
    assert logfilter.token("nhs", NHS) in text
    assert logfilter.token("upn", UPN) in text
    assert logfilter.token("name", NAME) in text


def test_our_logger_httpx_and_a_process_without_logging_config(tmp_path: Path) -> None:
    env = {**os.environ, "SCHOOLSLINK_HOME": str(tmp_path / "home"), "SCHOOLSLINK_KEY": KEY,
           "PYTHONPATH": str(REPO)}
    log_file = tmp_path / "app.log"
    res = _run("""
        import http.server, logging, sys, threading
        import httpx
        from schoolslink.cli import main

        nhs, upn, name, log_file = sys.argv[1:5]
        logging.basicConfig(filename=log_file, level=logging.INFO)  # whatever a host process sets up
        main(["--version"])  # the CLI's entry installs the filter first (then exits on the unknown option)

        class Quiet(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
            def log_message(self, *a):
                pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        logging.getLogger("schoolslink.x").info(f"probe {nhs} {upn} {name} {nhs[:3]} {nhs[3:6]} {nhs[6:]}")
        logging.getLogger("schoolslink.x").info("probe %s %s %s", nhs, upn, name)
        httpx.get(f"http://127.0.0.1:{srv.server_port}/Patient",
                  params={"identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}", "upn": upn, "name": name})
        try:
            raise LookupError(f"no pupil {upn} ({nhs})")
        except LookupError:
            logging.getLogger("connectors.fhir.client").exception("lookup %s failed", name)
        srv.shutdown()
        """, env, NHS, UPN, NAME, str(log_file))
    assert res.returncode == 0, res.stderr
    text = log_file.read_text()
    assert "HTTP Request: GET" in text and "LookupError" in text  # httpx's own log line, and the traceback
    _assert_pseudonymised(text)
    assert text.count(logfilter.token("nhs", NHS)) >= 5

    # No logging configured at all: Python's last-resort handler writes warnings to stderr.
    res = _run("""
        import logging, sys
        from schoolslink.cli import main

        main(["--version"])
        nhs, upn, name = sys.argv[1:4]
        logging.getLogger("schoolslink.pipeline.x").warning("probe %s %s %s", nhs, upn, name)
        """, env, NHS, UPN, NAME)
    assert res.returncode == 0, res.stderr
    assert "probe" in res.stderr
    _assert_pseudonymised(res.stderr)


PROBE_DAG = '''
import logging
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="leak_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def leak_probe():
    @task
    def probe() -> int:
        import os

        import structlog

        from schoolslink import airflow_glue

        airflow_glue.run_facts()
        nhs, upn, name = os.environ["PROBE_NHS"], os.environ["PROBE_UPN"], os.environ["PROBE_NAME"]
        logging.getLogger("schoolslink.probe").warning(f"probe {nhs} {upn} {name}")
        logging.getLogger("airflow.task").info("probe task %s %s %s", nhs, upn, name)
        structlog.get_logger("probe").info("probe structlog", nhs=nhs, upn=upn, name=name)
        return 1

    probe()


the_dag = leak_probe()
'''


def test_an_airflow_task_that_logs_an_identifier(tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    dag_file = dags / "leak_probe.py"
    dag_file.write_text(PROBE_DAG)
    env = airflow_env(tmp_path / "home")
    # airflow_runner loads DAGs from the repository's dags/ only: this throwaway DAG gets a folder of its own
    env.update({"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "SCHOOLSLINK_KEY": KEY,
                "PROBE_NHS": NHS, "PROBE_UPN": UPN, "PROBE_NAME": NAME})
    ensure_metadata_db(env)
    res = _run("""
        import importlib.util, json, sys

        from schoolslink import logfilter

        spec = importlib.util.spec_from_file_location("leak_probe", sys.argv[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        logfilter.install()  # as airflow_runner.main does, once Airflow has set up logging
        dr = mod.the_dag.test()
        print(json.dumps({"state": str(dr.state)}), flush=True)
        """, env, str(dag_file))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert '"state": "success"' in res.stdout
    assert out.count("probe") >= 3
    _assert_pseudonymised(out)
    for text in leakscan.airflow_db(tmp_path / "home" / "airflow").values():
        assert NHS not in text and UPN not in text and NAME not in text
    assert leakscan.xcom_values(tmp_path / "home" / "airflow") == [1]
    for text in leakscan.texts(sorted((tmp_path / "home" / "airflow" / "logs").rglob("*"))).values():
        _assert_pseudonymised(text)


def test_airflows_task_log_write_path_has_the_processor(tmp_path: Path) -> None:
    """The processors Airflow's supervisor writes a task's log file with (and a task process sends its logs with)
    include ours, through `[logging] logging_config_class` as airflow_env sets it."""
    env = airflow_env(tmp_path / "home")
    env["SCHOOLSLINK_KEY"] = KEY
    assert env["AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS"] == "schoolslink.airflow_glue.LOGGING_CONFIG"
    log_file = tmp_path / "task.log"
    res = _run("""
        import sys

        import structlog
        from airflow.sdk.log import logging_processors

        nhs, upn, name, path = sys.argv[1:5]
        with open(path, "ab") as f:
            log = structlog.wrap_logger(structlog.BytesLogger(f), processors=logging_processors(json_output=True),
                                        logger_name="task").bind()
            log.info("probe %s", nhs, upn=upn, name=name)
            try:
                raise ValueError(f"bad {nhs} {upn} {name}")
            except ValueError:
                log.exception("failed")
        """, env, NHS, UPN, NAME, str(log_file))
    assert res.returncode == 0, res.stderr
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [x["event"] for x in lines][1] == "failed" and "exception" in lines[1]
    _assert_pseudonymised(text)


# The demo, once, scanned ----------------------------------------------------------------------------------------


def _contact_details(synth_home: Path, upns: set[str]) -> tuple[set[str], set[str]]:
    """The postcodes and the contacts' phone numbers the synthetic CTFs give the referred pupils (the manifest lists
    neither; their street names are `address` markers)."""
    postcodes, phones = set(), set()
    for ctf in synth_home.glob("landing/mis/*/*.xml"):
        for pupil in re.findall(r"<Pupil>.*?</Pupil>", ctf.read_text(), flags=re.S):
            upn = re.search(r"<UPN>(\w+)</UPN>", pupil)
            if upn and upn.group(1) in upns:
                postcodes |= set(re.findall(r"<Postcode>([^<]+)</Postcode>", pupil))
                phones |= set(re.findall(r"<PhoneNo>([^<]+)</PhoneNo>", pupil))
    return postcodes, phones


def _worker_emails(synth_home: Path) -> set[str]:
    """The trust workers' email addresses (their PractitionerRoles in the seed bundles; their phones are markers)."""
    out = set()
    for bundle in synth_home.glob("seed/fhir/bundle-*.json"):
        for entry in json.loads(bundle.read_text()).get("entry", []):
            res = entry.get("resource", {})
            if res.get("resourceType") == "PractitionerRole":
                out |= {t["value"] for t in res.get("telecom", []) if t.get("system") == "email"}
    return out


def test_the_demo_leaves_no_pupil_identity_in_logs_xcom_airflow_db_gx_reports_or_dead_letters(tmp_path: Path) -> None:
    from schoolslink.synth import synthesise

    home = tmp_path / "demo"
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", "2", "--pupils", "300", "--seed", "3",
           "--date", RUN_DATE, "--out", str(home), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, cwd=REPO,
                         env={**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY})
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ok"] and [r["state"] for r in summary["runs"]] == ["success"] * 3

    manifest = json.loads((home / "synth-manifest.json").read_text())
    # The CTFs now rest sealed: the same synthesis again (deterministic) gives the referred pupils' postcodes and
    # contacts' phone numbers, and the workers' email addresses.
    again = synthesise(tmp_path / "again", schools=2, pupils=300, seed=3, as_of=date.fromisoformat(RUN_DATE))
    assert [c.to_dict() for c in again.cases] == manifest["cases"]
    postcodes, phones = _contact_details(tmp_path / "again", {c["upn"] for c in manifest["cases"]})
    assert len(postcodes) >= len(manifest["cases"]) // 2 and len(phones) >= len(manifest["cases"]) // 2
    emails = _worker_emails(tmp_path / "again")
    assert emails and all("@" in e for e in emails)

    needles = leakscan.identity_needles(manifest, postcodes, phones, emails)
    kinds = set(needles.values())
    assert {"upn", "nhs_number", "surname", "forename", "dob", "name (HL7)", "postcode", "nhs_number (FHIR)",
            "upn (CSV)", "marker", "phone", "email"} <= kinds
    assert {mk["item"] for mk in manifest["markers"]} >= {"address", "contact_phone"}
    places = leakscan.places_without_pupil_data(home)
    assert places["logs"] and places["airflow db"] and places["gx"] and places["state store"]
    assert any("medplum" in name for name in places["logs"])
    assert leakscan.xcom_values(home / "airflow"), "the DAGs pass storage keys and counts by XCom"
    places["xcom"] = {"xcom values": json.dumps(leakscan.xcom_values(home / "airflow"))}
    places["demo output"] = {"demo stdout/stderr": res.stdout + res.stderr}
    hits = [hit for where in places.values() for hit in leakscan.find(where, needles)]
    assert hits == []

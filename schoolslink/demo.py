"""`schoolslink demo`: synthesise a trust, start the local peers, run every DAG through Airflow, summarise.

The FHIR peer is Medplum's router behind a thin Node server on 127.0.0.1 (connectors/fhir/server.py).
Pass `--fhir-base` to use a server that is already running (its data is kept between runs; the
trust's seed data is loaded only when the server does not have it yet).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

from schoolslink.airflow_runner import airflow_env, ensure_metadata_db

DAG_ORDER = ("nhs_sync", "mis_ingest", "school_feeds")


@dataclass
class DemoResult:
    home: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    fhir_base: str = ""
    ok: bool = False
    links: int = 0
    review_open: int = 0


_BAD_CTF_PUPIL = """    <Pupil><UPN>{upn}</UPN><Surname>{surname}</Surname><Forename>{forename}</Forename>
      <DOB>{dob}</DOB><Sex>{sex}</Sex><BasicDetails><NCyearActual>8</NCyearActual><EnrolStatus>C</EnrolStatus>
      </BasicDetails></Pupil>
"""


def plant_bad_input(home: Path, urn: int, run_date: date) -> None:
    """Exports a data manager must see handled: bad records, an entity attack, and a CSV report.

    School `urn` sends a CTF whose pupils include a wrong UPN check letter, a duplicated UPN, an
    impossible date of birth and an unknown sex code (each quarantined; the good pupil goes on);
    school `urn + 1` sends a billion-laughs file (refused whole, moved aside); school `urn + 2` sends a
    SIMS student list report as CSV (its layout recognised from the headings), one of whose three pupils
    has a wrong UPN check letter (quarantined; the other two go on).
    """
    from schoolslink.identifiers import make_upn

    good, other = make_upn(999, 9001, 1), make_upn(999, 9001, 2)
    bad_letter = ("A" if good[0] != "A" else "B") + good[1:]
    pupils = [
        (good, "DEMOVALID", "Pupil", "2013-05-01", "F"),
        (bad_letter, "DEMOBADUPN", "Pupil", "2013-05-02", "M"),
        (good, "DEMODUPLICATE", "Pupil", "2013-05-03", "M"),
        (other, "DEMOBADDOB", "Pupil", "2013-02-30", "F"),
        (make_upn(999, 9001, 3), "DEMOBADSEX", "Pupil", "2013-05-04", "Q"),
    ]
    body = "".join(_BAD_CTF_PUPIL.format(upn=u, surname=sn, forename=fn, dob=d, sex=x) for u, sn, fn, d, x in pupils)
    ctf = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CTfile><Header><DocumentName>Common Transfer File"
           f"</DocumentName><CTFversion>25.0</CTFversion><DateTime>{run_date.isoformat()}T01:00:00</DateTime>"
           f"<DocumentQualifier>full</DocumentQualifier><SupplierID>DEMO</SupplierID><SourceSchool><LEA>999</LEA>"
           f"<Estab>9001</Estab><URN>{urn}</URN><SchoolName>Demo bad-input school</SchoolName>"
           f"<AcademicYear>{run_date.year}</AcademicYear></SourceSchool></Header>\n<CTFpupilData>\n{body}"
           f"</CTFpupilData></CTfile>\n")
    folder = home / "landing" / "mis" / str(urn)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ctf-{urn}-{run_date.isoformat()}.xml").write_text(ctf, encoding="utf-8")
    bomb = ('<?xml version="1.0"?>\n<!DOCTYPE CTfile [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
            '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>\n<CTfile><Header>&c;</Header></CTfile>\n')
    folder = home / "landing" / "mis" / str(urn + 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ctf-{urn + 1}-{run_date.isoformat()}.xml").write_text(bomb, encoding="utf-8")
    sims = [make_upn(999, 9003, i) for i in (1, 2, 3)]
    sims[2] = ("A" if sims[2][0] != "A" else "B") + sims[2][1:]
    rows = "".join(f"{100 + i},{u},DEMOCSV{i},Pupil,{'MF'[i % 2]},0{i + 1}/09/2013,Year 8,N - No Special "
                   f"Educational Need,No\r\n" for i, u in enumerate(sims))
    folder = home / "landing" / "mis" / str(urn + 2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"sims-student-list-{run_date.isoformat()}.csv").write_text(
        "Adno,UPN,Legal Surname,Legal Forename,Gender,DOB,Year,SEN Status,In Care\r\n" + rows, encoding="utf-8")


def seed_trust(base: str, seed_dir: Path, trust_ods: str) -> int:
    """Load the synthetic trust's own FHIR data, unless the server already has it."""
    from connectors.fhir.client import FhirClient

    with FhirClient(base) as client:
        have = client.search("Organization", {"identifier": f"https://fhir.nhs.uk/Id/ods-organization-code|{trust_ods}"})
        if have:
            return 0
        n = 0
        for bundle_path in sorted(seed_dir.glob("bundle-*.json")):
            resources = [e["resource"] for e in json.loads(bundle_path.read_text())["entry"]]
            results = client.put_batch(resources)
            bad = [r for r in results if not r.ok]
            if bad:
                raise RuntimeError(f"seeding the trust's FHIR data failed for {len(bad)} resource(s): {bad[0].message}")
            n += len(results)
        return n


def run(
    *, home: Path, schools: int, pupils: int, seed: int, run_date: date, fhir_base: str | None = None,
    fresh: bool = True, bad_input: bool = True,
) -> DemoResult:
    from connectors.fhir.server import MedplumServer, ensure_npm_packages
    from schoolslink.synth import synthesise

    t0 = time.monotonic()
    home = home.resolve()
    os.environ["SCHOOLSLINK_HOME"] = str(home)
    result = DemoResult(home=home)
    if fresh and fhir_base is None:
        for sub in ("landing", "work", "out", "seed", "airflow", "logs", "state.db", "state.db-wal", "state.db-shm"):
            p = home / sub
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    manifest_path = home / "synth-manifest.json"
    if not (home / "landing").exists() or not manifest_path.exists():
        synth = synthesise(home, schools=schools, pupils=pupils, seed=seed, as_of=run_date)
        if bad_input:
            plant_bad_input(home, int(max(synth.school_urns)) + 1, run_date)
    manifest = json.loads(manifest_path.read_text())
    trust = manifest.get("trust_ods", "R9X")

    server = None
    try:
        if fhir_base is None:
            ensure_npm_packages()
            server = MedplumServer(log_path=logs / "medplum.log")
            server.start()
            fhir_base = server.base_url
        result.fhir_base = fhir_base
        seed_trust(fhir_base, home / "seed" / "fhir", trust)
        from schoolslink.endpoints import write_endpoints
        from schoolslink.store.db import migrate

        write_endpoints({trust: fhir_base})
        migrate()
        env = airflow_env(home)
        # The DAGs find the trust's server the way a deployment does: an Airflow Connection (here in Airflow's
        # environment form; in production the metadata database or a secrets backend).
        from schoolslink.endpoints import connection_id

        env.setdefault(f"AIRFLOW_CONN_{connection_id(trust).upper()}", json.dumps(
            {"conn_type": "http", "host": fhir_base, "extra": {"bundle_size": 2000}}))
        ensure_metadata_db(env)
        env["SCHOOLSLINK_LOGICAL_DATE"] = datetime.combine(run_date, dtime(2, 0)).isoformat() + "+00:00"
        with (logs / "airflow.log").open("a") as af_log:
            proc = subprocess.run(
                [sys.executable, "-m", "schoolslink.airflow_runner", *DAG_ORDER],
                env=env, stdout=subprocess.PIPE, stderr=af_log, text=True, check=False,
            )
            af_log.write(proc.stdout)
        for line in proc.stdout.splitlines():
            if line.startswith('{"dag_id"'):
                result.runs.append(json.loads(line))
        from schoolslink import runs

        for dag_id in DAG_ORDER:
            s = runs.latest(dag_id)
            if s:
                result.summaries[dag_id] = s["summary"]
        result.links, result.review_open = _identity_counts()
        result.ok = proc.returncode == 0 and len(result.runs) == len(DAG_ORDER)
    finally:
        if server is not None:
            server.stop()
    result.seconds = time.monotonic() - t0
    return result


def _identity_counts() -> tuple[int, int]:
    from sqlalchemy import func, select

    from schoolslink.pipeline.common import store
    from schoolslink.store.schema import links, review_queue

    with store().connect() as conn:
        n_links = conn.execute(select(func.count()).select_from(links).where(links.c.withdrawn.is_(False))).scalar()
        n_review = conn.execute(
            select(func.count()).select_from(review_queue).where(review_queue.c.status == "open")
        ).scalar()
    return int(n_links or 0), int(n_review or 0)


def summary_lines(r: DemoResult) -> list[str]:
    s_in = r.summaries.get("mis_ingest", {})
    s_nhs = r.summaries.get("nhs_sync", {})
    s_feed = r.summaries.get("school_feeds", {})
    lines = [
        f"schoolslink demo: {'ok' if r.ok else 'FAILED'} in {r.seconds:.1f} s",
        "Airflow runs: " + ", ".join(f"{x['dag_id']}={x['state']}" for x in r.runs),
        f"read from schools: {s_in.get('files', 0)} exports (CTF, CSV, Wonde), {s_in.get('read', 0)} pupil records; "
        f"{s_in.get('refused_files', 0)} files refused; {s_in.get('quarantined', 0)} records quarantined",
        f"consent: {s_in.get('consent_records', 0)} register records; {s_in.get('with_consent', 0)} pupils with "
        f"an active consent (plain data kept only for them)",
        "pulled from the trust: " + ", ".join(f"{k.removeprefix('pulled_')} {v}" for k, v in sorted(s_nhs.items())
                                               if k.startswith("pulled_")),
        f"identity: {r.links} learners linked to a trust patient, {r.review_open} waiting in the review queue "
        f"(no guessed identity)",
        f"school -> trust: {s_in.get('sent', 0)} resources sent, {s_in.get('unchanged_not_sent', 0)} unchanged "
        f"(not sent again); refused by consent {s_in.get('refused_by_consent', 0)}, sensitive case "
        f"{s_in.get('not_sent_sensitive_case', 0)}, left school {s_in.get('not_sent_left_school', 0)}, no agreement "
        f"{s_in.get('refused_no_agreement', 0)}, stopped at delivery "
        f"{sum(v for k, v in s_in.items() if k.startswith('stopped_at_delivery'))}, refused by the server "
        f"{s_in.get('refused_by_server', 0)}",
        f"trust -> school: {s_feed.get('feeds_written', 0)} feeds, {s_feed.get('feed_rows', 0)} rows; refused by "
        f"consent {s_feed.get('feed_refused_by_consent', 0)}, no agreement {s_feed.get('feed_no_agreement', 0)}",
        f"feeds:  {r.home / 'out' / 'feeds'}",
        f"ledger: {r.home / 'state.db'} (table ledger); `schoolslink audit verify` checks the chain",
        f"logs:   {r.home / 'logs'}",
    ]
    reasons = s_in.get("quarantine_reasons") or {}
    if reasons:
        lines.append("quarantine reasons (mis_ingest):")
        lines += [f"  {n:6d}  {why}" for why, n in reasons.items()]
    return lines

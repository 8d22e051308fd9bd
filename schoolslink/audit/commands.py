"""`schoolslink audit query | report | export-fhir`: the auditor's commands, added under the CLI's `audit` parser.

schoolslink/cli.py calls `register_audit(ausub)` with the subparsers object of its `audit` parser (the one that
holds `audit verify`). Exit codes follow the CLI contract: 0 success; 1 refused or not found (an unknown run, a
trust with no endpoint, a server that refused entries); 2 usage (a bad NHS number, UPN, recipient or time). With
`--json` the command prints exactly one JSON document on stdout and nothing else; messages go to stderr.

An NHS number or UPN can be given as `-` to read it from standard input, which keeps it out of the shell's history
and the process list. It is never printed back, not even in an error message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

USAGE, REFUSED, OK = 2, 1, 0


def _say(args: argparse.Namespace, doc: dict[str, Any], text: str, *, code: int = OK) -> int:
    """One JSON document on stdout with --json; else `text` (on stderr when it reports a refusal or usage error)."""
    if getattr(args, "json", False):
        print(json.dumps(doc, default=str))
    elif text:
        print(text, file=sys.stderr if code else sys.stdout)
    return code


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    return _say(args, {"ok": False, "error": message}, f"schoolslink audit: {message}", code=code)


def _identifier(value: str) -> str:
    return sys.stdin.readline().strip() if value == "-" else value


# -- audit query ----------------------------------------------------------------------------------------------------


def cmd_audit_query(args: argparse.Namespace) -> int:
    from schoolslink.audit import query as q
    from schoolslink.store.db import engine

    try:
        with engine().connect() as conn:
            subject: q.Subject | None = None
            if args.nhs_number is not None:
                subject = q.subject_for_nhs_number(conn, _identifier(args.nhs_number))
            elif args.upn is not None:
                subject = q.subject_for_upn(conn, _identifier(args.upn))
            elif args.subject_key is not None:
                subject = q.subject_for_key(args.subject_key)
            query = q.LedgerQuery(
                subject=subject,
                recipient=q.parse_recipient(args.recipient) if args.recipient is not None else None,
                agreement=args.agreement.strip() if args.agreement else None,
                run_id=args.run,
                since=q.parse_instant(args.since) if args.since else None,
                until=q.parse_instant(args.until, end=True) if args.until else None,
                direction=q.parse_direction(args.direction) if args.direction else None,
            )
            result = q.run_query(conn, query)
    except q.AuditUsageError as exc:
        return _fail(args, USAGE, str(exc))
    except ValueError as exc:  # e.g. a malformed SCHOOLSLINK_KEY_PREVIOUS: configuration, not the auditor's input
        return _fail(args, REFUSED, str(exc))
    doc = result.to_json()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        as_json = args.format == "json" or (args.format is None and out.suffix.lower() == ".json")
        out.write_text(json.dumps(doc, indent=1) + "\n" if as_json else result.to_csv(), encoding="utf-8")
        return _say(args, {"ok": True, "count": len(result.entries), "out": str(out.resolve()),
                           "format": "json" if as_json else "csv", "filters": query.filters()},
                    f"{len(result.entries)} ledger entries written to {out}")
    if args.json or args.format == "json":
        print(json.dumps(doc, default=str))
        return OK
    sys.stdout.write(result.to_csv())
    return OK


# -- audit report ---------------------------------------------------------------------------------------------------


def cmd_audit_report(args: argparse.Namespace) -> int:
    from schoolslink.audit.report import write_report
    from schoolslink.audit.runinfo import UnknownRunError

    out = Path(args.out)
    if out.exists() and out.is_dir():
        return _fail(args, USAGE, f"--out must be a file, and {out} is a folder")
    try:
        report = write_report(args.run_id, out)
    except UnknownRunError as exc:
        return _fail(args, REFUSED, str(exc))
    doc = {"ok": True, "out": str(out.resolve()), **report.to_json()}
    return _say(args, doc, f"run report for {report.dag_id} run {args.run_id} written to {out} "
                           f"({report.ledger_entries} ledger entries, {len(report.quarantine_rows)} quarantine rows; "
                           f"ledger check: {'passed' if report.verify_ok else 'FAILED'})")


# -- audit export-fhir ----------------------------------------------------------------------------------------------


def cmd_audit_export_fhir(args: argparse.Namespace) -> int:
    from schoolslink.audit.auditevent import AuditEventExportError, export_auditevents, put_auditevents
    from schoolslink.audit.runinfo import UnknownRunError
    from schoolslink.errors import ConfigurationError

    try:
        if args.trust:
            res = put_auditevents(args.run, args.trust)
        else:
            res = export_auditevents(args.run, Path(args.out))
    except UnknownRunError as exc:
        return _fail(args, REFUSED, str(exc))
    except (AuditEventExportError, ConfigurationError) as exc:
        return _fail(args, REFUSED, str(exc))
    scope = f"run {args.run}" if args.run else "the whole ledger"
    if res.trust:
        text = (f"{res.count} AuditEvents for {scope} to trust {res.trust}: {res.written} written, "
                f"{res.already_held} already held, {res.failed} failed")
    else:
        text = f"{res.count} AuditEvents for {scope} written to {res.out} (a FHIR batch Bundle)"
    if res.messages and not args.json:
        text += "\n" + "\n".join(f"  {m}" for m in res.messages)
    return _say(args, res.to_json(), text, code=OK if res.ok else REFUSED)


# -- the parsers ------------------------------------------------------------------------------------------------------


def register_audit(ausub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `query`, `report` and `export-fhir` to the `audit` parser's subparsers (cli.py's `ausub`)."""
    qp = ausub.add_parser(
        "query", help="ledger entries: who received what about whom, when, under which consent and agreement",
        description="Every filter given must hold. Times without an offset are UK time; a bare date as --to "
                    "means to the end of that day. Output: CSV on stdout; --json one JSON document; --out FILE "
                    "writes CSV, or JSON for a .json file or --format json.")
    who = qp.add_mutually_exclusive_group()
    who.add_argument("--nhs-number", metavar="NHS_NUMBER",
                     help="the child's NHS number ('-' reads it from stdin); never printed")
    who.add_argument("--upn", metavar="UPN", help="the pupil's UPN ('-' reads it from stdin); never printed")
    who.add_argument("--subject-key", metavar="KEY",
                     help="a subject pseudonym as the ledger shows it (lrn-..., pat-...)")
    qp.add_argument("--recipient", metavar="WHO", help="URN:<urn> (a school), ODS:<code> (a trust) or a portal user")
    qp.add_argument("--agreement", metavar="ID", help="a data sharing agreement's id")
    qp.add_argument("--run", metavar="RUN_ID", help="an Airflow run id")
    qp.add_argument("--from", dest="since", metavar="WHEN", help="at or after: YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]")
    qp.add_argument("--to", dest="until", metavar="WHEN", help="at or before: YYYY-MM-DD (the whole day) or a time")
    qp.add_argument("--direction", choices=("school_to_trust", "trust_to_school"))
    qp.add_argument("--out", metavar="FILE", help="write the entries to FILE instead of stdout")
    qp.add_argument("--format", choices=("csv", "json"), help="the format of --out (default: by its suffix)")
    qp.add_argument("--json", action="store_true", help="print one JSON document")
    qp.set_defaults(func=cmd_audit_query)

    rp = ausub.add_parser("report", help="one run's HTML report for auditors (counts and reasons, no pupil data)")
    rp.add_argument("run_id", metavar="RUN_ID")
    rp.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_audit_report)

    ep = ausub.add_parser("export-fhir", help="ledger entries as FHIR R4 AuditEvents: a batch Bundle file, or PUT to a "
                                              "trust's FHIR server")
    ep.add_argument("--run", metavar="RUN_ID", help="only this run's entries (default: the whole ledger)")
    dest = ep.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE", help="write a FHIR batch Bundle (JSON) of PUT AuditEvent/<id>")
    dest.add_argument("--trust", metavar="ODS", help="PUT the AuditEvents of what the trust received to its FHIR "
                                                     "server (its configured endpoint)")
    ep.add_argument("--json", action="store_true")
    ep.set_defaults(func=cmd_audit_export_fhir)


register = register_audit  # the name the issue first gave it

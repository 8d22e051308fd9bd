"""The `schoolslink` command. Exit codes: 0 success; 1 input or data refused; 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection


def _home(args: argparse.Namespace) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    return Path(os.environ.get("SCHOOLSLINK_HOME", ".schoolslink"))


def cmd_demo(args: argparse.Namespace) -> int:
    from schoolslink import demo

    run_date = date.fromisoformat(args.date) if args.date else date.today()
    r = demo.run(home=_home(args), schools=args.schools, pupils=args.pupils, seed=args.seed,
                 run_date=run_date, fhir_base=args.fhir_base, fresh=not args.keep, bad_input=not args.clean_input)
    if args.json:
        print(json.dumps({"ok": r.ok, "seconds": round(r.seconds, 2), "home": str(r.home), "runs": r.runs,
                          "summaries": r.summaries}, default=str))
    else:
        print("\n".join(demo.summary_lines(r)))
    return 0 if r.ok else 1


def cmd_synth(args: argparse.Namespace) -> int:
    from schoolslink.synth import synthesise

    home = _home(args)
    run_date = date.fromisoformat(args.date) if args.date else date.today()
    m = synthesise(home, schools=args.schools, pupils=args.pupils, seed=args.seed, as_of=run_date)
    counts = getattr(m, "counts", None)
    print(json.dumps({"home": str(home.resolve()), "counts": counts}, default=str) if args.json
          else f"wrote a synthetic trust into {home.resolve()}: {counts}")
    return 0


def cmd_agreement_check(args: argparse.Namespace) -> int:
    from schoolslink.errors import AgreementError
    from schoolslink.governance.agreement import load_agreement
    from schoolslink.governance.signposting import check_for_agreement

    try:
        a = load_agreement(Path(args.file))
        beside = Path(args.file).resolve().parent / "signposting"  # kept as data beside the agreement
        tables = check_for_agreement(a, beside if beside.is_dir() else None)
    except AgreementError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{a.id} version {a.version}: {a.effective_from} to {a.effective_to or 'open'}")
    print(f"  trusts: {', '.join(t.ods for t in a.trusts)}; purposes: {', '.join(a.purposes)}")
    for d, items in sorted(a.items.items()):
        print(f"  {d.value} may carry: {', '.join(sorted(items)) or '(nothing)'}")
    print(f"  the trust is sent a notice when consent is withdrawn: {'yes' if a.notify_withdrawal else 'no'}; "
          f"when a pupil it knew moves school: {'yes' if a.notify_move else 'no'}")
    for ods, table in sorted(tables.items()):
        if table is None:
            print(f"  signposting for {ods}: none (feeds give no 'where else to go')")
        else:
            print(f"  signposting for {ods}: {len(table.rejection)} rejection and {len(table.closure)} closure "
                  f"reasons, {len(table.services)} services ({table.path})")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from schoolslink import ledger
    from schoolslink.store.db import engine

    with engine().connect() as conn:
        r = ledger.verify(conn, checkpoints=not args.no_checkpoints)
    if args.json:
        print(json.dumps({"ok": r.ok, "entries": r.entries, "checkpoints_checked": r.checkpoints_checked,
                          "problem": r.problem, "first_bad_seq": r.first_bad_seq, "last_bad_seq": r.last_bad_seq,
                          "message": r.message, "problems": [
                              {"kind": p.kind, "message": p.message, "first_seq": p.first_seq,
                               "last_seq": p.last_seq, "checkpoint": p.checkpoint} for p in r.problems]}))
    else:
        print(r.message)
        for p in r.problems[1:]:
            print(f"  also: {p.message}")
    return 0 if r.ok else 1


def cmd_audit_purge(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from schoolslink.retention import purge

    counts = purge(datetime.now(UTC))
    _emit(args, {"ok": True, **counts}, f"{counts['values_erased']} disclosed values erased past their agreement's "
                                        f"retention ({counts['values_kept']} kept); the ledger still verifies")
    return 0


def cmd_feeds_build(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from schoolslink.pipeline import feeds_stage

    if args.out:
        os.environ["SCHOOLSLINK_FEEDS_DIR"] = str(Path(args.out).resolve())
    total = 0
    for chunk in feeds_stage.plan(1):
        res = feeds_stage.build(f"cli__{args.date}", chunk, date.fromisoformat(args.date), datetime.now(UTC))
        total += res["feeds_written"]
    print(f"{total} feeds written")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from schoolslink.summary import SummaryError, build_summaries, summaries_dir

    try:
        out = Path(args.out) if args.out else summaries_dir(args.month)
        counts = build_summaries(args.month, out)
    except SummaryError as exc:
        print(f"schoolslink summary: {exc}", file=sys.stderr)
        return 2
    doc = {"ok": True, "month": args.month, "out": str(out.resolve()), **counts.as_dict()}
    _emit(args, doc, f"{counts.school_pages} school and {counts.trust_pages} trust summaries for {args.month} "
                     f"in {out}")
    return 0


def cmd_mappings_lint(args: argparse.Namespace) -> int:
    from schoolslink.errors import ConfigurationError
    from schoolslink.mapping.engine import load_mappings

    root = Path(args.path) if args.path else None
    try:
        ms = load_mappings(root)
        for name in ms.mappings:
            ms.compile(name)
    except ConfigurationError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{len(ms.mappings)} mappings, {len(ms.fragments)} fragments, {len(ms.tables)} code tables: ok")
    for m in sorted(ms.mappings.values(), key=lambda m: m.name):
        print(f"  {m.name:36s} {m.version}  {m.input} -> {m.output}")
    return 0


def cmd_mappings_test(args: argparse.Namespace) -> int:
    from schoolslink.errors import ConfigurationError
    from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
    from schoolslink.mapping.goldens import run_goldens

    target = Path(args.path) if args.path else MAPPINGS_DIR
    root = target if target.is_dir() else MAPPINGS_DIR
    try:
        results = run_goldens(load_mappings(root), None if target == root else target)
    except ConfigurationError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.mapping}: {r.name}" + (f"\n     {r.file}:{r.line}: {r.message}" if not r.ok else ""))
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_mis_check(args: argparse.Namespace) -> int:
    from schoolslink.mischeck import check_file

    files = [check_file(Path(f)) for f in args.files]
    if args.json:
        print(json.dumps({"files": files}))
    else:
        for f in files:
            what = f"{f['format'] or '?'} {f['version'] or ''}".strip()
            if f["status"] == "rejected":
                print(f"REJECTED {f['path']} ({what}): {f['reason']}")
            else:
                print(f"accepted {f['path']} ({what}): {f['pupils']} pupils, {len(f['quarantined'])} quarantined")
                for q in f["quarantined"]:
                    print(f"    {q['record']}: {q['reason']}")
    return 1 if any(f["status"] == "rejected" for f in files) else 0


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str, *, ok: bool = True) -> None:
    """One JSON document on stdout with --json; else the text (on stderr when something was refused)."""
    if getattr(args, "json", False):
        print(json.dumps(doc, default=str))
    else:
        print(text, file=sys.stdout if ok else sys.stderr)


def _review(args: argparse.Namespace, decide: Callable[[Connection], Any]) -> tuple[int, Any]:
    """Run one review decision in one transaction; a refusal prints why and gives exit 1."""
    from schoolslink.errors import DecisionRefused
    from schoolslink.store.db import engine

    try:
        with engine().begin() as conn:
            return 0, decide(conn)
    except DecisionRefused as exc:
        _emit(args, {"ok": False, "refused": str(exc)}, f"refused: {exc}", ok=False)
        return 1, None


def cmd_review_list(args: argparse.Namespace) -> int:
    from schoolslink.governance import review
    from schoolslink.store.db import engine

    with engine().connect() as conn:
        items = review.open_items(conn, school_urn=args.school, trust_ods=args.trust)
    lines = [f"{len(items)} open review item(s)"] + [
        f"{i.trust_ods}  {i.patient_ref}  school {i.school_urn or '-'}  candidate {i.candidate_learner_key or '-'}"
        f"\n    {i.reason}" for i in items]
    _emit(args, {"ok": True, "count": len(items), "items": [i.to_json() for i in items]}, "\n".join(lines))
    return 0


def cmd_review_confirm(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from schoolslink.governance import review

    on = date.fromisoformat(args.date) if args.date else date.today()
    code, d = _review(args, lambda conn: review.confirm(
        conn, args.trust, args.patient_ref, by=args.by, at=datetime.now(UTC), on=on, learner_key=args.learner,
        rules_met=args.rule_met or ()))
    if d is not None:
        rules = f"; rule met: {', '.join(d.details['rules_met'])}" if d.details["rules_met"] else ""
        _emit(args, {"ok": True, **d.to_json()},
              f"confirmed: {d.trust_ods} {d.patient_ref} linked to learner {d.learner_key} by {d.by}{rules} "
              f"(decision {d.decision_id})")
    return code


def cmd_review_reject(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from schoolslink.governance import review

    code, d = _review(args, lambda conn: review.reject(conn, args.trust, args.patient_ref, by=args.by,
                                                       at=datetime.now(UTC), reason=args.reason))
    if d is not None:
        _emit(args, {"ok": True, **d.to_json()},
              f"rejected: {d.trust_ods} {d.patient_ref} will not be matched again (decision {d.decision_id})")
    return code


def cmd_review_unlink(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from schoolslink.governance import review

    at = datetime.now(UTC)
    code, d = _review(args, lambda conn: review.unlink(conn, args.learner_key, args.trust, by=args.by,
                                                       reason=args.reason, at=at))
    if d is None:
        return code
    doc: dict[str, Any] = {"ok": True, **d.to_json()}
    text = [f"unlinked: learner {d.learner_key} from {d.trust_ods} {d.patient_ref} (decision {d.decision_id}); "
            f"{d.details['retractions_due']} resource(s) due for retraction, {d.details['feed_corrections_due']} "
            "school feed correction(s) due in the next feed"]
    if args.now:
        from schoolslink.pipeline import retraction

        sent = retraction.send_due(d.decision_id, review.DAG_ID, at, trusts=[d.trust_ods])
        still = sum(sent.get(k, 0) for k in ("retractions_no_endpoint", "retractions_refused", "retractions_still_due"))
        doc.update(sent_now=sent, ok=still == 0)
        text.append(f"sent now: {sent.get('retracted', 0)} marked entered-in-error on the trust's server"
                    + (f"; {still} not sent now: the next mis_ingest run sends them" if still else ""))
        if still:
            code = 1
    elif d.details["retractions_due"]:
        text.append("the next mis_ingest run sends the retraction (or run again with --now)")
    _emit(args, doc, "\n".join(text), ok=code == 0)
    return code


def _trust_args(p: argparse.ArgumentParser) -> None:
    """The options that size and place a synthetic trust (demo and synth)."""
    p.add_argument("--schools", type=int, default=20)
    p.add_argument("--pupils", type=int, default=6000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="SCHOOLSLINK_HOME to write into (default ./.schoolslink)")
    p.add_argument("--date", help="the run's date, YYYY-MM-DD (default today)")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="schoolslink", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthesise a trust, start the peers, run every DAG, summarise")
    _trust_args(d)
    d.add_argument("--fhir-base", help="use this running FHIR server instead of starting one")
    d.add_argument("--keep", action="store_true", help="keep the state of an earlier demo in --out")
    d.add_argument("--clean-input", action="store_true",
                   help="leave out the two deliberately bad school exports the demo adds")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="write synthetic CTF files, consent registers and FHIR seed bundles")
    _trust_args(s)
    s.set_defaults(func=cmd_synth)

    a = sub.add_parser("agreement", help="data sharing agreements")
    asub = a.add_subparsers(dest="agreement_command", required=True)
    ac = asub.add_parser("check", help="validate an agreement and print what each direction may carry")
    ac.add_argument("file")
    ac.set_defaults(func=cmd_agreement_check)

    au = sub.add_parser("audit", help="the disclosure ledger")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    av = ausub.add_parser("verify", help="recompute the ledger's hash chain")
    av.add_argument("--json", action="store_true")
    av.add_argument("--no-checkpoints", action="store_true",
                    help="check the chain only, not the external Merkle checkpoints")
    av.set_defaults(func=cmd_audit_verify)
    ap = ausub.add_parser("purge", help="erase disclosed values past the agreement's retention (entries stay "
                                        "verifiable)")
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(func=cmd_audit_purge)
    from schoolslink.audit.commands import register_audit

    register_audit(ausub)  # audit query | report | export-fhir (docs/audit.md)

    mi = sub.add_parser("mis", help="school MIS exports")
    misub = mi.add_subparsers(dest="mis_command", required=True)
    mc = misub.add_parser("check", help="read MIS exports without sending anything (exit 1 if a file is rejected)")
    mc.add_argument("files", nargs="+")
    mc.add_argument("--json", action="store_true")
    mc.set_defaults(func=cmd_mis_check)

    mp = sub.add_parser("mappings", help="declarative mappings")
    msub = mp.add_subparsers(dest="mappings_command", required=True)
    ml = msub.add_parser("lint", help="schema-check every mapping, fragment and code table (file:line: message)")
    ml.add_argument("path", nargs="?")
    ml.set_defaults(func=cmd_mappings_lint)
    mt = msub.add_parser("test", help="run the golden tests beside each mapping")
    mt.add_argument("path", nargs="?")
    mt.set_defaults(func=cmd_mappings_test)

    _review_parser(sub)

    f = sub.add_parser("feeds", help="school status feeds")
    fsub = f.add_subparsers(dest="feeds_command", required=True)
    fb = fsub.add_parser("build", help="build every school's feed for that night")
    fb.add_argument("--date", required=True)
    fb.add_argument("--out", help="folder for the feeds (default out/feeds under SCHOOLSLINK_HOME)")
    fb.set_defaults(func=cmd_feeds_build)

    sm = sub.add_parser("summary", help="the monthly partnership summary for each school and trust (HTML)")
    sm.add_argument("--month", required=True, help="YYYY-MM")
    sm.add_argument("--out", help="folder (default out/summaries/<month> under SCHOOLSLINK_HOME)")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=cmd_summary)

    from schoolslink.events_cli import register_events

    register_events(sub)  # landing watch | fhir receive (docs/events.md)
    from schoolslink.mllp_cli import register_mllp

    register_mllp(sub)  # mllp listen | mllp send (docs/mllp.md)
    from schoolslink.portal_cli import register_portal

    register_portal(sub)  # portal | portal user ... | portal events (docs/portal.md)
    return p


def _review_parser(sub: Any) -> None:
    from schoolslink.governance.review import CASE_RULES, RULES

    mt = sub.add_parser("match", help="identity matching")
    msub = mt.add_subparsers(dest="match_command", required=True)
    rv = msub.add_parser("review", help="the identity review queue (docs/review-queue.md)")
    rsub = rv.add_subparsers(dest="review_command", required=True)

    ls = rsub.add_parser("list", help="open review items: trust, patient reference, school, reason, candidate key")
    ls.add_argument("--school", metavar="URN")
    ls.add_argument("--trust", metavar="ODS")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_review_list)

    rules = "; ".join(f"{flag.replace('_', '-')}: {' or '.join(names)}" for flag, names in CASE_RULES.items())
    cf = rsub.add_parser("confirm", help="link the item's patient to a learner, as a person decided")
    cf.add_argument("trust", metavar="TRUST")
    cf.add_argument("patient_ref", metavar="PATIENT_REF")
    cf.add_argument("--learner", metavar="KEY", help="the learner key (default: the item's candidate)")
    cf.add_argument("--by", required=True, metavar="NAME", help="the reviewer's name (staff, recorded)")
    cf.add_argument("--rule-met", action="append", choices=sorted(RULES), metavar="RULE",
                    help=f"the agreement's rule that is met, for a sensitive case ({rules})")
    cf.add_argument("--date", help="the day the consent rules are checked, YYYY-MM-DD (default today)")
    cf.add_argument("--json", action="store_true")
    cf.set_defaults(func=cmd_review_confirm)

    rj = rsub.add_parser("reject", help="decide no link: the patient is never matched automatically again")
    rj.add_argument("trust", metavar="TRUST")
    rj.add_argument("patient_ref", metavar="PATIENT_REF")
    rj.add_argument("--by", required=True, metavar="NAME")
    rj.add_argument("--reason", metavar="TEXT", help="why (no pupil names or identifiers)")
    rj.add_argument("--json", action="store_true")
    rj.set_defaults(func=cmd_review_reject)

    ul = rsub.add_parser("unlink", help="withdraw a wrong link and retract everything sent under it")
    ul.add_argument("learner_key", metavar="LEARNER_KEY")
    ul.add_argument("trust", metavar="TRUST")
    ul.add_argument("--by", required=True, metavar="NAME")
    ul.add_argument("--reason", required=True, metavar="TEXT", help="why the link was wrong (no pupil identifiers)")
    ul.add_argument("--now", action="store_true",
                    help="send the retraction to the trust's FHIR server now, not in the next mis_ingest run")
    ul.add_argument("--json", action="store_true")
    ul.set_defaults(func=cmd_review_unlink)


def main(argv: list[str] | None = None) -> int:
    __import__("schoolslink.logfilter").logfilter.install()  # pseudonymise identifiers in any log record
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The `schoolslink` command. Exit codes: 0 success; 1 input or data refused; 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path


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

    try:
        a = load_agreement(Path(args.file))
    except AgreementError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{a.id} version {a.version}: {a.effective_from} to {a.effective_to or 'open'}")
    print(f"  trusts: {', '.join(t.ods for t in a.trusts)}; purposes: {', '.join(a.purposes)}")
    for d, items in sorted(a.items.items()):
        print(f"  {d.value} may carry: {', '.join(sorted(items)) or '(nothing)'}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from schoolslink import ledger
    from schoolslink.store.db import engine

    with engine().connect() as conn:
        r = ledger.verify(conn)
    if args.json:
        print(json.dumps({"ok": r.ok, "entries": r.entries, "first_bad_seq": r.first_bad_seq, "message": r.message}))
    else:
        print(r.message)
    return 0 if r.ok else 1


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
    av.set_defaults(func=cmd_audit_verify)

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

    f = sub.add_parser("feeds", help="school status feeds")
    fsub = f.add_subparsers(dest="feeds_command", required=True)
    fb = fsub.add_parser("build", help="build every school's feed for that night")
    fb.add_argument("--date", required=True)
    fb.add_argument("--out", help="folder for the feeds (default out/feeds under SCHOOLSLINK_HOME)")
    fb.set_defaults(func=cmd_feeds_build)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

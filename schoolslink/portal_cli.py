"""`schoolslink portal ...`: serve the school portal, manage its local accounts, read its audit log.

    schoolslink portal [--host H] [--port P] [--tls-cert FILE --tls-key FILE]
    schoolslink portal user add --email E --role dsl|smhl|school_admin|link_worker --school URN... | --trust ODS...
                                [--auth local|oidc] [--password-stdin] [--json]
    schoolslink portal user list [--school URN | --trust ODS] [--json]
    schoolslink portal user disable|enable USER   (a user id or email address)
    schoolslink portal events [--user ID] [--event KIND] [--limit N] [--json]

schoolslink/cli.py calls `register_portal(sub)` with its top-level subparsers. `user add` prints the new
account's id, its TOTP provisioning URI (otpauth://, for an authenticator app) and, unless `--password-stdin`
gave one, a generated password: both once, for the person the account is for. Exit codes: 0 done; 1 refused
(the message names the field and what to do); 2 usage. `--json`: one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from schoolslink.audit.commands import OK, REFUSED, USAGE
from schoolslink.audit.commands import _say as say  # one JSON document with --json, else the text


def cmd_portal(args: argparse.Namespace) -> int:
    from schoolslink.errors import ConfigurationError
    from schoolslink.portal.server import serve

    if bool(args.tls_cert) != bool(args.tls_key):
        print("schoolslink portal: give --tls-cert and --tls-key together", file=sys.stderr)
        return USAGE
    try:
        serve(args.host, args.port, certfile=args.tls_cert, keyfile=args.tls_key, announce=args.announce,
              exit_on_stdin_close=args.exit_on_stdin_close)
    except ConfigurationError as exc:
        print(f"schoolslink portal: {exc}", file=sys.stderr)
        return REFUSED
    except OSError as exc:
        print(f"schoolslink portal: cannot listen on {args.host}:{args.port} ({exc.strerror})", file=sys.stderr)
        return REFUSED
    return OK


def _user_doc(u: Any) -> dict[str, Any]:
    return {"user_id": u.user_id, "email": u.email, "role": u.role, "organisations": list(u.organisations),
            "auth": u.auth, "disabled": u.disabled}


def cmd_user_add(args: argparse.Namespace) -> int:
    from schoolslink.portal import accounts
    from schoolslink.store.db import engine

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    orgs = (args.school or []) + (args.trust or [])
    try:
        with engine().begin() as conn:
            made = accounts.add(conn, email=args.email, role=args.role, organisations=orgs, now=datetime.now(UTC),
                                created_by="cli", auth=args.auth, password=password)
            from schoolslink.portal.audit import event

            event(conn, datetime.now(UTC), "user_added", user_id=None, organisation=made.user.organisations[0],
                  detail=f"{made.user.user_id} as {made.user.role} (cli)")
    except accounts.AccountError as exc:
        return say(args, {"ok": False, "error": str(exc)}, f"schoolslink portal user add: {exc}", code=REFUSED)
    doc = {"ok": True, **_user_doc(made.user), "totp_uri": made.totp_uri, "password": made.password}
    lines = [f"added {made.user.user_id}: {made.user.email}, {made.user.role_name}, "
             f"{', '.join(made.user.organisations)} ({made.user.auth} sign-in)"]
    if made.totp_uri:
        lines.append(f"TOTP provisioning URI (give it to the user once, for their authenticator app): {made.totp_uri}")
    if made.password:
        lines.append(f"password (give it to the user once): {made.password}")
    return say(args, doc, "\n".join(lines))


def cmd_user_list(args: argparse.Namespace) -> int:
    from schoolslink.portal import accounts
    from schoolslink.store.db import engine

    orgs = [o.strip().upper() for o in (args.school or []) + (args.trust or [])] or None
    with engine().connect() as conn:
        users = accounts.list_users(conn, orgs)
    text = "\n".join("\t".join([u.user_id, u.email, u.role, ",".join(u.organisations), u.auth]
                               + (["disabled"] if u.disabled else [])) for u in users) or "no portal users"
    return say(args, {"ok": True, "users": [_user_doc(u) for u in users]}, text)


def _set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    from schoolslink.portal import accounts, sessions
    from schoolslink.portal.audit import event
    from schoolslink.store.db import engine

    now = datetime.now(UTC)
    with engine().begin() as conn:
        user = accounts.by_email(conn, args.user) if "@" in args.user else accounts.get(conn, args.user)
        if user is None:
            return say(args, {"ok": False, "error": "no such portal user"}, "schoolslink portal user: no such "
                       "user: give a user id (u-...) or an email address", code=REFUSED)
        accounts.set_disabled(conn, user.user_id, disabled)
        if disabled:
            sessions.end_all_for(conn, user.user_id, now)
        event(conn, now, "user_disabled" if disabled else "user_enabled", detail=f"{user.user_id} (cli)")
    word = "disabled" if disabled else "enabled"
    return say(args, {"ok": True, "user_id": user.user_id, "disabled": disabled},
                f"{user.user_id} {word}" + ("; their sessions ended" if disabled else ""))


def cmd_events(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from schoolslink.audit.query import iso
    from schoolslink.store.db import engine
    from schoolslink.store.schema import portal_events as t

    q = select(t).order_by(t.c.id.desc()).limit(args.limit)
    if args.user:
        q = q.where(t.c.user_id == args.user)
    if args.event:
        q = q.where(t.c.event == args.event)
    with engine().connect() as conn:
        rows = [{"id": r.id, "at": iso(r.at), "user_id": r.user_id, "event": r.event,
                 "organisation": r.organisation, "detail": r.detail} for r in conn.execute(q)]
    rows.reverse()
    text = "\n".join(f"{r['at']}\t{r['event']}\t{r['user_id'] or '-'}\t{r['organisation'] or '-'}\t{r['detail'] or ''}"
                     for r in rows) or "no portal events"
    return say(args, {"ok": True, "events": rows}, text)


def register_portal(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `portal` (and `portal user ...`, `portal events`) to the CLI's top-level subparsers."""
    p = sub.add_parser("portal", help="the school portal (web): serve it, manage its accounts, read its audit log")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="... and this private key (PEM)")
    p.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)  # print LISTENING <port>
    p.add_argument("--exit-on-stdin-close", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_portal)
    psub = p.add_subparsers(dest="portal_command")

    u = psub.add_parser("user", help="local portal accounts")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add an account; prints its TOTP provisioning URI (and a password) once")
    ua.add_argument("--email", required=True)
    ua.add_argument("--role", required=True, choices=("dsl", "smhl", "school_admin", "link_worker"))
    ua.add_argument("--school", nargs="+", metavar="URN", help="the school(s) a school role serves")
    ua.add_argument("--trust", nargs="+", metavar="ODS", help="the trust(s) a link worker serves")
    ua.add_argument("--auth", choices=("local", "oidc"), default="local",
                    help="local: password and TOTP; oidc: signs in through the OpenID provider (default local)")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    ua.add_argument("--json", action="store_true")
    ua.set_defaults(func=cmd_user_add)
    ul = usub.add_parser("list", help="the accounts (all, or those of a school or trust)")
    ul.add_argument("--school", nargs="+", metavar="URN")
    ul.add_argument("--trust", nargs="+", metavar="ODS")
    ul.add_argument("--json", action="store_true")
    ul.set_defaults(func=cmd_user_list)
    for name, disabled in (("disable", True), ("enable", False)):
        ud = usub.add_parser(name, help=f"{name} an account" + (" and end its sessions" if disabled else ""))
        ud.add_argument("user", metavar="USER", help="a user id (u-...) or an email address")
        ud.add_argument("--json", action="store_true")
        ud.set_defaults(func=lambda a, d=disabled: _set_disabled(a, d))

    ev = psub.add_parser("events", help="the portal's audit log: sign-ins, refused requests, account changes")
    ev.add_argument("--user", metavar="ID", help="only this user's events")
    ev.add_argument("--event", metavar="KIND", help="only this kind (sign_in, sign_in_failed, refused, ...)")
    ev.add_argument("--limit", type=int, default=200, help="the most recent N (default 200)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_events)

"""`schoolslink mllp listen | send`: the HL7v2 listener and a sender (docs/mllp.md).

schoolslink/cli.py calls `register_mllp(sub)` with its top-level subparsers object. Exit codes follow the CLI
contract: 0 success; 1 refused (any AE or AR, a message with no acknowledgment, a file that holds no message); 2
usage (bad options, a file that cannot be read, TLS files that do not load, an address `listen` cannot bind).
`listen` returns 0 after a clean stop (SIGTERM or Ctrl-C). `send --json` prints exactly one JSON document on stdout:

    {"messages": [{"file": "adt.hl7", "index": 1, "control_id": "MSG00001", "ack": "AA", "error": null}, ...],
     "counts": {"AA": 1, "AE": 0, "AR": 0, "failed": 0}}

Without --json, one line per message: `FILE:INDEX CODE CONTROL_ID [ERR-3 CODE: TEXT]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

USAGE, REFUSED, OK = 2, 1, 0
MAX_MESSAGE_LIMIT = 64 << 20  # a message of 64 MiB is far beyond any ADT or REF; the writer's pipe takes < 2 GiB


def cmd_listen(args: argparse.Namespace) -> int:
    from connectors.hl7v2.listener import MllpListener, run, server_context
    from connectors.hl7v2.store import MessageStore

    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        print("schoolslink mllp listen: --tls-cert and --tls-key go together (and --tls-client-ca needs them)",
              file=sys.stderr)
        return USAGE
    try:
        ctx = server_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        print(f"schoolslink mllp listen: the TLS certificate, key or client CA cannot be loaded ({exc})",
              file=sys.stderr)
        return USAGE
    if not 1024 <= args.max_message <= MAX_MESSAGE_LIMIT:
        print(f"schoolslink mllp listen: --max-message must be from 1024 to {MAX_MESSAGE_LIMIT} bytes "
              f"(it is {args.max_message})", file=sys.stderr)
        return USAGE
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        __import__("schoolslink.logfilter").logfilter.install()  # again: onto the handler just made
    store = MessageStore(args.db_url)
    listener = MllpListener(store, host=args.host, port=args.port, ssl=ctx, max_message=args.max_message,
                            on_stored=_events_hook())

    def ready(port: int) -> None:
        print(f"LISTENING {port}", flush=True)

    try:
        run(listener, ready, stop_on_stdin_eof=args.exit_on_stdin_eof)
    except OSError as exc:  # the address is taken, or not ours to listen on
        print(f"schoolslink mllp listen: cannot listen on {args.host}:{args.port} "
              f"({exc.strerror or type(exc).__name__})", file=sys.stderr)
        store.close()
        return USAGE
    return OK


def _events_hook() -> Any:
    """The `on_stored` hook that publishes an `hl7v2` event per commit (SCHOOLSLINK_EVENTS: Redis, SQS, or off),
    so the DAG that applies the messages starts at once; without it the scheduled sweep still applies them."""
    try:
        from connectors.events import DisabledPublisher, hl7v2_stored_hook, publisher_from_env
    except ImportError:  # pragma: no cover - the events connector is not installed here
        return None
    publisher = publisher_from_env()
    return None if isinstance(publisher, DisabledPublisher) else hl7v2_stored_hook(publisher)


def cmd_send(args: argparse.Namespace) -> int:
    from connectors.hl7v2.fastcheck import check
    from connectors.hl7v2.sender import MllpSender, NoAcknowledgment, client_context, read_messages

    def fail(code: int, message: str) -> int:
        if args.json:
            print(json.dumps({"ok": False, "error": message}))
        else:
            print(f"schoolslink mllp send: {message}", file=sys.stderr)
        return code

    batches: list[tuple[str, list[bytes]]] = []
    for name in args.files:
        try:
            msgs = read_messages(Path(name))
        except OSError as exc:
            return fail(USAGE, f"{name}: cannot be read ({exc.strerror or type(exc).__name__})")
        if not msgs:
            return fail(REFUSED, f"{name}: holds no HL7 message (nothing was sent)")
        batches.append((name, msgs))
    try:
        ctx = client_context(args.tls_ca, args.tls_cert, args.tls_key) if (args.tls_ca or args.tls_cert) else None
    except (OSError, ssl.SSLError) as exc:
        return fail(USAGE, f"the TLS CA, certificate or key cannot be loaded ({exc})")
    rows: list[dict[str, Any]] = []
    counts = {"AA": 0, "AE": 0, "AR": 0, "failed": 0}
    with MllpSender(args.host, args.port, ssl=ctx, timeout=args.timeout, retries=args.retries) as sender:
        for name, msgs in batches:
            for i, msg in enumerate(msgs, 1):
                row: dict[str, Any] = {"file": name, "index": i, "control_id": check(msg).control_id,
                                       "ack": None, "error": None}
                try:
                    ack = sender.send(msg)
                except (NoAcknowledgment, ssl.SSLError, OSError) as exc:
                    row["error"] = (str(exc) if isinstance(exc, NoAcknowledgment)
                                    else f"TLS failed ({type(exc).__name__})" if isinstance(exc, ssl.SSLError)
                                    else f"cannot connect ({type(exc).__name__})")
                    counts["failed"] += 1
                else:
                    row["ack"] = ack.code
                    if ack.error is not None:
                        row["error"] = f"{ack.error}: {ack.text or ''}".rstrip(": ")
                    counts[ack.code] = counts.get(ack.code, 0) + 1
                rows.append(row)
                if not args.json:
                    line = f"{name}:{i} {row['ack'] or 'NONE'} {row['control_id'] or '-'}"
                    print(line + (f" {row['error']}" if row["error"] else ""), flush=True)
    if args.json:
        print(json.dumps({"messages": rows, "counts": counts}))
    refused = counts["failed"] + sum(n for code, n in counts.items() if code not in ("AA", "CA", "failed"))
    return REFUSED if refused else OK


def register_mllp(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `mllp listen` and `mllp send` to the CLI's top-level subparsers."""
    from connectors.hl7v2.mllp import MAX_FRAME

    mp = sub.add_parser("mllp", help="HL7v2 over MLLP: the listener (persist before ACK) and a sender")
    msub = mp.add_subparsers(dest="mllp_command", required=True)

    lp = msub.add_parser("listen", help="receive HL7v2 messages, store each durably, then acknowledge it",
                         description="Runs until SIGTERM or Ctrl-C, then acknowledges what it received and stops. "
                                     "Prints 'LISTENING <port>' once it accepts connections.")
    lp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    lp.add_argument("--port", type=int, default=2575, help="port (default 2575; 0 picks a free one)")
    lp.add_argument("--tls-cert", metavar="FILE", help="our TLS certificate (PEM): turns TLS on")
    lp.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    lp.add_argument("--tls-client-ca", metavar="FILE",
                    help="require a client certificate that chains to this CA (mutual TLS)")
    lp.add_argument("--db-url", metavar="URL", help="the store's SQLAlchemy URL (default SCHOOLSLINK_DB_URL, else "
                                                    "the SQLite file under SCHOOLSLINK_HOME)")
    lp.add_argument("--max-message", type=int, default=MAX_FRAME, metavar="BYTES",
                    help=f"refuse (AR) larger messages (default {MAX_FRAME})")
    lp.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)  # a child of a test
    lp.set_defaults(func=cmd_listen)

    sp = msub.add_parser("send", help="send the messages in FILEs, one at a time, and print each ACK code")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=2575)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for each ACK (10)")
    sp.add_argument("--retries", type=int, default=3, metavar="N",
                    help="resends of a message after a timeout or a lost connection (3)")
    sp.add_argument("--tls-ca", metavar="FILE", help="use TLS; check the listener's certificate against this CA")
    sp.add_argument("--tls-cert", metavar="FILE", help="our client certificate, for mutual TLS")
    sp.add_argument("--tls-key", metavar="FILE", help="its private key")
    sp.set_defaults(func=cmd_send)

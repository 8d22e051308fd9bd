"""`schoolslink landing watch` and `schoolslink fhir receive`: the two long-running services that publish events.

schoolslink/cli.py calls `register_events(sub)` with its top-level subparsers. Both services publish where
`SCHOOLSLINK_EVENTS` says (connectors/events; docs/events.md) and run until SIGTERM or SIGINT. Exit codes follow
the CLI contract: 0 stopped cleanly; 1 refused to start (a bad setting, the port taken); 2 usage.

    schoolslink landing watch                               # watches SCHOOLSLINK_HOME/landing/, publishes `landing`
    schoolslink fhir receive --host 127.0.0.1 --port 8095   # POST /notify/<ODS>, publishes `fhir`
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)


def _logging() -> None:
    from schoolslink import logfilter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logfilter.install()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_landing_watch(args: argparse.Namespace) -> int:
    from connectors.events import publisher_from_env
    from connectors.events.watcher import LandingWatcher

    if not args.rescan > 0 or not args.settle >= 0:
        print("schoolslink landing watch: --rescan must be over 0 seconds and --settle 0 or more", file=sys.stderr)
        return 2
    _logging()
    publisher = publisher_from_env()
    stop = _stop_on_signals()
    watcher = LandingWatcher(publisher, settle=args.settle, rescan=args.rescan)
    try:
        watcher.start()
    except OSError as exc:
        print(f"schoolslink landing watch: cannot watch {watcher.root}: {exc.strerror or exc}", file=sys.stderr)
        publisher.close()
        return 1
    print(f"WATCHING {watcher.root}", flush=True)
    try:
        while not stop.wait(5):
            if not watcher.alive():  # exit non-zero: the service manager restarts it, and a restart rescans
                log.error("the landing watcher stopped watching %s (the folder gone, or a watcher thread died): "
                          "exiting so it is restarted", watcher.root)
                return 1
    finally:
        watcher.stop()
        publisher.close()
        log.info("landing watcher stopped: %d event(s) published; publisher %s", watcher.published, publisher.stats)
    return 0


def cmd_fhir_receive(args: argparse.Namespace) -> int:
    from connectors.events import publisher_from_env
    from connectors.fhir.notify import NotifySecrets, serve
    from schoolslink.errors import ConfigurationError

    _logging()
    try:
        NotifySecrets.from_env()  # refuse to start on a broken secrets file, before binding the port
    except ConfigurationError as exc:
        print(f"schoolslink fhir receive: {exc}", file=sys.stderr)
        return 1
    publisher = publisher_from_env()
    try:
        serve(publisher, args.host, args.port)
    except OSError as exc:
        print(f"schoolslink fhir receive: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    finally:
        publisher.close()
    return 0


def register_events(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `landing watch` and `fhir receive` to the CLI's top-level subparsers (cli.py's `sub`)."""
    lp = sub.add_parser("landing", help="the landing zone: watch it for dropped files (docs/events.md)")
    lsub = lp.add_subparsers(dest="landing_command", required=True)
    lw = lsub.add_parser("watch", help="publish a `landing` event when a school's file has landed (runs until "
                                       "stopped)")
    lw.add_argument("--settle", type=float, default=2.0, metavar="SECONDS",
                    help="a file with no close or move of its own counts once its size holds this long")
    lw.add_argument("--rescan", type=float, default=60.0, metavar="SECONDS",
                    help="list the zone this often for files whose events were lost (an inotify overflow)")
    lw.set_defaults(func=cmd_landing_watch)

    fp = sub.add_parser("fhir", help="FHIR subscription notifications (docs/events.md)")
    fsub = fp.add_subparsers(dest="fhir_command", required=True)
    fr = fsub.add_parser("receive", help="receive rest-hook notifications, store them sealed, publish `fhir`")
    fr.add_argument("--host", default="127.0.0.1")
    fr.add_argument("--port", type=int, default=8095, help="0 picks a free port (printed as LISTENING <port>)")
    fr.set_defaults(func=cmd_fhir_receive)

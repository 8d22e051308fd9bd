"""The landing-zone watcher: a long-running service that publishes `landing` when a school's file has landed.

`schoolslink landing watch` runs it beside Airflow. It watches `SCHOOLSLINK_HOME/landing/` with inotify
(watchdog) and publishes one `landing` event (connectors/events) per file that is completely there, so
mis_ingest starts within about a second instead of at its hourly sweep. It reads nothing but the file's bytes
for their SHA-256 (the same digest the sealed header records), and it seals, moves and deletes nothing: the
run's `intake` does that, exactly as for a sweep.

Which files count: the ones `LandingZone.intake` takes (connectors/storage/landing.py) — `mis/<URN>/<file>`
and `consent/<URN>.csv` — and never a partial or temporary one:

- a file is complete when the writer closes it after writing (inotify `IN_CLOSE_WRITE`), or when it is
  renamed or moved into place (`IN_MOVED_TO`: a writer's `x.csv.part` renamed to `x.csv`, a `mv` from
  elsewhere). A file that appears with no close or move of its own (inside a folder moved in whole) counts
  once its size has stayed the same for `settle` seconds;
- ignored: `*.part` (the landing zone's "still being written"), `*.sealed` (intake's own output), hidden files
  (`.name`, as rsync and editors write their temporary copies), and anything outside the two layouts above
  (`refused/`, `fhir-notifications/`, `mesh/`).

The payload is `{"kind": "mis"|"consent", "school_urn": URN, "sha256": hex, "size": bytes}`: the landed file
named by its school and hash, never by its name (a school may put a pupil's name in one) or its contents. When
the watcher starts it publishes one `{"kind": "startup", "waiting": n}` if files are already waiting (they
landed while it was down).

Events can be lost: when the kernel's inotify queue overflows (a burst of files faster than the watcher reads),
the events in it are dropped, and watchdog re-adds its watches without saying what was lost. So every `rescan`
seconds (default 60) the watcher lists the zone: a file it has neither published (at its present size and time)
nor is already waiting on is watched from then, and published once it has held still for `settle` seconds, as a
file moved in with its folder is. A lost event costs a minute, then, and never the file; and the sweep takes
whatever is still there at the next hour.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Final

from watchdog.events import FileSystemEventHandler

from connectors.events import Publisher
from connectors.storage.landing import SUFFIX

log = logging.getLogger(__name__)

PARTIAL: Final = ".part"
_STOP: Final = ""


def drop_of(root: Path, path: Path) -> tuple[str, str] | None:
    """(kind, school URN) if `path` is a file `LandingZone.intake` would take as a drop; else None."""
    try:
        rel = path.relative_to(root).parts
    except ValueError:
        return None
    name = rel[-1] if rel else ""
    if not name or name.startswith(".") or name.endswith((SUFFIX, PARTIAL)):
        return None
    if len(rel) == 3 and rel[0] == "mis" and not rel[1].startswith("."):
        return "mis", rel[1]
    if len(rel) == 2 and rel[0] == "consent" and Path(name).suffix.lower() == ".csv":
        return "consent", Path(name).stem
    return None


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class LandingWatcher:
    """Watches the landing zone and publishes `landing` for each completed drop (see the module docstring)."""

    def __init__(self, publisher: Publisher, root: Path | None = None, settle: float = 2.0,
                 rescan: float = 60.0) -> None:
        from schoolslink.settings import landing_dir

        self.publisher = publisher
        self.root = (root or landing_dir()).resolve()
        self.settle = settle
        self.rescan = rescan
        self.published = 0
        self.rescued = 0  # files a rescan found that no event had announced
        self._known: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) published or announced at start
        self._work: queue.Queue[str] = queue.Queue()
        self._appeared: dict[str, tuple[float, int, int]] = {}  # path -> (when last looked, size, mtime_ns then)
        self._lock = threading.Lock()
        self._observer: Any = None
        self._worker: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> LandingWatcher:
        from watchdog.observers.inotify import InotifyObserver

        for sub in ("mis", "consent"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._worker = threading.Thread(target=self._run, name="landing-watcher", daemon=True)
        self._worker.start()
        # "full events": a file moved in from outside the zone is a move (complete), not a create (being written)
        observer = InotifyObserver(generate_full_events=True)
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.start()
        self._observer = observer
        waiting = 0
        for path in self._drops():
            try:
                st = os.stat(path)
            except OSError:
                continue
            with self._lock:  # the worker may be publishing already
                self._known[path] = (st.st_size, st.st_mtime_ns)  # announced now: the startup event's run takes it
            waiting += 1
        if waiting:
            self.publisher.publish("landing", {"kind": "startup", "waiting": waiting})
        log.info("watching the landing zone (%d file(s) already waiting)", waiting)
        return self

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._worker is not None:
            self._work.put(_STOP)
            self._worker.join(timeout=10)
            self._worker = None

    def __enter__(self) -> LandingWatcher:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # events ------------------------------------------------------------------------------------------------------

    def completed(self, path: str) -> None:
        """A writer closed `path` after writing, or it was moved into place."""
        with self._lock:
            self._appeared.pop(path, None)
        self._work.put(path)

    def appeared(self, path: str) -> None:
        """`path` was created: a writer's new file (its close follows) or a file inside a folder moved in."""
        try:
            st = os.stat(path)
        except OSError:
            return
        with self._lock:
            self._appeared.setdefault(path, (time.monotonic(), st.st_size, st.st_mtime_ns))

    def _settled(self) -> list[str]:
        """Files seen appear with no close or move since, whose size and modification time held for `settle`
        seconds (watched, not judged by their time stamp: a copy may carry another machine's clock)."""
        now = time.monotonic()
        out = []
        with self._lock:
            for path, (seen, size, mtime_ns) in list(self._appeared.items()):
                if now - seen < self.settle:
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    del self._appeared[path]
                    continue
                if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                    del self._appeared[path]
                    out.append(path)
                else:
                    self._appeared[path] = (now, st.st_size, st.st_mtime_ns)
        return out

    def alive(self) -> bool:
        """Still watching: the inotify observer and the worker are running and the zone is there. (watchdog stops
        its observer when the watched folder itself is deleted; a dead watcher must exit so it is restarted.)"""
        return (self._observer is not None and self._observer.is_alive() and self._worker is not None
                and self._worker.is_alive() and self.root.is_dir())

    def _drops(self) -> list[str]:
        """Every file in the zone that `intake` would take as a drop."""
        out = []
        for sub in ("mis", "consent"):
            for folder, _dirs, files in os.walk(self.root / sub):
                for name in files:
                    path = os.path.join(folder, name)
                    if drop_of(self.root, Path(path)) is not None:
                        out.append(path)
        return out

    def _rescan(self) -> int:
        """Watch the drops no event announced (see the module docstring); how many there were."""
        found = 0
        present = set()
        for path in self._drops():
            present.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            with self._lock:
                if self._known.get(path) == (st.st_size, st.st_mtime_ns) or path in self._appeared:
                    continue
                self._appeared[path] = (time.monotonic(), st.st_size, st.st_mtime_ns)
            found += 1
        with self._lock:
            for path in set(self._known) - present:  # taken by a run's intake (or removed): nothing to remember
                del self._known[path]
        if found:
            self.rescued += found
            log.warning("%d landed file(s) had no event (events lost: an inotify queue overflow?); each is "
                        "published once it has held still", found)
        return found

    def _run(self) -> None:
        checked = rescanned = time.monotonic()
        while True:
            try:
                item = self._work.get(timeout=min(1.0, self.settle))
            except queue.Empty:
                item = None
            if item == _STOP:
                return
            if item is not None:
                self._publish(Path(item))
            if item is None or time.monotonic() - checked >= min(1.0, self.settle):
                checked = time.monotonic()
                for path in self._settled():
                    self._publish(Path(path))
            if time.monotonic() - rescanned >= self.rescan:
                rescanned = time.monotonic()
                try:
                    self._rescan()
                except OSError as exc:  # the zone unreadable for a moment: the next rescan tries again
                    log.warning("the landing zone could not be listed (%s)", type(exc).__name__)

    def _publish(self, path: Path) -> None:
        drop = drop_of(self.root, path)
        if drop is None:
            return
        kind, urn = drop
        try:
            st = os.stat(path)
            with self._lock:
                if self._known.get(str(path)) == (st.st_size, st.st_mtime_ns):
                    return  # announced already, as it is now (an event and a rescan may both have found it)
            sha, size = _sha256(path)
        except OSError:
            return  # already taken by a run's intake (sealed, the plain copy removed): that run has it
        with self._lock:
            self._known[str(path)] = (st.st_size, st.st_mtime_ns)
        self.publisher.publish("landing", {"kind": kind, "school_urn": urn, "sha256": sha, "size": size})
        self.published += 1
        log.info("a %s file landed for school %s (sha256 %s…): event published", kind, urn, sha[:12])


class _Handler(FileSystemEventHandler):
    """watchdog's callbacks, narrowed to what marks a file complete."""

    def __init__(self, watcher: LandingWatcher) -> None:
        super().__init__()
        self.w = watcher

    def dispatch(self, event: Any) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind == "closed":
            self.w.completed(os.fsdecode(event.src_path))
        elif kind == "moved" and event.dest_path:
            self.w.completed(os.fsdecode(event.dest_path))
        elif kind == "created":
            self.w.appeared(os.fsdecode(event.src_path))

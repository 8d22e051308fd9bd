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
seconds (default 60) the watcher lists the zone. A file it has not published as it is now, is not waiting on, and
has not changed since the previous listing began (so no event of its own can still be on its way) is watched from
then and published once it has held still for `settle` seconds, as a file moved in with its folder is. A lost event
costs a minute or two, then, never the file; the sweep takes whatever is still there at the next hour.

Never the same content twice: the watcher remembers, per path, the file it last announced (inode, size, times) and
its SHA-256. A file whose inode and digest match what was announced is not announced again (a `touch`, a copy tool
setting the time after it closed the file); new content, or a file deleted and dropped again, is.
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


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file changed: inode, size, modification and change times."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sha256(path: Path) -> tuple[str, int, tuple[int, int, int, int]] | None:
    """(digest, size, stamp) of the file as one version: None if it changed while it was read (its own close or
    move event follows, or the next rescan finds it)."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        before = _stamp(os.fstat(f.fileno()))
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        if _stamp(os.fstat(f.fileno())) != before:
            return None
    return h.hexdigest(), n, before


class LandingWatcher:
    """Watches the landing zone and publishes `landing` for each completed drop (see the module docstring)."""

    def __init__(self, publisher: Publisher, root: Path | None = None, settle: float = 2.0,
                 rescan: float = 60.0) -> None:
        from schoolslink.settings import landing_dir

        if not rescan > 0 or not settle >= 0:
            raise ValueError("rescan must be over 0 seconds, and settle 0 or more")
        self.publisher = publisher
        self.root = (root or landing_dir()).resolve()
        self.settle = settle
        self.rescan = rescan
        self.published = 0
        self.rescued = 0  # files a rescan found that no event had announced
        # path -> (stamp, digest) of what was published there (digest None: announced at start, not read)
        self._known: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self._queued: set[str] = set()  # completed, waiting for the worker to publish
        self._rescued: set[str] = set()  # found by a rescan, waiting to hold still
        self._scanned = threading.Event()  # the start-up listing is done: rescans may begin
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
        for path in self._drops()[0]:
            try:
                st = os.stat(path)
            except OSError:
                continue
            with self._lock:  # the worker may be publishing already: what it published is not counted again
                if path in self._known or path in self._queued:
                    continue
                self._known[path] = (_stamp(st), None)  # announced now: the startup event's run takes it
            waiting += 1
        self._scanned.set()
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
            self._rescued.discard(path)
            self._queued.add(path)
        self._work.put(path)

    def gone(self, path: str) -> None:
        """`path` was deleted or moved away: a file dropped there again is news, whatever it holds."""
        with self._lock:
            self._known.pop(path, None)

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

    def _drops(self) -> tuple[list[str], bool]:
        """Every file in the zone that `intake` would take as a drop (`mis/<URN>/<file>`, `consent/<URN>.csv`), and
        whether the whole zone could be listed."""
        out: list[str] = []
        complete = True

        def files(folder: Path) -> list[os.DirEntry[str]]:
            nonlocal complete
            try:
                with os.scandir(folder) as it:
                    return list(it)
            except FileNotFoundError:
                return []
            except OSError:
                complete = False
                return []

        for school in files(self.root / "mis"):
            if school.is_dir():
                out += [f.path for f in files(Path(school.path))
                        if f.is_file() and drop_of(self.root, Path(f.path)) is not None]
        out += [f.path for f in files(self.root / "consent")
                if f.is_file() and drop_of(self.root, Path(f.path)) is not None]
        return out, complete

    def _rescan(self, since: float) -> None:
        """Watch the drops no event announced (see the module docstring): files unchanged since `since` (the wall
        clock when the previous rescan began) that were not published as they are."""
        drops, complete = self._drops()
        for path in drops:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ctime > since:
                continue  # changed since the last listing began: its own event may still be on its way
            with self._lock:
                known = self._known.get(path)
                if (known is not None and known[0] == _stamp(st)) or path in self._appeared or path in self._queued:
                    continue
                self._appeared[path] = (time.monotonic(), st.st_size, st.st_mtime_ns)
                self._rescued.add(path)
        if complete:  # forget what is no longer there (taken by a run's intake), unless the listing was partial
            present = set(drops)
            with self._lock:
                for path in set(self._known) - present:
                    del self._known[path]

    def _run(self) -> None:
        checked = rescanned = time.monotonic()
        since = time.time()
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
            if time.monotonic() - rescanned >= self.rescan and self._scanned.is_set():
                rescanned = time.monotonic()
                began = time.time()
                self._rescan(since)
                since = began

    def _publish(self, path: Path) -> None:
        key = str(path)
        with self._lock:
            self._queued.discard(key)
            rescued = key in self._rescued
            self._rescued.discard(key)
        drop = drop_of(self.root, path)
        if drop is None:
            return
        kind, urn = drop
        try:
            got = _sha256(path)
        except OSError:
            return  # already taken by a run's intake (sealed, the plain copy removed): that run has it
        if got is None:
            return  # changing as it was read: its close event follows (or the next rescan finds it)
        sha, size, stamp = got
        with self._lock:
            known = self._known.get(key)
            self._known[key] = (stamp, sha)
        if known is not None and known[0][0] == stamp[0]:  # the same file (inode) announced already
            if known[1] == sha or (known[1] is None and known[0] == stamp):
                return  # with this content: an event and a rescan both found it, or a touch
        self.publisher.publish("landing", {"kind": kind, "school_urn": urn, "sha256": sha, "size": size})
        self.published += 1
        if rescued:
            self.rescued += 1
            log.warning("a %s file for school %s had no event (events lost: an inotify queue overflow?); found by "
                        "the rescan and published (sha256 %s…)", kind, urn, sha[:12])
        else:
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
            self.w.gone(os.fsdecode(event.src_path))
            self.w.completed(os.fsdecode(event.dest_path))
        elif kind == "deleted":
            self.w.gone(os.fsdecode(event.src_path))
        elif kind == "created":
            self.w.appeared(os.fsdecode(event.src_path))

"""The landing zone: where MIS exports and consent registers arrive, sealed at once and kept for a while.

Layout under `SCHOOLSLINK_HOME/landing/`:

    mis/<URN>/<file>                    a school's export as dropped (SFTP, a sync tool, a copy): plain, briefly
    mis/<URN>/<stamp>-<n>.<fmt>.sealed  the same, sealed by `intake` (the plain drop is then removed)
    consent/<URN>.csv                   a school's consent register as dropped
    consent/<URN>/<stamp>-<n>.csv.sealed
    refused/<URN>/...sealed             a file refused whole, moved aside, still sealed, with its reason

`intake` is the first thing a run does: every plain file dropped is sealed (AES-256-GCM, see
connectors/storage/sealed.py) and the plain copy deleted, so a whole-school export rests encrypted. A file is
taken only once it has settled: not written to for `SCHOOLSLINK_LANDING_SETTLE_SECONDS` (default 2, the event
watcher's settle too), and unchanged (size and modification time) from before sealing to after. A file still
being written, or written to while it was sealed, is left where it is for the next run, whole: deleting the plain
copy under a writer that still has it open would lose what it writes next. (Uploaders should still write
`name.part` and rename it when done: a writer that stalls for longer than the settle time cannot be told from
one that has finished.) A pull
from an API (Wonde) is sealed as it is written (`land_bytes`) and never rests in plain. Sealed files are
read back as streams; nothing is decrypted to disk. Each sealed file's header records when it landed and
when it may be deleted (`retention_days`, from `SCHOOLSLINK_LANDING_RETENTION_DAYS`, default 28); `purge`
deletes what is past that date, refused files included. The header holds no pupil data: kind, school URN,
format, landing time, retention date, the dropped file's size and SHA-256 (to tell a repeat drop).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from connectors.storage.sealed import SealedFileError, open_sealed, read_header, seal_bytes, seal_file
from schoolslink.settings import landing_dir

RETENTION_ENV: Final = "SCHOOLSLINK_LANDING_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS: Final = 28
SETTLE_ENV: Final = "SCHOOLSLINK_LANDING_SETTLE_SECONDS"
DEFAULT_SETTLE_SECONDS: Final = 2.0
SUFFIX: Final = ".sealed"
KINDS: Final = ("mis", "consent")
_FORMATS: Final = {".xml": "xml", ".csv": "csv", ".json": "json", ".txt": "csv"}

log = logging.getLogger(__name__)


def retention_days() -> int:
    raw = os.environ.get(RETENTION_ENV, "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    days = int(raw)
    if days < 1:
        raise ValueError(f"{RETENTION_ENV} must be a whole number of days, 1 or more")
    return days


def settle_seconds() -> float:
    raw = os.environ.get(SETTLE_ENV, "").strip()
    if not raw:
        return DEFAULT_SETTLE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ValueError(f"{SETTLE_ENV} must be a number of seconds from 0 to 3600 (it is {raw!r})")
    return seconds


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True, slots=True)
class Landed:
    """One sealed file in the landing zone (metadata only)."""

    path: Path
    kind: str
    school_urn: str
    fmt: str  # xml | csv | json
    landed_at: dt.datetime
    delete_after: dt.date
    sha256: str

    def open(self) -> IO[bytes]:
        return open_sealed(self.path)

    @property
    def key(self) -> str:
        """The storage key (relative to the landing zone): safe for logs, XCom and the run report."""
        return str(self.path.relative_to(landing_dir()))


def _stamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class LandingZone:
    def __init__(self, root: Path | None = None, retention: Callable[[str], int | None] | None = None) -> None:
        """`retention`: the days a school's files are kept (by URN), where an agreement says; else the default."""
        self.root = root or landing_dir()
        self._retention = retention

    def days_for(self, urn: str) -> int:
        days = self._retention(urn) if self._retention is not None else None
        return days if days is not None else retention_days()

    def _dest(self, kind: str, urn: str, fmt: str, at: dt.datetime, n: int) -> Path:
        """The sealed file's path: named by `at`, numbered from `n` past any taken (names sort oldest first)."""
        while True:
            dest = self.root / kind / urn / f"{_stamp(at)}-{n:04d}.{fmt}{SUFFIX}"
            if not dest.exists():
                return dest
            n += 1

    def _meta(self, kind: str, urn: str, fmt: str, at: dt.datetime, size: int, sha: str) -> dict[str, object]:
        return {"kind": kind, "school_urn": urn, "format": fmt, "landed_at": at.isoformat(),
                "delete_after": (at.date() + dt.timedelta(days=self.days_for(urn))).isoformat(),
                "size": size, "sha256": sha}

    def intake(self, now: dt.datetime | None = None, settle: float | None = None) -> list[Landed]:
        """Seal every settled plain file dropped in the zone and delete the plain copy; return what was sealed.

        Settled: not changed (inode, size, modification time) while watched for `settle` seconds (default:
        settle_seconds()), which is done, once for all of them, only when a file's modification time is recent or
        ahead of this machine's clock; an older one counts as settled. A file that changed, or that changes while
        it is sealed, is left for the next run (its sealed copy, if made, removed). Files are sealed in the order
        they were written, and named by that time, so a school's exports are read in the order it made them."""
        now = now or dt.datetime.now(dt.UTC)
        settle = settle_seconds() if settle is None else settle
        seen: list[tuple[str, str, Path, os.stat_result]] = []
        for kind, urn, src in self._drops():
            with contextlib.suppress(FileNotFoundError):  # another intake (a run outside Airflow) took it first
                seen.append((kind, urn, src, src.stat()))
        busy: list[str] = []  # the schools whose files were left (URNs: never a file's name)
        if settle > 0 and any(time.time() - st.st_mtime < settle for *_, st in seen):
            time.sleep(settle)  # recent, or dated ahead of our clock: watch them rather than trust the clock
            watched = []
            for kind, urn, src, st in seen:
                try:
                    again = src.stat()
                except FileNotFoundError:
                    continue
                if _version(again) != _version(st):
                    busy.append(urn)
                else:
                    watched.append((kind, urn, src, again))
            seen = watched
        seen.sort(key=lambda d: (d[3].st_mtime_ns, d[2].name))  # oldest first: the order the school made them
        out: list[Landed] = []
        for kind, urn, src, before in seen:
            fmt = _FORMATS.get(src.suffix.lower(), "bin")
            written = min(now, dt.datetime.fromtimestamp(before.st_mtime, dt.UTC))
            dest = self._dest(kind, urn, fmt, written, 1)
            try:
                sha = _digest(src)
                seal_file(src, dest, self._meta(kind, urn, fmt, now, before.st_size, sha))
                changed = _version(src.stat()) != _version(before)
            except FileNotFoundError:  # taken by another intake meanwhile: its copy stands
                dest.unlink(missing_ok=True)
                continue
            if changed:  # written to (or replaced) while it was read: not the file whose digest we took
                dest.unlink(missing_ok=True)
                busy.append(urn)
                continue
            src.unlink(missing_ok=True)
            out.append(self._landed(dest))
        if busy:
            log.warning("%d dropped file(s) still being written, from %s: left for the next run (uploads should be "
                        "written as name.part and renamed when done)", len(busy), ", ".join(sorted(set(busy))))
        return out

    def _drops(self) -> Iterator[tuple[str, str, Path]]:
        mis = self.root / "mis"
        if mis.exists():
            for school in sorted(p for p in mis.iterdir() if p.is_dir()):
                for f in sorted(school.iterdir()):
                    if f.is_file() and not f.name.endswith((SUFFIX, ".part")) and not f.name.startswith("."):
                        yield "mis", school.name, f
        consent = self.root / "consent"
        if consent.exists():
            for f in sorted(consent.iterdir()):
                if f.is_file() and f.suffix.lower() == ".csv" and not f.name.startswith("."):
                    yield "consent", f.stem, f

    def land_bytes(self, kind: str, urn: str, fmt: str, data: bytes, now: dt.datetime | None = None) -> Landed:
        """Seal data that never rests in plain (an API pull) straight into the zone."""
        now = now or dt.datetime.now(dt.UTC)
        folder = self.root / kind / urn
        existing = len(list(folder.glob(f"{_stamp(now)}-*"))) if folder.exists() else 0
        dest = self._dest(kind, urn, fmt, now, existing + 1)
        seal_bytes(data, dest, self._meta(kind, urn, fmt, now, len(data), hashlib.sha256(data).hexdigest()))
        return self._landed(dest)

    def _landed(self, path: Path) -> Landed:
        m = read_header(path)
        return Landed(path, str(m["kind"]), str(m["school_urn"]), str(m["format"]),
                      dt.datetime.fromisoformat(str(m["landed_at"])), dt.date.fromisoformat(str(m["delete_after"])),
                      str(m["sha256"]))

    def sealed(self, kind: str, urn: str) -> list[Landed]:
        """A school's sealed files of one kind, oldest first (the name starts with when the file was written, or
        with when it landed if that was earlier)."""
        folder = self.root / kind / urn
        if not folder.exists():
            return []
        out = []
        for p in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                out.append(self._landed(p))
            except (SealedFileError, ValueError, KeyError):
                continue  # not ours or damaged: opening it will say so if anyone asks
        return out

    def schools(self, kind: str) -> list[str]:
        folder = self.root / kind
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob(f"*{SUFFIX}")))

    def move_aside(self, landed: Landed, reason: str) -> Path:
        """A refused file goes to refused/<URN>/ (still sealed) with a note of why, kept for its retention."""
        dest_dir = self.root / "refused" / landed.school_urn
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / landed.path.name
        shutil.move(str(landed.path), target)
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return target

    def purge(self, today: dt.date | None = None) -> int:
        """Delete sealed files (and refusal notes) past their retention date; return how many files went."""
        today = today or dt.datetime.now(dt.UTC).date()
        n = 0
        for p in self.root.rglob(f"*{SUFFIX}"):
            try:
                if dt.date.fromisoformat(str(read_header(p)["delete_after"])) < today:
                    p.unlink()
                    p.with_name(p.name + ".reason.txt").unlink(missing_ok=True)
                    n += 1
            except (SealedFileError, ValueError, KeyError, OSError):
                continue
        return n

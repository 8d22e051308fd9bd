"""Sealed files and the landing zone: exports rest encrypted, read back as streams, go when retention ends."""

from __future__ import annotations

import datetime as dt
import io
import os
import secrets
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.mis.ctf import CtfReader
from connectors.mis.errors import CtfRefused
from connectors.storage.landing import LandingZone
from connectors.storage.sealed import (
    CHUNK,
    TAG,
    SealedFileError,
    is_sealed,
    open_sealed,
    read_header,
    seal_bytes,
)
from schoolslink import workstore
from schoolslink.identifiers import make_upn

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
MARKER = b"ZEBEDEE-MARKER-SURNAME"


def _seal(tmp_path: Path, data: bytes, key: bytes = KEY) -> Path:
    return seal_bytes(data, tmp_path / "f.sealed", {"kind": "test"}, key)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
def test_round_trip_at_chunk_edges(tmp_path: Path, size: int) -> None:
    data = secrets.token_bytes(size)
    p = _seal(tmp_path, data)
    with open_sealed(p, KEY) as f:
        assert f.read() == data
    assert p.stat().st_size > size  # sealed: longer by the header and a tag a chunk


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=3 * CHUNK + 100), offsets=st.lists(st.integers(0, 3 * CHUNK + 200)))
def test_seek_and_read_anywhere_matches_the_plain_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                                        offsets: list[int]) -> None:
    p = _seal(tmp_path_factory.mktemp("s"), data)
    with open_sealed(p, KEY) as f:
        for off in offsets:
            f.seek(off)
            assert f.read(1000) == data[off: off + 1000]
        f.seek(-5, io.SEEK_END)
        assert f.read() == (data[-5:] if len(data) >= 5 else data)


def test_nothing_of_the_content_is_visible_at_rest(tmp_path: Path) -> None:
    p = _seal(tmp_path, MARKER * 1000)
    raw = p.read_bytes()
    assert MARKER not in raw and MARKER[:8] not in raw
    assert set(read_header(p)) == {"kind", "kid"}


@pytest.mark.parametrize("where", ["header", "first chunk", "last byte"])
def test_any_changed_byte_is_refused(tmp_path: Path, where: str) -> None:
    p = _seal(tmp_path, secrets.token_bytes(2 * CHUNK + 10))
    raw = bytearray(p.read_bytes())
    i = {"header": 20, "first chunk": 200, "last byte": len(raw) - 1}[where]
    raw[i] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(SealedFileError):
        with open_sealed(p, KEY) as f:
            f.read()


@pytest.mark.parametrize("cut", ["mid-chunk", "chunk boundary", "whole body"])
def test_a_file_cut_short_is_refused_even_at_a_chunk_boundary(tmp_path: Path, cut: str) -> None:
    data = secrets.token_bytes(3 * CHUNK + 5)
    p = _seal(tmp_path, data)
    raw = p.read_bytes()
    body_start = len(raw) - (3 * (CHUNK + TAG) + 5 + TAG)
    keep = {"mid-chunk": len(raw) - 100, "chunk boundary": body_start + 2 * (CHUNK + TAG),
            "whole body": body_start}[cut]
    p.write_bytes(raw[:keep])
    with pytest.raises(SealedFileError, match=r"cut short|damaged"):
        with open_sealed(p, KEY) as f:
            f.read()


def test_another_key_is_named_as_such(tmp_path: Path) -> None:
    p = _seal(tmp_path, b"abc")
    with pytest.raises(SealedFileError, match="another key"):
        open_sealed(p, OTHER)


def test_not_a_sealed_file(tmp_path: Path) -> None:
    p = tmp_path / "plain.xml"
    p.write_bytes(b"<CTfile/>")
    assert not is_sealed(p)
    with pytest.raises(SealedFileError, match="not a sealed file"):
        open_sealed(p, KEY)


def test_the_key_is_made_once_outside_the_database_with_owner_only_access(sl_home: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHOOLSLINK_SEAL_KEY", raising=False)
    p = seal_bytes(b"x", sl_home / "a.sealed", {"kind": "t"})
    key_file = sl_home / "secrets" / "seal.key"
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    with open_sealed(p) as f:
        assert f.read() == b"x"
    monkeypatch.setenv("SCHOOLSLINK_SEAL_KEY", "zz")
    with pytest.raises(SealedFileError, match="64 hex digits"):
        open_sealed(p)


# The landing zone ----------------------------------------------------------------------------------------------

CTF = """<?xml version="1.0" encoding="UTF-8"?>
<CTfile><Header><DocumentName>Common Transfer File</DocumentName><CTFversion>25.0</CTFversion>
<DateTime>2026-11-20T10:00:00</DateTime><DocumentQualifier>full</DocumentQualifier>
<SourceSchool><LEA>999</LEA><Estab>1001</Estab><URN>100001</URN><SchoolName>Test School</SchoolName></SourceSchool>
<DestSchool><LEA>999</LEA><Estab>1002</Estab></DestSchool></Header>
<CTFpupilData>{pupils}</CTFpupilData></CTfile>
"""
PUPIL = ("<Pupil><UPN>{upn}</UPN><Surname>ZEBEDEE</Surname><Forename>Alex</Forename><DOB>2012-03-04</DOB>"
         "<Sex>F</Sex></Pupil>")


def _ctf(n: int) -> bytes:
    return CTF.format(pupils="".join(PUPIL.format(upn=make_upn(999, 1001, i)) for i in range(1, n + 1))).encode()


def test_intake_seals_every_drop_and_removes_the_plain_copy(sl_home: Path) -> None:
    drop = sl_home / "landing" / "mis" / "100001" / "export.xml"
    drop.parent.mkdir(parents=True)
    drop.write_bytes(_ctf(3))
    reg = sl_home / "landing" / "consent" / "100001.csv"
    reg.parent.mkdir(parents=True)
    reg.write_text("record_id,upn\n")
    zone = LandingZone()
    landed = zone.intake(dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC))
    assert {(x.kind, x.school_urn, x.fmt) for x in landed} == {("mis", "100001", "xml"), ("consent", "100001", "csv")}
    assert not drop.exists() and not reg.exists()
    for x in landed:
        assert is_sealed(x.path) and b"ZEBEDEE" not in x.path.read_bytes()
        assert x.delete_after == dt.date(2026, 11, 20) + dt.timedelta(days=28)
    [mis] = zone.sealed("mis", "100001")
    with mis.open() as f:
        result = CtfReader().read(f)  # the CTF reader streams straight from the sealed file
    assert len(result.learners) == 3 and result.header.source_urn == "100001"
    assert zone.schools("mis") == ["100001"]


def test_intake_leaves_files_still_being_written_alone(sl_home: Path) -> None:
    school = sl_home / "landing" / "mis" / "100001"
    school.mkdir(parents=True)
    (school / "export.xml.part").write_bytes(b"<CTfile>")  # our uploaders' convention
    (school / ".export.xml.Ab12Cd").write_bytes(b"<CTfile>")  # rsync's and scp's temporary copies
    (sl_home / "landing" / "consent").mkdir(parents=True)
    (sl_home / "landing" / "consent" / ".100001.csv.swp").write_text("x")
    assert LandingZone().intake(dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC)) == []
    assert len(list(school.iterdir())) == 2


def test_a_file_still_being_written_is_left_whole_for_the_next_run(sl_home: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A school's upload in progress (an SFTP put straight to the final name) is neither sealed half-written nor
    deleted from under its writer; once the writer has finished, the next intake takes the whole file."""
    drop = sl_home / "landing" / "mis" / "100001" / "export.xml"
    drop.parent.mkdir(parents=True)
    whole = _ctf(2000)  # about 260 KB: at 1 KB each 50 ms, longer than the test waits
    stop = threading.Event()

    def upload() -> None:
        with drop.open("wb") as f:
            for i in range(0, len(whole), 1000):
                f.write(whole[i:i + 1000])
                f.flush()
                if stop.wait(0.05):  # a slow link: a little at a time, until told to finish
                    break
            f.write(whole[f.tell():])

    writer = threading.Thread(target=upload)
    writer.start()
    try:
        time.sleep(0.2)
        zone = LandingZone()
        assert zone.intake(settle=0.5) == []  # waited half a second: it was still being written
        assert drop.exists() and zone.sealed("mis", "100001") == []
        assert "1 dropped file(s) still being written, from 100001" in caplog.text  # the school, not the name
    finally:
        stop.set()
        writer.join()
    assert drop.read_bytes() == whole  # nothing of the upload was lost
    [landed] = zone.intake(settle=0.5)  # just closed: waited for, then taken
    assert not drop.exists()
    with landed.open() as f:
        assert f.read() == whole


def test_a_file_changed_while_it_was_sealed_is_not_taken(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import connectors.storage.landing as landing

    drop = sl_home / "landing" / "mis" / "100001" / "export.xml"
    drop.parent.mkdir(parents=True)
    drop.write_bytes(_ctf(2))
    os.utime(drop, (time.time() - 60, time.time() - 60))  # settled, as far as its clock says
    real = landing.seal_file

    def seal_then_append(src: Path, dest: Path, meta: dict[str, object]) -> Path:
        out = real(src, dest, meta)
        with src.open("ab") as f:  # the writer was only paused: it goes on while we seal
            f.write(b"<!-- more -->")
        return out

    monkeypatch.setattr(landing, "seal_file", seal_then_append)
    zone = LandingZone()
    assert zone.intake(settle=0.5) == []
    assert drop.read_bytes().endswith(b"<!-- more -->")  # the plain file is kept, whole
    assert list(drop.parent.glob("*.sealed")) == []  # and the copy of what it was is not
    monkeypatch.setattr(landing, "seal_file", real)
    os.utime(drop, (time.time() - 60, time.time() - 60))
    [landed] = zone.intake(settle=0.5)
    with landed.open() as f:
        assert f.read().endswith(b"<!-- more -->")


def test_a_file_dated_ahead_of_our_clock_is_watched_then_taken(sl_home: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import connectors.storage.landing as landing

    drop = sl_home / "landing" / "mis" / "100001" / "export.xml"
    drop.parent.mkdir(parents=True)
    drop.write_bytes(_ctf(1))
    os.utime(drop, (time.time() + 86_400, time.time() + 86_400))  # a share whose clock runs a day ahead
    waits: list[float] = []
    monkeypatch.setattr(landing.time, "sleep", waits.append)
    assert len(LandingZone().intake(settle=30)) == 1
    assert waits == [30]  # its clock is not trusted either way: watched for the settle time, unchanged, taken


def test_exports_are_sealed_in_the_order_the_school_wrote_them(sl_home: Path) -> None:
    """A run reads a school's newest full export and what came after it, by the sealed names: they follow when
    each file was written, not its name, nor which run happened to take it."""
    folder = sl_home / "landing" / "mis" / "100001"
    folder.mkdir(parents=True)
    t = time.time()
    full, delta, later_full = _ctf(3), _ctf(1), _ctf(2)
    (folder / "2-full.xml").write_bytes(full)
    os.utime(folder / "2-full.xml", (t - 600, t - 600))
    (folder / "1-delta.xml").write_bytes(delta)  # its name sorts first; it was written later
    os.utime(folder / "1-delta.xml", (t - 60, t - 60))
    zone = LandingZone()
    zone.intake(settle=0.5)
    (folder / "0-full.xml").write_bytes(later_full)  # taken by a later run, though written before the delta
    os.utime(folder / "0-full.xml", (t - 300, t - 300))
    zone.intake(settle=0.5)
    order = []
    for landed in zone.sealed("mis", "100001"):
        with landed.open() as f:
            order.append(f.read())
    assert order == [full, later_full, delta]


@pytest.mark.parametrize("raw", ["-1", "soon", "7200"])
def test_a_bad_settle_setting_is_refused_with_its_name(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.storage.landing import settle_seconds

    monkeypatch.setenv("SCHOOLSLINK_LANDING_SETTLE_SECONDS", raw)
    with pytest.raises(ValueError, match="SCHOOLSLINK_LANDING_SETTLE_SECONDS must be a number of seconds"):
        settle_seconds()


def test_a_truncated_export_is_still_told_apart_when_read_sealed(sl_home: Path) -> None:
    drop = sl_home / "landing" / "mis" / "100001" / "export.xml"
    drop.parent.mkdir(parents=True)
    whole = _ctf(2000)
    drop.write_bytes(whole[: len(whole) // 2])
    zone = LandingZone()
    zone.intake()
    [mis] = zone.sealed("mis", "100001")
    with pytest.raises(CtfRefused, match="truncated"), mis.open() as f:
        CtfReader().read(f)


def test_an_api_pull_lands_sealed_without_resting_in_plain(sl_home: Path) -> None:
    zone = LandingZone()
    x = zone.land_bytes("mis", "100001", "json", b'{"format":"wonde","note":"ZEBEDEE"}')
    assert b"ZEBEDEE" not in x.path.read_bytes()
    with x.open() as f:
        assert b"ZEBEDEE" in f.read()


def test_retention_purges_what_is_past_its_date_including_refused_files(sl_home: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_LANDING_RETENTION_DAYS", "7")
    zone = LandingZone()
    old = zone.land_bytes("mis", "100001", "xml", _ctf(1), dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    refused = zone.land_bytes("mis", "100002", "xml", b"not xml", dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    aside = zone.move_aside(refused, "file is not XML")
    new = zone.land_bytes("mis", "100001", "xml", _ctf(1), dt.datetime(2026, 11, 20, tzinfo=dt.UTC))
    assert aside.with_name(aside.name + ".reason.txt").read_text().strip() == "file is not XML"
    assert zone.purge(dt.date(2026, 11, 8)) == 0  # 7 days kept, to the day
    assert zone.purge(dt.date(2026, 11, 9)) == 2
    assert not old.path.exists() and not aside.exists() and new.path.exists()
    assert not aside.with_name(aside.name + ".reason.txt").exists()


def test_a_bad_retention_setting_is_refused(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_LANDING_RETENTION_DAYS", "0")
    with pytest.raises(ValueError, match="1 or more"):
        LandingZone().land_bytes("mis", "100001", "xml", b"x")


def test_work_files_are_sealed_too(sl_home: Path) -> None:
    rows = [{"surname": "ZEBEDEE", "n": i} for i in range(2000)]
    assert workstore.write_jsonl("run/chunk-0/learners.jsonl", rows) == 2000
    p = workstore.path_for("run/chunk-0/learners.jsonl")
    assert b"ZEBEDEE" not in p.read_bytes()
    assert list(workstore.read_jsonl("run/chunk-0/learners.jsonl")) == rows
    assert not [q for q in p.parent.iterdir() if q.name.endswith(".part")]
    assert os.stat(p).st_size > 0


def test_an_agreement_sets_a_schools_retention_and_the_shortest_wins(sl_home: Path, tmp_path: Path) -> None:
    import shutil

    from schoolslink.governance.agreement import agreements_dir, landing_days_for, load_agreements

    folder = tmp_path / "agreements"
    shutil.copytree(agreements_dir(), folder)
    text = (folder / "demo-partnership.yaml").read_text()
    (folder / "short.yaml").write_text(text.replace("id: demo-partnership", "id: short")
                                       .replace("landing_days: 30", "landing_days: 7")
                                       .replace('urn_ranges: ["900001-900999"]', 'urns: ["900002"]'))
    agreements = load_agreements(folder)
    assert landing_days_for(agreements, "900001") == 30 and landing_days_for(agreements, "900002") == 7
    assert landing_days_for(agreements, "100001") is None
    zone = LandingZone(retention=lambda urn: landing_days_for(agreements, urn))
    at = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    assert zone.land_bytes("mis", "900001", "xml", b"x", at).delete_after == dt.date(2026, 12, 20)
    assert zone.land_bytes("mis", "900002", "xml", b"x", at).delete_after == dt.date(2026, 11, 27)
    assert zone.land_bytes("mis", "100001", "xml", b"x", at).delete_after == dt.date(2026, 12, 18)  # the default 28

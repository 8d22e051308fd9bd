"""A school read through Wonde, end to end through the ingest stages, against a real HTTP server on loopback.

The pull lands sealed (no pupil data rests in plain), the watermark moves only after landing, an
incremental pull applies on top of the first full one, and the leavers and deletions Wonde reports are
marked and recorded as events. A failing pull keeps its watermark and the reason is in the quarantine.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from schoolslink.keys import learner_key
from schoolslink.pipeline import ingest, pull
from schoolslink.store.schema import learner_events, learners, quarantine, source_ids, watermarks
from tests.integration.wonde_server import WondeServer, make_student

SCHOOL, URN, TOKEN = "A1930499544", "900001", "test-token-not-secret"
DAY = dt.date(2026, 11, 26)
LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.fixture()
def server(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WondeServer]:
    with WondeServer(TOKEN) as s:
        cfg = sl_home / "config" / "wonde.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f'base_url: {s.base_url}\nschools:\n  "{URN}": {SCHOOL}\n')
        monkeypatch.setenv("SCHOOLSLINK_WONDE_TOKEN", TOKEN)
        yield s


def _ingest(run_id: str) -> dict[str, int]:
    chunks = ingest.plan(run_id, 1)
    if not chunks:
        return {}
    [chunk] = chunks
    return ingest.govern_map(run_id, ingest.parse_validate(run_id, chunk, DAY), DAY)


def test_wonde_school_through_the_stages(sl_home: Path, store: Engine, server: WondeServer) -> None:
    school = server.school(SCHOOL)
    school.students = [make_student(i, updated_at=LONG_AGO) for i in range(1, 6)]
    upns = [s.upn for s in school.students]

    assert pull.pull_sources("r1") == {"wonde_schools": 1, "wonde_pulls_landed": 1, "wonde_pulls_failed": 0}
    landed = list((sl_home / "landing" / "mis" / URN).iterdir())
    assert len(landed) == 1 and landed[0].name.endswith(".json.sealed")
    assert not any(s.fields["legal_surname"].encode() in landed[0].read_bytes() for s in school.students)
    out = _ingest("r1")
    assert out["learners"] == 5
    with store.connect() as conn:
        assert conn.execute(select(func.count()).select_from(source_ids)).scalar() == 5
        mark1 = conn.execute(select(watermarks.c.value).where(watermarks.c.source == f"wonde:{SCHOOL}")).scalar()
    assert mark1 is not None

    # Later: student 2 is deleted in the MIS, student 3 is reported as a leaver, student 1 changed.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    school.deletions = [({"id": school.students[1].id, "type": "student", "restored_at": None}, later)]
    school.leavers = [make_student(3, updated_at=later)]
    school.students = [school.students[0], *school.students[3:]]
    school.students[0].updated_at = later
    assert pull.pull_sources("r2")["wonde_pulls_landed"] == 1
    assert server.seen("students")[-1].query.get("updated_after")  # incremental from the watermark
    out = _ingest("r2")
    assert out["learners_left"] == 2
    with store.connect() as conn:
        events = set(conn.execute(select(learner_events.c.learner_key, learner_events.c.kind)
                                  .where(learner_events.c.run_id == "r2")).all())
        state = dict(conn.execute(select(learners.c.learner_key, learners.c.left_school)).all())
    assert events == {(learner_key(upns[1]), "left"), (learner_key(upns[2]), "left")}
    assert len(state) == 5 and sum(state.values()) == 2  # marked, not deleted

    # A pull that fails keeps the watermark; the reason says so, without the token.
    server.fail_next(20, status=503)
    with store.connect() as conn:
        mark2 = conn.execute(select(watermarks.c.value).where(watermarks.c.source == f"wonde:{SCHOOL}")).scalar()
    counts = pull.pull_sources("r3")
    assert counts["wonde_pulls_failed"] == 1 and counts["wonde_pulls_landed"] == 0
    with store.connect() as conn:
        assert conn.execute(select(watermarks.c.value).where(watermarks.c.source == f"wonde:{SCHOOL}")).scalar() \
            == mark2
        [reason] = conn.execute(select(quarantine.c.reason).where(quarantine.c.run_id == "r3")).scalars().all()
    assert "watermark stays" in reason and TOKEN not in reason


def test_no_wonde_configuration_pulls_nothing(sl_home: Path, store: Engine) -> None:
    assert pull.pull_sources("r1") == {"wonde_schools": 0, "wonde_pulls_landed": 0, "wonde_pulls_failed": 0}

"""Leavers and moves through the ingest stages: marked (never deleted), and recorded as events.

A pupil missing from a school's next full export has left; one whose export gives a leaving date has left;
one who turns up on another school's export has moved; one back on the roll has returned. A partial export
(a change list) never marks anyone as gone. Each is a row in `learner_events` (keys and URNs only) and the
learners table keeps the row, without plain data once the learner has left.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from sqlalchemy import Engine, select

from schoolslink.identifiers import make_upn
from schoolslink.keys import learner_key
from schoolslink.pipeline import ingest
from schoolslink.store.schema import learner_events, learners

DAY = date(2026, 11, 26)
HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<CTfile><Header><DocumentName>Common Transfer File</DocumentName><CTFversion>25.0</CTFversion>
<DateTime>{when}T10:00:00</DateTime><DocumentQualifier>{qualifier}</DocumentQualifier>
<SourceSchool><LEA>999</LEA><Estab>{estab}</Estab><URN>{urn}</URN><SchoolName>School {urn}</SchoolName></SourceSchool>
</Header><CTFpupilData>{pupils}</CTFpupilData></CTfile>
"""
PUPIL = ("<Pupil><UPN>{upn}</UPN><Surname>Surname{n}</Surname><Forename>Pupil</Forename><DOB>2012-03-04</DOB>"
         "<Sex>F</Sex>{extra}</Pupil>")
A, B = "100001", "100002"
UPNS = [make_upn(999, 1001, i) for i in range(1, 6)]


def _drop(home: Path, urn: str, name: str, upns: list[str], qualifier: str = "full", when: str = "2026-11-20",
          leaving: dict[str, str] | None = None, former: dict[str, str] | None = None) -> None:
    leaving, former = leaving or {}, former or {}

    def extra(u: str) -> str:
        return ((f"<FormerUPN>{former[u]}</FormerUPN>" if u in former else "")
                + (f"<LeavingDate>{leaving[u]}</LeavingDate>" if u in leaving else ""))

    pupils = "".join(PUPIL.format(upn=u, n=i, extra=extra(u)) for i, u in enumerate(upns))
    folder = home / "landing" / "mis" / urn
    folder.mkdir(parents=True, exist_ok=True)
    estab = "1001" if urn == A else "1002"
    (folder / name).write_text(HEADER.format(when=when, qualifier=qualifier, estab=estab, urn=urn, pupils=pupils))


def _run(run_id: str) -> dict[str, int]:
    [chunk] = ingest.plan(run_id, 1)
    return ingest.govern_map(run_id, ingest.parse_validate(run_id, chunk, DAY), DAY)


def _events(store: Engine, run_id: str) -> set[tuple[str, str, str | None, str | None]]:
    with store.connect() as conn:
        q = select(learner_events.c.learner_key, learner_events.c.kind, learner_events.c.from_urn,
                   learner_events.c.to_urn).where(learner_events.c.run_id == run_id)
        return {tuple(r) for r in conn.execute(q)}  # type: ignore[misc]


def _state(store: Engine) -> dict[str, tuple[str, bool]]:
    with store.connect() as conn:
        return {k: (u, bool(left)) for k, u, left in conn.execute(
            select(learners.c.learner_key, learners.c.school_urn, learners.c.left_school))}


def test_leavers_and_moves_are_marked_and_become_events(sl_home: Path, store: Engine) -> None:
    k = [learner_key(u) for u in UPNS]
    _drop(sl_home, A, "a1.xml", UPNS[:4])
    _drop(sl_home, B, "b1.xml", [UPNS[4]])
    out = _run("r1")
    assert out["learners"] == 5 and _events(store, "r1") == set()  # first sight of a roll is not a change

    # Next night: A's full roll no longer lists pupil 0 (left) nor pupil 1 (now on B's roll); pupil 2 has a
    # leaving date that has passed, pupil 3 one still to come (still on roll).
    _drop(sl_home, A, "a2.xml", UPNS[2:4], when="2026-11-25",
          leaving={UPNS[2]: "2026-11-24", UPNS[3]: "2026-12-19"})
    _drop(sl_home, B, "b2.xml", [UPNS[4], UPNS[1]], when="2026-11-25")
    out = _run("r2")
    assert _events(store, "r2") == {
        (k[0], "left", A, None), (k[1], "moved", A, B), (k[2], "left", A, None)}
    assert out["learners_left"] == 2 and out["learners_moved"] == 1
    state = _state(store)
    assert len(state) == 5  # nobody deleted
    assert state[k[0]] == (A, True) and state[k[1]] == (B, False) and state[k[2]] == (A, True)
    assert state[k[3]] == (A, False)
    with store.connect() as conn:
        plain = dict(conn.execute(select(learners.c.learner_key, learners.c.plain)).all())
    assert plain[k[0]] is None and plain[k[2]] is None

    # A partial export (a change list) lists only pupil 0, back on roll: returned; nobody else is marked.
    _drop(sl_home, A, "a3.xml", [UPNS[0]], qualifier="partial", when="2026-11-26")
    _run("r3")
    assert _events(store, "r3") == {(k[0], "returned", None, A)}
    state = _state(store)
    assert state[k[0]] == (A, False) and state[k[3]] == (A, False)

    # The same files again: no change, no events (a re-run is idempotent).
    _run("r4")
    assert _events(store, "r4") == set()


def test_a_stated_former_upn_renumbers_and_nothing_is_linked_by_inference(sl_home: Path, store: Engine) -> None:
    old, new, adopted_old, adopted_new = UPNS[0], make_upn(999, 1001, 50), UPNS[1], make_upn(999, 1001, 51)
    _drop(sl_home, A, "a1.xml", [old, adopted_old])
    _run("r1")
    # Next: pupil 0 has a new UPN and the export states the old one as FormerUPN; the adopted pupil has a new
    # UPN and, as the CTF guidance requires, no FormerUPN: nothing ties the two records.
    _drop(sl_home, A, "a2.xml", [new, adopted_new], when="2026-11-25", former={new: old})
    out = _run("r2")
    ko, kn, kao, kan = (learner_key(u) for u in (old, new, adopted_old, adopted_new))
    with store.connect() as conn:
        rows = conn.execute(select(learner_events.c.learner_key, learner_events.c.kind, learner_events.c.other_key)
                            .where(learner_events.c.run_id == "r2")).all()
    assert set(rows) == {(ko, "renumbered", kn), (kao, "left", None)}
    assert all(kan not in r for r in rows)  # the adopted child's new record is tied to nothing
    state = _state(store)
    assert state[ko] == (A, True) and state[kn] == (A, False) and state[kao] == (A, True) and kan in state
    assert out["marked_left"] == 2

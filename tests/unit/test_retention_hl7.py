"""Retention empties the body of an HL7v2 message once it is applied or quarantined and past the landing zone's
retention, keeps the row (so a resend is still a known duplicate), and never touches one not yet applied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select

from schoolslink.retention import purge
from schoolslink.store.db import migrate
from schoolslink.store.schema import hl7_messages

NOW = datetime(2026, 11, 26, 3, tzinfo=UTC)


def test_old_bodies_are_emptied_and_pending_ones_kept(sl_home: Path) -> None:
    eng = migrate()
    rows = [("applied", 40), ("quarantined", 40), ("received", 40), ("applied", 3)]
    with eng.begin() as conn:
        conn.execute(insert(hl7_messages), [
            {"sender": "RIO^R9X", "control_id": f"m{i}", "message_type": "ADT^A08", "body": b"sealed-bytes",
             "received_at": NOW - timedelta(days=age), "status": status, "ack_code": "AA"}
            for i, (status, age) in enumerate(rows)])
    assert purge(NOW, engine=eng, agreements=[])["hl7_bodies_erased"] == 2
    with eng.connect() as conn:
        left = {r.control_id: (r.status, bytes(r.body)) for r in conn.execute(select(hl7_messages))}
    assert left == {"m0": ("applied", b""), "m1": ("quarantined", b""), "m2": ("received", b"sealed-bytes"),
                    "m3": ("applied", b"sealed-bytes")}
    assert purge(NOW, engine=eng, agreements=[])["hl7_bodies_erased"] == 0  # once only

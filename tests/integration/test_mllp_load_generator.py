"""The MLLP benchmark's C load generator (benchmarks/mllp_load.c) against the real listener: it compiles, its senders
are stop-and-wait, and every message it counts as acknowledged AA is in the store (the benchmark's figures rest on
these counts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.mllp import TEMPLATE, _c_senders, load_generator
from connectors.hl7v2.listener import ListenerProcess
from connectors.hl7v2.store import MessageStore
from schoolslink.identifiers import make_test_nhs_number


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_load_generator_counts_what_the_listener_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"SCHOOLSLINK_HOME": str(tmp_path / "home"), "SCHOOLSLINK_SEAL_KEY": "4c" * 32,
           "SCHOOLSLINK_KEY": "test-key-not-secret", "SCHOOLSLINK_DB_URL": f"sqlite:///{tmp_path / 'state.db'}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    exe = load_generator(tmp_path)
    assert exe is not None
    good = make_test_nhs_number(5)
    bad = good[:9] + str((int(good[9]) + 1) % 10)  # fails its check digit: the listener answers AE
    # every fourth message of each connection (its 1st, 5th, 9th ...) carries the bad number
    (tmp_path / "messages.bin").write_bytes(TEMPLATE.encode() + b"\0" + (good + bad + good + good).encode())
    with ListenerProcess(env=env, log_path=tmp_path / "listener.log") as listener:
        res = _c_senders(exe, tmp_path, listener.port, 3, 0.5, "T1")
    assert res["senders"] == 3 and res["messages"] > 12
    assert res["mismatched"] == 0 and res["closed"] == 0
    assert res["p50_ms"] > 0 and res["p99_ms"] >= res["p50_ms"] and res["per_s"] > 0
    acked = set(res["aa_ids"])
    assert len(acked) + res["not_aa"] == res["messages"]  # every control id distinct, each counted once
    assert not any(int(c.rsplit("-", 1)[1]) % 4 == 1 for c in acked)  # the AE'd ones are not counted AA
    assert res["not_aa"] >= 3
    assert {c.rsplit("-", 1)[0] for c in acked} == {"T1-0", "T1-1", "T1-2"}
    store = MessageStore(env["SCHOOLSLINK_DB_URL"])
    try:
        assert acked <= store.control_ids("PAS^RX1")
        assert store.counts()["received"] == len(acked)
        assert store.counts()["quarantined"] == res["not_aa"]
    finally:
        store.close()

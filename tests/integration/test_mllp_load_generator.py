"""The MLLP benchmark's C load generator (benchmarks/mllp_load.c) against the real listener: it compiles, its senders
are stop-and-wait, and every message it counts as acknowledged AA is in the store (the benchmark's figures rest on
these counts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.mllp import _c_senders, load_generator
from connectors.hl7v2.listener import ListenerProcess
from connectors.hl7v2.store import MessageStore


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_load_generator_counts_what_the_listener_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"SCHOOLSLINK_HOME": str(tmp_path / "home"), "SCHOOLSLINK_SEAL_KEY": "4c" * 32,
           "SCHOOLSLINK_KEY": "test-key-not-secret", "SCHOOLSLINK_DB_URL": f"sqlite:///{tmp_path / 'state.db'}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    exe = load_generator(tmp_path)
    assert exe is not None
    with ListenerProcess(env=env, log_path=tmp_path / "listener.log") as listener:
        res = _c_senders(exe, tmp_path, listener.port, 3, 0.5, "T1")
    assert res["senders"] == 3 and res["messages"] > 3 and res["not_aa"] == 0
    assert res["p50_ms"] > 0 and res["p99_ms"] >= res["p50_ms"] and res["per_s"] > 0
    acked = set(res["aa_ids"])
    assert len(acked) == res["messages"]  # every control id distinct, every one acknowledged AA
    assert {c.rsplit("-", 1)[0] for c in acked} == {"T1-0", "T1-1", "T1-2"}
    store = MessageStore(env["SCHOOLSLINK_DB_URL"])
    try:
        assert acked <= store.control_ids("PAS^RX1")
        assert store.counts()["received"] == len(acked)
    finally:
        store.close()

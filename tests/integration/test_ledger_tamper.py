"""The tamper-evident ledger on SQLite and PostgreSQL, with its checkpoints in a moto S3 bucket under Object Lock.

A ledger is built through `ledger.append` over three runs, each ending with a checkpoint (the RFC 6962 tree head)
written to the database and to an S3 bucket created with Object Lock (so versioned), by a "pipeline" IAM user whose
policy allows only s3:PutObject, s3:GetObject, s3:GetObjectVersion, s3:ListBucket and s3:ListBucketVersions. Then
the ledger is tampered with each way and `ledger.verify` must catch it and name the entry (or the checkpoint and
its range of entries): a field edited, an entry deleted, inserted or reordered, the tail cut off with the head
rewound, and the whole chain rewritten with every hash recomputed (caught only by the checkpoints). The pipeline's
own credentials cannot delete a checkpoint; an overwrite makes a second version, which verify reports.

moto (5.2.5) enforces Object Lock on DeleteObject with a VersionId (moto/s3/models.py `delete_object`:
`key.is_locked(...)` -> AccessDeniedByLock), which the "ops" user below (allowed every s3 action) runs into.
It does not check the s3:BypassGovernanceRetention permission, and treats any value of the bypass header as
true, so COMPLIANCE mode is what is tested; the pipeline user is refused by IAM before the lock is reached.

moto checks signatures and IAM policies once `INITIAL_NO_AUTH_ACTION_COUNT` requests have been served; see
tests/integration/test_feed_delivery_s3.py for how the count is set through `/moto-api/reset-auth`.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, select

from schoolslink import ledger
from schoolslink.model import Direction, Disclosure
from schoolslink.store.schema import ledger_checkpoints, ledger_values, watermarks
from tests.moto_iam import moto_with_iam

REGION = "eu-west-2"
AT = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
L = ledger.ledger  # the table
PIPELINE_ACTIONS_BUCKET = ["s3:ListBucket", "s3:ListBucketVersions"]
PIPELINE_ACTIONS_OBJECTS = ["s3:PutObject", "s3:GetObject", "s3:GetObjectVersion"]


def pipeline_policy(bucket: str) -> dict[str, Any]:
    """What docs/audit-ledger.md tells an operator to give the pipeline's checkpoint user: no delete, no bypass."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": PIPELINE_ACTIONS_BUCKET, "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": PIPELINE_ACTIONS_OBJECTS, "Resource": f"arn:aws:s3:::{bucket}/*"},
    ]}


@pytest.fixture(scope="module")
def moto_lock() -> Iterator[dict[str, Any]]:
    """moto's server on 127.0.0.1: a bucket with Object Lock, a pipeline user and an ops user; IAM on after."""
    with moto_with_iam(REGION) as moto:
        run = uuid.uuid4().hex[:8]
        bucket = f"sl-ledger-checkpoints-{run}"
        moto.s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION},
                              ObjectLockEnabledForBucket=True)
        moto.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        ops_policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*",
             "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        users: dict[str, dict[str, str]] = {}
        for role, policy in (("pipeline", pipeline_policy(bucket)), ("ops", ops_policy)):
            key, secret = moto.user(f"sl-{role}-{run}", policy)
            users[role] = {"key": key, "secret": secret}
        lock = moto.s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
        assert lock["ObjectLockEnabled"] == "Enabled"
        moto.enforce()
        yield {"endpoint": moto.endpoint, "bucket": bucket, "users": users}


def s3_client(env: dict[str, Any], role: str) -> Any:
    from connectors.storage.s3 import S3Credentials, client

    u = env["users"][role]
    return client(S3Credentials(access_key_id=u["key"], secret_access_key=u["secret"]), region=REGION,
                  endpoint_url=env["endpoint"])


@pytest.fixture()
def locked(moto_lock: dict[str, Any]) -> Any:
    """A checkpoint store for this test: its own prefix in the locked bucket, written by the pipeline user."""
    from connectors.storage.checkpoints import S3ObjectLockStore

    return S3ObjectLockStore(s3_client(moto_lock, "pipeline"), moto_lock["bucket"], f"t-{uuid.uuid4().hex[:8]}")


def _disclosure(run: str, i: int, **kw: Any) -> Disclosure:
    return Disclosure(run_id=run, dag_id="mis_ingest", direction=Direction.SCHOOL_TO_TRUST, recipient="ODS:R9X",
                      subject_key=f"lrn-{i:04d}", data_items=("attendance_percent", "sen_provision"),
                      agreement_id="demo-partnership", agreement_version="1.0", consent_id=f"school:900001:{i}",
                      mapping_version="m1", content_hash=f"{i:064x}",
                      values={"attendance_percent": f"{90 + i / 10:.1f}", "sen_provision": "K"}, **kw)


RUNS = (("run-1", range(1, 5)), ("run-2", range(5, 8)), ("run-3", range(8, 11)))  # checkpoints at 4, 7, 10


def build(store: Engine, cstore: Any) -> list[ledger.Checkpoint]:
    cps = []
    for n, (run, items) in enumerate(RUNS):
        with store.begin() as conn:
            ledger.append(conn, [_disclosure(run, i, task_id="deliver") for i in items], AT + timedelta(days=n))
        with store.begin() as conn:
            cps.append(ledger.checkpoint(conn, run, store=cstore, now=AT + timedelta(days=n, hours=1)))
    return cps


def verify(store: Engine, cstore: Any) -> ledger.VerifyResult:
    with store.connect() as conn:
        return ledger.verify(conn, cstore)


def _row(conn: sa.Connection, seq: int) -> dict[str, Any]:
    return dict(conn.execute(select(L).where(L.c.seq == seq)).mappings().one())


HASHED = ("at", "run_id", "dag_id", "direction", "recipient", "subject_key", "data_items", "agreement_id",
          "agreement_version", "consent_id", "mapping_version", "content_hash", "entry_format", "task_id",
          "key_version", "commitments")


def _rechain(conn: sa.Connection, from_seq: int) -> None:
    """What an attacker with the database's credentials does to hide an edit: recompute every hash from
    `from_seq` on, and the head."""
    prev = _row(conn, from_seq - 1)["entry_hash"] if from_seq > 1 else ledger.GENESIS
    for r in conn.execute(select(L).where(L.c.seq >= from_seq).order_by(L.c.seq)).mappings().all():
        h = ledger._row_hash(prev, r)
        conn.execute(sa.update(L).where(L.c.seq == r["seq"]).values(prev_hash=prev, entry_hash=h))
        prev = h
    _set_head(conn, prev)


def _set_head(conn: sa.Connection, value: str) -> None:
    conn.execute(sa.update(watermarks).where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
                 .values(value=value))


# --- building and reading ---------------------------------------------------------------------------------------

def test_a_clean_ledger_verifies_with_every_checkpoint(store: Engine, locked: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY_VERSION", "k2")
    cps = build(store, locked)
    assert [c.tree_size for c in cps] == [4, 7, 10]
    r = verify(store, locked)
    assert r.ok and r.entries == 10 and r.checkpoints_checked == 3 and r.problem is None, r
    with store.connect() as conn:
        row = _row(conn, 5)
        assert (row["task_id"], row["key_version"], row["entry_format"]) == ("deliver", "k2", 2)
        commits = json.loads(row["commitments"])
        assert set(commits) == {"attendance_percent", "sen_provision"}
        vals = {v.item: v for v in conn.execute(select(ledger_values).where(ledger_values.c.seq == 5))}
        assert ledger.opens(row["commitments"], "attendance_percent", vals["attendance_percent"].salt, "90.5")
        assert not ledger.opens(row["commitments"], "attendance_percent", vals["attendance_percent"].salt, "90.6")
    # the external documents hold a tree size, a root, a run id and a time: nothing about any pupil
    stored = locked.read_all()
    assert sorted(stored) == sorted(c.name for c in cps)
    for name, versions in stored.items():
        assert len(versions) == 1
        doc = json.loads(versions[0].body)
        assert set(doc) == {"tree_size", "root", "run_id", "created_at"}
        assert "lrn-" not in versions[0].body.decode() and "90." not in versions[0].body.decode()
        assert name.startswith(f"{doc['tree_size']:012d}-")


def test_the_task_comes_from_airflow_when_the_disclosure_does_not_say(store: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "deliver_chunk")
    from_env, named = _disclosure("run-x", 1), _disclosure("run-x", 2, task_id="notify")
    from_env.values = named.values = None  # a caller with no values: no commitments, still verifiable
    with store.begin() as conn:
        ledger.append(conn, [from_env, named], AT)
    with store.connect() as conn:
        assert [(r["task_id"], r["commitments"], r["key_version"]) for r in (_row(conn, 1), _row(conn, 2))] == [
            ("deliver_chunk", "", "1"), ("notify", "", "1")]
        assert conn.execute(select(sa.func.count()).select_from(ledger_values)).scalar_one() == 0
        assert ledger.verify(conn, checkpoints=False).ok


def test_runs_finish_writes_the_checkpoint_to_the_configured_bucket_once(
        store: Engine, moto_lock: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.storage.checkpoints import S3ObjectLockStore
    from schoolslink import runs

    prefix = f"cfg-{uuid.uuid4().hex[:8]}"
    u = moto_lock["users"]["pipeline"]
    monkeypatch.setenv("SCHOOLSLINK_CHECKPOINTS", f"s3://{moto_lock['bucket']}/{prefix}")
    monkeypatch.setenv("SCHOOLSLINK_CHECKPOINTS_ENDPOINT", moto_lock["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", u["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", u["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with store.begin() as conn:
        ledger.append(conn, [_disclosure("scheduled__2026-11-26T02:00:00+00:00", i) for i in range(3)], AT)
    for _ in range(2):  # a retried last task makes no second checkpoint (and no second version)
        runs.finish("scheduled__2026-11-26T02:00:00+00:00", "mis_ingest", AT, AT, {"sent": 3})
    bucket_store = S3ObjectLockStore(s3_client(moto_lock, "pipeline"), moto_lock["bucket"], prefix)
    stored = bucket_store.read_all()
    assert list(stored) == ["000000000003-scheduled__2026-11-26T02_00_00_00_00.json"]
    assert len(next(iter(stored.values()))) == 1
    head = s3_client(moto_lock, "ops").head_object(Bucket=moto_lock["bucket"], Key=f"{prefix}/checkpoints/"
                                                   + next(iter(stored)))
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=365 * 7)
    with store.connect() as conn:
        r = ledger.verify(conn)  # the configured store, as `schoolslink audit verify` uses it
    assert r.ok and r.checkpoints_checked == 1, r


# --- tampering with the database ----------------------------------------------------------------------------------

def test_an_edited_field_is_named(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.update(L).where(L.c.seq == 6).values(recipient="ODS:EVIL"))
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.CHANGED and r.first_bad_seq == 6, r
    assert "entry 6" in r.message


def test_an_edited_commitment_is_named(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        commits = json.loads(_row(conn, 2)["commitments"])
        commits["attendance_percent"] = "0" * 64
        conn.execute(sa.update(L).where(L.c.seq == 2).values(commitments=json.dumps(commits)))
    r = verify(store, locked)
    assert r.problem == ledger.CHANGED and r.first_bad_seq == 2, r


def test_a_deleted_entry_is_named(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.delete(L).where(L.c.seq == 5))
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.REMOVED and r.first_bad_seq == 5, r
    assert "entry 5" in r.message
    # the checkpoints from the one covering it on no longer match either
    assert any(p.kind == ledger.REWRITTEN and p.checkpoint and p.checkpoint.startswith("000000000007")
               for p in r.problems)


def test_a_deleted_first_entry_is_named(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.delete(L).where(L.c.seq == 1))
    r = verify(store, locked)
    assert r.problem == ledger.REMOVED and r.first_bad_seq == 2 and "before entry 2" in r.message, r


@pytest.mark.parametrize("forged_hash", [True, False], ids=["hash-recomputed", "hash-copied"])
def test_an_inserted_entry_is_named(store: Engine, locked: Any, forged_hash: bool) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.update(L).where(L.c.seq >= 5).values(seq=L.c.seq + 100))  # make room at 5
        fake = _row(conn, 4)
        fake.update(seq=5, subject_key="lrn-9999", consent_id="school:900001:forged", prev_hash=fake["entry_hash"])
        fake["entry_hash"] = ledger._row_hash(fake["prev_hash"], fake) if forged_hash else _row(conn, 105)["prev_hash"]
        conn.execute(sa.insert(L).values(**fake))
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.INSERTED and r.first_bad_seq == 5, r


@pytest.mark.parametrize("whole_rows", [True, False], ids=["rows-swapped", "contents-swapped"])
def test_reordered_entries_are_named(store: Engine, locked: Any, whole_rows: bool) -> None:
    build(store, locked)
    cols = [c for c in L.columns.keys() if c != "seq" and (whole_rows or c in HASHED)]
    with store.begin() as conn:
        a, b = _row(conn, 3), _row(conn, 6)
        conn.execute(sa.update(L).where(L.c.seq == 3).values(**{c: b[c] for c in cols}))
        conn.execute(sa.update(L).where(L.c.seq == 6).values(**{c: a[c] for c in cols}))
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.REORDERED and (r.first_bad_seq, r.last_bad_seq) == (3, 6), r


def test_a_truncated_tail_with_the_head_rewound_is_caught_by_the_checkpoints(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.delete(L).where(L.c.seq > 7))
        _set_head(conn, _row(conn, 7)["entry_hash"])
        conn.execute(sa.delete(ledger_checkpoints).where(ledger_checkpoints.c.tree_size > 7))
    with store.connect() as conn:
        assert ledger.verify(conn, checkpoints=False).ok  # the chain alone cannot tell
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.TRUNCATED and r.first_bad_seq == 8, r
    assert "000000000010-run-3.json" in r.message
    assert {p.kind for p in r.problems} == {ledger.TRUNCATED, ledger.CHECKPOINT_MISSING_DB}


def test_a_truncated_tail_without_the_head_is_caught_by_the_chain(store: Engine, locked: Any) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.delete(L).where(L.c.seq > 8))
    r = verify(store, locked)
    assert r.problem == ledger.TRUNCATED and r.first_bad_seq == 9 and "tail" in r.message, r


@pytest.mark.parametrize("db_checkpoints_too", [False, True], ids=["chain-only", "db-checkpoints-too"])
def test_a_consistent_rewrite_is_caught_only_by_the_external_checkpoints(store: Engine, locked: Any,
                                                                         db_checkpoints_too: bool) -> None:
    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.update(L).where(L.c.seq == 6).values(recipient="ODS:EVIL"))
        _rechain(conn, 6)
        if db_checkpoints_too:  # and the database's own copies of the checkpoints, recomputed to match
            hashes = [h for (h,) in conn.execute(select(L.c.entry_hash).order_by(L.c.seq))]
            for cp in conn.execute(select(ledger_checkpoints)).mappings().all():
                root = ledger.merkle_root(bytes.fromhex(h) for h in hashes[:cp["tree_size"]]).hex()
                conn.execute(sa.update(ledger_checkpoints).where(ledger_checkpoints.c.tree_size == cp["tree_size"])
                             .values(root=root))
    with store.connect() as conn:
        assert ledger.verify(conn, checkpoints=False).ok  # every hash holds
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.REWRITTEN, r
    # the earliest checkpoint that fails (tree size 7), and the entries since the last one that holds (5..7)
    assert (r.first_bad_seq, r.last_bad_seq) == (5, 7), r
    assert "000000000007-run-2.json" in r.message and "1 later checkpoint" in r.message
    assert (ledger.CHECKPOINT_MISMATCH_DB in {p.kind for p in r.problems}) == db_checkpoints_too


def test_checkpoints_missing_on_either_side_are_reported(store: Engine, locked: Any, tmp_path: Path) -> None:
    from connectors.storage.checkpoints import FolderStore

    build(store, locked)
    with store.begin() as conn:
        conn.execute(sa.delete(ledger_checkpoints).where(ledger_checkpoints.c.tree_size == 4))
    r = verify(store, locked)
    assert r.problem == ledger.CHECKPOINT_MISSING_DB and "000000000004-run-1.json" in r.message, r
    r = verify(store, FolderStore(tmp_path / "empty"))  # a store that never had them
    assert {p.kind for p in r.problems} == {ledger.CHECKPOINT_MISSING_EXTERNAL}
    assert len(r.problems) == 2 and r.checkpoints_checked == 2


# --- tampering with the checkpoints -------------------------------------------------------------------------------

def test_the_pipeline_cannot_delete_a_checkpoint_and_an_overwrite_is_reported(
        store: Engine, locked: Any, moto_lock: dict[str, Any]) -> None:
    from botocore.exceptions import ClientError

    cps = build(store, locked)
    bucket, key = moto_lock["bucket"], locked.prefix + cps[1].name
    pipeline = s3_client(moto_lock, "pipeline")
    version = pipeline.list_object_versions(Bucket=bucket, Prefix=key)["Versions"][0]["VersionId"]
    # the pipeline's own credentials: no delete of a version, no delete marker, no bypass. IAM refuses (moto says
    # "Access Denied" for IAM and for the lock alike; an unlocked object shows which one refused)
    spare_key = locked.prefix + "spare.txt"
    spare = pipeline.put_object(Bucket=bucket, Key=spare_key, Body=b"x")["VersionId"]
    for k, kwargs in ((key, {"VersionId": version}), (key, {"VersionId": version, "BypassGovernanceRetention": True}),
                      (key, {}), (spare_key, {"VersionId": spare})):
        with pytest.raises(ClientError) as exc:
            pipeline.delete_object(Bucket=bucket, Key=k, **kwargs)
        assert exc.value.response["Error"]["Code"] == "AccessDenied"
    # an operator allowed every s3 action deletes the unlocked object, but not the locked checkpoint: the lock
    ops = s3_client(moto_lock, "ops")
    ops.delete_object(Bucket=bucket, Key=spare_key, VersionId=spare)
    for kwargs in ({"VersionId": version}, {"VersionId": version, "BypassGovernanceRetention": True}):
        with pytest.raises(ClientError) as exc:
            ops.delete_object(Bucket=bucket, Key=key, **kwargs)
        assert exc.value.response["Error"]["Code"] == "AccessDenied"
    assert [v["VersionId"] for v in pipeline.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]] == [version]
    assert verify(store, locked).ok
    # the pipeline can put again under the name: a second version, with another root, which verify reports
    forged = json.loads(pipeline.get_object(Bucket=bucket, Key=key)["Body"].read())
    forged["root"] = "f" * 64
    pipeline.put_object(Bucket=bucket, Key=key, Body=json.dumps(forged).encode())
    versions = pipeline.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert len(versions) == 2 and version in {v["VersionId"] for v in versions}
    r = verify(store, locked)
    assert not r.ok and r.problem == ledger.CHECKPOINT_OVERWRITTEN and cps[1].name in r.message, r
    # the first version is still what the entries are checked against
    assert ledger.REWRITTEN not in {p.kind for p in r.problems} and r.checkpoints_checked == 3


def test_a_delete_marker_is_reported(store: Engine, locked: Any, moto_lock: dict[str, Any]) -> None:
    cps = build(store, locked)
    s3_client(moto_lock, "ops").delete_object(Bucket=moto_lock["bucket"], Key=locked.prefix + cps[0].name)
    r = verify(store, locked)
    assert r.problem == ledger.CHECKPOINT_DELETED and cps[0].name in r.message, r
    assert r.checkpoints_checked == 3  # the locked version is still there and still checked


# --- retention and concurrency ------------------------------------------------------------------------------------

def test_erasing_values_leaves_the_ledger_verifiable(store: Engine, locked: Any) -> None:
    from schoolslink.governance.agreement import load_agreements
    from schoolslink.retention import purge

    build(store, locked)
    agreements = load_agreements()  # the demo agreement: values_days 90
    assert purge(AT + timedelta(days=30), engine=store, agreements=agreements)["values_erased"] == 0
    counts = purge(AT + timedelta(days=91, hours=12), engine=store, agreements=agreements)
    # run-1 (day 0) and run-2 (day 1) are past 90 days; run-3 (day 2) is not yet
    assert counts == {"values_erased": 14, "values_kept": 6, "agreements": 1, "hl7_bodies_erased": 0}, counts
    with store.connect() as conn:
        erased = conn.execute(select(ledger_values).where(ledger_values.c.seq <= 7)).all()
        assert erased and all(v.salt is None and v.value is None and v.erased_at is not None for v in erased)
    r = verify(store, locked)
    assert r.ok and r.entries == 10 and r.checkpoints_checked == 3, r
    assert purge(AT + timedelta(days=400), engine=store, agreements=[])["values_erased"] == 6  # default 90 days


THREADS, ROUNDS, PER = 4, 6, 3


def _hammer(url: str, folder: str, who: str) -> None:
    """Append from one worker: ROUNDS transactions of PER entries, a checkpoint after every other one."""
    from connectors.storage.checkpoints import FolderStore
    from schoolslink.store.db import engine_for

    eng = engine_for(url)
    cstore = FolderStore(Path(folder))
    for k in range(ROUNDS):
        with eng.begin() as conn:
            ledger.append(conn, [_disclosure(f"{who}-{k}", i) for i in range(PER)], datetime.now(UTC))
        if k % 2:
            with eng.begin() as conn:
                ledger.checkpoint(conn, f"{who}-{k}", store=cstore)


def _assert_one_chain(store: Engine, folder: Path, entries: int) -> None:
    from connectors.storage.checkpoints import FolderStore

    with store.connect() as conn:
        rows = conn.execute(select(L.c.prev_hash, L.c.entry_hash).order_by(L.c.seq)).all()
        r = ledger.verify(conn, FolderStore(folder))
    assert r.ok and r.entries == entries, r
    assert len({p for p, _ in rows}) == entries  # no fork: no two entries follow the same one
    assert all(rows[i][0] == rows[i - 1][1] for i in range(1, len(rows)))  # no gap
    assert r.checkpoints_checked == entries // (ROUNDS * PER) * (ROUNDS // 2)


def test_concurrent_appends_from_threads_keep_one_chain(store: Engine, store_url: str, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work(who: str) -> None:
        try:
            _hammer(store_url, str(tmp_path / "cps"), who)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    _assert_one_chain(store, tmp_path / "cps", THREADS * ROUNDS * PER)


def test_concurrent_appends_from_processes_keep_one_chain(store: Engine, store_url: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(store_url, str(tmp_path / "cps"), f"p{n}")) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    _assert_one_chain(store, tmp_path / "cps", 3 * ROUNDS * PER)

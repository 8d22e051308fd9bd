"""The disclosure ledger: append-only, one row per record disclosed, each row chained to the previous, with
per-run Merkle checkpoints kept outside the database.

Chain. entry_hash = SHA-256(prev_hash || canonical JSON of the entry's fields). The head of the chain is kept in
`watermarks` ('ledger', 'head') and locked for the append, so concurrent runs append in turn on SQLite (a write
takes the database's write lock first) and PostgreSQL (row lock). Entry format 2 (migration 0006) adds to the
hashed fields the Airflow task, the pseudonym key version and salted commitments to the values sent:
SHA-256(16 random bytes of salt || the value's canonical text) per item. The salt and value live in
`ledger_values`, apart from the entry, so retention can erase them (schoolslink/retention.py) while the entry,
and the chain, still verify; whoever holds a value and its salt can prove what was sent.

Checkpoints. At the end of every DAG run (`runs.finish`) `checkpoint` computes the RFC 6962 tree head over the
whole log (leaf = SHA-256(0x00 || entry_hash bytes), node = SHA-256(0x01 || left || right)), keeps it in
`ledger_checkpoints` and writes it to an external store the database's credentials cannot rewrite
(connectors/storage/checkpoints.py: S3 Object Lock, or a folder for development). A rewrite of the whole chain
with every hash recomputed passes the chain check but not the checkpoints made before it.

`verify` recomputes both and names what broke: the first entry changed, removed, inserted or reordered, a tail
cut off, or the earliest checkpoint that no longer matches and its range of entries. docs/audit-ledger.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from connectors.storage.checkpoints import (
    CheckpointStore,
    CheckpointStoreError,
    CheckpointVersion,
    checkpoint_body,
    checkpoint_name,
    from_config,
)
from schoolslink import keys
from schoolslink.model import Disclosure
from schoolslink.settings import home
from schoolslink.store.schema import ledger, ledger_checkpoints, ledger_values, watermarks

GENESIS = "0" * 64
RETRACTION = "retraction"  # data_items of an entry that retracts what was sent earlier (a link found wrong)
ENTRY_FORMAT = 2  # what `append` writes; entries made before migration 0006 are format 1
DEFAULT_LEDGER_YEARS = 8  # checkpoints' retention where no agreement sets retention.ledger_years
_FIELDS_V1 = (
    "at", "run_id", "dag_id", "direction", "recipient", "subject_key", "data_items",
    "agreement_id", "agreement_version", "consent_id", "mapping_version", "content_hash",
)
_FIELDS_V2 = (*_FIELDS_V1, "entry_format", "task_id", "key_version", "commitments")


# Values and commitments -----------------------------------------------------------------------------------------

def value_text(value: object) -> str:
    """The canonical text of a value sent: a string as it is; None as ''; anything else as compact JSON with
    sorted keys. A commitment is to this text."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def commitment(salt: bytes, text: str) -> str:
    """SHA-256(salt || text as UTF-8), hex."""
    return hashlib.sha256(salt + text.encode("utf-8")).hexdigest()


def opens(commitments_json: str | None, item: str, salt_hex: str, value: str) -> bool:
    """Whether `value` with `salt_hex` is what entry's commitment to `item` was made from."""
    try:
        want = json.loads(commitments_json or "{}").get(item)
        return want is not None and commitment(bytes.fromhex(salt_hex), value) == want
    except (ValueError, AttributeError):
        return False


# Merkle tree (RFC 6962 section 2.1) ----------------------------------------------------------------------------

EMPTY_ROOT = hashlib.sha256(b"").hexdigest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The roots of the perfect subtrees covering the leaves so far, largest first, as (height, hash): enough to
    add leaves and to give the RFC 6962 tree head (the right fold of these roots) at any size."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: list[tuple[int, bytes]] | None = None) -> None:
        self.size = size
        self.nodes = nodes or []

    def add(self, leaf: bytes) -> None:
        """Add a leaf hash (`leaf_hash` of the leaf's data)."""
        h, height = leaf, 0
        while self.nodes and self.nodes[-1][0] == height:
            _, left = self.nodes.pop()
            h, height = node_hash(left, h), height + 1
        self.nodes.append((height, h))
        self.size += 1

    def root(self) -> bytes:
        if not self.nodes:
            return hashlib.sha256(b"").digest()
        h = self.nodes[-1][1]
        for _, left in reversed(self.nodes[:-1]):
            h = node_hash(left, h)
        return h

    def to_json(self) -> str:
        return json.dumps([[height, h.hex()] for height, h in self.nodes], separators=(",", ":"))

    @classmethod
    def from_json(cls, size: int, text: str) -> Frontier:
        """A stored frontier; ValueError if it is not one for `size` leaves."""
        nodes = [(int(height), bytes.fromhex(h)) for height, h in json.loads(text)]
        if sum(1 << height for height, _ in nodes) != size or any(len(h) != 32 for _, h in nodes):
            raise ValueError("frontier does not match its tree size")
        return cls(size, nodes)


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """MTH(D[n]) of RFC 6962 over leaf *data* (each hashed as a leaf here)."""
    f = Frontier()
    for d in leaves:
        f.add(leaf_hash(d))
    return f.root()


def _entry_leaf(entry_hash: str) -> bytes:
    try:
        raw = bytes.fromhex(entry_hash)
    except (TypeError, ValueError):
        raw = str(entry_hash).encode()  # a tampered, non-hex hash: still a leaf, and one that will not match
    return leaf_hash(raw)


# The chain -----------------------------------------------------------------------------------------------------

def _at_text(at: datetime) -> str:
    """The instant as UTC ISO text (SQLite hands back naive UTC datetimes, PostgreSQL aware ones)."""
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return aware.isoformat(timespec="microseconds")


def _entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    names = _FIELDS_V2 if int(fields.get("entry_format") or 1) >= 2 else _FIELDS_V1
    body = json.dumps({k: fields.get(k) for k in names}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256((str(prev_hash) + body).encode()).hexdigest()


def _row_hash(prev_hash: str, row: Mapping[Any, Any]) -> str:
    """The hash a stored row's fields give after `prev_hash`."""
    fields = dict(row)
    at = fields.get("at")
    fields["at"] = _at_text(at) if isinstance(at, datetime) else str(at)
    return _entry_hash(prev_hash, fields)


def _lock_head(conn: Connection) -> str:
    """Take the ledger's write lock and return the head hash."""
    res = conn.execute(
        update(watermarks)
        .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
        .values(value=watermarks.c.value)
    )
    if res.rowcount == 0:  # the first append ever: two may race to create the head (PostgreSQL; SQLite's
        # UPDATE above already holds the database's write lock)
        first = {"source": "ledger", "resource_type": "head", "value": GENESIS}
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(watermarks).values(**first).on_conflict_do_nothing())
        else:
            conn.execute(insert(watermarks).values(**first))
    head = conn.execute(
        select(watermarks.c.value)
        .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
        .with_for_update()
    ).scalar_one()
    return str(head)


def append(conn: Connection, disclosures: Iterable[Disclosure], at: datetime) -> int:
    """Append one ledger row per disclosure, in one transaction with the caller's other writes.

    The task is the disclosure's `task_id`, else `AIRFLOW_CTX_TASK_ID` (set by Airflow in a task), else ''. Each
    of the disclosure's `values` gets a fresh 16-byte salt; the commitments go into the hashed entry, the salt
    and value into `ledger_values`.
    """
    prev = _lock_head(conn)
    env_task = os.environ.get("AIRFLOW_CTX_TASK_ID", "")
    key_version = keys.key_version()
    subject = lru_cache(maxsize=4096)(keys.ledger_subject)  # a pupil's several items share one subject
    rows: list[dict[str, Any]] = []
    opened: list[list[dict[str, Any]]] = []
    for d in disclosures:
        commits: dict[str, str] = {}
        vals: list[dict[str, Any]] = []
        for item, text in sorted((d.values or {}).items()):
            salt = secrets.token_bytes(16)
            commits[str(item)] = commitment(salt, str(text))
            vals.append({"item": str(item), "salt": salt.hex(), "value": str(text)})
        fields: dict[str, Any] = {
            "at": _at_text(at),
            "run_id": d.run_id,
            "dag_id": d.dag_id,
            "direction": d.direction.value,
            "recipient": d.recipient,
            "subject_key": subject(d.subject_key),
            "data_items": ",".join(sorted(d.data_items)),
            "agreement_id": d.agreement_id,
            "agreement_version": d.agreement_version,
            "consent_id": d.consent_id,
            "mapping_version": d.mapping_version,
            "content_hash": d.content_hash,
            "entry_format": ENTRY_FORMAT,
            "task_id": d.task_id if d.task_id is not None else env_task,
            "key_version": key_version,
            "commitments": json.dumps(commits, sort_keys=True, separators=(",", ":")) if commits else "",
        }
        h = _entry_hash(prev, fields)
        rows.append({**fields, "at": at.astimezone(UTC), "prev_hash": prev, "entry_hash": h})
        opened.append(vals)
        prev = h
    if rows:
        if any(opened):
            seqs = conn.execute(insert(ledger).returning(ledger.c.seq, sort_by_parameter_order=True),
                                rows).scalars().all()
            conn.execute(insert(ledger_values), [{**v, "seq": s} for s, vals in zip(seqs, opened, strict=True)
                                                 for v in vals])
        else:
            conn.execute(insert(ledger), rows)  # one executemany: SQLAlchemy batches the rows itself
        conn.execute(
            update(watermarks)
            .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
            .values(value=prev)
        )
    return len(rows)


def subjects_of(state_key: str) -> list[str]:
    """What the ledger's `subject_key` may hold for a state store key: its subject under every pseudonym key held."""
    return [s for _v, s in keys.ledger_subjects(state_key)]


def last_agreement(conn: Connection, subject_key: str, recipient: str,
                   content_hash: str | None = None) -> tuple[str, str]:
    """The agreement (id, version) of the latest disclosure to `recipient` about `subject_key` (with that
    content hash, if one is given and found): what a retraction of it records. ("none", "-") if none."""
    q = (select(ledger.c.agreement_id, ledger.c.agreement_version)
         .where(ledger.c.subject_key.in_(subjects_of(subject_key)), ledger.c.recipient == recipient,
                ledger.c.data_items != RETRACTION)
         .order_by(ledger.c.seq.desc()).limit(1))
    hit = conn.execute(q.where(ledger.c.content_hash == content_hash)).first() if content_hash else None
    hit = hit or conn.execute(q).first()
    return (str(hit[0]), str(hit[1])) if hit is not None else ("none", "-")


# Checkpoints ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint:
    run_id: str
    tree_size: int
    root: str
    created_at: datetime

    @property
    def name(self) -> str:
        return checkpoint_name(self.tree_size, self.run_id)


def checkpoint_store() -> CheckpointStore:
    """The external checkpoint store configured by `SCHOOLSLINK_CHECKPOINTS` (s3://bucket/prefix or a folder;
    default `<SCHOOLSLINK_HOME>/checkpoints`) and `SCHOOLSLINK_CHECKPOINTS_ENDPOINT`."""
    return from_config(os.environ.get("SCHOOLSLINK_CHECKPOINTS"), default_folder=home() / "checkpoints",
                       endpoint_url=os.environ.get("SCHOOLSLINK_CHECKPOINTS_ENDPOINT") or None)


def retention_years() -> int:
    """How long checkpoints are locked: `SCHOOLSLINK_LEDGER_RETENTION_YEARS`, else the longest
    `retention.ledger_years` of the agreements, else 8."""
    env = os.environ.get("SCHOOLSLINK_LEDGER_RETENTION_YEARS", "").strip()
    if env:
        return max(1, int(env))
    from schoolslink.errors import AgreementError
    from schoolslink.governance.agreement import load_agreements

    try:
        years = [a.ledger_years for a in load_agreements() if a.ledger_years]
    except (AgreementError, OSError):
        years = []
    return max(years, default=DEFAULT_LEDGER_YEARS)


def _plus_years(t: datetime, years: int) -> datetime:
    try:
        return t.replace(year=t.year + years)
    except ValueError:  # 29 February
        return t.replace(year=t.year + years, day=28)


def checkpoint(conn: Connection, run_id: str, *, store: CheckpointStore | None = None,
               now: datetime | None = None) -> Checkpoint:
    """Record the tree head over the whole ledger for `run_id`, in the database and in the external store.

    Runs in the caller's transaction and holds the ledger's write lock, so no append lands in between. The row is
    inserted first and the external put made before the caller commits: a failed put rolls the row back (and
    raises CheckpointStoreError, so the task fails and is retried). A second call for the same run and tree
    size returns the checkpoint already made and writes nothing.
    """
    _lock_head(conn)
    count = int(conn.execute(select(func.count()).select_from(ledger)).scalar_one())
    last = conn.execute(select(ledger_checkpoints).order_by(ledger_checkpoints.c.tree_size.desc()).limit(1)
                        ).mappings().first()
    frontier = Frontier()
    if last is not None and int(last["tree_size"]) <= count:
        try:
            frontier = Frontier.from_json(int(last["tree_size"]), str(last["frontier"]))
        except (ValueError, TypeError):
            frontier = Frontier()
    for (h,) in conn.execute(select(ledger.c.entry_hash).order_by(ledger.c.seq).offset(frontier.size)):
        frontier.add(_entry_leaf(h))
    done = conn.execute(select(ledger_checkpoints).where(ledger_checkpoints.c.run_id == run_id,
                                                         ledger_checkpoints.c.tree_size == frontier.size)
                        ).mappings().first()
    if done is not None:
        return Checkpoint(run_id, frontier.size, str(done["root"]), done["created_at"])
    created = (now or datetime.now(UTC)).astimezone(UTC)
    cp = Checkpoint(run_id, frontier.size, frontier.root().hex(), created)
    conn.execute(insert(ledger_checkpoints).values(tree_size=cp.tree_size, run_id=run_id, root=cp.root,
                                                   created_at=created, frontier=frontier.to_json()))
    (store or checkpoint_store()).put(cp.name, checkpoint_body(cp.tree_size, cp.root, run_id, created),
                                      _plus_years(created, retention_years()))
    return cp


# Verification --------------------------------------------------------------------------------------------------

# Problem kinds, in the order verify reports them.
CHANGED = "changed"  # an entry's fields no longer give its hash
REMOVED = "removed"  # an entry is missing from the chain
INSERTED = "inserted"  # an entry the chain never had
REORDERED = "reordered"  # two entries' contents swapped
TRUNCATED = "truncated"  # the tail cut off (the head, or a checkpoint, names more than the ledger holds)
CHECKPOINT_OVERWRITTEN = "checkpoint_overwritten"  # an external checkpoint has more than one differing version
CHECKPOINT_DELETED = "checkpoint_deleted"  # an external checkpoint has a delete marker
REWRITTEN = "rewritten"  # the chain holds together but a checkpoint's root no longer matches
CHECKPOINT_MISSING_DB = "checkpoint_missing_db"  # external checkpoint the database does not have
CHECKPOINT_MISSING_EXTERNAL = "checkpoint_missing_external"  # database checkpoint the external store lacks
CHECKPOINT_MISMATCH_DB = "checkpoint_mismatch_db"  # the database's copy differs from the external one
CHECKPOINT_UNREADABLE = "checkpoint_unreadable"  # the external store could not be read, or a document is bad
_ORDER = (CHANGED, REMOVED, INSERTED, REORDERED, TRUNCATED, CHECKPOINT_OVERWRITTEN, CHECKPOINT_DELETED, REWRITTEN,
          CHECKPOINT_MISMATCH_DB, CHECKPOINT_MISSING_DB, CHECKPOINT_MISSING_EXTERNAL, CHECKPOINT_UNREADABLE)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    message: str
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoint: str | None = None  # the checkpoint's name, for a checkpoint problem


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None
    message: str
    checkpoints_checked: int = 0  # checkpoints whose root was recomputed and compared
    problem: str | None = None  # the kind of the first problem (see the kinds above)
    last_bad_seq: int | None = None  # the end of the first problem's range of entries, where it has one
    problems: tuple[Problem, ...] = ()  # every problem found, the first one first


@dataclass(frozen=True, slots=True)
class _Claim:
    name: str
    tree_size: int
    root: str
    run_id: str


def _parse_checkpoint(name: str, body: bytes) -> _Claim:
    doc = json.loads(body)
    claim = _Claim(name, int(doc["tree_size"]), str(doc["root"]), str(doc["run_id"]))
    if checkpoint_name(claim.tree_size, claim.run_id) != name:
        raise ValueError("its name does not match its contents")
    return claim


def _external_claims(versions: Mapping[str, list[CheckpointVersion]],
                     problems: list[Problem]) -> dict[str, _Claim]:
    """The external checkpoints as first written (the oldest version), noting overwritten and deleted ones."""
    out: dict[str, _Claim] = {}
    for name, vs in sorted(versions.items()):
        bodies = [v.body for v in vs if v.body is not None]
        if any(v.body is None for v in vs):
            problems.append(Problem(CHECKPOINT_DELETED, f"checkpoint {name}: deleted in the external store (a delete "
                                    "marker); its locked versions remain", checkpoint=name))
        if len(set(bodies)) > 1:
            problems.append(Problem(CHECKPOINT_OVERWRITTEN, f"checkpoint {name}: {len(bodies)} versions with "
                                    f"different contents in the external store (written once, then rewritten)",
                                    checkpoint=name))
        if not bodies:
            continue
        try:
            out[name] = _parse_checkpoint(name, bodies[0])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(Problem(CHECKPOINT_UNREADABLE, f"checkpoint {name}: not a checkpoint ({exc})",
                                    checkpoint=name))
    return out


def _row_at(conn: Connection, *where: Any, desc: bool = False) -> Mapping[Any, Any] | None:
    order = ledger.c.seq.desc() if desc else ledger.c.seq
    return conn.execute(select(ledger).where(*where).order_by(order).limit(1)).mappings().first()


def _range(first: int | None, last: int | None) -> str:
    return f"entry {first}" if first == last else f"entries {first}..{last}"


def _bad_contents(conn: Connection, row: Mapping[Any, Any], expected: str, prev_seq: int | None) -> Problem:
    """An entry whose fields do not give its hash: inserted, one of two swapped, or changed."""
    seq = int(row["seq"])
    nxt = _row_at(conn, ledger.c.seq > seq)
    if nxt is not None and nxt["prev_hash"] == expected:
        after = f"entry {prev_seq}" if prev_seq is not None else "the start"
        return Problem(INSERTED, f"entry {seq}: inserted (it does not hash, and entry {nxt['seq']} links past it "
                       f"to {after})", seq, seq)
    for other in conn.execute(select(ledger).where(ledger.c.seq != seq).order_by(ledger.c.seq)).mappings():
        if _row_hash(str(row["prev_hash"]), other) == row["entry_hash"]:
            a, b = sorted((seq, int(other["seq"])))
            return Problem(REORDERED, f"entries {a} and {b}: reordered (entry {seq}'s contents are at entry "
                           f"{other['seq']})", a, b)
    return Problem(CHANGED, f"entry {seq}: contents changed (its fields no longer give its hash)", seq, seq)


def _broken_link(conn: Connection, row: Mapping[Any, Any], expected: str, prev_seq: int | None) -> Problem:
    """An entry that hashes but does not link to the entry before it: entries inserted, removed or reordered."""
    seq = int(row["seq"])
    linked = _row_at(conn, ledger.c.entry_hash == row["prev_hash"])
    if linked is not None and int(linked["seq"]) < seq:
        first = _row_at(conn, ledger.c.seq > linked["seq"])
        a = int(first["seq"]) if first is not None else seq
        b = prev_seq if prev_seq is not None else a
        return Problem(INSERTED, f"{_range(a, b)}: inserted (entry {seq} links to entry {linked['seq']})", a, b)
    if linked is not None:
        partner = _row_at(conn, ledger.c.prev_hash == expected, ledger.c.seq != seq)
        b = int(partner["seq"]) if partner is not None else int(linked["seq"])
        return Problem(REORDERED, f"entries {seq} and {b}: reordered (entry {seq} links to an entry after it)",
                       min(seq, b), max(seq, b))
    gap_first = (prev_seq + 1) if prev_seq is not None else None
    if gap_first is not None and gap_first < seq:
        return Problem(REMOVED, f"{_range(gap_first, seq - 1)}: removed (entry {seq} links to an entry that is no "
                       "longer in the ledger)", gap_first, seq - 1)
    where = f"between entry {prev_seq} and entry {seq}" if prev_seq is not None else f"before entry {seq}"
    return Problem(REMOVED, f"an entry {where} was removed (entry {seq} links to an entry that is no longer in the "
                   "ledger)", seq, seq)


def verify(conn: Connection, store: CheckpointStore | None = None, *, checkpoints: bool = True) -> VerifyResult:
    """Recompute the chain and every checkpoint's tree head; name the first entry or checkpoint that does not hold.

    `store`: the external checkpoint store (default: the configured one, `checkpoint_store()`); `checkpoints=False`
    checks the chain and the head only. Verification never needs a pseudonym key or a value.
    """
    problems: list[Problem] = []
    claims: dict[str, _Claim] = {}
    ext: dict[str, _Claim] = {}
    db: dict[str, _Claim] = {}
    where = ""
    if checkpoints:
        for r in conn.execute(select(ledger_checkpoints)).mappings():
            name = checkpoint_name(int(r["tree_size"]), str(r["run_id"]))
            db[name] = _Claim(name, int(r["tree_size"]), str(r["root"]), str(r["run_id"]))
        st = store or checkpoint_store()
        where = f" ({st.description})"
        try:
            ext = _external_claims(st.read_all(), problems)
        except CheckpointStoreError as exc:
            problems.append(Problem(CHECKPOINT_UNREADABLE, f"external checkpoints could not be read: {exc}"))
        for name in sorted(set(db) | set(ext)):
            d, e = db.get(name), ext.get(name)
            if d is not None and e is not None and d.root != e.root:
                problems.append(Problem(CHECKPOINT_MISMATCH_DB, f"checkpoint {name}: the database's root differs "
                                        "from the external store's", checkpoint=name))
            elif e is None and name not in {p.checkpoint for p in problems}:
                problems.append(Problem(CHECKPOINT_MISSING_EXTERNAL, f"checkpoint {name}: in the database but not "
                                        f"in the external store{where}", checkpoint=name))
            elif d is None:
                problems.append(Problem(CHECKPOINT_MISSING_DB, f"checkpoint {name}: in the external store but not in "
                                        "the database", checkpoint=name))
            claim = e or d
            if claim is not None:
                claims[name] = claim
    sizes = {c.tree_size for c in claims.values()}
    wanted = sizes | {s + 1 for s in sizes}
    roots: dict[int, str] = {0: EMPTY_ROOT}
    seq_at: dict[int, int] = {}
    prev, n = GENESIS, 0
    prev_seq: int | None = None
    bad: tuple[str, Mapping[Any, Any], str, int | None] | None = None
    frontier = Frontier()
    rows = conn.execution_options(yield_per=2000).execute(select(ledger).order_by(ledger.c.seq)).mappings()
    for row in rows:
        n += 1
        seq = int(row["seq"])
        if n in wanted:
            seq_at[n] = seq
        if bad is None:
            if _row_hash(str(row["prev_hash"]), row) != row["entry_hash"]:
                bad = ("contents", dict(row), prev, prev_seq)
            elif row["prev_hash"] != prev:
                bad = ("link", dict(row), prev, prev_seq)
        if sizes:
            frontier.add(_entry_leaf(str(row["entry_hash"])))
            if n in sizes:
                roots[n] = frontier.root().hex()
        prev, prev_seq = str(row["entry_hash"]), seq
    if bad is not None:
        kind, brow, expected, before = bad
        problems.insert(0, (_bad_contents if kind == "contents" else _broken_link)(conn, brow, expected, before))
    head = conn.execute(
        select(watermarks.c.value).where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
    ).scalar()
    if head is not None and head != prev:
        at = _row_at(conn, ledger.c.entry_hash == head)
        if at is not None and prev_seq is not None and int(at["seq"]) < prev_seq:
            after = _row_at(conn, ledger.c.seq > at["seq"])
            a = int(after["seq"]) if after is not None else prev_seq
            problems.append(Problem(INSERTED, f"{_range(a, prev_seq)}: added after the head (entry {at['seq']}) "
                                    "without the ledger's append", a, prev_seq))
        else:
            problems.append(Problem(TRUNCATED, "the chain's tail was removed or replaced: the head names an entry "
                                    f"that is not the last (last: {prev_seq})",
                                    (prev_seq or 0) + 1, None))
    checked = 0
    failing: list[_Claim] = []
    good_below: dict[str, int] = {}
    best_good = 0
    truncated = False
    for c in sorted(claims.values(), key=lambda c: (c.tree_size, c.run_id)):
        if c.tree_size > n:
            if not truncated:
                problems.append(Problem(TRUNCATED, f"checkpoint {c.name} (run {c.run_id}) covers {c.tree_size} "
                                        f"entries but the ledger holds {n}: the entries after "
                                        f"{'entry ' + str(prev_seq) if prev_seq is not None else 'the start'} "
                                        "were removed", (prev_seq or 0) + 1, None, c.name))
                truncated = True
            continue
        checked += 1
        if roots.get(c.tree_size) == c.root:
            best_good = max(best_good, c.tree_size)
        else:
            good_below[c.name] = best_good
            failing.append(c)
    if failing:
        c = failing[0]
        lo = good_below[c.name] + 1
        lo_seq, hi_seq = seq_at.get(lo), seq_at.get(c.tree_size)
        more = f"; {len(failing) - 1} later checkpoint(s) fail too" if len(failing) > 1 else ""
        problems.append(Problem(REWRITTEN, f"checkpoint {c.name} (run {c.run_id}, tree size {c.tree_size}) no "
                                f"longer matches the ledger: {_range(lo_seq, hi_seq)} (positions {lo}..{c.tree_size}) "
                                f"were changed after it was made{more}", lo_seq, hi_seq, c.name))
    problems.sort(key=lambda p: _ORDER.index(p.kind))
    if not problems:
        cps = f"; {checked} checkpoint(s) match{where}" if checkpoints else ""
        return VerifyResult(True, n, None, f"{n} entries verified{cps}", checked)
    first = problems[0]
    msg = first.message if len(problems) == 1 else f"{first.message} (and {len(problems) - 1} more problem(s))"
    return VerifyResult(False, n, first.first_seq, msg, checked, first.kind, first.last_seq, tuple(problems))

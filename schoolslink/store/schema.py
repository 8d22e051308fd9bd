"""Tables of the state store (SQLAlchemy Core). Alembic migrations in `schoolslink/migrations` create them.

What is kept, and why (DESIGN.md, minimisation): the whole roll only as keyed hashes used for matching
(`learners` without `plain`); plain personal data (`learners.plain`) only for learners with an active
consent; the trust's patients only as keyed pseudonyms and match hashes, never names or NHS numbers. Both sides keep
per-attribute keyed hashes (`match_keys`) for scored matching, and `match_candidates` keeps what a reviewer weighs.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("dag_id", String(100), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("summary", JSON),  # counts and reasons only: never pupil data
)

learners = Table(
    "learners",
    metadata,
    Column("learner_key", String(40), primary_key=True),
    Column("school_urn", String(10), nullable=False),
    Column("match_hash", String(40), nullable=False),
    Column("looked_after", Boolean, nullable=False, default=False),
    Column("adopted", Boolean, nullable=False, default=False),
    Column("child_protection", Boolean, nullable=False, default=False),
    Column("do_not_tell_parent", Boolean, nullable=False, default=False),
    Column("competent", Boolean, nullable=False, default=False),  # Gillick, as the school recorded
    Column("left_school", Boolean, nullable=False, default=False),
    Column("age_years", Integer),
    Column("plain", JSON(none_as_null=True)),  # canonical learner, only while a consent is active
    Column("updated_run", String(250), nullable=False),
    # keyed hash per normalised attribute (surname, forename, dob, sex, postcode, ...) for scored matching:
    # schoolslink/governance/scoring.py. Hashes only, never values.
    Column("match_keys", JSON(none_as_null=True)),
    Index("ix_learners_school_match", "school_urn", "match_hash"),
)

consents = Table(
    "consents",
    metadata,
    Column("consent_id", String(200), primary_key=True),
    Column("source", String(10), nullable=False),  # 'school' | 'fhir'
    Column("subject_key", String(40), nullable=False, index=True),
    Column("given_by", String(20), nullable=False),
    Column("decision", String(10), nullable=False),
    Column("directions", String(100), nullable=False),
    Column("purposes", String(200), nullable=False),
    Column("data_items", Text),
    Column("school_urn", String(10)),  # the school the consent names; None: the school that holds it
    Column("valid_from", Date, nullable=False),
    Column("valid_to", Date),
    Column("withdrawn_on", Date),
    Column("competent", Boolean, nullable=False, default=False),
    Column("updated_run", String(250), nullable=False),
)

patients = Table(
    "patients",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("patient_ref", String(100), primary_key=True),
    Column("patient_key", String(40), nullable=False, index=True),
    Column("school_urn", String(10)),
    Column("match_hash", String(40)),
    Column("verified", Boolean, nullable=False),
    Column("restricted", Boolean, nullable=False),
    Column("version_id", String(64)),
    Column("updated_run", String(250), nullable=False),
    Column("match_keys", JSON(none_as_null=True)),  # as learners.match_keys, from the trust's Patient
)

links = Table(
    "links",
    metadata,
    Column("learner_key", String(40), primary_key=True),
    Column("trust_ods", String(10), primary_key=True),
    Column("patient_key", String(40), nullable=False),
    Column("patient_ref", String(100), nullable=False),
    Column("method", String(40), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("confirmed_by", String(100)),
    Column("withdrawn", Boolean, nullable=False, default=False),
    Column("linked_run", String(250), nullable=False),
)

review_queue = Table(
    "review_queue",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("patient_ref", String(100), primary_key=True),
    Column("patient_key", String(40), nullable=False),
    Column("school_urn", String(10)),
    Column("candidate_learner_key", String(40)),
    Column("reason", String(200), nullable=False),
    Column("status", String(12), nullable=False, default="open"),  # open | confirmed | rejected
    Column("updated_run", String(250), nullable=False),
)

match_candidates = Table(
    "match_candidates",
    metadata,
    # The pupils a reviewer should weigh for a trust Patient waiting in review_queue, best first (twins: both):
    # keys, the score and which attributes agreed (levels only, never values). Rewritten whenever the Patient is
    # matched again; gone once it links.
    Column("trust_ods", String(10), primary_key=True),
    Column("patient_ref", String(100), primary_key=True),
    Column("learner_key", String(40), primary_key=True),
    Column("rank", Integer, nullable=False),
    Column("exact", Boolean, nullable=False),  # name and date of birth agree (the match hash)
    Column("score", Float),  # None: either side has no match keys yet
    Column("agreement", String(200)),  # e.g. 'surname=exact forename=disagree dob=exact sex=agree postcode=exact'
    Column("updated_run", String(250), nullable=False),
)

trust_referrals = Table(
    "trust_referrals",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("referral_ref", String(100), primary_key=True),  # ServiceRequest/<id>
    Column("patient_ref", String(100), nullable=False, index=True),
    Column("fhir_status", String(20), nullable=False),
    Column("received", Date),
    Column("team_type", String(10)),
    Column("rejection_reason", String(10)),
    Column("closure_reason", String(10)),
    Column("transition", Boolean, nullable=False, default=False),
    Column("moved_area", Boolean, nullable=False, default=False),
    Column("performer_ref", String(100)),
    Column("version_id", String(64)),
    Column("updated_run", String(250), nullable=False),
)

trust_episodes = Table(
    "trust_episodes",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("episode_ref", String(100), primary_key=True),
    Column("referral_ref", String(100), nullable=False, index=True),
    Column("fhir_status", String(20), nullable=False),
    Column("start", Date),
    Column("end", Date),
    Column("care_manager_ref", String(100)),
    Column("updated_run", String(250), nullable=False),
)

trust_appointments = Table(
    "trust_appointments",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("appointment_ref", String(100), primary_key=True),
    Column("referral_ref", String(100), nullable=False, index=True),
    Column("fhir_status", String(20), nullable=False),
    Column("start", Date),
    Column("updated_run", String(250), nullable=False),
)

trust_practitioners = Table(
    "trust_practitioners",
    metadata,
    Column("trust_ods", String(10), primary_key=True),
    Column("role_ref", String(100), primary_key=True),
    Column("name", String(200)),
    Column("role", String(200)),
    Column("email", String(200)),
    Column("updated_run", String(250), nullable=False),
)

watermarks = Table(
    "watermarks",
    metadata,
    Column("source", String(100), primary_key=True),
    Column("resource_type", String(50), primary_key=True),
    Column("value", String(64), nullable=False),
    # versions read inside the pull's overlap window ("id|versionId" -> lastUpdated): read again, they are skipped
    Column("seen", JSON(none_as_null=True), nullable=True),
)

outbox = Table(
    "outbox",
    metadata,
    Column("destination", String(100), primary_key=True),
    Column("resource_ref", String(120), primary_key=True),
    Column("subject_key", String(40), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("status", String(12), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(500)),
    Column("run_id", String(250), nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("run_id", String(250), nullable=False, index=True),
    Column("dag_id", String(100), nullable=False),
    Column("direction", String(20), nullable=False),
    Column("recipient", String(100), nullable=False),
    Column("subject_key", String(40), nullable=False, index=True),
    Column("data_items", String(500), nullable=False),
    Column("agreement_id", String(100), nullable=False),
    Column("agreement_version", String(20), nullable=False),
    Column("consent_id", String(200), nullable=False),
    Column("mapping_version", String(64), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    # Entry format 2 (migration 0006) also hashes these four; format 1 entries (before it) have them NULL.
    Column("entry_format", Integer, nullable=False, server_default="1"),
    Column("task_id", String(250)),  # the Airflow task that disclosed ('' outside a task)
    Column("key_version", String(20)),  # which pseudonym key made subject_key (schoolslink.keys.key_version)
    # canonical JSON {item: SHA-256(salt || value text)} of the values sent ('' when none were given)
    Column("commitments", Text),
)

ledger_values = Table(
    "ledger_values",
    metadata,
    # The salt and value behind each commitment of a ledger entry: personal data, erased by retention
    # (schoolslink/retention.py sets salt and value NULL and erased_at); the entry stays verifiable without them.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),  # ledger.seq
    Column("item", String(100), primary_key=True),
    Column("salt", String(32)),  # 16 random bytes, hex
    Column("value", Text),  # the value text committed to (schoolslink.ledger.value_text)
    Column("erased_at", DateTime(timezone=True)),
)

ledger_checkpoints = Table(
    "ledger_checkpoints",
    metadata,
    # The RFC 6962 tree head over the first tree_size ledger entries when a run finished; the same document is
    # written to the external checkpoint store (connectors/storage/checkpoints.py), which verify compares.
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("run_id", String(250), primary_key=True),
    Column("root", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # the roots of the perfect subtrees at tree_size (JSON list of hex, largest first), so the next checkpoint
    # reads only the entries after this one
    Column("frontier", Text, nullable=False),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("source", String(300), nullable=False),  # storage key of the input
    Column("record", String(200)),  # 'pupil#17' or 'ServiceRequest/<id>': a position or reference, never data
    Column("field", String(200)),
    Column("reason", Text, nullable=False),
)

feed_rows = Table(
    "feed_rows",
    metadata,
    Column("school_urn", String(10), primary_key=True),
    Column("learner_key", String(40), primary_key=True),
    Column("trust_ods", String(10), primary_key=True),
    Column("content_hash", String(64), nullable=False),
    Column("feed_date", Date, nullable=False),
    # the row as the school last had it before feed_date, so a same-night re-run marks changes the same way
    Column("prev_hash", String(64)),
    Column("prev_date", Date),
)

learner_events = Table(
    "learner_events",
    metadata,
    # A learner left, moved school or came back: marked, never deleted, and recorded here so governance and
    # delivery can act on it (a moved learner's old school stops seeing them; nothing more is sent for a
    # leaver). Keys and URNs only.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("learner_key", String(40), nullable=False, index=True),
    Column("kind", String(10), nullable=False),  # left | moved | returned | renumbered
    # renumbered: the export states this learner's UPN as a FormerUPN of `other_key`'s learner
    Column("other_key", String(40)),
    Column("from_urn", String(10)),
    Column("to_urn", String(10)),
    Column("source", String(300), nullable=False),  # what told us: a storage key, or 'full export roll'
    Column("run_id", String(250), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

source_ids = Table(
    "source_ids",
    metadata,
    # A MIS's own record id (e.g. a Wonde student id), keyed, to the learner it belongs to: how a deletion
    # that names only the source's id is resolved to a learner.
    Column("source_key", String(40), primary_key=True),  # pseudonym of (source, school, id)
    Column("learner_key", String(40), nullable=False),
    Column("updated_run", String(250), nullable=False),
)

mesh_messages = Table(
    "mesh_messages",
    metadata,
    # One MESH message we send (direction 'out') or took from our inbox ('in'): ids, hashes, sizes and times,
    # never the body, the subject or anything about a pupil. An outgoing row is written before the send, with
    # the body sealed in the MESH spool (schoolslink/pipeline/mesh_exchange.py), so a failed or interrupted
    # send is retried by the next run and one with a message id is never sent again.
    Column("local_id", String(36), primary_key=True),  # our uuid4, sent as Mex-LocalID: never pupil data
    Column("direction", String(3), nullable=False),  # out | in
    Column("mailbox", String(20), nullable=False),  # our mailbox
    Column("peer_mailbox", String(20), nullable=False),  # the recipient (out) or the sender (in)
    Column("workflow_id", String(100), nullable=False),
    Column("content_sha256", String(64), nullable=False),
    Column("byte_count", BigInteger, nullable=False),
    # out: pending | sent | delivered | dead_letter;  in: received (landed) | acknowledged
    Column("status", String(12), nullable=False),
    Column("message_id", String(100)),  # MESH's id, once MESH gave one (unique per direction: see below)
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(500)),  # operation, mailbox and status only (connectors/mesh/errors.py)
    Column("reason", String(500)),  # why a dead letter is one
    Column("run_id", String(250)),  # the run that queued (out) or received (in) it
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),  # out: MESH showed it acknowledged; in: we acknowledged it
    Column("dead_at", DateTime(timezone=True)),
    Index("ix_mesh_messages_direction_mailbox_status", "direction", "mailbox", "status"),
    # One row per message each way: never two sends recorded under one id, never one arrival recorded twice.
    # (Both ways can hold the same id when two of our mailboxes talk to each other.)
    Index("uq_mesh_messages_direction_message_id", "direction", "message_id", unique=True),
)

hl7_messages = Table(
    "hl7_messages",
    metadata,
    # One HL7v2 message as the MLLP listener received it (connectors/hl7v2/store.py, docs/mllp.md), written and
    # committed before its acknowledgment was sent. The body is sealed (AES-256-GCM under the seal key, kept outside
    # the database): never plain. A message refused at the door (AE/AR) is kept too, as 'quarantined'.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("sender", String(200)),  # MSH-3^MSH-4 as received (a longer one: 'sha256:' + its hash); None: no MSH
    Column("control_id", String(200)),  # MSH-10 (likewise bounded); None: the message had none
    Column("message_type", String(100)),  # MSH-9 type^trigger, e.g. 'ADT^A08'
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),  # the message, sealed
    Column("status", String(12), nullable=False),  # received | applied | quarantined
    Column("reason", Text),  # why it was quarantined: a field and a rule, never a value
    Column("ack_code", String(2), nullable=False),  # AA | AE | AR: what the sender was told
    Column("ack_error", String(3)),  # the ERR-3 code (HL7 table 0357) sent with AE/AR
    Index("ix_hl7_messages_status", "status", "id"),
    # A message is stored once: the same MSH-10 from the same sender is acknowledged again, never stored again.
    Index("uq_hl7_messages_sender_control_id", "sender", "control_id", unique=True),
)

# The school portal (migration 0008; docs/portal.md): its accounts, sessions and its own audit log. Staff data
# only: nothing here is about a pupil (pupil page views and downloads go to the ledger).

portal_users = Table(
    "portal_users",
    metadata,
    # One person who may sign in: a local account (password + TOTP) or one that signs in through OIDC.
    Column("user_id", String(40), primary_key=True),  # 'u-' + random hex: the ledger's recipient 'portal:<id>'
    Column("email", String(254), nullable=False, unique=True),  # lower case
    Column("role", String(20), nullable=False),  # dsl | smhl | school_admin | link_worker
    Column("organisations", JSON, nullable=False),  # school URNs (school roles) or trust ODS codes (link_worker)
    Column("auth", String(10), nullable=False),  # local | oidc
    Column("password_hash", String(200)),  # argon2id, local accounts only
    Column("totp_sealed", Text),  # the TOTP secret, AES-256-GCM under the seal key (kept outside the database)
    Column("totp_last_step", BigInteger),  # the last TOTP time step accepted: no code is accepted twice
    Column("oidc_issuer", String(300)),
    Column("oidc_subject", String(300)),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_attempts", Integer, nullable=False, default=0),  # failed sign-ins in a row
    Column("locked_until", DateTime(timezone=True)),  # sign-in refused until then (too many failures)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(60), nullable=False),  # 'cli', 'oidc' or the admin's user id
    Column("last_sign_in_at", DateTime(timezone=True)),
    Index("uq_portal_users_oidc_issuer", "oidc_issuer", "oidc_subject", unique=True),
)

portal_sessions = Table(
    "portal_sessions",
    metadata,
    # A browser's sign-in in progress ('login') or signed-in session ('session'). The cookie holds a random
    # token; only its SHA-256 is kept, so a copy of this table opens no session.
    Column("session_hash", String(64), primary_key=True),
    Column("kind", String(10), nullable=False),  # login | session
    Column("user_id", String(40)),
    Column("csrf_token", String(64), nullable=False),  # the synchroniser token every POST form carries
    Column("role", String(20)),
    Column("organisations", JSON),  # as signed in (OIDC: from the organisation claim)
    Column("pending", JSON),  # a sign-in under way: the user awaiting a TOTP code, or OIDC state, nonce, verifier
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),  # idle expiry counts from here
    Column("expires_at", DateTime(timezone=True), nullable=False),  # absolute expiry
    Column("ended_at", DateTime(timezone=True)),  # signed out or replaced
    Index("ix_portal_sessions_user_id", "user_id"),
)

portal_events = Table(
    "portal_events",
    metadata,
    # The portal's own audit log: sign-ins, sign-outs, refused requests (another school's page: 404), account
    # changes. Never pupil data, a pupil id, a password or a code. What was shown about a pupil is in the ledger.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user_id", String(40)),
    Column("event", String(30), nullable=False),
    Column("organisation", String(10)),  # the school URN or trust ODS code the request named, if any
    Column("detail", String(300)),
    Index("ix_portal_events_at", "at"),
)

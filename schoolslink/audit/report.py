"""The auditor's run report: one self-contained, accessible HTML page about one DAG run.

What it shows, all from the state store and the run's work folder, never from a pupil's record:

* the run: DAG, run id, start, end, duration and state (from the `runs` row its last task writes);
* what was read, the refusals by consent, by agreement and by the case rules, and every other count, from the
  run's summary (`runs.summary`: counts and reasons only, by design);
* what was quarantined and why: the run's `quarantine` rows (source, record reference, field, reason: positions
  and references, never values);
* what was delivered to whom: the run's ledger entries counted by recipient and by data item (counts of entries
  and of distinct children; never a subject key);
* validation: the Great Expectations results the run kept (`work/<run>/chunk-*/gx/*.json`, already cut to counts
  and record positions by schoolslink/validation.py), pass or fail per suite;
* timings: the run's duration, and per task when the summary records them;
* the ledger check (`schoolslink.ledger.verify`) at the time the report was made.

The page makes no request of its own (inline CSS, no script, no images) and is checked with axe-core in tests.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select

from schoolslink.audit.query import iso, reflect, utc
from schoolslink.audit.runinfo import UnknownRunError, run_is_known, run_row

LONDON = ZoneInfo("Europe/London")
TEMPLATES = Path(__file__).resolve().parent / "templates"
SUMMARY_TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "summary"  # the stylesheet it shares

# What was read: summary key -> label (keys absent from a run's summary are not shown).
READ_LABELS: dict[str, str] = {
    "files": "School exports read",
    "read": "Pupil records read from school exports",
    "accepted": "Pupil records accepted",
    "learners": "Learners stored or updated",
    "consent_records": "Consent records read",
    "with_consent": "Pupils with an active consent",
    "wonde_pulls_landed": "Wonde pulls landed",
    "mesh_received": "MESH messages received",
    "linked_now": "Pupils linked to a trust patient in this run",
    "to_review": "Records sent to the identity review queue",
    "learners_mapped": "Pupils whose school context was mapped",
    "outbound": "School context resources prepared for trusts",
    "feeds_written": "School feeds written",
    "feed_rows": "Rows in school feeds",
}
PULLED_PREFIX = "pulled_"
PULLED_NOT_READ = frozenset({"pulled_own_writes_skipped", "pulled_overlap_already_seen", "pulled_quarantined",
                             "pulled_types_failed"})

# Refusals: summary key -> (direction, ground, reason in plain words).
REFUSALS: dict[str, tuple[str, str, str]] = {
    "refused_by_consent": ("School to trust", "Consent",
                           "No active consent covers the data items (none given, refused, withdrawn or expired)"),
    "stopped_at_delivery_consent": ("School to trust", "Consent",
                                    "Consent no longer covered the items when checked again just before delivery"),
    "feed_refused_by_consent": ("Trust to school", "Consent",
                                "No active consent lets the trust's news about the child reach the school"),
    "refused_no_agreement": ("School to trust", "Agreement",
                             "No data sharing agreement in force between the school and the trust for this purpose"),
    "stopped_at_delivery_agreement": ("School to trust", "Agreement",
                                      "The agreement no longer covered the items just before delivery"),
    "feed_no_agreement": ("Trust to school", "Agreement",
                          "No data sharing agreement in force between the trust and the school"),
    "not_sent_sensitive_case": ("School to trust", "Case rules",
                                "Looked-after, adopted, child-protection or do-not-tell-parent case without a link a "
                                "person confirmed knowing the case"),
    "stopped_at_delivery_link_or_flags": ("School to trust", "Case rules",
                                          "The link was withdrawn or the case changed before delivery"),
    "not_sent_left_school": ("School to trust", "Case rules", "The pupil has left the school"),
    "refused_by_server": ("School to trust", "Receiving server", "Refused by the trust's FHIR server"),
}
_OTHER_REFUSAL = re.compile(r"(consent|agreement).*(refused|stopped|no_)|(refused|stopped|no_).*(consent|agreement)")

# Quarantine totals: summary key -> label.
QUARANTINE_LABELS: dict[str, str] = {
    "quarantined": "Pupil records quarantined",
    "refused_files": "Whole files refused",
    "consent_registers_refused": "Consent registers refused",
    "consent_rows_quarantined": "Consent register rows quarantined",
    "pulled_quarantined": "Trust records quarantined",
    "mapping_errors": "Records the mapping could not map",
}
WARNING_SEVERITIES = frozenset({"warning", "info"})
TIMING_KEYS = ("timings", "task_timings", "task_seconds")
ITEM_LABELS = {"retraction": "retraction (what was sent under a wrong link, re-sent as entered in error)"}


@dataclass(frozen=True, slots=True)
class Count:
    label: str
    n: int
    key: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    direction: str
    ground: str
    reason: str
    n: int


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    source: str
    record: str
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class Delivery:
    recipient: str
    direction: str
    item: str  # "" for a recipient's total
    entries: int
    children: int


@dataclass(frozen=True, slots=True)
class Expectation:
    name: str  # "expect_...(column)"
    severity: str
    reason: str
    records: int  # records that failed it, summed over batches


@dataclass(frozen=True, slots=True)
class SuiteResult:
    suite: str
    success: bool  # as GX put it: False when any expectation failed, a warning included
    batches: int
    records: int
    expectations: int
    failed: list[Expectation]

    @property
    def passed(self) -> bool:
        """No critical expectation failed (a warning tells the school and keeps the record: schoolslink/validation)."""
        return all(e.severity in WARNING_SEVERITIES for e in self.failed) and (self.success or bool(self.failed))

    @property
    def result(self) -> str:
        if not self.passed:
            return "Failed"
        return "Passed with warnings" if self.failed else "Passed"


@dataclass(frozen=True, slots=True)
class Timing:
    label: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A Merkle tree head over the first `tree_size` ledger entries, made when the run finished."""

    tree_size: int
    root: str
    created_at: datetime | None


@dataclass(slots=True)
class RunReport:
    """Everything the page shows: counts, reasons, references and times; nothing about a child."""

    run_id: str
    dag_id: str
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    generated_at: datetime
    read: list[Count] = field(default_factory=list)
    quarantine_totals: list[Count] = field(default_factory=list)
    quarantine_rows: list[QuarantineRow] = field(default_factory=list)
    quarantine_reasons: list[Count] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)  # per recipient (item "")
    delivered_items: list[Delivery] = field(default_factory=list)  # per recipient and data item
    ledger_entries: int = 0
    ledger_children: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    validation: list[SuiteResult] = field(default_factory=list)
    validation_flags: list[Count] = field(default_factory=list)  # gx_* numbers the summary recorded
    timings: list[Timing] = field(default_factory=list)
    all_counts: list[Count] = field(default_factory=list)
    verify_ok: bool = False
    verify_entries: int = 0
    verify_message: str = ""
    verify_problems: list[str] = field(default_factory=list)  # every problem verify found, the first first
    checkpoints: list[Checkpoint] = field(default_factory=list)  # the ledger checkpoints this run made
    summary_recorded: bool = False

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def refused_total(self) -> int:
        return sum(r.n for r in self.refusals if r.ground in ("Consent", "Agreement"))

    def to_json(self) -> dict[str, Any]:
        """What `audit report --json` prints beside the file's path: counts only."""
        return {
            "run_id": self.run_id, "dag_id": self.dag_id, "state": self.state,
            "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
            "duration_seconds": self.duration_seconds,
            "read": {c.key: c.n for c in self.read},
            "quarantine_rows": len(self.quarantine_rows),
            "refused": [{"direction": r.direction, "ground": r.ground, "reason": r.reason, "count": r.n}
                        for r in self.refusals],
            "ledger_entries": self.ledger_entries, "children": self.ledger_children,
            "recipients": {d.recipient: d.entries for d in self.deliveries},
            "validation": {s.suite: s.result for s in self.validation},
            "verify": {"ok": self.verify_ok, "entries": self.verify_entries, "message": self.verify_message,
                       "problems": self.verify_problems},
            "checkpoints": [{"tree_size": c.tree_size, "root": c.root, "created_at": iso(c.created_at)}
                            for c in self.checkpoints],
        }


# -- collecting ---------------------------------------------------------------------------------------------------


def _is_count(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _humanise(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _read_counts(summary: dict[str, Any]) -> list[Count]:
    out = [Count(label, int(summary[k]), k) for k, label in READ_LABELS.items() if _is_count(summary.get(k))]
    for k in sorted(summary):
        if k.startswith(PULLED_PREFIX) and k not in PULLED_NOT_READ and _is_count(summary[k]):
            out.append(Count(f"Read from the trust's FHIR server: {k.removeprefix(PULLED_PREFIX)}", int(summary[k]),
                             k))
    return out


def _refusals(summary: dict[str, Any]) -> list[Refusal]:
    out = [Refusal(d, g, why, int(summary[k])) for k, (d, g, why) in REFUSALS.items() if _is_count(summary.get(k))]
    for k in sorted(summary):
        if k not in REFUSALS and _OTHER_REFUSAL.search(k) and _is_count(summary[k]):
            out.append(Refusal("", "Other", _humanise(k), int(summary[k])))
    return out


def _timings(summary: dict[str, Any]) -> list[Timing]:
    for name in TIMING_KEYS:
        t = summary.get(name)
        if isinstance(t, dict):
            return [Timing(str(k), float(v)) for k, v in t.items() if _is_count(v)]
    return []


def _quarantine(conn: Connection, run_id: str) -> list[QuarantineRow]:
    t = reflect(conn, "quarantine")
    order = t.c["id"] if "id" in t.c else t.c.run_id
    rows = conn.execute(select(t).where(t.c.run_id == run_id).order_by(order)).mappings()
    return [QuarantineRow(str(r.get("source") or ""), str(r.get("record") or ""), str(r.get("field") or ""),
                          str(r.get("reason") or "")) for r in rows]


def _deliveries(conn: Connection, run_id: str, report: RunReport) -> None:
    t = reflect(conn, "ledger")
    q = select(t.c.seq, t.c.recipient, t.c.direction, t.c.subject_key, t.c.data_items).where(t.c.run_id == run_id)
    per_recipient: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0])
    children: dict[tuple[str, str], set[str]] = defaultdict(set)
    item_entries: dict[tuple[str, str, str], int] = defaultdict(int)
    item_children: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    everyone: set[str] = set()
    seqs: list[int] = []
    for seq, recipient, direction, subject, items in conn.execute(q):
        seqs.append(int(seq))
        everyone.add(subject)
        per_recipient[(recipient, direction)][0] += 1
        children[(recipient, direction)].add(subject)
        for item in [i for i in str(items or "").split(",") if i] or ["(none)"]:
            item_entries[(recipient, direction, item)] += 1
            item_children[(recipient, direction, item)].add(subject)
    report.ledger_entries = len(seqs)
    report.ledger_children = len(everyone)
    report.first_seq = min(seqs) if seqs else None
    report.last_seq = max(seqs) if seqs else None
    report.deliveries = [Delivery(r, d, "", n[0], len(children[(r, d)])) for (r, d), n in sorted(per_recipient.items())]
    report.delivered_items = [Delivery(r, d, ITEM_LABELS.get(i, i), n, len(item_children[(r, d, i)]))
                              for (r, d, i), n in sorted(item_entries.items())]


def gx_result_files(run_id: str) -> list[Path]:
    """The sanitised Great Expectations results the run kept in its work folder."""
    from schoolslink.settings import work_dir
    from schoolslink.workstore import run_slug

    root = work_dir() / run_slug(run_id)
    return sorted(root.glob("chunk-*/gx/*.json")) if root.is_dir() else []


def _validation(run_id: str) -> list[SuiteResult]:
    suites: dict[str, dict[str, Any]] = {}
    for path in gx_result_files(run_id):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        name = str(doc.get("suite_name") or path.stem.rsplit("-", 1)[0])
        s = suites.setdefault(name, {"success": True, "batches": 0, "records": 0, "expectations": 0, "failed": {}})
        s["batches"] += 1
        s["success"] = s["success"] and bool(doc.get("success"))
        stats = doc.get("statistics") or {}
        s["expectations"] = max(s["expectations"], int(stats.get("evaluated_expectations") or 0))
        counts = [int((r.get("result") or {}).get("element_count") or 0) for r in doc.get("results") or []]
        s["records"] += max(counts, default=0)
        for r in doc.get("results") or []:
            if r.get("success"):
                continue
            cfg = r.get("expectation_config") or {}
            kwargs = cfg.get("kwargs") or {}
            label = f"{cfg.get('type', 'expectation')}({kwargs.get('column', '')})"
            raised = bool((r.get("exception_info") or {}).get("raised_exception"))
            reason = str((cfg.get("meta") or {}).get("reason") or "") + (" (raised an error)" if raised else "")
            prev = s["failed"].get(label)
            n = int((r.get("result") or {}).get("unexpected_count") or 0)
            s["failed"][label] = Expectation(label, str(cfg.get("severity") or "critical"), reason,
                                             n + (prev.records if prev else 0))
    return [SuiteResult(name, s["success"], s["batches"], s["records"], s["expectations"],
                        sorted(s["failed"].values(), key=lambda e: e.name)) for name, s in sorted(suites.items())]


def _checkpoints(conn: Connection, run_id: str) -> list[Checkpoint]:
    """The run's rows in `ledger_checkpoints`, where the store has that table."""
    from schoolslink.audit.query import has_table

    if not has_table(conn, "ledger_checkpoints"):
        return []
    t = reflect(conn, "ledger_checkpoints")
    if not {"run_id", "tree_size", "root"} <= set(t.c.keys()):
        return []
    rows = conn.execute(select(t).where(t.c.run_id == run_id).order_by(t.c.tree_size)).mappings()
    return [Checkpoint(int(r["tree_size"]), str(r["root"]),
                       utc(r["created_at"]) if r.get("created_at") is not None else None) for r in rows]


def _state(row: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    if row is not None and row.get("state"):
        return str(row["state"])
    if summary.get("state"):
        return str(summary["state"])
    if row is not None and row.get("finished_at") is not None:
        return "finished"
    return "not finished (no end recorded: still running, or stopped before its last task)"


def build_report(conn: Connection, run_id: str, now: datetime) -> RunReport:
    """The run's report facts. UnknownRunError when the store has never heard of the run."""
    from schoolslink import ledger

    if not run_is_known(conn, run_id):
        raise UnknownRunError(run_id)
    row = run_row(conn, run_id)
    raw = (row or {}).get("summary")
    summary: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    ledger_t = reflect(conn, "ledger")
    dag_id = str((row or {}).get("dag_id") or conn.execute(
        select(ledger_t.c.dag_id).where(ledger_t.c.run_id == run_id).limit(1)).scalar() or "unknown")
    started, finished = (row or {}).get("started_at"), (row or {}).get("finished_at")
    report = RunReport(run_id=run_id, dag_id=dag_id, state=_state(row, summary),
                       started_at=utc(started) if started is not None else None,
                       finished_at=utc(finished) if finished is not None else None,
                       generated_at=now.astimezone(UTC), summary_recorded=row is not None and bool(summary))
    report.read = _read_counts(summary)
    report.refusals = _refusals(summary)
    report.quarantine_totals = [Count(label, int(summary[k]), k) for k, label in QUARANTINE_LABELS.items()
                                if _is_count(summary.get(k))]
    reasons = summary.get("quarantine_reasons")
    if isinstance(reasons, dict):
        report.quarantine_reasons = [Count(str(k), int(v)) for k, v in reasons.items() if _is_count(v)]
    report.quarantine_rows = _quarantine(conn, run_id)
    _deliveries(conn, run_id, report)
    report.validation = _validation(run_id)
    report.validation_flags = [Count(_humanise(k), int(v), k) for k, v in sorted(summary.items())
                               if k.startswith("gx_") and _is_count(v)]
    report.timings = _timings(summary)
    report.all_counts = [Count(_humanise(k), int(v), k) for k, v in sorted(summary.items()) if _is_count(v)]
    v = ledger.verify(conn)
    report.verify_ok = bool(getattr(v, "ok", False))
    report.verify_entries = int(getattr(v, "entries", 0) or 0)
    report.verify_message = str(getattr(v, "message", ""))
    report.verify_problems = [str(getattr(p, "message", p)) for p in getattr(v, "problems", ()) or ()]
    report.checkpoints = _checkpoints(conn, run_id)
    return report


# -- rendering ----------------------------------------------------------------------------------------------------


def when(at: datetime | None) -> str:
    """'26 November 2026, 15:21:52 GMT' (UK time), or 'not recorded'."""
    if at is None:
        return "not recorded"
    local = at.astimezone(LONDON)
    return f"{local.day} {local:%B %Y, %H:%M:%S %Z}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded (the run has no end time)"
    if seconds < 60:
        return f"{seconds:.1f} seconds"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def render_report(report: RunReport) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader([TEMPLATES, SUMMARY_TEMPLATES]),
                      autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(when=when, duration=duration, iso=iso)
    return env.get_template("report.html.j2").render(r=report)


def write_report(run_id: str, out: Path, now: datetime | None = None) -> RunReport:
    """Build the run's report and write it to `out` atomically. UnknownRunError for an unknown run."""
    from schoolslink.store.db import engine

    with engine().connect() as conn:
        report = build_report(conn, run_id, now or datetime.now(UTC))
    html = render_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return report

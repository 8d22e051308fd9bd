"""FHIR R4 AuditEvent export of the ledger, for trusts that keep their audit trail in FHIR.

One AuditEvent per ledger entry (docs/audit.md has the mapping table):

* type DICOM 110106 "Export" (data left schoolslink for another organisation); action "R" for a disclosure of
  data items, "E" for an entry that records an act rather than data (a retraction of what was sent under a wrong
  link, a withdrawal or move notice); outcome "0"; recorded = the entry's time.
* agents: schoolslink, the sender (requestor; policy = the agreement), and the recipient (a trust by ODS code, a
  school by URN, or a portal user).
* source: observer schoolslink, an application server.
* entities: the subject as its keyed pseudonym only (learner or patient key: never an NHS number or UPN), and
  the disclosure itself, identified by the ledger entry hash, with the data items, agreement, consent, mapping
  version, content hash, run and task as details.

Ids are deterministic (a hash of the entry hash), so exporting again addresses the same resources: a file export
is byte-for-byte the same Bundle of `PUT AuditEvent/<id>`, and a PUT to a trust's server first asks which of the
ids it holds (an AuditEvent is an immutable record of one entry) and sends only the others, so a re-export adds no
resource and no version (FHIR servers such as Medplum and HAPI add a version even for an identical PUT). Each
AuditEvent is checked with fhir.resources' R4B model before it is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Connection

from schoolslink.audit.query import LedgerQuery, run_query
from schoolslink.audit.runinfo import UnknownRunError, run_is_known
from schoolslink.constants import (
    LEARNER_KEY_SYSTEM,
    ODS_ORGANISATION_SYSTEM,
    OUR_META_SOURCE,
    OUR_TAG_CODE,
    OUR_TAG_SYSTEM,
    SCHOOL_URN_SYSTEM,
)

if TYPE_CHECKING:
    from connectors.fhir.client import FhirClient

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
# Our own identifier systems (no national one exists for these): documented in docs/audit.md.
SYSTEM_ID_SYSTEM = "https://fhir.schoolslink.org.uk/Id/system"
LEDGER_ENTRY_SYSTEM = "https://fhir.schoolslink.org.uk/Id/ledger-entry"
PATIENT_KEY_SYSTEM = "https://fhir.schoolslink.org.uk/Id/patient-key"
SUBJECT_KEY_SYSTEM = "https://fhir.schoolslink.org.uk/Id/subject-key"
PORTAL_USER_SYSTEM = "https://fhir.schoolslink.org.uk/Id/portal-user"
SCHOOLSLINK = "schoolslink"
_ID_SEARCH_CHUNK = 100
ACT_ITEMS = frozenset({"retraction", "withdrawal_notice", "move_notice"})  # entries that record an act, not data
# entity detail name -> the entry's column, in the order they are listed (empty values are left out)
DETAILS = (
    ("data_items", "data_items"), ("direction", "direction"), ("recipient", "recipient"),
    ("agreement", "agreement"), ("agreement_version", "agreement_version"), ("consent_id", "consent_id"),
    ("mapping_version", "mapping_version"), ("content_hash", "content_hash"), ("run_id", "run_id"),
    ("dag_id", "dag_id"), ("task_id", "task_id"), ("key_version", "key_version"), ("ledger_seq", "seq"),
)


class AuditEventExportError(RuntimeError):
    """The export could not be done as asked (no endpoint for the trust, a server refused entries): exit 1."""


def auditevent_id(entry_hash: str) -> str:
    """A FHIR id (<= 64 chars) fixed by the entry: the same entry always gives the same AuditEvent."""
    return "slae-" + hashlib.sha256(f"auditevent\x1f{entry_hash}".encode()).hexdigest()[:48]


def _who(recipient: str) -> dict[str, Any]:
    kind, sep, code = recipient.partition(":")
    if sep and kind.upper() == "ODS":
        return {"identifier": {"system": ODS_ORGANISATION_SYSTEM, "value": code}, "display": f"Trust {code}"}
    if sep and kind.upper() == "URN":
        return {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": code}, "display": f"School URN {code}"}
    user = code if sep and kind.lower() == "portal" else recipient
    return {"identifier": {"system": PORTAL_USER_SYSTEM, "value": user}, "display": f"Portal user {user}"}


def _subject_system(subject_key: str) -> str:
    return {"lrn": LEARNER_KEY_SYSTEM, "pat": PATIENT_KEY_SYSTEM}.get(subject_key[:3], SUBJECT_KEY_SYSTEM)


def _detail_text(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    return "" if v is None else str(v)


def action_of(data_items: Sequence[str]) -> str:
    """'E' for an entry that records an act (retraction, notice), else 'R' (data read out and sent)."""
    return "E" if data_items and set(data_items) <= ACT_ITEMS else "R"


def auditevent(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The AuditEvent of one ledger entry (as `schoolslink.audit.query.entry_of` gives it), checked with R4B."""
    from fhir.resources.R4B.auditevent import AuditEvent

    items = list(entry.get("data_items") or [])
    agreement = f"{entry['agreement']} version {entry['agreement_version']}"
    details = [{"type": name, "valueString": text} for name, col in DETAILS
               if (text := _detail_text(entry.get(col))).strip()]
    doc: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": auditevent_id(str(entry["entry_hash"])),
        "meta": {"source": OUR_META_SOURCE, "tag": [{"system": OUR_TAG_SYSTEM, "code": OUR_TAG_CODE}]},
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "action": action_of(items),
        "recorded": entry["at"],
        "outcome": "0",
        "outcomeDesc": f"Disclosed under agreement {agreement} and consent {entry['consent_id']}",
        "agent": [
            {"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
             "who": {"identifier": {"system": SYSTEM_ID_SYSTEM, "value": SCHOOLSLINK}, "display": SCHOOLSLINK},
             "requestor": True,
             "policy": [f"urn:schoolslink:agreement:{quote(str(entry['agreement']), safe='')}:"
                        f"{quote(str(entry['agreement_version']), safe='')}"]},
            {"type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
             "who": _who(str(entry["recipient"])),
             "requestor": False},
        ],
        "source": {
            "site": SCHOOLSLINK,
            "observer": {"identifier": {"system": SYSTEM_ID_SYSTEM, "value": SCHOOLSLINK}, "display": SCHOOLSLINK},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {"what": {"identifier": {"system": _subject_system(str(entry["subject_key"])),
                                     "value": str(entry["subject_key"])}},
             "type": {"system": AUDIT_ENTITY_TYPE, "code": "1", "display": "Person"},
             "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
             "description": "The child the disclosure was about, as a keyed pseudonym"},
            {"what": {"identifier": {"system": LEDGER_ENTRY_SYSTEM, "value": str(entry["entry_hash"])}},
             "type": {"system": AUDIT_ENTITY_TYPE, "code": "2", "display": "System Object"},
             "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
             "name": f"ledger entry {entry['seq']}",
             "description": "Data items: " + (", ".join(items) or "none"),
             "detail": details},
        ],
    }
    AuditEvent.model_validate(doc)  # raises pydantic's ValidationError: a fault here, never the data's
    return doc


def auditevents(conn: Connection, run_id: str | None = None, recipient: str | None = None) -> list[dict[str, Any]]:
    """The AuditEvents of the run's ledger entries (every entry when run_id is None), optionally only those to
    one recipient. UnknownRunError for a run the store has never heard of."""
    if run_id is not None and not run_is_known(conn, run_id):
        raise UnknownRunError(run_id)
    result = run_query(conn, LedgerQuery(run_id=run_id, recipient=recipient))
    return [auditevent(e) for e in result.entries]


def batch_bundle(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A FHIR batch Bundle of `PUT AuditEvent/<id>`."""
    return {"resourceType": "Bundle", "type": "batch", "entry": [
        {"fullUrl": f"AuditEvent/{r['id']}", "resource": dict(r),
         "request": {"method": "PUT", "url": f"AuditEvent/{r['id']}"}} for r in resources]}


@dataclass(slots=True)
class ExportResult:
    run_id: str | None
    count: int
    out: Path | None = None
    trust: str | None = None
    written: int = 0
    already_held: int = 0  # on the trust's server from an earlier export: not PUT again
    failed: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "auditevents": self.count,
                "out": str(self.out) if self.out else None, "trust": self.trust, "written": self.written,
                "already_held": self.already_held, "failed": self.failed, "messages": self.messages}


def export_auditevents(run_id: str | None, out_file: Path) -> ExportResult:
    """Write the AuditEvents of `run_id` (every ledger entry when None) as one FHIR batch Bundle JSON file,
    atomically. UnknownRunError for an unknown run."""
    from schoolslink.store.db import engine

    with engine().connect() as conn:
        resources = auditevents(conn, run_id)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    tmp.write_text(json.dumps(batch_bundle(resources), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_file)
    return ExportResult(run_id, len(resources), out=out_file, written=len(resources))


def _already_held(client: FhirClient, ids: Sequence[str]) -> set[str]:
    """Which of our AuditEvent ids the server holds already. An AuditEvent is a record of one ledger entry and its id
    is fixed by the entry, so one that is there is the same record: not PUT again (a server such as Medplum or HAPI
    would add a version for an identical PUT)."""
    held: set[str] = set()
    for i in range(0, len(ids), _ID_SEARCH_CHUNK):
        part = ids[i : i + _ID_SEARCH_CHUNK]
        found = client.search("AuditEvent", {"_id": ",".join(part), "_count": str(len(part)), "_elements": "id"})
        held.update(str(r.get("id")) for r in found if r.get("resourceType") == "AuditEvent")
    return held & set(ids)


def put_auditevents(run_id: str | None, trust_ods: str) -> ExportResult:
    """PUT the AuditEvents of what was disclosed to the trust (`ODS:<trust>` entries only: a trust's audit
    server never learns what went to schools) to its FHIR server, in batch Bundles by id."""
    from connectors.fhir.errors import FhirError
    from schoolslink.endpoints import fhir_endpoint
    from schoolslink.store.db import engine

    ods = trust_ods.strip().upper()
    endpoint = fhir_endpoint(ods)
    if endpoint is None:
        raise AuditEventExportError(f"no FHIR endpoint is configured for trust {ods} (docs/fhir-connector.md); "
                                    "write a file with --out instead")
    if endpoint.mesh_mailbox or endpoint.conditional_writes:
        raise AuditEventExportError(f"trust {ods} does not take PUT by id (it takes files over MESH or assigns its "
                                    "own ids); write a file with --out and send it")
    with engine().connect() as conn:
        resources = auditevents(conn, run_id, recipient=f"ODS:{ods}")
    res = ExportResult(run_id, len(resources), trust=ods)
    if not resources:
        return res
    try:
        with endpoint.client() as client:
            held = _already_held(client, [str(r["id"]) for r in resources])
            todo = [r for r in resources if r["id"] not in held]
            res.already_held = len(resources) - len(todo)
            results = client.put_batch(todo) if todo else []
    except FhirError as exc:
        res.failed = len(resources) - res.already_held
        res.messages.append(f"the trust's FHIR server failed the batch: {exc}")
        return res
    for r in results:
        if r.ok:
            res.written += 1
        else:
            res.failed += 1
            if len(res.messages) < 20:
                res.messages.append(f"AuditEvent/{r.id}: {r.status} {r.message or ''}".strip())
    return res


__all__ = ["ACT_ITEMS", "AuditEventExportError", "ExportResult", "UnknownRunError", "auditevent", "auditevent_id",
           "auditevents", "batch_bundle", "export_auditevents", "put_auditevents"]

"""The canonical model: the one shape every mapping reads or writes (DESIGN.md, "Canonical model").

Plain, typed, slotted dataclasses: cheap to build by the hundred thousand, easy to serialise to the
work store as JSON lines. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from typing import Any


class Direction(enum.StrEnum):
    SCHOOL_TO_TRUST = "school_to_trust"
    TRUST_TO_SCHOOL = "trust_to_school"


# The canonical data items each direction can carry: agreements list them, mappings tag nodes with them.
DATA_ITEMS: dict[Direction, frozenset[str]] = {
    Direction.SCHOOL_TO_TRUST: frozenset(
        {"attendance_percent", "sen_provision", "exclusions_fixed_count", "year_group"}),
    Direction.TRUST_TO_SCHOOL: frozenset(
        {"referral_received", "referral_status", "outcome_reason", "days_waiting", "next_appointment",
         "named_contact", "transition"}),
}
ALL_DATA_ITEMS = frozenset().union(*DATA_ITEMS.values())


class ConsentGiver(enum.StrEnum):
    PARENT = "parent"  # a person with parental responsibility
    YOUNG_PERSON = "young_person"  # 16-17 with capacity, or a competent (Gillick) younger child
    LOCAL_AUTHORITY = "local_authority"  # parental responsibility for a looked-after child


class ConsentDecision(enum.StrEnum):
    PERMIT = "permit"
    DENY = "deny"


class ConsentStatus(enum.StrEnum):
    ACTIVE = "active"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"


class ReferralStatus(enum.StrEnum):
    RECEIVED = "received"
    BEING_ASSESSED = "being_assessed"
    ACCEPTED_WAITING = "accepted_waiting"
    IN_TREATMENT = "in_treatment"
    NOT_ACCEPTED = "not_accepted"
    DISCHARGED = "discharged"
    MOVED_TO_ADULT_SERVICES = "moved_to_adult_services"
    MOVED_AREA = "moved_area"


class MatchMethod(enum.StrEnum):
    VERIFIED_NHS_NUMBER_NAME_DOB = "verified_nhs_number+name+dob"
    CONFIRMED_BY_REVIEWER = "confirmed_by_reviewer"
    # Identity matching (schoolslink/governance/scoring.py): a score at or above AUTO; the trust's verified number
    # equal to the one the school's MIS holds; or a PDS trace of the school's details finding the trust's number.
    SCORED_DEMOGRAPHICS = "scored_demographics"
    VERIFIED_NHS_NUMBER_SCHOOL_RECORD = "verified_nhs_number+school_record"
    PDS_TRACE = "pds_trace+verified_nhs_number"


class ReviewReason(enum.StrEnum):
    NO_CANDIDATE = "no pupil on the named school's roll has this name and date of birth"
    SEVERAL_CANDIDATES = "more than one pupil on the named school's roll has this name and date of birth"
    UNVERIFIED_NHS_NUMBER = "the trust's NHS number is not verified (status other than 01)"
    NO_SCHOOL_NAMED = "the trust's record names no school"
    SENSITIVE_CASE = "looked-after, adopted, child-protection or do-not-tell-parent case: needs a person"
    RESTRICTED = "restricted record (PDS R): never disclosed"
    ALREADY_LINKED = "the pupil is already linked to another patient of this trust: a person must decide"
    BECAME_SENSITIVE = "the link was suspended: the case became sensitive or restricted after it was made"
    # Scored matching (schoolslink/governance/scoring.py).
    LOW_SCORE = "the best pupil on the named school's roll agrees only in part (score below the auto-link threshold)"
    AMBIGUOUS = "more than one pupil on the named school's roll could be this child (e.g. twins): a person must choose"
    NHS_NUMBER_DISAGREES = ("the school's or PDS's NHS number for the best pupil is not the trust's: "
                            "a person must decide")


@dataclass(slots=True)
class LearnerFlags:
    looked_after: bool = False
    adopted: bool = False
    child_protection: bool = False
    restricted: bool = False
    do_not_tell_parent: bool = False

    @property
    def sensitive(self) -> bool:
        return (
            self.looked_after
            or self.adopted
            or self.child_protection
            or self.restricted
            or self.do_not_tell_parent
        )


@dataclass(slots=True)
class Learner:
    """A pupil or student as a school's MIS export states them."""

    upn: str
    school_urn: str
    surname: str
    forename: str
    dob: date
    sex: str  # M / F / U (CTF 25 Sex; CTF 24 Gender)
    former_upns: list[str] = field(default_factory=list)
    uln: str | None = None
    middle_names: str = ""
    preferred_surname: str = ""
    preferred_forename: str = ""
    postcode: str = ""
    address_lines: list[str] = field(default_factory=list)
    nhs_number: str | None = None
    nhs_number_status: str | None = None
    year_group: str = ""
    enrol_status: str = "C"
    sen_provision: str = "N"  # E EHC plan, K SEN support, N none (S retired)
    ethnicity: str = ""
    fsm_eligible: bool | None = None
    attendance_sessions_possible: int | None = None
    attendance_sessions_attended: int | None = None
    attendance_sessions_authorised_absence: int | None = None
    attendance_sessions_unauthorised_absence: int | None = None
    exclusions_fixed_count: int = 0
    exclusions_permanent: bool = False
    leaving_date: date | None = None
    contacts: list[dict[str, Any]] = field(default_factory=list)
    flags: LearnerFlags = field(default_factory=LearnerFlags)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shallow: contacts and lists are shared, not copied); far cheaper than asdict."""
        d = {name: getattr(self, name) for name in _LEARNER_FIELDS}
        d["flags"] = {name: getattr(self.flags, name) for name in _FLAG_FIELDS}
        return d


_LEARNER_FIELDS = tuple(f.name for f in fields(Learner))
_FLAG_FIELDS = tuple(f.name for f in fields(LearnerFlags))


@dataclass(slots=True)
class SchoolContext:
    """What a school may tell the trust about a learner: only what an agreement allows."""

    attendance_percent: float | None = None
    sen_provision: str | None = None
    exclusions_fixed_count: int | None = None
    year_group: str | None = None


@dataclass(slots=True)
class Consent:
    consent_id: str  # source record id: 'school:<urn>:<row>' or 'fhir:Consent/<id>'
    subject_key: str  # learner key (school side) or patient key (trust side)
    given_by: ConsentGiver
    decision: ConsentDecision
    directions: tuple[Direction, ...]
    purposes: tuple[str, ...]
    valid_from: date
    valid_to: date | None = None
    status: ConsentStatus = ConsentStatus.ACTIVE
    withdrawn_on: date | None = None
    data_items: tuple[str, ...] | None = None  # None: every item the agreement allows
    school_urn: str | None = None  # the school the consent is about sharing with (None: any school)


@dataclass(slots=True)
class PatientLink:
    learner_key: str
    patient_key: str  # keyed pseudonym of the NHS number
    trust_ods: str
    patient_ref: str  # 'Patient/<trust id>' on the trust's server
    method: MatchMethod
    confidence: float
    confirmed_by: str | None = None
    withdrawn: bool = False


@dataclass(slots=True)
class NamedContact:
    name: str
    role: str
    email: str


@dataclass(slots=True)
class Referral:
    referral_id: str  # 'ServiceRequest/<id>' on the trust's server
    trust_ods: str
    patient_key: str
    team_type: str | None
    received: date | None
    triaged: date | None
    first_contact: date | None
    status: ReferralStatus
    outcome_reason: str | None = None  # MHSDS rejection or closure reason code
    named_contact: NamedContact | None = None
    next_appointment: date | None = None
    transition: bool = False


@dataclass(slots=True)
class Disclosure:
    run_id: str
    dag_id: str
    direction: Direction
    recipient: str  # 'URN:<urn>' or 'ODS:<code>'
    subject_key: str
    data_items: tuple[str, ...]
    agreement_id: str
    agreement_version: str
    consent_id: str
    mapping_version: str
    content_hash: str
    # the Airflow task that disclosed (None: the ledger takes AIRFLOW_CTX_TASK_ID, which Airflow sets in a task)
    task_id: str | None = None
    # item -> the value sent, as canonical text (schoolslink.ledger.value_text): the ledger keeps a salted
    # commitment to each in the hashed entry and the salt and value apart (ledger_values), erased by retention.
    # None: no values to commit to (the entry is still chained and verifiable).
    values: Mapping[str, str] | None = None

"""A deterministic synthetic trust: school MIS exports, consent registers and the trust's FHIR data.

`synthesise(out_home, ...)` writes, under `out_home`:

- `landing/mis/<URN>/ctf-<URN>-<as_of>.xml`: one Common Transfer File per school, in the shape of
  docs/formats.md (CTF 25 with `<Sex>`; about one school in ten writes CTF 24 with `<Gender>`). LA 999 (the
  DfE test LA), Estab 1001+i, URN first_urn+i. Written streaming, one pupil at a time.
- `landing/consent/<URN>.csv`: the school's consent register (docs/formats.md columns), header always.
- `seed/fhir/bundle-NNNN.json`: FHIR R4 `batch` Bundles of at most 2000 `PUT Type/id` entries: the trust's
  Organization and PractitionerRoles, then per referred pupil a Patient, a ServiceRequest, an
  EpisodeOfCare (accepted referrals), Appointments (some) and a Consent naming the school (some). A
  pupil's resources always sit in one bundle, the Patient first.
- `synth-manifest.json`: counts, the school URNs, one `cases` entry per pupil with trust data (with what
  governance must conclude about it) and the leak `markers` (below). The same content is returned as a
  `SynthManifest`.

Nothing else is written (no agreements: they are fixed files in the repo); existing `seed/fhir/bundle-*.json`
files are replaced so a smaller run leaves no stale bundles.

Determinism: everything comes from one `random.Random(seed)` (per-school streams are seeded from it) and
`as_of`; no wall clock, no global random, no hash-order dependence. Same arguments, byte-identical files.

Names: pronounceable syllable names built by an injective function of an index (forenames: onset, vowel,
onset, vowel pair, coda, e.g. "Grodain"; surnames: onset, vowel, onset, vowel and an ending such as `ford` or
`wood`, in upper case as the CTF example has them, e.g. "LIVUWOOD"). A keyed bijection (a Feistel network)
spreads the indices over the name space. Ordinary pupils get a (surname, forename) pair that is unique across
the trust by construction (surnames and forenames on their own are shared, as in life); each referred pupil
gets a surname and a forename that no other person in the synthetic trust carries and that is no English
word, except the deliberate partners: the other twin (same surname and DOB) and the `name_dob_duplicate`
partner (same surname, forename and DOB). Each `cases` entry also carries `referral_status` (a
ReferralStatus value) so a feed test knows what the school should read.

Case kinds (`CASE_KINDS`; at least two of each at the default size) and the expectations governance must
reach (DESIGN.md "Governance rules"): a pupil is linked only when the Patient's NHS number is verified (01),
the Patient names the school, name + DOB agree with exactly one pupil on that roll, and no sensitive flag
(looked after, adopted, child protection, do-not-tell-parent, restricted) is set; data goes in a direction
only when linked and an active permit from the person who decides covers that direction and the purpose
`cypmhs-school-support`, with no refusal. Parent-given kinds use pupils who stay under 16 for at least 183
days after `as_of` (at 16 the young person decides); `young_person_consents` pupils are 16 or 17;
`do_not_tell_parent` records are the young person's own, marked competent.

Referral statuses in the FHIR data (read them back exactly this way; `schoolslink.status.derive` does):

| status | ServiceRequest.status | extensions on the ServiceRequest | EpisodeOfCare | Appointments |
|---|---|---|---|---|
| received | `draft` | team type | none | none |
| being_assessed | `active` | team type | none | maybe a future `booked` one |
| accepted_waiting | `active` | team type | `waitlist` | maybe a future `booked` one |
| in_treatment | `active` | team type | `active` | a past `fulfilled` (first contact), maybe a future `booked` |
| not_accepted | `revoked` | team type, rejection reason 01/02/03 | none | none |
| discharged | `completed` | team type, closure reason in 01 02 04 05 07 08 09 (never 03) | `finished` | none |
| moved_to_adult_services | `completed` | team type, closure reason 08, transition `true` | `finished` | none |
| moved_area | `completed` | team type, closure reason 03 (moved out of area) | `finished` | none |

So: transition extension true -> moved to adult services; else closure reason 03 -> moved area; else
revoked or a rejection reason -> not accepted; else completed or a closure reason -> discharged; else an
EpisodeOfCare `active` -> in treatment, `waitlist` -> accepted and waiting; else `active` -> being assessed;
else received. The transition extension appears only on completed referrals.

Extensions and code systems (constants below; code systems from `schoolslink.constants`):
`TEAM_TYPE_EXT` (valueCodeableConcept, system `MHSDS_TEAM_TYPE_SYSTEM`, e.g. F01), `REJECTION_REASON_EXT`
(valueCodeableConcept, `MHSDS_REJECTION_REASON_SYSTEM`), `CLOSURE_REASON_EXT` (valueCodeableConcept,
`MHSDS_CLOSURE_REASON_SYSTEM`), `TRANSITION_EXT` (valueBoolean). `reasonCode` carries the MHSDS primary
reason for referral (`PRIMARY_REASON_SYSTEM`) and a free-text clinical note. The ServiceRequest identifier
(`REFERRAL_ID_SYSTEM`) is the trust's own referral number, `RF` + 8 characters. Consent purposes use
`PURPOSE_SYSTEM`; a restricted Patient has `meta.security` code `R` in `CONFIDENTIALITY_SYSTEM`.

Markers (`synth-manifest.json` "markers": `{"value", "item", "where"}`): values that must never reach a side,
so a test can look for each in everything the pipeline writes toward that side. `where` is the side that must
never receive it: `nhs` (nothing we write to a trust: FHIR resources we own, MESH files, outbox rows bound
for a trust), `school` (feeds, portal pages, files for schools) or `both`. Every value is unique in the list
and occurs in the synthetic input only in the places listed, as a whole token (a run of letters and digits;
only `contact_phone` values hold a space and are matched as plain substrings):

| item | value | where | in the input |
|---|---|---|---|
| address | `MK` + 10 consonants, the Street of every referred pupil ("MKBCD... Road") | both | that pupil's CTF |
| parent_contact | `MK` + 10 consonants, the Surname of every referred pupil's first contact | both | that CTF |
| upn | the UPN of every referred pupil (a UPN never goes to the NHS) | nhs | CTF, consent CSV |
| surname, forename | the pupil's names, for every case with expect_school_to_trust false | nhs | CTF, the Patient |
| nhs_number | cases with a false direction: `both` if both are false, else that side | varies | Patient, maybe CTF |
| referral_reason | `MK` + 10 consonants inside every ServiceRequest.reasonCode.text | school | the bundle |
| appointment_note | `MK` + 10 consonants inside every Appointment.comment | school | the bundle |
| contact_phone | every PractitionerRole's phone (`01632 960nnn`, Ofcom's drama range) | school | the bundle |
| referral_id | the ServiceRequest identifier value, for cases with expect_trust_to_school false | school | the bundle |

A trust's own resources naturally hold its Patients' names and NHS numbers: `nhs` markers are about what
the pipeline itself writes toward the NHS side, not what the trust's server already had. The named worker's
email is shared by many pupils and is meant for schools, so it is not a marker.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final, TextIO
from zoneinfo import ZoneInfo

from schoolslink.constants import (
    CLOSURE_REASON_EXT,
    CONFIDENTIALITY_SYSTEM,
    EDUCATIONAL_ESTABLISHMENT_EXT,
    MHSDS_CLOSURE_REASON_SYSTEM,
    MHSDS_REJECTION_REASON_SYSTEM,
    MHSDS_TEAM_TYPE_SYSTEM,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    NHS_NUMBER_VERIFICATION_SYSTEM,
    ODS_ORGANISATION_SYSTEM,
    PURPOSE_SUPPORT,
    PURPOSE_SYSTEM,
    REJECTION_REASON_EXT,
    SCHOOL_URN_SYSTEM,
    TEAM_TYPE_EXT,
    TRANSITION_EXT,
)
from schoolslink.identifiers import make_test_nhs_number, make_upn, uln_check_digit

# Extension URLs and code systems the synthetic trust uses (see the module docstring) --------------------------

# (the extensions a trust uses for MHSDS facts, and the purpose and confidentiality systems, are the
# ones the pipeline reads: schoolslink.constants)
PRIMARY_REASON_SYSTEM: Final = "https://fhir.schoolslink.org.uk/CodeSystem/mhsds-primary-reason-for-referral"
REFERRAL_ID_SYSTEM: Final = "https://fhir.schoolslink.org.uk/Id/trust-referral-number"

DEFAULT_AS_OF: Final = date(2026, 11, 25)
TEST_LA: Final = 999
BUNDLE_LIMIT: Final = 2000
MANIFEST_NAME: Final = "synth-manifest.json"
MANIFEST_FORMAT: Final = "schoolslink-synth-manifest/1"
REFERRED_SHARE: Final = 0.10  # pupils with trust data

# Case kinds and what governance must conclude: (expect_linked, expect_school_to_trust, expect_trust_to_school)
CASE_EXPECTATIONS: Final[dict[str, tuple[bool, bool, bool]]] = {
    "consented": (True, True, True),
    "young_person_consents": (True, True, True),
    "no_consent": (True, False, False),
    "refused": (True, False, False),
    "withdrawn": (True, False, False),
    "parents_disagree": (True, False, False),
    "school_to_trust_only": (True, True, False),
    "looked_after": (False, False, False),
    "adopted": (False, False, False),
    "child_protection": (False, False, False),
    "do_not_tell_parent": (False, False, False),
    "restricted": (False, False, False),
    "unverified_nhs": (False, False, False),
    "no_roll_match": (False, False, False),
    "twins": (True, True, True),
    "name_dob_duplicate": (False, False, False),
    "expired": (True, False, False),
}
CASE_KINDS: Final[tuple[str, ...]] = tuple(CASE_EXPECTATIONS)

# Share of referred pupils per kind; "consented" takes the rest (about 57%).
_KIND_WEIGHTS: Final[dict[str, float]] = {
    "young_person_consents": 0.06,
    "no_consent": 0.08,
    "refused": 0.04,
    "withdrawn": 0.03,
    "parents_disagree": 0.02,
    "school_to_trust_only": 0.03,
    "looked_after": 0.02,
    "adopted": 0.015,
    "child_protection": 0.02,
    "do_not_tell_parent": 0.015,
    "restricted": 0.01,
    "unverified_nhs": 0.03,
    "no_roll_match": 0.02,
    "twins": 0.01,
    "name_dob_duplicate": 0.01,
    "expired": 0.02,
}
# Kinds whose consent comes from a parent (or the local authority): pupils who stay under 16.
_UNDER_16_KINDS: Final = frozenset(
    {"consented", "refused", "withdrawn", "parents_disagree", "school_to_trust_only", "looked_after",
     "adopted", "child_protection", "twins", "expired"}
)
_PAIRED_KINDS: Final = frozenset({"twins", "name_dob_duplicate"})

# Referral statuses (ReferralStatus values) and their shares; moved_to_adult_services only at 17+.
_STATUS_WEIGHTS: Final[tuple[tuple[str, float], ...]] = (
    ("received", 0.10),
    ("being_assessed", 0.13),
    ("accepted_waiting", 0.27),
    ("in_treatment", 0.28),
    ("not_accepted", 0.08),
    ("discharged", 0.10),
    ("moved_area", 0.04),
)
_TRANSITION = "moved_to_adult_services"
_TRANSITION_SHARE_17_PLUS: Final = 0.35
_ACCEPTED: Final = frozenset({"accepted_waiting", "in_treatment", "discharged", _TRANSITION, "moved_area"})
_CLOSED: Final = frozenset({"discharged", _TRANSITION, "moved_area"})

_PRIMARY_REASONS: Final[tuple[tuple[str, str, float], ...]] = (
    ("05", "Anxiety", 0.30),
    ("04", "Depression", 0.15),
    ("15", "Self harm behaviours", 0.10),
    ("25", "Suspected autism", 0.10),
    ("12", "Eating disorders", 0.06),
    ("24", "Neurodevelopmental conditions, excluding autism", 0.06),
    ("16", "Conduct disorders", 0.05),
    ("19", "Relationship difficulties", 0.04),
    ("21", "Attachment difficulties", 0.03),
    ("11", "Post-traumatic stress disorder", 0.03),
    ("06", "Obsessive compulsive disorder", 0.03),
    ("18", "In crisis", 0.03),
    ("20", "Gender discomfort issues", 0.02),
)
_REASON_NOTES: Final[dict[str, tuple[str, ...]]] = {
    "05": ("panic symptoms on school mornings", "worry stopping sleep", "avoids lessons with presentations"),
    "04": ("low mood and withdrawal from friends", "tearful most days", "lost interest in sport"),
    "15": ("cuts on forearms seen by school nurse", "disclosed self-harm to a teacher"),
    "25": ("social communication difficulties noted by SENCo", "sensory overload in busy corridors"),
    "12": ("restricting food at lunchtime", "rapid weight loss noted by parent"),
    "24": ("attention and impulsivity concerns in class", "difficulty sustaining focus"),
    "16": ("repeated aggression towards peers", "defiance at home and school"),
    "19": ("conflict at home after separation", "peer relationship breakdown"),
    "21": ("attachment difficulties after placement moves", "difficulty trusting adults"),
    "11": ("intrusive memories after a road accident", "nightmares after a bereavement"),
    "06": ("checking rituals delaying arrival", "intrusive thoughts about contamination"),
    "18": ("presented in crisis at school", "expressed suicidal thoughts"),
    "20": ("distress about gender identity", "asked for support with gender questions"),
}
_APPOINTMENT_NOTES: Final = (
    "bring the school's SDQ if available", "parent to attend the first half", "review sleep diary",
    "agree a safety plan", "check medication side effects", "discuss a school reintegration plan",
    "young person prefers a video call", "interpreter booked",
)
# MHSDS team type referred to, by primary reason (default F01, the education-based MHST).
_TEAM_BY_REASON: Final[dict[str, tuple[str, str]]] = {
    "12": ("C10", "Community Eating Disorder Service"),
    "25": ("C01", "Autism Service"),
    "24": ("C04", "Neurodevelopment Team"),
    "18": ("A02", "Crisis Resolution Team/Home Treatment Service"),
}
_TEAM_DEFAULTS: Final[tuple[tuple[str, str], ...]] = (
    ("F01", "Mental Health Support Team"),
    ("D06", "Mental Health In Education Service"),
)
_TEAM_SPA: Final = ("A18", "Single Point of Access Service")
_TEAM_LAC: Final = ("C06", "Looked After Children Service")
_REJECTION_REASONS: Final = (("01", "Duplicate referral"), ("02", "Inappropriate referral"),
                             ("03", "Incomplete referral"))
_CLOSURE_REASONS: Final[dict[str, str]] = {
    "01": "Admitted as an in-patient",
    "02": "Discharged - no further treatment appropriate",
    "03": "Discharged - patient moved out of area",
    "04": "Discharged - treatment completed",
    "05": "Discharged - patient did not attend",
    "07": "Patient requested discharge",
    "08": "Referred to another health care provider",
    "09": "Patient refused treatment",
}
_DISCHARGE_CODES: Final = ("02", "04", "04", "04", "05", "07", "08", "09", "01")
_VERIFICATION: Final[dict[str, str]] = {
    "01": "Number present and verified",
    "02": "Number present but not traced",
}
_WORKER_ROLES: Final = (
    "Education Mental Health Practitioner", "Senior Mental Health Practitioner", "Mental Health Nurse",
    "Clinical Psychologist", "Family Therapist", "Child and Adolescent Psychotherapist",
    "Consultant Child and Adolescent Psychiatrist", "CYPMHS Team Lead", "Mental Health Support Team Supervisor",
    "Eating Disorders Specialist Nurse", "Autism Assessment Practitioner", "Primary Mental Health Worker",
)
_WORKERS: Final = 20

# Names -----------------------------------------------------------------------------------------------------

_ONSETS: Final = ("b", "bl", "br", "c", "ch", "cl", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k",
                  "l", "m", "n", "p", "pl", "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS: Final = ("a", "e", "i", "o", "u")
_DIGRAPHS: Final = ("ia", "ie", "ai", "ea", "ou")
_CODAS: Final = ("n", "l", "nd", "th", "x", "rt", "m")
_ENDINGS: Final = ("ton", "son", "ford", "ham", "wick", "more", "den", "well", "field", "ridge", "worth",
                   "stone", "dale", "gate", "wood", "land", "man", "hurst", "bury", "holt")
_NO, _NV, _ND = len(_ONSETS), len(_VOWELS), len(_DIGRAPHS)
_FORENAME_SPACE: Final = _NO * _NV * _NO * _ND * len(_CODAS)
_SURNAME_SPACE: Final = _NO * _NV * _NO * _NV * len(_ENDINGS)
# English words (en-GB and en-US word lists) the two name shapes can spell: a referred pupil's names are
# leak markers, so they must not be words a feed or a FHIR resource could contain for another reason.
_ENGLISH_LOOKALIKES: Final = frozenset("""
befoul befriend beneath bestial bewail britain burial cereal chaplain chilean cobain dalian damian damien
danial daniel debian declaim demean denial derail detail detain domain dorian fabian facial fenian fijian
filial frisian fustian gabriel gawain genial glacial goliath grecian hadrian jovial jovian julian korean
labial lilian lineal lorain lucian lucien malian marian medial median menial micheal miriam muriel musial
nubian prevail proclaim profound pronoun propound protean racial radial rebound reclaim redound refrain
regain remain repeal resound retail retain retrain retrial reveal rewound serial shavian simian social
sustain titian travail trivial trobriand venial vivian
balaton baseman brakeman castigate caveman cleveland coleman coleridge copeland delegate derogate farewell
fireman firestone firewood foreman fumigate graceland gravestone hereford homeland hopewell kiloton lakeland
lakewood limestone lineman litigate lodestone madison masefield megaton milestone minefield mitigate morison
navigate nobleman profligate propagate relegate rifleman robeson rosewood segregate sheraton tableland
tucuman venison vineland wasteland
""".split())
# Index pools (before the keyed spread): ordinary pairs, then the workers, then one name per referred pupil.
_ORDINARY_SURNAMES: Final = 60_000
_ORDINARY_FORENAMES: Final = 4_000
_RESERVED_OFFSET: Final = 100  # the workers take the first indices after the ordinary pool

_STREET_WORDS: Final = ("Mill", "Church", "Station", "Orchard", "Victoria", "Albert", "Chapel", "Park", "Meadow",
                        "Willow", "Cedar", "Beech", "Rowan", "Hawthorn", "Bridge", "Castle", "Market",
                        "Quarry", "Kiln", "Forge", "Abbey", "Priory", "Canal", "Spring", "Vicarage",
                        "Coronation", "Jubilee", "Lime", "Poplar", "Ash", "Heron", "Kingfisher", "Badger")
_STREET_SUFFIXES: Final = ("Road", "Street", "Lane", "Close", "Avenue", "Drive", "Way", "Grove", "Crescent",
                           "Gardens", "Terrace", "Row")
_TOWNS: Final = ("Ashby Wells", "Brackwater", "Coldmarsh", "Elmsworth", "Fennick", "Greywater", "Hollowmere",
                 "Kestlebury", "Larkhampton", "Millbrack", "Northwold", "Oakhurst Green", "Redmarsh",
                 "Stonebridge", "Westfold", "Yarnbrook")
_POSTCODE_AREAS: Final = ("SY", "TF", "WV", "DY", "HR", "GL", "WR", "ST", "LD", "NP")
_POSTCODE_LETTERS: Final = "ABDEFGHJLNPQRSTUWXYZ"
# Ofcom's ranges for drama (never allocated to a real line): 07700 900nnn, and 0113..0161 496 0nnn.
_HOME_AREA_CODES: Final = ("0113 496 0", "0114 496 0", "0115 496 0", "0116 496 0", "0117 496 0", "0118 496 0",
                           "0121 496 0", "0161 496 0")
_SCHOOL_STEMS: Final = ("Ash", "Brack", "Cold", "Elm", "Fern", "Hazel", "Kings", "Lark", "Mill", "North",
                        "Oak", "Red", "Stone", "West", "Wood", "Holly", "Bright", "Clay", "Thorn", "Marsh")
_SCHOOL_TAILS: Final = ("well", "field", "ford", "brook", "ley", "ton", "worth", "bury", "dale", "hurst")
_SUPPLIERS: Final = ("SIMS", "Arbor", "Bromcom", "ScholarPack")
_ETHNICITIES: Final[tuple[tuple[str, float], ...]] = (
    ("WBRI", 0.62), ("WIRI", 0.01), ("WOTH", 0.05), ("WROM", 0.005), ("MWBC", 0.02), ("MWBA", 0.01),
    ("MWAS", 0.015), ("MOTH", 0.02), ("AIND", 0.035), ("APKN", 0.045), ("ABAN", 0.02), ("AOTH", 0.02),
    ("BCRB", 0.01), ("BAFR", 0.04), ("BOTH", 0.005), ("CHNE", 0.005), ("OOTH", 0.02), ("REFU", 0.01),
    ("NOBT", 0.005),
)

_MARKER_LETTERS: Final = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: a marker can never contain a name
_REFERRAL_ID_CHARS: Final = "BCDFGHJKLMNPQRSTVWXZ23456789"
_LONDON: Final = ZoneInfo("Europe/London")


# Public results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynthCase:
    """A pupil with trust data, and what governance must conclude about them."""

    case: str
    school_urn: str
    upn: str
    nhs_number: str
    surname: str
    forename: str
    dob: str  # ISO date, as the CTF states it
    patient_id: str
    referral_status: str  # a ReferralStatus value
    expect_linked: bool
    expect_school_to_trust: bool
    expect_trust_to_school: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "school_urn": self.school_urn,
            "upn": self.upn,
            "nhs_number": self.nhs_number,
            "surname": self.surname,
            "forename": self.forename,
            "dob": self.dob,
            "patient_id": self.patient_id,
            "referral_status": self.referral_status,
            "expect_linked": self.expect_linked,
            "expect_school_to_trust": self.expect_school_to_trust,
            "expect_trust_to_school": self.expect_trust_to_school,
        }


@dataclass(frozen=True, slots=True)
class Marker:
    """A value that must never reach `where` ('nhs', 'school' or 'both'); see the module docstring."""

    value: str
    item: str
    where: str

    def to_dict(self) -> dict[str, str]:
        return {"value": self.value, "item": self.item, "where": self.where}


@dataclass(slots=True)
class SynthManifest:
    seed: int
    as_of: date
    trust_ods: str
    school_urns: list[str]
    counts: dict[str, int]
    cases_by_kind: dict[str, int]
    referrals_by_status: dict[str, int]
    consents_by_kind: dict[str, int]  # consent register rows by '<given_by>:<decision>'
    cases: list[SynthCase]
    markers: list[Marker]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "seed": self.seed,
            "as_of": self.as_of.isoformat(),
            "trust_ods": self.trust_ods,
            "counts": {
                **self.counts,
                "cases_by_kind": dict(self.cases_by_kind),
                "referrals_by_status": dict(self.referrals_by_status),
                "consents_by_kind": dict(self.consents_by_kind),
            },
            "school_urns": list(self.school_urns),
            "cases": [c.to_dict() for c in self.cases],
            "markers": [m.to_dict() for m in self.markers],
        }

    def write(self, path: Path) -> None:
        """The manifest as JSON: small parts indented, one case or marker per line."""
        d = self.to_dict()
        head = {k: v for k, v in d.items() if k not in ("cases", "markers")}
        with path.open("w", encoding="utf-8", newline="\n") as f:
            text = json.dumps(head, indent=2)
            f.write(text[: text.rindex("}")].rstrip() + ",\n")
            for name in ("cases", "markers"):
                items = d[name]
                f.write(f'  "{name}": [')
                f.write(",".join("\n    " + json.dumps(x, separators=(", ", ": ")) for x in items))
                f.write("\n  ]" if items else "]")
                f.write(",\n" if name == "cases" else "\n")
            f.write("}\n")


def load_manifest(path: Path) -> SynthManifest:
    """Read a `synth-manifest.json` back."""
    d = json.loads(path.read_text(encoding="utf-8"))
    counts = dict(d["counts"])
    by_kind = counts.pop("cases_by_kind")
    by_status = counts.pop("referrals_by_status")
    consents = counts.pop("consents_by_kind")
    return SynthManifest(
        seed=int(d["seed"]),
        as_of=date.fromisoformat(d["as_of"]),
        trust_ods=str(d["trust_ods"]),
        school_urns=[str(u) for u in d["school_urns"]],
        counts={k: int(v) for k, v in counts.items()},
        cases_by_kind={k: int(v) for k, v in by_kind.items()},
        referrals_by_status={k: int(v) for k, v in by_status.items()},
        consents_by_kind={k: int(v) for k, v in consents.items()},
        cases=[SynthCase(**c) for c in d["cases"]],
        markers=[Marker(**m) for m in d["markers"]],
    )


# Keyed bijections and generated strings ---------------------------------------------------------------------

_M64 = (1 << 64) - 1


class _Bijection:
    """A keyed permutation of range(n): a four-round Feistel network with cycle walking."""

    __slots__ = ("_half", "_keys", "_mask", "n")

    def __init__(self, n: int, rng: random.Random) -> None:
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n = n
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        self._keys = tuple(rng.getrandbits(64) for _ in range(4))

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise ValueError(f"index {i} outside 0..{self.n - 1}")
        half, mask = self._half, self._mask
        x = i
        while True:
            left, right = x >> half, x & mask
            for k in self._keys:
                z = ((right ^ k) * 0xBF58476D1CE4E5B9) & _M64
                z ^= z >> 31
                z = (z * 0x94D049BB133111EB) & _M64
                left, right = right, left ^ ((z ^ (z >> 29)) & mask)
            x = (left << half) | right
            if x < self.n:
                return x


def _digits(value: int, alphabet: str, width: int) -> str:
    base = len(alphabet)
    out = []
    for _ in range(width):
        value, d = divmod(value, base)
        out.append(alphabet[d])
    return "".join(reversed(out))


def _forename_at(i: int) -> str:
    i, c = divmod(i, len(_CODAS))
    i, v2 = divmod(i, _ND)
    i, o2 = divmod(i, _NO)
    o1, v1 = divmod(i, _NV)
    return (_ONSETS[o1] + _VOWELS[v1] + _ONSETS[o2] + _DIGRAPHS[v2] + _CODAS[c]).capitalize()


def _surname_at(i: int) -> str:
    i, e = divmod(i, len(_ENDINGS))
    i, v2 = divmod(i, _NV)
    i, o2 = divmod(i, _NO)
    o1, v1 = divmod(i, _NV)
    return (_ONSETS[o1] + _VOWELS[v1] + _ONSETS[o2] + _VOWELS[v2] + _ENDINGS[e]).upper()


class _Names:
    """Every name in the synthetic trust; see the module docstring for the uniqueness guarantees."""

    def __init__(self, rng: random.Random) -> None:
        self._fore = _Bijection(_FORENAME_SPACE, rng)
        self._sur = _Bijection(_SURNAME_SPACE, rng)
        self._pairs = _Bijection(_ORDINARY_SURNAMES * _ORDINARY_FORENAMES, rng)
        self.ordinary_forenames = [_forename_at(self._fore(i)) for i in range(_ORDINARY_FORENAMES)]
        self.ordinary_surnames = [_surname_at(self._sur(i)) for i in range(_ORDINARY_SURNAMES)]
        self._ordinary = 0
        self._reserved_forename = 0
        self._reserved_surname = 0

    def ordinary_pair(self) -> tuple[str, str]:
        """(surname, forename), a pair no other ordinary pupil has."""
        p = self._pairs(self._ordinary)
        self._ordinary += 1
        s, f = divmod(p, _ORDINARY_FORENAMES)
        return self.ordinary_surnames[s], self.ordinary_forenames[f]

    def worker(self, w: int) -> tuple[str, str]:
        """(Surname, Forename) of trust worker w (title case), carried by no pupil or parent."""
        return (
            _surname_at(self._sur(_ORDINARY_SURNAMES + w)).capitalize(),
            _forename_at(self._fore(_ORDINARY_FORENAMES + w)),
        )

    def unique_surname(self) -> str:
        """A surname no one else in the trust has (never an English word)."""
        while True:
            i = _ORDINARY_SURNAMES + _RESERVED_OFFSET + self._reserved_surname
            if i >= _SURNAME_SPACE:
                raise ValueError("too many referred pupils for the synthetic surname space")
            self._reserved_surname += 1
            name = _surname_at(self._sur(i))
            if name.lower() not in _ENGLISH_LOOKALIKES:
                return name

    def unique_forename(self) -> str:
        """A forename no one else in the trust has (never an English word)."""
        while True:
            i = _ORDINARY_FORENAMES + _RESERVED_OFFSET + self._reserved_forename
            if i >= _FORENAME_SPACE:
                raise ValueError("too many referred pupils for the synthetic forename space")
            self._reserved_forename += 1
            name = _forename_at(self._fore(i))
            if name.lower() not in _ENGLISH_LOOKALIKES:
                return name


class _Tokens:
    """Unique marker strings (MK + 10 consonants) and trust referral numbers (RF + 8 characters)."""

    def __init__(self, rng: random.Random) -> None:
        self._mk = _Bijection(len(_MARKER_LETTERS) ** 10, rng)
        self._rf = _Bijection(len(_REFERRAL_ID_CHARS) ** 8, rng)
        self._mk_next = 0
        self._rf_next = 0

    def marker(self) -> str:
        v = self._mk(self._mk_next)
        self._mk_next += 1
        return "MK" + _digits(v, _MARKER_LETTERS, 10)

    def referral_number(self) -> str:
        v = self._rf(self._rf_next)
        self._rf_next += 1
        return "RF" + _digits(v, _REFERRAL_ID_CHARS, 8)


def _esc(s: str) -> str:
    if "&" in s or "<" in s or ">" in s:
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s


def _weighted(choices: tuple[tuple[str, float], ...]) -> tuple[tuple[str, ...], list[float]]:
    values = tuple(c for c, _ in choices)
    cum = list(itertools.accumulate(w for _, w in choices))
    total = cum[-1]
    return values, [c / total for c in cum]


def _pick(values: tuple[str, ...], cum: list[float], r: float) -> str:
    return values[min(bisect.bisect_right(cum, r), len(values) - 1)]


def _age_on(dob: date, day: date) -> int:
    return day.year - dob.year - ((day.month, day.day) < (dob.month, dob.day))


def _academic_year(d: date) -> int:
    return d.year if d.month >= 9 else d.year - 1


def _school_days(start: date, end: date) -> int:
    """Weekdays in [start, end) outside the usual English school holidays (approximate)."""
    days = 0
    d = start
    while d < end:
        if d.weekday() < 5 and not _holiday(d):
            days += 1
        d += timedelta(days=1)
    return days


def _holiday(d: date) -> bool:
    md = (d.month, d.day)
    return (
        (10, 26) <= md <= (10, 30)  # autumn half term
        or md >= (12, 21) or md <= (1, 2)  # Christmas
        or (2, 16) <= md <= (2, 20)  # spring half term
        or (3, 30) <= md <= (4, 10)  # Easter
        or (5, 25) <= md <= (5, 29)  # summer half term
        or (7, 22) <= md <= (9, 2)  # summer
    )


def _weekday_on_or_before(d: date) -> date:
    while d.weekday() >= 5:
        d -= timedelta(days=1)
    return d


# Schools and rolls -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _School:
    index: int
    urn: str
    estab: int
    name: str
    phase: str  # primary | secondary | sixth_form
    ctf_version: str
    supplier: str
    pupils: int
    roll_seed: int
    detail_seed: int
    postcode_area: str
    town: str


_PHASE_YEARS: Final[dict[str, tuple[tuple[int, ...], list[float]]]] = {
    "primary": ((0, 1, 2, 3, 4, 5, 6), [1, 2, 3, 4, 5, 6, 7]),
    "secondary": ((7, 8, 9, 10, 11), [1, 2, 3, 4, 5]),
    "sixth_form": ((7, 8, 9, 10, 11, 12, 13), [1, 2, 3, 4, 5, 5.6, 6.2]),
}
_PHASE_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "primary": ("Primary School", "Primary Academy", "C of E Primary School", "Infant and Junior School"),
    "secondary": ("Academy", "High School", "Community School"),
    "sixth_form": ("Academy and Sixth Form", "School and Sixth Form College", "Church & Community Academy"),
}


class _Roll:
    """One pupil while their school is being written (a school's roll is held, never the trust's)."""

    __slots__ = (
        "adopted", "contact_marker", "dob", "forename", "former_upn", "kind", "lac", "leaver", "nhs",
        "partner", "pos", "sex", "status", "street_marker", "surname", "upn", "year",
    )

    def __init__(self, pos: int, year: int, dob: date, sex: str) -> None:
        self.pos = pos
        self.year = year
        self.dob = dob
        self.sex = sex
        self.kind: str | None = None
        self.status = ""
        self.partner: _Roll | None = None  # set on a twin's or duplicate's partner: the referred pupil
        self.surname = ""
        self.forename = ""
        self.upn = ""
        self.former_upn = ""
        self.nhs = ""
        self.leaver = False
        self.lac = False
        self.adopted = False
        self.street_marker = ""
        self.contact_marker = ""


def _roll_skeleton(school: _School, ay: int) -> list[_Roll]:
    rng = random.Random(school.roll_seed)
    years, weights = _PHASE_YEARS[school.phase]
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    out = []
    for pos in range(school.pupils):
        y = years[min(bisect.bisect_right(cum, rng.random() * total), len(years) - 1)]
        start = date(ay - 5 - y, 9, 1)
        span = (date(ay - 4 - y, 9, 1) - start).days
        dob = start + timedelta(days=rng.randrange(span))
        out.append(_Roll(pos, y, dob, "F" if rng.random() < 0.5 else "M"))
    return out


# The generator ---------------------------------------------------------------------------------------------


class _Trust:
    """Everything a run shares: the random streams, name and token spaces, the bundle writer, the results."""

    def __init__(self, out_home: Path, seed: int, as_of: date, trust_ods: str) -> None:
        self.out_home = out_home
        self.seed = seed
        self.as_of = as_of
        self.ay = _academic_year(as_of)
        self.trust_ods = trust_ods
        self.org_id = f"org-{trust_ods.lower()}"
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.tokens = _Tokens(self.rng)
        self.nhs_next = self.rng.randrange(50_000)
        self.uln_next = self.rng.randrange(100_000_000, 500_000_000)
        self.case_seq = 0
        self.appt_seq = 0
        self.consent_seq = 0
        self.cases: list[SynthCase] = []
        self.markers: list[Marker] = []
        self.counts: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.consents_by_kind: Counter[str] = Counter()
        self.sessions_now = 2 * _school_days(date(self.ay, 9, 3), min(as_of, date(self.ay + 1, 7, 22)))
        self.workers: list[tuple[str, str, str, str]] = []  # (role id, display name, role, phone)
        self.bundles = _BundleWriter(out_home / "seed" / "fhir", BUNDLE_LIMIT)
        self.eth_values, self.eth_cum = _weighted(_ETHNICITIES)
        self.status_values, self.status_cum = _weighted(_STATUS_WEIGHTS)
        self.reason_values, self.reason_cum = _weighted(tuple((c, w) for c, _, w in _PRIMARY_REASONS))
        self.reason_display = {c: d for c, d, _ in _PRIMARY_REASONS}

    # identifiers ------------------------------------------------------------------------------------------

    def nhs_number(self) -> str:
        n = make_test_nhs_number(self.nhs_next)
        self.nhs_next += 1
        return n

    def uln(self) -> str:
        while True:
            first9 = f"{self.uln_next:09d}"
            self.uln_next += 1
            check = uln_check_digit(first9)
            if check is not None:
                return f"{first9}{check}"

    def mark(self, value: str, item: str, where: str) -> None:
        self.markers.append(Marker(value, item, where))

    # trust-wide resources ---------------------------------------------------------------------------------

    def trust_resources(self) -> None:
        org = {
            "resourceType": "Organization",
            "id": self.org_id,
            "identifier": [{"system": ODS_ORGANISATION_SYSTEM, "value": self.trust_ods}],
            "active": True,
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                  "code": "prov", "display": "Healthcare Provider"}]}],
            "name": f"Synthetic Children and Young People's Mental Health Service ({self.trust_ods})",
        }
        resources: list[dict[str, Any]] = [org]
        phones = self.rng.sample(range(1000), _WORKERS)
        for w in range(_WORKERS):
            surname, forename = self.names.worker(w)
            role = _WORKER_ROLES[w % len(_WORKER_ROLES)]
            phone = f"01632 960{phones[w]:03d}"
            role_id = f"prole-{w + 1:03d}"
            email = f"{forename.lower()}.{surname.lower()}@cypmhs.example.nhs.uk"
            display = f"{forename} {surname}"
            self.workers.append((role_id, display, role, phone))
            resources.append({
                "resourceType": "PractitionerRole",
                "id": role_id,
                "active": True,
                "practitioner": {"display": display},
                "organization": {"reference": f"Organization/{self.org_id}"},
                "code": [{"text": role}],
                "telecom": [
                    {"system": "email", "value": email, "use": "work"},
                    {"system": "phone", "value": phone, "use": "work"},
                ],
            })
            self.mark(phone, "contact_phone", "school")
        self.bundles.add_group(resources)
        self.counts["practitioner_roles"] = _WORKERS
        self.counts["organizations"] = 1

    # schools ---------------------------------------------------------------------------------------------

    def plan_schools(self, n: int, pupils: int, first_urn: int) -> list[_School]:
        rng = self.rng
        phases = ["primary" if i % 20 < 9 else "secondary" if i % 20 < 13 else "sixth_form" for i in range(n)]
        rng.shuffle(phases)
        if n >= 1 and "sixth_form" not in phases:
            phases[0] = "sixth_form"
        if n >= 3 and "primary" not in phases:
            phases[-1] = "primary"
        old = set(rng.sample(range(n), n // 10)) if n >= 2 else set()
        if n >= 2 and not old:
            old = {rng.randrange(n)}
        base, extra = divmod(pupils, n)
        schools = []
        used_names: set[str] = set()
        for i in range(n):
            phase = phases[i]
            while True:
                stem = rng.choice(_SCHOOL_STEMS) + rng.choice(_SCHOOL_TAILS)
                name = f"{stem} {rng.choice(_PHASE_NAMES[phase])}"
                if name not in used_names or len(used_names) > 3000:
                    break
            used_names.add(name)
            schools.append(
                _School(
                    index=i,
                    urn=str(first_urn + i),
                    estab=1001 + i,
                    name=name,
                    phase=phase,
                    ctf_version="24.0" if i in old else "25.0",
                    supplier=rng.choice(_SUPPLIERS),
                    pupils=base + (1 if i < extra else 0),
                    roll_seed=rng.getrandbits(64),
                    detail_seed=rng.getrandbits(64),
                    postcode_area=f"{rng.choice(_POSTCODE_AREAS)}{rng.randrange(1, 20)}",
                    town=rng.choice(_TOWNS),
                )
            )
        return schools

    def plan_cases(self, schools: list[_School], pupils: int) -> list[list[str]]:
        """The kinds of referred pupil at each school (which pupils they are is decided per school)."""
        rng = self.rng
        total = round(pupils * REFERRED_SHARE)
        others = list(_KIND_WEIGHTS)
        min_each = 2 if total >= 3 * len(CASE_KINDS) else 1 if total >= len(CASE_KINDS) else 0
        quota = {k: max(min_each, int(_KIND_WEIGHTS[k] * total)) for k in others}
        while sum(quota.values()) > total:
            biggest = max(others, key=lambda k: quota[k])
            quota[biggest] -= 1
        quota["consented"] = total - sum(quota.values())

        # Referred pupils per school, in proportion to its roll (largest remainder).
        exact = [s.pupils * total / pupils for s in schools]
        per_school = [int(x) for x in exact]
        rest = sorted(range(len(schools)), key=lambda i: (per_school[i] - exact[i], i))
        for i in rest[: total - sum(per_school)]:
            per_school[i] += 1

        # Young people deciding for themselves go where there are 16-17 year olds.
        slots: list[list[str]] = [[] for _ in schools]
        capacity = []
        for s in schools:
            if s.phase != "sixth_form" or per_school[s.index] == 0:
                capacity.append(0)
                continue
            n1617 = sum(1 for p in _roll_skeleton(s, self.ay) if 16 <= _age_on(p.dob, self.as_of) <= 17)
            capacity.append(min(max(1, per_school[s.index] // 3), n1617 // 2))
        candidates = [i for i, c in enumerate(capacity) for _ in range(c)]
        rng.shuffle(candidates)
        yp = quota.pop("young_person_consents")
        for i in candidates[:yp]:
            slots[i].append("young_person_consents")
        quota["consented"] += max(0, yp - len(candidates))

        remaining = [k for k in CASE_KINDS if k in quota for _ in range(quota[k])]
        rng.shuffle(remaining)
        free = [i for i, s in enumerate(schools) for _ in range(per_school[s.index] - len(slots[i]))]
        for i, kind in zip(free, remaining, strict=True):
            slots[i].append(kind)
        return slots

    def write_school(self, school: _School, kinds: list[str]) -> None:
        rng = random.Random(school.detail_seed)
        roll = _roll_skeleton(school, self.ay)
        self.choose_referred(rng, roll, kinds)
        self.name_and_number(rng, school, roll)

        mis_dir = self.out_home / "landing" / "mis" / school.urn
        mis_dir.mkdir(parents=True, exist_ok=True)
        consent_dir = self.out_home / "landing" / "consent"
        consent_dir.mkdir(parents=True, exist_ok=True)
        ctf_path = mis_dir / f"ctf-{school.urn}-{self.as_of.isoformat()}.xml"
        with ctf_path.open("w", encoding="utf-8", newline="\n") as ctf, \
                (consent_dir / f"{school.urn}.csv").open("w", encoding="utf-8", newline="") as reg:
            ctf.write(self.ctf_header(school))
            register = csv.writer(reg, lineterminator="\n")
            register.writerow(_REGISTER_COLUMNS)
            record_no = itertools.count(1)
            for p in roll:
                ctf.write(self.pupil_xml(rng, school, p))
                if p.kind is not None:
                    self.consent_rows(rng, school, p, register, record_no)
                    self.trust_data(rng, school, p)
                elif rng.random() < 0.01 and _age_on(p.dob, self.as_of + timedelta(days=183)) < 16:
                    # On the register, not (yet) known to the trust.
                    self.row(register, record_no, school, p, "parent", "permit",
                             valid_from=self.as_of - timedelta(days=rng.randrange(10, 200)))
            ctf.write("  </CTFpupilData>\n</CTfile>\n")
        self.counts["pupils"] += len(roll)

    def choose_referred(self, rng: random.Random, roll: list[_Roll], kinds: list[str]) -> None:
        """Pick the referred pupils (by the age each kind needs), their partners, statuses and flags."""
        as_of = self.as_of
        horizon = as_of + timedelta(days=183)
        order = list(range(len(roll)))
        rng.shuffle(order)
        pools: dict[str, list[int]] = {"yp": [], "under16": [], "older": [], "any": list(order)}
        by_year: dict[int, list[int]] = {}
        for idx in order:
            pupil = roll[idx]
            age = _age_on(pupil.dob, as_of)
            if 16 <= age <= 17:
                pools["yp"].append(idx)
            if _age_on(pupil.dob, horizon) < 16:
                pools["under16"].append(idx)
            if age >= 11:
                pools["older"].append(idx)
            by_year.setdefault(pupil.year, []).append(idx)
        used: set[int] = set()

        def take(pool: list[int]) -> int | None:
            while pool:
                j = pool.pop()
                if j not in used:
                    used.add(j)
                    return j
            return None

        rank = {"young_person_consents": 0, "twins": 1, "name_dob_duplicate": 1, "do_not_tell_parent": 3}
        for kind in sorted(kinds, key=lambda k: (rank.get(k, 2 if k in _UNDER_16_KINDS else 4), k)):
            if kind == "young_person_consents":
                i = take(pools["yp"])
            elif kind in _UNDER_16_KINDS:
                i = take(pools["under16"])
            elif kind == "do_not_tell_parent":
                i = take(pools["older"])
                if i is None:
                    i = take(pools["any"])
            else:
                i = take(pools["any"])
            if i is None:  # the school has no pupil of the right age left: a kind any pupil can be
                kind = "no_consent"
                i = take(pools["any"])
                if i is None:
                    break
            p = roll[i]
            if kind in _PAIRED_KINDS:
                partner_i = take(by_year[p.year])
                if partner_i is None:
                    kind = "consented" if kind == "twins" else "no_consent"
                else:
                    partner = roll[partner_i]
                    partner.partner = p
                    partner.dob = p.dob
            p.kind = kind
            age = _age_on(p.dob, as_of)
            if age >= 17 and rng.random() < _TRANSITION_SHARE_17_PLUS:
                p.status = _TRANSITION
            else:
                p.status = _pick(self.status_values, self.status_cum, rng.random())
            if kind == "looked_after":
                p.lac = True
            elif kind == "adopted":
                p.adopted = True

        for p in roll:
            if p.kind is None and p.partner is None:
                r = rng.random()
                if r < 0.02:
                    p.leaver = True
                elif r < 0.028:
                    p.lac = True
                elif r < 0.031:
                    p.adopted = True

    def name_and_number(self, rng: random.Random, school: _School, roll: list[_Roll]) -> None:
        """Names, UPNs and NHS numbers, in roll order (partners follow their referred pupil)."""
        names = self.names
        for p in roll:
            if p.kind is not None:
                p.surname, p.forename = names.unique_surname(), names.unique_forename()
        for p in roll:
            if p.kind is not None:
                continue
            if p.partner is not None:
                p.surname = p.partner.surname
                if p.partner.kind == "name_dob_duplicate":
                    p.forename = p.partner.forename
                else:
                    p.forename = names.ordinary_forenames[rng.randrange(_ORDINARY_FORENAMES)]
            else:
                p.surname, p.forename = names.ordinary_pair()

        permanent: Counter[int] = Counter()
        temporary: Counter[int] = Counter()

        def serial(counter: Counter[int], yy: int, limit: int) -> tuple[int, int]:
            for step in range(100):
                y = (yy + step) % 100
                if counter[y] < limit:
                    counter[y] += 1
                    return y, counter[y] - 1
            raise ValueError("too many pupils at one school for synthetic UPNs")

        for p in roll:
            yy = (self.ay - p.year) % 100
            if rng.random() < 0.005:
                y, s = serial(temporary, yy, 2300)
                p.upn = make_upn(TEST_LA, school.estab, s, temporary=True, year=y)
            else:
                y, s = serial(permanent, yy, 1000)
                p.upn = make_upn(TEST_LA, school.estab, s, year=y)
                if rng.random() < 0.01 and p.kind not in ("adopted",):
                    y, s = serial(temporary, yy, 2300)
                    p.former_upn = make_upn(TEST_LA, school.estab, s, temporary=True, year=y)
            if p.kind is not None:
                p.nhs = self.nhs_number()
            elif rng.random() < 0.15:
                p.nhs = self.nhs_number()

    # the CTF ----------------------------------------------------------------------------------------------

    def ctf_header(self, school: _School) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            "<CTfile>\n"
            "  <Header>\n"
            "    <DocumentName>Common Transfer File</DocumentName>\n"
            f"    <CTFversion>{school.ctf_version}</CTFversion>\n"
            f"    <DateTime>{self.as_of.isoformat()}T18:00:00</DateTime>\n"
            "    <DocumentQualifier>full</DocumentQualifier>\n"
            f"    <SupplierID>{school.supplier}</SupplierID>\n"
            "    <SourceSchool>\n"
            f"      <LEA>{TEST_LA}</LEA><Estab>{school.estab}</Estab><URN>{school.urn}</URN>\n"
            f"      <SchoolName>{_esc(school.name)}</SchoolName><AcademicYear>{self.ay}</AcademicYear>\n"
            "    </SourceSchool>\n"
            f"    <DestSchool><LEA>{TEST_LA}</LEA><Estab>{school.estab}</Estab></DestSchool>\n"
            "  </Header>\n"
            "  <CTFpupilData>\n"
        )

    def pupil_xml(self, rng: random.Random, school: _School, p: _Roll) -> str:
        rnd = rng.random
        as_of = self.as_of
        referred = p.kind is not None
        parts: list[str] = ["    <Pupil>\n", f"      <UPN>{p.upn}</UPN>\n"]
        if p.year >= 12 and rnd() < 0.7:
            parts.append(f"      <UniqueLearnerNumber>{self.uln()}</UniqueLearnerNumber>\n")
        middle = ""
        if rnd() < 0.3:
            middle = f"<MiddleNames>{self.names.ordinary_forenames[rng.randrange(_ORDINARY_FORENAMES)]}</MiddleNames>"
        preferred = p.forename
        if rnd() < 0.04:
            preferred = self.names.ordinary_forenames[rng.randrange(_ORDINARY_FORENAMES)]
        sn, fn = _esc(p.surname), _esc(p.forename)
        parts.append(f"      <Surname>{sn}</Surname><Forename>{fn}</Forename>{middle}\n")
        parts.append(f"      <PreferredSurname>{sn}</PreferredSurname>"
                     f"<PreferredForename>{_esc(preferred)}</PreferredForename>\n")
        if p.former_upn:
            parts.append(f"      <FormerUPN>{p.former_upn}</FormerUPN>\n")
        sex_tag = "Gender" if school.ctf_version.startswith("24") else "Sex"
        parts.append(f"      <DOB>{p.dob.isoformat()}</DOB>\n      <{sex_tag}>{p.sex}</{sex_tag}>\n")

        in_ctf_nhs = bool(p.nhs) and (
            not referred or (p.kind not in ("no_roll_match", "name_dob_duplicate") and rnd() < 0.3)
        )
        year = "R" if p.year == 0 else str(p.year)
        eth = _pick(self.eth_values, self.eth_cum, rnd())
        enrol = "C" if rnd() < 0.99 else "M"
        fsm = "true" if rnd() < 0.24 else "false"
        nhs_el = f"<NHSnumber>{p.nhs}</NHSnumber>" if in_ctf_nhs else ""
        parts.append(
            "      <BasicDetails>\n"
            f"        <NCyearActual>{year}</NCyearActual><Ethnicity>{eth}</Ethnicity>"
            f"<EnrolStatus>{enrol}</EnrolStatus><FSMeligible>{fsm}</FSMeligible>{nhs_el}\n"
            "      </BasicDetails>\n"
        )
        if p.lac:
            parts.append("      <LookedAfter><InCare>true</InCare>"
                         f"<CareAuthority>{TEST_LA}</CareAuthority></LookedAfter>\n")
        if p.adopted:
            parts.append("      <AdoptedFromCare>true</AdoptedFromCare>\n")
        r = rnd()
        if r < 0.15:
            provision = "E" if r < 0.03 else "K"
            start = date(self.ay - rng.randrange(0, max(1, min(p.year, 6)) + 1), 9, 1 + rng.randrange(0, 20))
            parts.append(f"      <SENhistory><SEN><StartDate>{start.isoformat()}</StartDate>"
                         f"<SENprovision>{provision}</SENprovision></SEN></SENhistory>\n")

        street = f"{rng.choice(_STREET_WORDS)} {rng.choice(_STREET_SUFFIXES)}"
        if referred:
            p.street_marker = self.tokens.marker()
            street = f"{p.street_marker} {rng.choice(_STREET_SUFFIXES)}"
        postcode = (f"{school.postcode_area} {rng.randrange(1, 10)}"
                    f"{rng.choice(_POSTCODE_LETTERS)}{rng.choice(_POSTCODE_LETTERS)}")
        parts.append(
            "      <Address>\n"
            f"        <BS7666Address><PAON>{rng.randrange(1, 180)}</PAON><Street>{street}</Street>"
            f"<Town>{school.town}</Town><Postcode>{postcode}</Postcode></BS7666Address>\n"
            "      </Address>\n"
        )

        parts.append("      <Contacts>\n")
        n_contacts = 2 if rnd() < 0.7 else 1
        for order in range(1, n_contacts + 1):
            c_surname = p.surname if rnd() < 0.8 else rng.choice(self.names.ordinary_surnames)
            if referred and order == 1:
                p.contact_marker = self.tokens.marker()
                c_surname = p.contact_marker
            c_forename = self.names.ordinary_forenames[rng.randrange(_ORDINARY_FORENAMES)]
            relationship = "CAR" if p.lac else "PAR"
            if rnd() < 0.75:
                rng.randrange(100, 1000)  # kept: the draws stay as they were, so a seed makes the same trust
                phone_type, phone = "M", f"07700 900{rng.randrange(1_000_000) % 1000:03d}"
            else:
                phone_type, phone = "H", f"{rng.choice(_HOME_AREA_CODES)}{rng.randrange(200_000, 1_000_000) % 1000:03d}"
            parts.append(
                f"        <Contact><Order>{order}</Order><Surname>{_esc(c_surname)}</Surname>"
                f"<Forename>{c_forename}</Forename><Relationship>{relationship}</Relationship>"
                "<Responsibility>true</Responsibility><Phones><Phone>"
                f"<TelephoneType>{phone_type}</TelephoneType><PhoneNo>{phone}</PhoneNo></Phone></Phones>"
                "</Contact>\n"
            )
        parts.append("      </Contacts>\n")

        parts.append("      <Attendance>\n")
        absence = rng.betavariate(1.4, 10.0) if referred else rng.betavariate(1.1, 14.0)
        years = [(self.ay - 1, 380)] if p.year > 0 else []
        years.append((self.ay, self.sessions_now))
        for att_year, possible in years:
            if att_year < self.ay and rnd() < 0.05:
                possible = rng.randrange(120, 380)  # joined during the year
            absent = min(possible, round(possible * min(0.9, absence * rng.uniform(0.7, 1.3))))
            authorised = round(absent * rng.uniform(0.45, 0.9))
            parts.append(
                f"        <YearData><Year>{att_year}</Year><SessionsPossible>{possible}</SessionsPossible>"
                f"<SessionsAuthorised>{authorised}</SessionsAuthorised>"
                f"<SessionsUnauthorised>{absent - authorised}</SessionsUnauthorised>"
                f"<AttendanceSessions>{possible - absent}</AttendanceSessions></YearData>\n"
            )
        parts.append("      </Attendance>\n")

        excl_rate = (0.035 if p.year >= 7 else 0.006) * (2 if referred else 1)
        if rnd() < excl_rate:
            items = []
            for _ in range(1 + (rng.randrange(3) if rnd() < 0.3 else 0)):
                day = _weekday_on_or_before(as_of - timedelta(days=rng.randrange(7, 330)))
                items.append(f"<Exclusion><Category>FIXD</Category><StartDate>{day.isoformat()}</StartDate>"
                             "</Exclusion>")
            parts.append(f"      <Exclusions>{''.join(sorted(items))}</Exclusions>\n")
        if p.leaver:
            leaving = _weekday_on_or_before(as_of - timedelta(days=rng.randrange(1, 150)))
            parts.append(f"      <LeavingDate>{leaving.isoformat()}</LeavingDate>\n")
        parts.append("    </Pupil>\n")
        return "".join(parts)

    # the consent register ---------------------------------------------------------------------------------

    def row(self, register: Any, record_no: Any, school: _School, p: _Roll, given_by: str, decision: str,
            *, valid_from: date, directions: str = "school_to_trust;trust_to_school",
            valid_to: date | None = None, withdrawn_on: date | None = None, competent: bool = False,
            child_protection: bool = False, do_not_tell_parent: bool = False) -> None:
        register.writerow((
            f"CR{school.urn}-{next(record_no):05d}", p.upn, given_by, decision, directions, PURPOSE_SUPPORT,
            valid_from.isoformat(), valid_to.isoformat() if valid_to else "",
            withdrawn_on.isoformat() if withdrawn_on else "",
            "true" if competent else "false", "true" if child_protection else "false",
            "true" if do_not_tell_parent else "false",
        ))
        self.counts["consent_rows"] += 1
        self.consents_by_kind[f"{given_by}:{decision}"] += 1
        if withdrawn_on is not None:
            self.counts["consent_rows_withdrawn"] += 1
        if valid_to is not None and valid_to < self.as_of:
            self.counts["consent_rows_expired"] += 1

    def consent_rows(self, rng: random.Random, school: _School, p: _Roll, register: Any, record_no: Any) -> None:
        as_of = self.as_of
        kind = p.kind
        frm = as_of - timedelta(days=rng.randrange(20, 240))
        to = None if rng.random() < 0.5 else as_of + timedelta(days=rng.randrange(200, 500))
        older = _age_on(p.dob, as_of) >= 16

        def w(given_by: str, decision: str, **kw: Any) -> None:
            kw.setdefault("valid_from", frm)
            self.row(register, record_no, school, p, given_by, decision, **kw)

        if kind == "no_consent":
            return
        if kind in ("consented", "adopted", "twins"):
            w("parent", "permit", valid_to=to)
        elif kind == "young_person_consents":
            w("young_person", "permit", valid_to=to, competent=True)
        elif kind == "refused":
            w("parent", "deny")
        elif kind == "withdrawn":
            w("parent", "permit", valid_to=to,
              withdrawn_on=as_of - timedelta(days=rng.randrange(1, (as_of - frm).days)))
        elif kind == "parents_disagree":
            first, second = ("permit", "deny") if rng.random() < 0.5 else ("deny", "permit")
            w("parent", first, valid_to=to if first == "permit" else None)
            w("parent", second, valid_to=to if second == "permit" else None,
              valid_from=frm + timedelta(days=rng.randrange(0, 15)))
        elif kind == "school_to_trust_only":
            w("parent", "permit", valid_to=to, directions="school_to_trust")
        elif kind == "looked_after":
            w("local_authority", "permit", valid_to=to)
        elif kind == "child_protection":
            w("parent", "permit", valid_to=to, child_protection=True)
        elif kind == "do_not_tell_parent":
            w("young_person", "permit", valid_to=to, competent=True, do_not_tell_parent=True)
        elif kind == "expired":
            end = as_of - timedelta(days=rng.randrange(1, 90))
            w("parent", "permit", valid_from=end - timedelta(days=rng.randrange(90, 365)), valid_to=end)
        else:  # restricted, unverified_nhs, no_roll_match, name_dob_duplicate: whoever decides permits
            if older:
                w("young_person", "permit", valid_to=to, competent=True)
            else:
                w("parent", "permit", valid_to=to)

    # the trust's FHIR data --------------------------------------------------------------------------------

    def trust_data(self, rng: random.Random, school: _School, p: _Roll) -> None:
        kind = p.kind
        assert kind is not None
        as_of = self.as_of
        self.case_seq += 1
        seq = self.case_seq
        pid, sr_id = f"pat-{seq:06d}", f"sr-{seq:06d}"
        status = p.status
        linked, s2t, t2s = CASE_EXPECTATIONS[kind]

        # Patient: as the trust holds it.
        family, given, birth = p.surname, p.forename, p.dob
        if kind == "no_roll_match":
            variant = rng.randrange(3)
            if variant == 0:
                birth = p.dob + timedelta(days=rng.choice((-1, 1)) * rng.randrange(3, 40))
            elif variant == 1:
                family = self.names.unique_surname()
            else:
                given = self.names.unique_forename()
        verification = "02" if kind == "unverified_nhs" else "01"
        patient: dict[str, Any] = {"resourceType": "Patient", "id": pid}
        if kind == "restricted":
            patient["meta"] = {"security": [{"system": CONFIDENTIALITY_SYSTEM, "code": "R",
                                             "display": "restricted"}]}
        patient["extension"] = [{
            "url": EDUCATIONAL_ESTABLISHMENT_EXT,
            "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": school.urn},
        }]
        patient["identifier"] = [{
            "extension": [{
                "url": NHS_NUMBER_VERIFICATION_EXT,
                "valueCodeableConcept": {"coding": [{
                    "system": NHS_NUMBER_VERIFICATION_SYSTEM, "code": verification,
                    "display": _VERIFICATION[verification],
                }]},
            }],
            "system": NHS_NUMBER_SYSTEM,
            "value": p.nhs,
        }]
        patient["name"] = [{"use": "official", "family": family, "given": [given]}]
        patient["gender"] = {"M": "male", "F": "female"}.get(p.sex, "unknown")
        patient["birthDate"] = birth.isoformat()
        resources: list[dict[str, Any]] = [patient]

        # The referral and its timeline.
        role_id, worker, _, _ = self.workers[rng.randrange(len(self.workers))]
        reason = _pick(self.reason_values, self.reason_cum, rng.random())
        if status == "received":
            team = _TEAM_SPA
        elif kind == "looked_after":
            team = _TEAM_LAC
        else:
            team = _TEAM_BY_REASON.get(reason) or _TEAM_DEFAULTS[rng.randrange(len(_TEAM_DEFAULTS))]
        lo, hi = {"received": (1, 10), "being_assessed": (5, 45), "accepted_waiting": (20, 182),
                  "in_treatment": (40, 182), "not_accepted": (10, 182)}.get(status, (60, 182))
        authored = as_of - timedelta(days=rng.randrange(lo, hi + 1))
        accepted = authored + timedelta(days=rng.randrange(7, 15))
        first_contact = accepted + timedelta(days=rng.randrange(7, max(8, (as_of - accepted).days - 2)))
        closed = accepted + timedelta(days=rng.randrange(14, max(15, (as_of - accepted).days)))

        extensions: list[dict[str, Any]] = [{
            "url": TEAM_TYPE_EXT,
            "valueCodeableConcept": {"coding": [{"system": MHSDS_TEAM_TYPE_SYSTEM, "code": team[0],
                                                 "display": team[1]}]},
        }]
        sr_status = {"received": "draft", "not_accepted": "revoked"}.get(
            status, "completed" if status in _CLOSED else "active")
        if status == "not_accepted":
            code, display = _REJECTION_REASONS[rng.randrange(3)]
            extensions.append({"url": REJECTION_REASON_EXT, "valueCodeableConcept": {"coding": [{
                "system": MHSDS_REJECTION_REASON_SYSTEM, "code": code, "display": display}]}})
        elif status in _CLOSED:
            code = {"moved_area": "03", _TRANSITION: "08"}.get(status) or rng.choice(_DISCHARGE_CODES)
            extensions.append({"url": CLOSURE_REASON_EXT, "valueCodeableConcept": {"coding": [{
                "system": MHSDS_CLOSURE_REASON_SYSTEM, "code": code, "display": _CLOSURE_REASONS[code]}]}})
            if status == _TRANSITION:
                extensions.append({"url": TRANSITION_EXT, "valueBoolean": True})
        rf = self.tokens.referral_number()
        reason_marker = self.tokens.marker()
        note = rng.choice(_REASON_NOTES[reason])
        resources.append({
            "resourceType": "ServiceRequest",
            "id": sr_id,
            "extension": extensions,
            "identifier": [{"system": REFERRAL_ID_SYSTEM, "value": rf}],
            "status": sr_status,
            "intent": "order",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005",
                                      "display": "Patient referral"}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": authored.isoformat(),
            "performer": [{"reference": f"PractitionerRole/{role_id}", "display": worker}],
            "reasonCode": [{
                "coding": [{"system": PRIMARY_REASON_SYSTEM, "code": reason,
                            "display": self.reason_display[reason]}],
                "text": f"{self.reason_display[reason]}: {note} (note {reason_marker})",
            }],
        })
        self.counts["referrals"] += 1
        appointment_markers: list[str] = []

        if status in _ACCEPTED:
            episode: dict[str, Any] = {
                "resourceType": "EpisodeOfCare",
                "id": f"eoc-{seq:06d}",
                "status": {"accepted_waiting": "waitlist", "in_treatment": "active"}.get(status, "finished"),
                "type": [{"coding": [{"system": MHSDS_TEAM_TYPE_SYSTEM, "code": team[0], "display": team[1]}]}],
                "patient": {"reference": f"Patient/{pid}"},
                "managingOrganization": {"reference": f"Organization/{self.org_id}"},
                "period": {"start": accepted.isoformat()},
                "referralRequest": [{"reference": f"ServiceRequest/{sr_id}"}],
                "careManager": {"reference": f"PractitionerRole/{role_id}", "display": worker},
            }
            if status in _CLOSED:
                episode["period"]["end"] = closed.isoformat()
            resources.append(episode)
            self.counts["episodes_of_care"] += 1

        def appointment(day: date, appt_status: str) -> None:
            self.appt_seq += 1
            marker = self.tokens.marker()
            appointment_markers.append(marker)
            start = datetime.combine(_weekday_on_or_before(day), time(9 + rng.randrange(8), 30 * rng.randrange(2)),
                                     tzinfo=_LONDON)
            resources.append({
                "resourceType": "Appointment",
                "id": f"appt-{self.appt_seq:06d}",
                "status": appt_status,
                "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
                "start": start.isoformat(),
                "end": (start + timedelta(minutes=50)).isoformat(),
                "minutesDuration": 50,
                "comment": f"{rng.choice(_APPOINTMENT_NOTES)} (note {marker})",
                "participant": [
                    {"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"},
                    {"actor": {"reference": f"PractitionerRole/{role_id}", "display": worker},
                     "status": "accepted"},
                ],
            })
            self.counts["appointments"] += 1

        if status == "in_treatment":
            appointment(first_contact, "fulfilled")
        future_share = {"being_assessed": 0.5, "accepted_waiting": 0.6, "in_treatment": 0.75}.get(status, 0.0)
        if rng.random() < future_share:
            # At least four days ahead: moving a weekend day back to Friday still leaves it after as_of.
            appointment(as_of + timedelta(days=rng.randrange(4, 60)), "booked")

        if kind in ("consented", "young_person_consents", "refused") and rng.random() < 0.25:
            self.consent_seq += 1
            by = "young_person" if kind == "young_person_consents" else "parent"
            deny = kind == "refused"
            resources.append({
                "resourceType": "Consent",
                "id": f"cons-{self.consent_seq:06d}",
                "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                      "code": "patient-privacy", "display": "Privacy Consent"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                          "display": "Patient Consent"}]}],
                "patient": {"reference": f"Patient/{pid}"},
                "dateTime": (authored - timedelta(days=rng.randrange(0, 10))).isoformat(),
                "performer": [{"display": by}],
                "organization": [{"reference": f"Organization/{self.org_id}"}],
                "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                           "code": "OPTOUT" if deny else "OPTIN"}]},
                "provision": {
                    "type": "deny" if deny else "permit",
                    "period": {"start": authored.isoformat()},
                    "actor": [{
                        "role": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP", "display": "information recipient"}]},
                        "reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": school.urn},
                                      "display": school.name},
                    }],
                    "purpose": [{"system": PURPOSE_SYSTEM, "code": PURPOSE_SUPPORT}],
                },
            })
            self.counts["fhir_consents"] += 1

        self.bundles.add_group(resources)
        self.counts["patients"] += 1

        # What governance must conclude, and what must never leak.
        self.cases.append(SynthCase(
            case=kind, school_urn=school.urn, upn=p.upn, nhs_number=p.nhs, surname=p.surname,
            forename=p.forename, dob=p.dob.isoformat(), patient_id=pid, referral_status=status,
            expect_linked=linked, expect_school_to_trust=s2t, expect_trust_to_school=t2s,
        ))
        self.by_kind[kind] += 1
        self.by_status[status] += 1
        self.mark(p.street_marker, "address", "both")
        self.mark(p.contact_marker, "parent_contact", "both")
        self.mark(p.upn, "upn", "nhs")
        if not s2t:
            self.mark(p.surname, "surname", "nhs")
            self.mark(p.forename, "forename", "nhs")
        nhs_where = "both" if not s2t and not t2s else "nhs" if not s2t else "school" if not t2s else ""
        if nhs_where:
            self.mark(p.nhs, "nhs_number", nhs_where)
        self.mark(reason_marker, "referral_reason", "school")
        for m in appointment_markers:
            self.mark(m, "appointment_note", "school")
        if not t2s:
            self.mark(rf, "referral_id", "school")


_REGISTER_COLUMNS: Final = (
    "record_id", "upn", "given_by", "decision", "directions", "purposes", "valid_from", "valid_to",
    "withdrawn_on", "competent", "child_protection", "do_not_tell_parent",
)


class _BundleWriter:
    """FHIR batch Bundles of PUT entries, at most `limit` entries each; a group never straddles two."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.entries: list[str] = []
        self.files = 0
        self.total = 0

    def add_group(self, resources: list[dict[str, Any]]) -> None:
        if len(resources) > self.limit:
            raise ValueError("a resource group larger than a bundle")
        if self.entries and len(self.entries) + len(resources) > self.limit:
            self.flush()
        for r in resources:
            entry = {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            self.entries.append(json.dumps(entry, separators=(",", ":")))
        self.total += len(resources)

    def flush(self) -> None:
        if not self.entries:
            return
        self.files += 1
        with (self.folder / f"bundle-{self.files:04d}.json").open("w", encoding="utf-8", newline="\n") as f:
            _write_bundle(f, self.entries)
        self.entries = []


def _write_bundle(f: TextIO, entries: list[str]) -> None:
    f.write('{"resourceType":"Bundle","type":"batch","entry":[\n')
    f.write(",\n".join(entries))
    f.write("\n]}\n")


# Entry point -----------------------------------------------------------------------------------------------


def synthesise(
    out_home: Path,
    *,
    schools: int = 20,
    pupils: int = 6000,
    seed: int = 7,
    as_of: date = DEFAULT_AS_OF,
    trust_ods: str = "R9X",
    first_urn: int = 900001,
) -> SynthManifest:
    """Write a synthetic trust under `out_home` (see the module docstring) and return its manifest."""
    if schools < 1:
        raise ValueError("schools must be at least 1")
    if pupils < schools:
        raise ValueError("pupils must be at least the number of schools")
    if schools > 8999:
        raise ValueError("at most 8999 schools (Estab 1001..9999)")
    if not (100000 <= first_urn and first_urn + schools - 1 <= 999999):
        raise ValueError("school URNs must stay six digits")
    if not trust_ods.isalnum():
        raise ValueError("trust_ods must be an ODS code (letters and digits)")

    out_home = Path(out_home)
    fhir_dir = out_home / "seed" / "fhir"
    fhir_dir.mkdir(parents=True, exist_ok=True)
    for stale in fhir_dir.glob("bundle-*.json"):
        stale.unlink()

    trust = _Trust(out_home, seed, as_of, trust_ods.upper())
    plan = trust.plan_schools(schools, pupils, first_urn)
    kinds = trust.plan_cases(plan, pupils)
    trust.trust_resources()
    for school in plan:
        trust.write_school(school, kinds[school.index])
    trust.bundles.flush()

    counts = {
        "schools": len(plan),
        "pupils": trust.counts["pupils"],
        "patients": trust.counts["patients"],
        "referrals": trust.counts["referrals"],
        "episodes_of_care": trust.counts["episodes_of_care"],
        "appointments": trust.counts["appointments"],
        "practitioner_roles": trust.counts["practitioner_roles"],
        "organizations": trust.counts["organizations"],
        "fhir_consents": trust.counts["fhir_consents"],
        "fhir_resources": trust.bundles.total,
        "bundles": trust.bundles.files,
        "consent_rows": trust.counts["consent_rows"],
        "consent_rows_withdrawn": trust.counts["consent_rows_withdrawn"],
        "consent_rows_expired": trust.counts["consent_rows_expired"],
        "ctf_version_24_schools": sum(1 for s in plan if s.ctf_version.startswith("24")),
        "markers": len(trust.markers),
    }
    manifest = SynthManifest(
        seed=seed,
        as_of=as_of,
        trust_ods=trust.trust_ods,
        school_urns=[s.urn for s in plan],
        counts=counts,
        cases_by_kind={k: trust.by_kind[k] for k in CASE_KINDS},
        referrals_by_status={s: trust.by_status[s] for s in (*(v for v, _ in _STATUS_WEIGHTS), _TRANSITION)},
        consents_by_kind=dict(sorted(trust.consents_by_kind.items())),
        cases=trust.cases,
        markers=trust.markers,
    )
    manifest.write(out_home / MANIFEST_NAME)
    return manifest

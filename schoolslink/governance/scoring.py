"""Scored demographic matching (Fellegi-Sunter) over keyed hashes: which pupil on a roll a trust Patient may be.

Nothing here sees a name, a date of birth or a postcode in the store. Each side keeps `match_keys` (JSON): a keyed
hash per normalised attribute (`keys.match_keys`: HMAC scoped to the school), so two records are compared attribute
by attribute, hash against hash:

    sn / psn / snx   legal surname / preferred (school) or usual (trust) surname / Soundex code of the legal surname
    fn / pfn         legal forename / preferred (school) or usual (trust) forename
    dob / dobx       date of birth / the same date with day and month swapped (only when both are 1-12 and differ)
    sex              M or F (anything else is left out: missing, not a disagreement)
    pc / pcd         full postcode / its outward code (district)
    nhs              pupils only: the patient key of the NHS number the school's MIS holds, if any

Names are folded to capital letters A-Z (accents, spaces, hyphens, apostrophes dropped) before hashing.

Weights (log2 m/u; m = P(level | same child), u = P(level | two different pupils of one school, ~1,000 pupils)):

    attribute  level       m      u       weight
    surname    exact       0.90   0.01    +6.49
               preferred   0.05   0.004   +3.64   a legal name agrees with the other side's preferred/usual one
               phonetic    0.02   0.006   +1.74   Soundex agrees (a typo); never enough to link
               disagree    0.03   0.98    -5.03
    forename   exact       0.88   0.01    +6.46
               preferred   0.07   0.005   +3.81
               disagree    0.05   0.985   -4.30
    dob        exact       0.96   0.0005  +10.91
               swapped     0.01   0.0005  +4.32   day and month swapped: partial, never full
               disagree    0.03   0.999   -5.06
    sex        agree       0.98   0.5     +0.97
               disagree    0.02   0.5     -4.64
    postcode   exact       0.80   0.005   +7.32
               district    0.12   0.35    -1.54   moved within the district: softens the disagreement only
               disagree    0.08   0.645   -3.01

A value missing on either side weighs 0. Everything agreeing scores 32.15; with no postcode, 24.83.

Thresholds, and why:

* AUTO = 28.0. A scored link needs every attribute to agree, postcode included, with at most one name in its
  preferred form (preferred forename 29.50, preferred surname 29.30; both preferred 26.65, sex disagreeing 26.54,
  no postcode 24.83 all fall short). With a roll of N pupils the prior odds are 1:N (about 2^-10), so 28 leaves
  posterior odds of about 2^18:1.
* REVIEW = 15.0. A candidate a person should look at: the date of birth (or its swap) with both names, or with one
  name and the home postcode. Surname and date of birth with another forename and no postcode (14.07: often a twin)
  is not a candidate; with the same postcode (21.39) it is. Siblings at one address (same surname and postcode,
  other forename and date of birth: 5.42) never are.
* Caps: unless both names agree (exactly or in a preferred form) and the date of birth agrees exactly, the score is
  capped at AUTO - 1, whatever the other attributes add. So a forename disagreement (twins), a swapped date of
  birth or a surname that agrees only by sound never auto-links; they wait for review.

The decision (`decide`), for a Patient the trust names a school for and that is not restricted:

1. More than one pupil whose match hash agrees (same name and date of birth) -> SEVERAL_CANDIDATES.
2. More than one candidate at or above REVIEW -> AMBIGUOUS (best first; every one is kept for the reviewer).
3. None -> NO_CANDIDATE.
4. The one candidate has a roll-mate with the same surname, date of birth, sex and postcode (a twin) -> AMBIGUOUS,
   however well the candidate agrees: twins never auto-link.
5. The school's MIS holds an NHS number for the candidate that is not the trust's -> NHS_NUMBER_DISAGREES.
6. Link when: the trust's NHS number is verified (01) and name + date of birth agree exactly (the match hash: the
   first rule, unchanged); or the score is at least AUTO; or the trust's number is verified, the date of birth
   agrees exactly and the school's MIS holds the same NHS number. A sensitive pupil never links here
   (SENSITIVE_CASE).
7. Otherwise review: UNVERIFIED_NHS_NUMBER (name and date of birth agree but the trust's number is not verified)
   or LOW_SCORE. A LOW_SCORE candidate whose date of birth agrees exactly, when the trust's number is verified, may
   be confirmed by an optional PDS trace of the pupil's details (`after_trace`): exactly one PDS result at or above
   PDS_MIN_SCORE whose NHS number is the trust's links (PDS_TRACE); a different number -> NHS_NUMBER_DISAGREES; a
   restricted result -> RESTRICTED.

Blocking: only pupils sharing a surname, forename, Soundex or date-of-birth key with the Patient are scored; any
other pupil scores below 0, far under REVIEW.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from schoolslink.keys import MATCH_KEY_NAMES
from schoolslink.model import MatchMethod, ReviewReason

__all__ = [
    "AUTO", "CAP", "PDS_MIN_SCORE", "REVIEW", "WEIGHTS", "Candidate", "Comparison", "Decision", "LearnerFacts",
    "PatientFacts", "Roll", "TraceFinding", "after_trace", "compare", "decide", "posterior",
]

AUTO: Final = 28.0
REVIEW: Final = 15.0
CAP: Final = AUTO - 1.0
# A PDS search result confirms a pupil's NHS number only at or above this score (PDS gives 1.0 to a result that
# agrees with everything searched; fuzzier results score less: the sandbox's canned results, 0.75, never confirm).
PDS_MIN_SCORE: Final = 0.95

# (m, u) for each level of each attribute; see the module docstring.
M_U: Final[dict[str, dict[str, tuple[float, float]]]] = {
    "surname": {"exact": (0.90, 0.01), "preferred": (0.05, 0.004), "phonetic": (0.02, 0.006),
                "disagree": (0.03, 0.98)},
    "forename": {"exact": (0.88, 0.01), "preferred": (0.07, 0.005), "disagree": (0.05, 0.985)},
    "dob": {"exact": (0.96, 0.0005), "swapped": (0.01, 0.0005), "disagree": (0.03, 0.999)},
    "sex": {"agree": (0.98, 0.5), "disagree": (0.02, 0.5)},
    "postcode": {"exact": (0.80, 0.005), "district": (0.12, 0.35), "disagree": (0.08, 0.645)},
}
WEIGHTS: Final[dict[str, dict[str, float]]] = {
    attr: {level: round(math.log2(m / u), 2) for level, (m, u) in levels.items()} for attr, levels in M_U.items()
}
ATTRIBUTES: Final = tuple(M_U)
MISSING: Final = "missing"

# The keys in `match_keys` (made by `schoolslink.keys.match_keys`).
SN, PSN, SNX, FN, PFN, DOB, DOBX, SEX, PC, PCD, NHS = MATCH_KEY_NAMES


# Comparing ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Comparison:
    """The agreement level of each attribute, the score, and whether the auto-link gates pass."""

    levels: tuple[str, ...]  # one per ATTRIBUTES, in order ('missing' when either side lacks it)
    raw: float
    score: float  # raw, capped at CAP when the gates fail
    gates: bool  # both names exact or preferred, date of birth exact

    def level(self, attribute: str) -> str:
        return self.levels[ATTRIBUTES.index(attribute)]

    @property
    def pattern(self) -> str:
        """e.g. 'surname=exact forename=disagree dob=exact sex=agree postcode=exact': levels only, no values."""
        return " ".join(f"{a}={lv}" for a, lv in zip(ATTRIBUTES, self.levels, strict=True))


def _names_level(p: Mapping[str, str], lrn: Mapping[str, str], legal: str, preferred: str) -> str:
    a, b = p.get(legal), lrn.get(legal)
    if not a or not b:
        return MISSING
    if a == b:
        return "exact"
    mine = {a, p.get(preferred)} - {None}
    theirs = {b, lrn.get(preferred)} - {None}
    return "preferred" if mine & theirs else "disagree"


def compare(p: Mapping[str, str], lrn: Mapping[str, str]) -> Comparison:
    """Compare a Patient's match keys with a pupil's (symmetric in everything but the NHS key, which is not scored)."""
    sn = _names_level(p, lrn, SN, PSN)
    if sn == "disagree" and p.get(SNX) and p.get(SNX) == lrn.get(SNX):
        sn = "phonetic"
    fn = _names_level(p, lrn, FN, PFN)
    if not p.get(DOB) or not lrn.get(DOB):
        dob = MISSING
    elif p[DOB] == lrn[DOB]:
        dob = "exact"
    elif p[DOB] == lrn.get(DOBX) or p.get(DOBX) == lrn[DOB]:
        dob = "swapped"
    else:
        dob = "disagree"
    sex = MISSING if not p.get(SEX) or not lrn.get(SEX) else ("agree" if p[SEX] == lrn[SEX] else "disagree")
    if not p.get(PC) or not lrn.get(PC):
        pc = MISSING
    elif p[PC] == lrn[PC]:
        pc = "exact"
    else:
        pc = "district" if p.get(PCD) == lrn.get(PCD) else "disagree"
    levels = (sn, fn, dob, sex, pc)
    raw = round(sum(WEIGHTS[a][lv] for a, lv in zip(ATTRIBUTES, levels, strict=True) if lv != MISSING), 2)
    gates = sn in ("exact", "preferred") and fn in ("exact", "preferred") and dob == "exact"
    return Comparison(levels, raw, raw if gates else min(raw, CAP), gates)


def posterior(score: float, roll_size: int) -> float:
    """P(same child | the evidence), with prior odds 1 : roll size (the pupil is one of the roll)."""
    log_odds = score - math.log2(max(roll_size, 1))
    if log_odds > 60:
        return 1.0
    return 1.0 / (1.0 + math.exp2(-log_odds))


# Deciding ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PatientFacts:
    """What the store holds about a trust Patient (keys only)."""

    patient_key: str
    school_urn: str | None
    match_hash: str | None
    match_keys: Mapping[str, str] | None
    verified: bool
    restricted: bool


@dataclass(frozen=True, slots=True)
class LearnerFacts:
    """What the store holds about a pupil on the roll (keys only)."""

    learner_key: str
    match_hash: str | None
    match_keys: Mapping[str, str] | None
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class Candidate:
    learner: LearnerFacts
    exact: bool  # the match hash agrees: same name and date of birth
    comparison: Comparison | None  # None when either side has no match keys (only the match hash can agree)

    @property
    def score(self) -> float | None:
        return self.comparison.score if self.comparison is not None else None

    def sort_key(self) -> tuple[float, bool]:
        return (self.score if self.score is not None else math.inf, self.exact)


_BLOCK_KINDS: Final = ((SN, SN), (SN, PSN), (PSN, SN), (PSN, PSN), (SNX, SNX), (FN, FN), (FN, PFN), (PFN, FN),
                       (PFN, PFN), (DOB, DOB), (DOB, DOBX))


class Roll:
    """One school's pupils, indexed for matching: by match hash, by blocking key, and twins (same surname, date of
    birth, sex and postcode)."""

    def __init__(self, learners: Iterable[LearnerFacts]) -> None:
        self.learners = list(learners)
        self._by_hash: dict[str, list[LearnerFacts]] = defaultdict(list)
        self._block: dict[tuple[str, str], list[LearnerFacts]] = defaultdict(list)
        self._births: dict[tuple[str, str, str, str], list[LearnerFacts]] = defaultdict(list)
        for lrn in self.learners:
            if lrn.match_hash:
                self._by_hash[lrn.match_hash].append(lrn)
            mk = lrn.match_keys
            if not mk:
                continue
            for kind in (SN, PSN, SNX, FN, PFN, DOB, DOBX):
                if mk.get(kind):
                    self._block[(kind, mk[kind])].append(lrn)
            if all(mk.get(k) for k in (SN, DOB, SEX, PC)):
                self._births[(mk[SN], mk[DOB], mk[SEX], mk[PC])].append(lrn)

    def __len__(self) -> int:
        return len(self.learners)

    def exact(self, match_hash: str | None) -> list[LearnerFacts]:
        return list(self._by_hash.get(match_hash, ())) if match_hash else []

    def block(self, keys: Mapping[str, str]) -> list[LearnerFacts]:
        """The pupils sharing a surname, forename, Soundex or date-of-birth key with `keys` (each once)."""
        seen: dict[str, LearnerFacts] = {}
        for mine, theirs in _BLOCK_KINDS:
            if keys.get(mine):
                for lrn in self._block.get((theirs, keys[mine]), ()):
                    seen.setdefault(lrn.learner_key, lrn)
        return list(seen.values())

    def twins_of(self, learner: LearnerFacts) -> list[LearnerFacts]:
        """Other pupils with the same surname, date of birth, sex and postcode as `learner` (all four known)."""
        mk = learner.match_keys
        if not mk or not all(mk.get(k) for k in (SN, DOB, SEX, PC)):
            return []
        return [o for o in self._births.get((mk[SN], mk[DOB], mk[SEX], mk[PC]), ())
                if o.learner_key != learner.learner_key]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one trust Patient: link (`reason` None, with `method` and `confidence`) or review."""

    reason: ReviewReason | None
    candidate: Candidate | None = None
    candidates: tuple[Candidate, ...] = ()  # every candidate a reviewer should see, best first
    method: MatchMethod | None = None
    confidence: float = 0.0
    traceable: bool = False  # a PDS trace of the candidate's details could confirm the link

    @property
    def links(self) -> bool:
        return self.reason is None


def _review(reason: ReviewReason, candidate: Candidate | None = None, candidates: tuple[Candidate, ...] = (),
            *, traceable: bool = False) -> Decision:
    if candidate is not None and not candidates:
        candidates = (candidate,)
    return Decision(reason, candidate, candidates, traceable=traceable)


def _link(c: Candidate, method: MatchMethod, confidence: float) -> Decision:
    if c.learner.sensitive:
        return _review(ReviewReason.SENSITIVE_CASE, c)
    return Decision(None, c, (c,), method, round(confidence, 6))


def decide(p: PatientFacts, roll: Roll) -> Decision:
    """Link the Patient to one pupil of the roll of the school it names, or say why a person must decide."""
    if p.restricted:
        return _review(ReviewReason.RESTRICTED)
    if not p.school_urn:
        return _review(ReviewReason.NO_SCHOOL_NAMED)
    found: dict[str, Candidate] = {}
    exact = {lrn.learner_key for lrn in roll.exact(p.match_hash)}
    pool = {lrn.learner_key: lrn for lrn in roll.exact(p.match_hash)}
    if p.match_keys:
        for lrn in roll.block(p.match_keys):
            pool.setdefault(lrn.learner_key, lrn)
    for key, lrn in pool.items():
        cmp = compare(p.match_keys, lrn.match_keys) if p.match_keys and lrn.match_keys else None
        c = Candidate(lrn, key in exact, cmp)
        if c.exact or (c.score is not None and c.score >= REVIEW):
            found[key] = c
    above = tuple(sorted(found.values(), key=Candidate.sort_key, reverse=True))
    if len(exact) > 1:
        return _review(ReviewReason.SEVERAL_CANDIDATES, None, above)
    if len(above) > 1:
        return _review(ReviewReason.AMBIGUOUS, above[0], above)
    if not above:
        return _review(ReviewReason.NO_CANDIDATE)
    c = above[0]
    twins = roll.twins_of(c.learner)
    if twins:
        rest = tuple(Candidate(t, False, compare(p.match_keys, t.match_keys) if p.match_keys and t.match_keys
                               else None) for t in twins)
        return _review(ReviewReason.AMBIGUOUS, c, (c, *sorted(rest, key=Candidate.sort_key, reverse=True)))
    nhs = (c.learner.match_keys or {}).get(NHS)
    if nhs and nhs != p.patient_key:
        return _review(ReviewReason.NHS_NUMBER_DISAGREES, c)
    dob_exact = c.comparison is not None and c.comparison.level("dob") == "exact"
    if c.exact and p.verified:
        return _link(c, MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB, 1.0)
    if c.comparison is not None and c.comparison.score >= AUTO:
        return _link(c, MatchMethod.SCORED_DEMOGRAPHICS, posterior(c.comparison.score, len(roll)))
    if p.verified and nhs and dob_exact:  # nhs == p.patient_key here
        return _link(c, MatchMethod.VERIFIED_NHS_NUMBER_SCHOOL_RECORD, 1.0)
    if c.exact and not p.verified:
        return _review(ReviewReason.UNVERIFIED_NHS_NUMBER, c)
    return _review(ReviewReason.LOW_SCORE, c, traceable=p.verified and dob_exact and not c.learner.sensitive)


@dataclass(frozen=True, slots=True)
class TraceFinding:
    """What a PDS trace of a candidate's details found, reduced to keys: the patient key of each result at or above
    PDS_MIN_SCORE, and whether any result is restricted."""

    patient_keys: tuple[str, ...] = field(default=())
    restricted: bool = False


def after_trace(d: Decision, p: PatientFacts, found: TraceFinding) -> Decision:
    """A traceable LOW_SCORE decision, once PDS has been asked who the candidate's details belong to."""
    c = d.candidate
    if not d.traceable or c is None:
        return d
    if found.restricted:
        return _review(ReviewReason.RESTRICTED, c)
    if len(found.patient_keys) != 1:
        return d  # nobody, or several: PDS cannot say; a person decides
    if found.patient_keys[0] != p.patient_key:
        return _review(ReviewReason.NHS_NUMBER_DISAGREES, c)
    return _link(c, MatchMethod.PDS_TRACE, 1.0)

"""Routing by postcode district: which trust's area a school is in, for a learner no trust has named yet.

A learner's records go to each trust whose patient (and referral) names them (links, per trust; see
agreements/README.md, "Routing"). Where no trust has named the learner, the partnership's table decides whose
area a school is in: `agreements/routing/postcode-districts.yaml` (`SCHOOLSLINK_ROUTING` to use another file):

    schools:   {URN: postcode district}       # the school's own address (GIAS), public data
    districts: {postcode district: trust ODS} # whose CYPMHS serves it

Used for move notices (schoolslink/pipeline/notices.py): the trust that knew a pupil who moved school is told
whose area the new school is in, never the new school. No file: no routing (the notice says so).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from schoolslink.errors import ConfigurationError
from schoolslink.governance.agreement import agreements_dir

_DISTRICT = re.compile(r"[A-Z]{1,2}[0-9][0-9A-Z]?")
_URN = re.compile(r"\d{6}")
_ODS = re.compile(r"[A-Z0-9]{3,6}")


@dataclass(frozen=True, slots=True)
class RoutingTable:
    school_districts: dict[str, str] = field(default_factory=dict)
    district_trusts: dict[str, str] = field(default_factory=dict)

    def trust_for_school(self, urn: str) -> str | None:
        district = self.school_districts.get(urn)
        return self.district_trusts.get(district) if district else None


def routing_path() -> Path:
    env = os.environ.get("SCHOOLSLINK_ROUTING")
    return Path(env) if env else agreements_dir() / "routing" / "postcode-districts.yaml"


def load_routing(path: Path | None = None) -> RoutingTable:
    path = path or routing_path()
    if not path.exists():
        return RoutingTable()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise ConfigurationError(f"{path}: not valid YAML") from None
    if not isinstance(doc, dict) or set(doc) - {"schools", "districts"}:
        raise ConfigurationError(f"{path}: a routing table has only 'schools' and 'districts'")
    schools = {str(k): str(v).upper().strip() for k, v in (doc.get("schools") or {}).items()}
    districts = {str(k).upper().strip(): str(v) for k, v in (doc.get("districts") or {}).items()}
    bad = ([f"school {k!r} is not a URN" for k in schools if not _URN.fullmatch(k)]
           + [f"{v!r} (school {k}) is not a postcode district" for k, v in schools.items()
              if not _DISTRICT.fullmatch(v)]
           + [f"{k!r} is not a postcode district" for k in districts if not _DISTRICT.fullmatch(k)]
           + [f"{v!r} (district {k}) is not an ODS code" for k, v in districts.items() if not _ODS.fullmatch(v)])
    if bad:
        raise ConfigurationError(f"{path}: " + "; ".join(bad))
    return RoutingTable(schools, districts)

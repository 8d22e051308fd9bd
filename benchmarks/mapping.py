"""Canonical school context -> checked UK Core Observations: the compiled mapping plus the fast check,
against building and validating `fhir.resources` R4B models record by record, in the same run.

    .venv/bin/python -m benchmarks.mapping [--resources 250000] [--baseline 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any


def _records(n_learners: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    return [{
        "learner_key": f"lrn-{rng.getrandbits(64):016x}", "school_urn": str(900001 + i % 500), "trust_ods": "R9X",
        "patient_ref": f"Patient/pat-{i:06d}", "effective": "2026-11-26",
        "values": {"attendance_percent": round(rng.uniform(40, 100), 1), "sen_provision": rng.choice("EKN"),
                   "exclusions_fixed_count": rng.randrange(4), "year_group": str(rng.randrange(1, 12))},
    } for i in range(n_learners)]


def _timed(records: list[dict[str, Any]], check_one: Callable[[dict[str, Any]], bool]) -> tuple[int, float]:
    """Map every record with the compiled mapping and check each resource; (resources, seconds)."""
    from schoolslink.mapping.engine import load_mappings

    cm = load_mappings().compile("school-context-observations")
    t0 = time.perf_counter()
    n = 0
    for rec in records:
        for r in cm.run(rec).get("resources", ()):
            if not check_one(r):
                raise SystemExit("a good record was refused")
            n += 1
    return n, time.perf_counter() - t0


def fast(records: list[dict[str, Any]]) -> tuple[int, float]:
    """The compiled mapping and the fast UK Core check, as runs use them."""
    from schoolslink.mapping.ukcore import check

    return _timed(records, lambda r: not check(r))


def baseline(records: list[dict[str, Any]]) -> tuple[int, float]:
    """The obvious way: build each Observation as an R4B model, record by record, then the UK Core rules."""
    from fhir.resources.R4B.observation import Observation

    from schoolslink.mapping.ukcore import ukcore_rules

    def slow(r: dict[str, Any]) -> bool:
        Observation.model_validate(r)
        return not ukcore_rules(r)

    return _timed(records, slow)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", type=int, default=250_000)
    ap.add_argument("--baseline", type=int, default=20_000, help="resources for the (slow) baseline")
    args = ap.parse_args()
    os.environ.setdefault("SCHOOLSLINK_KEY", "benchmark")
    base_n, base_s = baseline(_records(args.baseline // 4))
    fast_n, fast_s = fast(_records(args.resources // 4))
    report = {
        "resources": fast_n, "seconds": round(fast_s, 2), "resources_per_s": round(fast_n / fast_s),
        "baseline_resources": base_n, "baseline_resources_per_s": round(base_n / base_s),
        "speedup": round((fast_n / fast_s) / (base_n / base_s), 1),
        "target": ">= 100,000 resources/s where R4B record by record runs about 14,000/s (ratio >= 7.1)",
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FHIR pull and push against the real Medplum server at the benchmark trust's size (25,000 referrals).

    .venv/bin/python -m benchmarks.fhir_io [--referrals 25000] [--json]

Push: our 25,000 school-context Observations written by the pipeline's client as `batch` Bundles of
`PUT Type/id`, for several bundle sizes; baselines in the same run: one `PUT Type/id` request per
resource, and `batch` conditional PUT (`PUT Observation?identifier=...`, what a server that assigns ids
needs), each on a sample.
Pull: the trust's 25,000 ServiceRequests read by the incremental pull (`_lastUpdated` watermark paging)
for several page sizes, then the same pull again with nothing changed; baseline: paging with `_offset`
(what a client does when the server gives no `next` links and the watermark is not used).

Figures are resources per second and ratios against the baselines, all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import timedelta
from typing import Any

import httpx

from connectors.fhir.client import FhirClient
from connectors.fhir.pull import IncrementalPull
from connectors.fhir.server import MedplumServer
from schoolslink.constants import NHS_NUMBER_SYSTEM, OUR_META_SOURCE, OUR_TAG_CODE, OUR_TAG_SYSTEM
from schoolslink.mapping import fhir_inbound as fin

OUR_ID = "https://fhir.schoolslink.org.uk/Id/record"
PUSH_BUNDLES = (100, 500, 2000, 5000)
PULL_PAGES = (100, 1000, 5000)


def referral(i: int) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest", "id": f"ref-{i:06d}",
        "identifier": [{"system": "https://trust.example.nhs.uk/Id/referral", "value": f"R{i:08d}"}],
        "status": "active", "intent": "order",
        "category": [{"coding": [{"system": "https://fhir.nhs.uk/England/CodeSystem/England-MHSDS-ServiceTeamType",
                                  "code": "C02"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1094791000000101",
                             "display": "Referral to child and adolescent mental health service"}]},
        "subject": {"reference": f"Patient/pat-{i:06d}",
                    "identifier": {"system": NHS_NUMBER_SYSTEM, "value": f"999{i:07d}"}},
        "authoredOn": "2026-09-01", "performer": [{"reference": f"PractitionerRole/role-{i % 40}"}],
        "reasonCode": [{"text": "low mood"}],
    }


def observation(i: int, value: str = "attendance 93.4%") -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": f"sc-{i:06d}",
        "meta": {"source": OUR_META_SOURCE, "tag": [{"system": OUR_TAG_SYSTEM, "code": OUR_TAG_CODE}]},
        "identifier": [{"system": OUR_ID, "value": f"sc-{i:06d}"}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "social-history"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1156016008",
                             "display": "School attendance"}]},
        "subject": {"reference": f"Patient/pat-{i:06d}"}, "effectiveDateTime": "2026-11-25",
        "valueString": value,
    }


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _offset_pull(base: str, rtype: str, page: int) -> int:
    n = 0
    offset = 0
    with httpx.Client(base_url=base + "/", timeout=600) as http:
        while True:
            body = http.get(rtype, params={"_count": page, "_offset": offset, "_sort": "_id"}).json()
            got = len(body.get("entry") or [])
            n += got
            offset += got
            if got < page:
                return n


def run(referrals: int) -> dict[str, Any]:
    out: dict[str, Any] = {"referrals": referrals, "push": {}, "pull": {}}
    obs = [observation(i) for i in range(referrals)]
    with MedplumServer() as server:
        base = server.base_url
        # Baselines first, on samples (their rates are flat in the number of resources).
        sample = obs[: min(1000, referrals)]
        with FhirClient(base) as c, httpx.Client(base_url=base + "/", timeout=60,
                                                 headers={"Content-Type": "application/fhir+json"}) as http:
            t, _ = _timed(lambda: [http.put(f"Observation/{o['id']}", content=json.dumps(o)) for o in sample])
            out["push"]["baseline_put_per_resource"] = {"resources": len(sample), "seconds": round(t, 3),
                                                        "per_s": round(len(sample) / t)}
            cond = [observation(i, "conditional") for i in range(referrals, referrals + 200)]
            c.bundle_size = 200
            t, res = _timed(lambda: c.put_batch(cond, conditional=True))
            assert all(r.ok for r in res)
            out["push"]["baseline_conditional_put_batch"] = {"resources": len(cond), "seconds": round(t, 3),
                                                             "per_s": round(len(cond) / t)}
        for size in PUSH_BUNDLES:
            with FhirClient(base, bundle_size=size, timeout=600) as c:
                t, res = _timed(lambda c=c: c.put_batch(obs))
                assert len(res) == referrals and all(r.ok for r in res)
                out["push"][f"batch_put_by_id_bundle_{size}"] = {"resources": referrals, "seconds": round(t, 3),
                                                                 "per_s": round(referrals / t)}
        base_rate = out["push"]["baseline_put_per_resource"]["per_s"]
        cond_rate = out["push"]["baseline_conditional_put_batch"]["per_s"]
        for key, fig in out["push"].items():
            if key.startswith("batch_"):
                fig["x_put_per_resource"] = round(fig["per_s"] / base_rate, 1)
                fig["x_conditional_put"] = round(fig["per_s"] / cond_rate, 1)

        # The trust's referrals, then the pulls.
        with FhirClient(base, bundle_size=5000, timeout=600) as c:
            assert all(r.ok for r in c.put_batch([referral(i) for i in range(referrals)]))
        t, n = _timed(lambda: _offset_pull(base, "ServiceRequest", 1000))
        assert n == referrals
        out["pull"]["baseline_offset_paging_1000"] = {"resources": n, "seconds": round(t, 3), "per_s": round(n / t)}
        for page in PULL_PAGES:
            with FhirClient(base, timeout=600) as c:
                pull = IncrementalPull(c, "ServiceRequest", page_size=page, is_own=fin.is_ours)
                t, n = _timed(lambda pull=pull: sum(1 for _ in pull))
                assert n == referrals, n
                # Nothing changed since: every referral was written inside the overlap window (2 minutes), so the
                # next pull reads them all again and skips each by id + versionId; without an overlap it reads
                # only the boundary instant. In steady state the window holds only the last minutes' changes.
                again = IncrementalPull(c, "ServiceRequest", pull.next_state(), page_size=page, is_own=fin.is_ours)
                t2, n2 = _timed(lambda again=again: sum(1 for _ in again))
                bare = IncrementalPull(c, "ServiceRequest", pull.next_state(), page_size=page, is_own=fin.is_ours,
                                       overlap=timedelta(0))
                t3, n3 = _timed(lambda bare=bare: sum(1 for _ in bare))
                assert n2 == 0 and n3 == 0
            out["pull"][f"incremental_page_{page}"] = {
                "resources": n, "seconds": round(t, 3), "per_s": round(n / t),
                "x_offset_paging": round((n / t) / out["pull"]["baseline_offset_paging_1000"]["per_s"], 1),
                "nothing_changed_seconds": round(t2, 3), "nothing_changed_no_overlap_seconds": round(t3, 3)}
    out["client_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--referrals", type=int, default=25000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = run(args.referrals)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"FHIR I/O against the Medplum peer, {args.referrals} referrals (client peak RSS "
          f"{out['client_peak_rss_mb']} MB)")
    for what in ("push", "pull"):
        for key, fig in out[what].items():
            extra = ", ".join(f"{k} {v}" for k, v in fig.items() if k.startswith(("x_", "nothing")))
            print(f"  {what:4s} {key:36s} {fig['per_s']:>8,d}/s  ({fig['resources']} in {fig['seconds']} s)"
                  + (f"  {extra}" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

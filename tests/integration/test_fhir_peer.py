"""The FHIR client against the real FHIR peer (Medplum's FhirRouter + MemoryRepository), plus the
client's paging and retry logic against scripted servers (httpx.MockTransport) for the cases the
real peer cannot be made to produce on demand (long runs of equal lastUpdated, next links, 503s).

The ``medplum`` fixture is session-scoped and shared with other tests, so every test here writes
ids under its own random prefix and filters what it reads back by that prefix.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.fhir.client import EntryResult, FhirClient
from connectors.fhir.errors import (
    FhirNotFoundError,
    FhirPagingError,
    FhirPermanentError,
    FhirTransientError,
)
from connectors.fhir.server import MedplumServer

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
OUR_ID_SYSTEM = "https://schoolslink.example/Id/record"


def observation(rid: str, *, patient: str = "p1", value: str = "attendance below 90%", **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "meta": {
            "source": "urn:schoolslink",
            "tag": [{"system": "urn:schoolslink", "code": "school-context"}],
        },
        "identifier": [{"system": OUR_ID_SYSTEM, "value": rid}],
        "status": "final",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "365458002"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-03-01",
        "valueCodeableConcept": {"text": value},
    }
    resource.update(extra)
    return resource


@pytest.fixture()
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture()
def client(medplum: MedplumServer) -> Iterator[FhirClient]:
    with FhirClient(medplum.base_url, timeout=30, bundle_size=2000) as c:
        yield c


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


def ours(resources: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in resources if str(r.get("id", "")).startswith(prefix)]


# --------------------------------------------------------------------------- the real peer


def test_server_is_up(medplum: MedplumServer) -> None:
    assert medplum.base_url.startswith("http://127.0.0.1:") and medplum.base_url.endswith("/fhir/R4")
    assert medplum.pid > 0 and medplum.running
    assert httpx.get(medplum.healthz_url).status_code == 200
    meta = httpx.get(f"{medplum.base_url}/metadata").json()
    assert meta["resourceType"] == "CapabilityStatement" and meta["fhirVersion"] == "4.0.1"


def test_put_batch_creates_resources_with_our_ids(medplum: MedplumServer, prefix: str) -> None:
    resources = [observation(f"{prefix}-{i}", patient=f"{prefix}p{i % 3}") for i in range(25)]
    with FhirClient(medplum.base_url, bundle_size=10) as c:  # three bundles
        results = c.put_batch(resources)
        assert [(r.resource_type, r.id) for r in results] == [("Observation", f"{prefix}-{i}") for i in range(25)]
        # Medplum answers 200 even when the PUT created the resource (HAPI: 201).
        assert all(r.ok and r.status in (200, 201) and r.version_id and r.message is None for r in results)
        stored = c.read("Observation", f"{prefix}-7")
        assert stored["id"] == f"{prefix}-7"
        assert stored["meta"]["versionId"] == results[7].version_id
        assert stored["subject"] == {"reference": f"Patient/{prefix}p1"}
        assert stored["meta"]["source"] == "urn:schoolslink"
        # search parameters the pipeline relies on
        by_identifier = c.search("Observation", {"identifier": f"{OUR_ID_SYSTEM}|{prefix}-3"})
        assert [r["id"] for r in by_identifier] == [f"{prefix}-3"]
        by_id = c.search("Observation", {"_id": f"{prefix}-4,{prefix}-5"})
        assert sorted(r["id"] for r in by_id) == [f"{prefix}-4", f"{prefix}-5"]
        by_subject = c.search("Observation", {"subject": f"Patient/{prefix}p2", "_count": "100"})
        assert len(by_subject) == 8
        by_patient = c.search("Observation", {"patient": f"{prefix}p2", "_count": "100"})  # bare id works
        assert len(by_patient) == 8
        # `subject` has several target types, so a bare id matches nothing on Medplum
        assert c.search("Observation", {"subject": f"{prefix}p2"}) == []


def test_identical_put_adds_a_version_on_medplum(client: FhirClient, prefix: str) -> None:
    """Medplum records a new version for every PUT, identical or not (HAPI skips no-op updates).
    The pipeline's outbox skips unchanged records itself, so nothing identical is re-sent."""
    resource = observation(f"{prefix}-same")
    first = client.put_batch([resource])[0]
    second = client.put_batch([resource])[0]
    assert first.ok and second.ok
    assert first.version_id != second.version_id
    assert client.history_count("Observation", resource["id"]) == 2
    third = client.put_batch([observation(f"{prefix}-same", value="attendance recovered")])[0]
    assert third.ok
    assert client.history_count("Observation", resource["id"]) == 3
    assert client.read("Observation", resource["id"])["valueCodeableConcept"]["text"] == "attendance recovered"
    # reading _history twice gives the same (newest-first) order: the peer fixes Medplum's
    # in-place reverse of the stored version list
    history = httpx.get(f"{client.base_url}/Observation/{resource['id']}/_history").json()
    again = httpx.get(f"{client.base_url}/Observation/{resource['id']}/_history").json()
    versions = [e["resource"]["meta"]["versionId"] for e in history["entry"]]
    assert versions == [e["resource"]["meta"]["versionId"] for e in again["entry"]]
    assert versions == [third.version_id, second.version_id, first.version_id]


def test_search_since_returns_exactly_what_changed_after_the_watermark(medplum: MedplumServer, prefix: str) -> None:
    transport = CountingTransport()
    with FhirClient(medplum.base_url, bundle_size=5, transport=transport) as c:
        before = c.put_batch([observation(f"{prefix}-a{i}") for i in range(12)])
        assert all(r.ok for r in before)
        before_resources = [c.read("Observation", f"{prefix}-a{i}") for i in range(12)]
        watermark = max(r["meta"]["lastUpdated"] for r in before_resources)
        time.sleep(0.005)
        after = c.put_batch([observation(f"{prefix}-b{i}") for i in range(50)])  # 10 bundles
        assert all(r.ok for r in after)
        c.put_batch([observation(f"{prefix}-a0", value="changed")])  # an update counts as a change

        transport.requests.clear()
        got = ours(list(c.search_since("Observation", watermark, page_size=7)), prefix)

    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "a version was yielded twice"
    at_watermark = {r["id"] for r in before_resources if r["meta"]["lastUpdated"] == watermark} - {f"{prefix}-a0"}
    expected = {f"{prefix}-b{i}" for i in range(50)} | {f"{prefix}-a0"} | at_watermark
    assert set(ids) == expected  # ge: resources written in the watermark's own millisecond come again
    stamps = [r["meta"]["lastUpdated"] for r in got]
    assert stamps == sorted(stamps)
    assert got[-1]["id"] == f"{prefix}-a0" and got[-1]["valueCodeableConcept"]["text"] == "changed"
    searches = [r for r in transport.requests if r.url.path.endswith("/Observation")]
    assert len(searches) >= 8  # 50+ resources at 7 a page
    assert all(r.url.params.get("_sort") == "_lastUpdated" for r in searches)
    # nothing changed since the newest one: only boundary resources (same millisecond) come back
    with FhirClient(medplum.base_url) as c:
        newest = got[-1]["meta"]["lastUpdated"]
        again = ours(list(c.search_since("Observation", newest, page_size=7)), prefix)
        assert {r["id"] for r in again} <= {r["id"] for r in got if r["meta"]["lastUpdated"] == newest}


def test_all_resources_pages_through_everything(client: FhirClient, prefix: str) -> None:
    client.put_batch([observation(f"{prefix}-{i}") for i in range(30)])
    everything = client.all_resources("Observation")
    assert len(ours(everything, prefix)) == 30
    assert len({(r["id"], r["meta"]["versionId"]) for r in everything}) == len(everything)


def test_a_bad_entry_does_not_fail_its_bundle_mates(client: FhirClient, prefix: str) -> None:
    good = [observation(f"{prefix}-g{i}") for i in range(4)]
    unknown_element = observation(f"{prefix}-x1", notAnElement=True)
    wrong_json_type = observation(f"{prefix}-x2", status=123)
    missing_required = {"resourceType": "Observation", "id": f"{prefix}-x3", "status": "final"}  # no code
    bad_id = observation(f"{prefix}_x4")  # '_' is not allowed in an R4 id
    batch = [good[0], unknown_element, good[1], wrong_json_type, good[2], missing_required, bad_id, good[3]]
    results = client.put_batch(batch)
    by_id = {r.id: r for r in results}
    for resource in good:
        assert by_id[resource["id"]].ok, by_id[resource["id"]]
        assert client.read("Observation", resource["id"])["id"] == resource["id"]
    for resource in (unknown_element, wrong_json_type, missing_required, bad_id):
        result = by_id[resource["id"]]
        assert not result.ok and 400 <= result.status < 500, result
        assert result.message and len(result.message) <= 300
        assert "attendance" not in result.message  # never the resource body
        with pytest.raises(FhirNotFoundError):
            client.read("Observation", resource["id"])
    assert "notAnElement" in (by_id[unknown_element["id"]].message or "")


def test_peer_refuses_type_url_mismatch_per_entry(medplum: MedplumServer, prefix: str) -> None:
    """put_batch derives each URL from the resource, so check the peer itself for this case."""
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": observation(f"{prefix}-ok"),
                "request": {"method": "PUT", "url": f"Observation/{prefix}-ok"},
            },
            {
                "resource": {"resourceType": "Patient", "id": f"{prefix}-pt"},
                "request": {"method": "PUT", "url": f"Observation/{prefix}-pt"},
            },
            {
                "resource": observation(f"{prefix}-id1"),
                "request": {"method": "PUT", "url": f"Observation/{prefix}-id2"},
            },
        ],
    }
    response = httpx.post(medplum.base_url, json=bundle, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    statuses = [int(e["response"]["status"].split()[0]) for e in response.json()["entry"]]
    assert statuses[0] == 200 and statuses[1] == 400 and statuses[2] == 400


def test_transaction_bundles_on_the_peer(medplum: MedplumServer, prefix: str) -> None:
    """Transactions answer all-or-error, but the memory repository cannot roll back: entries
    applied before the failing one stay. More than 50 updates are refused outright."""

    def put(rid: str, resource: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"resource": resource or observation(rid), "request": {"method": "PUT", "url": f"Observation/{rid}"}}

    def post(entries: list[dict[str, Any]]) -> httpx.Response:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return httpx.post(medplum.base_url, json=bundle, headers={"Content-Type": "application/fhir+json"})

    ok = post([put(f"{prefix}-t1"), put(f"{prefix}-t2")])
    assert ok.status_code == 200 and ok.json()["type"] == "transaction-response"
    failed = post([put(f"{prefix}-t3"), put(f"{prefix}-t4", {"resourceType": "Patient", "id": f"{prefix}-t4"})])
    assert failed.status_code == 400 and failed.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{medplum.base_url}/Observation/{prefix}-t3").status_code == 200  # not rolled back
    too_many = post([put(f"{prefix}-u{i}") for i in range(51)])
    assert too_many.status_code == 400
    assert httpx.get(f"{medplum.base_url}/Observation/{prefix}-u0").status_code == 404


def test_large_batch_body(medplum: MedplumServer, prefix: str) -> None:
    """5,000 resources in one Bundle, ~12 MB of JSON."""
    padding = "x" * 2000
    resources = [observation(f"{prefix}-{i}", note=[{"text": padding}]) for i in range(5000)]
    assert len(json.dumps(resources)) > 10_000_000
    with FhirClient(medplum.base_url, bundle_size=5000) as c:
        results = c.put_batch(resources)
        assert len(results) == 5000 and all(r.ok for r in results)
        assert c.read("Observation", f"{prefix}-4999")["note"][0]["text"] == padding


def test_read_errors(client: FhirClient, prefix: str) -> None:
    with pytest.raises(FhirNotFoundError) as missing:
        client.read("Observation", f"{prefix}-nope")
    assert missing.value.status == 404 and prefix not in str(missing.value)
    with pytest.raises(FhirNotFoundError):
        client.history_count("Observation", f"{prefix}-nope")
    with pytest.raises(ValueError):
        client.put_batch([{"resourceType": "Observation", "status": "final"}])  # no id


def test_server_never_logs_request_data(medplum: MedplumServer, client: FhirClient, prefix: str) -> None:
    nhs_number = "9434765919"
    client.put_batch([observation(f"{prefix}-log", identifier=[{"system": NHS_NUMBER_SYSTEM, "value": nhs_number}])])
    client.search("Observation", {"identifier": f"{NHS_NUMBER_SYSTEM}|{nhs_number}"})
    with pytest.raises(FhirNotFoundError):
        client.read("Observation", f"{prefix}-missing")
    log = medplum.log_path.read_text()
    assert nhs_number not in log and prefix not in log


def test_httpx_request_log_lines_lose_their_query(
    client: FhirClient, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    nhs_number = "9434765870"
    with caplog.at_level(logging.INFO, logger="httpx"):
        client.search("Patient", {"identifier": f"{NHS_NUMBER_SYSTEM}|{nhs_number}"})
    assert "HTTP Request" in caplog.text
    assert nhs_number not in caplog.text and "nhs-number" not in caplog.text


def test_stop_and_restart(tmp_path: Any) -> None:
    with MedplumServer(log_path=tmp_path / "peer.log") as server:
        pid, base = server.pid, server.base_url
        assert httpx.get(server.healthz_url).status_code == 200
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/metadata", timeout=2)
    server.stop()  # idempotent
    assert pid > 0


# ------------------------------------------------------------- scripted servers (MockTransport)


class ScriptedSearchServer:
    """Just enough of a FHIR search endpoint: ``_lastUpdated=ge``, ``_sort=_lastUpdated``,
    ``_count``, ``_offset``; optionally next links, an ignored ``_offset`` or unsorted pages."""

    def __init__(
        self,
        stamps: list[str],
        *,
        links: bool = False,
        ignore_offset: bool = False,
        unsorted: bool = False,
    ) -> None:
        self.resources: list[dict[str, Any]] = [
            {"resourceType": "Observation", "id": f"o{i}", "meta": {"versionId": "1", "lastUpdated": s}}
            for i, s in enumerate(stamps)
        ]
        self.links = links
        self.ignore_offset = ignore_offset
        self.unsorted = unsorted
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls > 500:
            raise AssertionError("client is looping")
        query = {k: v[-1] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        matches = self.resources
        lu = query.get("_lastUpdated")
        if lu:
            assert lu.startswith("ge")
            matches = [r for r in matches if r["meta"]["lastUpdated"] >= lu[2:]]
        if query.get("_sort") == "_lastUpdated" and not self.unsorted:
            matches = sorted(matches, key=lambda r: r["meta"]["lastUpdated"])  # stable
        elif self.unsorted:
            matches = list(reversed(matches))
        count = int(query.get("_count", "20"))
        offset = 0 if self.ignore_offset else int(query.get("_offset", "0"))
        page = matches[offset : offset + count]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in page],
        }
        if self.links and offset + count < len(matches):
            nxt = dict(query, _offset=str(offset + count))
            bundle["link"] = [{"relation": "next", "url": str(request.url.copy_with(params=nxt))}]
        return httpx.Response(200, json=bundle)


def scripted(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> FhirClient:
    return FhirClient("http://fhir.test/fhir/R4", transport=httpx.MockTransport(handler), **kwargs)


def stamp(ms: int) -> str:
    return f"2024-05-01T10:00:00.{ms:03d}Z"


def test_search_since_steps_through_long_runs_of_equal_lastupdated() -> None:
    # 23 resources in one millisecond, then 5, then 1, then 17: page size 4
    stamps = [stamp(1)] * 23 + [stamp(2)] * 5 + [stamp(3)] + [stamp(4)] * 17
    server = ScriptedSearchServer(stamps)
    got = list(scripted(server).search_since("Observation", None, page_size=4))
    assert [r["id"] for r in got] == [f"o{i}" for i in range(len(stamps))]
    # from a watermark in the middle of a run: the whole run again (ge), nothing twice
    server = ScriptedSearchServer(stamps)
    got = list(scripted(server).search_since("Observation", stamp(2), page_size=4))
    assert [r["id"] for r in got] == [f"o{i}" for i in range(23, len(stamps))]


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 50])
def test_search_since_any_page_size(page_size: int) -> None:
    stamps = [stamp(ms) for ms in (1, 1, 2, 2, 2, 2, 3, 5, 5, 5, 5, 5, 5, 5, 8, 9, 9)]
    got = list(scripted(ScriptedSearchServer(stamps)).search_since("Observation", None, page_size=page_size))
    assert [r["id"] for r in got] == [f"o{i}" for i in range(len(stamps))]


def test_search_since_follows_next_links() -> None:
    stamps = [stamp(i // 3) for i in range(40)]
    server = ScriptedSearchServer(stamps, links=True)
    got = list(scripted(server).search_since("Observation", None, page_size=6))
    assert [r["id"] for r in got] == [f"o{i}" for i in range(40)]
    assert server.calls == 7


def test_search_since_refuses_to_loop_when_offset_is_ignored() -> None:
    server = ScriptedSearchServer([stamp(1)] * 30, ignore_offset=True)
    with pytest.raises(FhirPagingError, match="share one lastUpdated"):
        list(scripted(server).search_since("Observation", None, page_size=10))
    assert server.calls <= 3


def test_search_since_refuses_unsorted_pages() -> None:
    server = ScriptedSearchServer([stamp(i) for i in range(10)], unsorted=True)
    with pytest.raises(FhirPagingError, match="did not sort"):
        list(scripted(server).search_since("Observation", None, page_size=4))


def test_search_since_detects_next_link_cycles() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "searchset",
                "link": [{"relation": "next", "url": "http://fhir.test/fhir/R4/Observation?page=2"}],
                "entry": [
                    {
                        "resource": {
                            "resourceType": "Observation",
                            "id": "o1",
                            "meta": {"lastUpdated": stamp(1)},
                        }
                    }
                ],
            },
        )

    with pytest.raises(FhirPagingError, match="cycle"):
        list(scripted(handler).search_since("Observation", None))


def test_transient_errors_are_retried_honouring_retry_after() -> None:
    replies = iter(
        [
            httpx.Response(503, headers={"Retry-After": "3"}),
            httpx.Response(429, headers={"Retry-After": "1"}),
            httpx.Response(502),
            httpx.Response(200, json={"resourceType": "Observation", "id": "o1"}),
        ]
    )
    sleeps: list[float] = []
    c = scripted(lambda request: next(replies), sleep=sleeps.append, backoff_base=0.1, max_retries=4)
    assert c.read("Observation", "o1")["id"] == "o1"
    assert len(sleeps) == 3 and sleeps[0] >= 3 and sleeps[1] >= 1 and 0 < sleeps[2] <= 0.4


def test_transient_errors_give_up_after_max_retries() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    sleeps: list[float] = []
    c = scripted(handler, sleep=sleeps.append, max_retries=2)
    with pytest.raises(FhirTransientError) as err:
        c.search("Patient", {"identifier": f"{NHS_NUMBER_SYSTEM}|9434765919"})
    assert len(calls) == 3 and len(sleeps) == 2
    assert sleeps[0] < sleeps[1] * 2  # exponential with jitter, not constant
    assert "9434765919" not in str(err.value) and "nhs-number" not in str(err.value)
    assert err.value.status is None


def test_permanent_errors_are_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            422,
            json={
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": "rule broken"}],
            },
        )

    c = scripted(handler, sleep=lambda s: None)
    with pytest.raises(FhirPermanentError) as err:
        c.put_batch([observation("o1")])
    assert len(calls) == 1 and err.value.status == 422
    assert "rule broken" in str(err.value) and "attendance" not in str(err.value)


def test_put_batch_reports_bundles_done_before_a_failure() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 2:
            return httpx.Response(503)
        sent = json.loads(request.content)
        return httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "batch-response",
                "entry": [{"response": {"status": "201 Created", "etag": 'W/"1"'}} for _ in sent["entry"]],
            },
        )

    c = scripted(handler, bundle_size=2, max_retries=0)
    with pytest.raises(FhirTransientError) as err:
        c.put_batch([observation(f"o{i}") for i in range(5)])
    assert err.value.partial_results == [
        EntryResult("Observation", "o0", 201, True, "1", None),
        EntryResult("Observation", "o1", 201, True, "1", None),
    ]


@settings(max_examples=80, deadline=None)
@given(
    runs=st.lists(st.integers(min_value=1, max_value=12), min_size=0, max_size=12),
    page_size=st.integers(min_value=1, max_value=9),
    since_index=st.integers(min_value=-1, max_value=15),
)
def test_search_since_matches_a_full_sorted_scan(runs: list[int], page_size: int, since_index: int) -> None:
    """Property: for any runs of equal lastUpdated, any page size and any watermark, search_since
    yields exactly the resources at or after the watermark, in order, each once."""
    stamps = [stamp(ms) for ms, length in enumerate(runs) for _ in range(length)]
    since = stamp(since_index) if 0 <= since_index else None
    server = ScriptedSearchServer(stamps)
    got = [r["id"] for r in scripted(server).search_since("Observation", since, page_size=page_size)]
    assert got == [f"o{i}" for i, s in enumerate(stamps) if since is None or s >= since]

"""The PDS trace client against the PDS FHIR API sandbox's own responses, served over real HTTP on 127.0.0.1.

The canned responses are the sandbox's (../shared/corpora/nhs/pds-fhir-sandbox, see its README), byte for byte:
searchset Bundles with `search.score`, a restricted (`meta.security` R) record, a minimal one, and the Spine error
bodies. Missing corpus: skipped locally, a failure in CI.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pytest

from connectors.pds import (
    PdsFhirClient,
    PdsNotFoundError,
    PdsPermanentError,
    PdsRequestError,
    PdsTransientError,
)
from connectors.pds.trace import candidate_of_patient, candidates_of_bundle, error_of_outcome
from tests.integration.pds_server import ERRORS, MOCKS, PDS_CORPUS, PdsServer


@pytest.fixture(autouse=True)
def _corpus() -> None:
    if not PDS_CORPUS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {PDS_CORPUS}")
        pytest.skip(f"corpus not present: {PDS_CORPUS}")


@pytest.fixture()
def pds() -> Iterator[PdsServer]:
    with PdsServer() as server:
        yield server


@pytest.fixture()
def client(pds: PdsServer) -> Iterator[PdsFhirClient]:
    with PdsFhirClient(pds.base_url, max_retries=2, sleep=lambda _s: None) as c:
        yield c


def _load(path: str) -> dict[str, object]:
    return json.loads((PDS_CORPUS / path).read_text())  # type: ignore[no-any-return]


# The readers, on the corpus files -------------------------------------------------------------------------------

def test_every_mock_reads_into_candidates() -> None:
    assert sorted(p.name for p in MOCKS.glob("*.json")) == [
        "Minimal_Patient.json", "Minimal_PatientSearch.json", "Patient.json", "PatientSearch.json",
        "Sensitive_Patient.json", "Sensitive_PatientSearch.json"]
    jane = candidates_of_bundle(_load("mocks/PatientSearch.json"))
    assert [(c.nhs_number, c.verified, c.restricted, c.score, c.version_id) for c in jane] == [
        ("9000000009", True, False, 0.75, "2")]
    janet = candidates_of_bundle(_load("mocks/Sensitive_PatientSearch.json"))
    assert [(c.nhs_number, c.restricted, c.score) for c in janet] == [("9000000025", True, 0.75)]
    minimal = candidates_of_bundle(_load("mocks/Minimal_PatientSearch.json"))
    assert [(c.nhs_number, c.verification, c.restricted) for c in minimal] == [("9000000033", "01", False)]
    assert candidate_of_patient(_load("mocks/Sensitive_Patient.json")).restricted is True
    assert candidate_of_patient(_load("mocks/Minimal_Patient.json")).score is None


def test_a_candidate_never_shows_its_nhs_number_in_repr() -> None:
    c = candidate_of_patient(_load("mocks/Patient.json"))
    assert c.nhs_number == "9000000009" and "9000000009" not in repr(c)


@pytest.mark.parametrize(("file", "status", "error", "code"), [
    ("INVALID_SEARCH_DATA.json", 400, PdsRequestError, "INVALID_SEARCH_DATA"),
    ("INVALID_RESOURCE_ID.json", 400, PdsRequestError, "INVALID_RESOURCE_ID"),
    ("PRECONDITION_FAILED.json", 412, PdsRequestError, "PRECONDITION_FAILED"),
    ("RESOURCE_NOT_FOUND.json", 404, PdsNotFoundError, "RESOURCE_NOT_FOUND"),
    ("RESOURCE_VERSION_MISMATCH.json", 409, PdsRequestError, "RESOURCE_VERSION_MISMATCH"),
])
def test_every_error_body_reads_as_a_clear_error(file: str, status: int, error: type[Exception], code: str) -> None:
    assert (ERRORS / file).is_file()
    exc = error_of_outcome("PDS search", status, _load(f"errors/{file}"))
    assert type(exc) is error and exc.code == code and exc.status == status
    assert str(exc).startswith(f"PDS search: HTTP {status}, {code}: ")
    assert "#(diagnostics)" not in str(exc)  # PDS's own diagnostics text is never repeated


def test_an_unknown_or_malformed_error_body_still_gives_a_clear_error() -> None:
    assert str(error_of_outcome("PDS read", 500, None)) == "PDS read: HTTP 500"
    assert isinstance(error_of_outcome("PDS read", 503, None), PdsTransientError)
    odd = {"resourceType": "OperationOutcome", "issue": [{"details": {"coding": [{"code": "Jane Smith 2010"}]}}]}
    assert str(error_of_outcome("PDS read", 400, odd)) == "PDS read: HTTP 400"  # not a code's shape: not repeated


def test_a_response_that_is_not_what_pds_sends_is_refused() -> None:
    with pytest.raises(PdsPermanentError, match="not a searchset Bundle"):
        candidates_of_bundle(_load("mocks/Patient.json"))
    with pytest.raises(PdsPermanentError, match="modulus 11"):
        candidate_of_patient({"resourceType": "Patient", "id": "9000000001"})
    bad_score = _load("mocks/PatientSearch.json")
    bad_score["entry"][0]["search"]["score"] = "high"  # type: ignore[index]
    with pytest.raises(PdsPermanentError, match=r"search\.score"):
        candidates_of_bundle(bad_score)


# The client, over HTTP -------------------------------------------------------------------------------------------

def test_search_finds_jane_smith_as_the_sandbox_does(client: PdsFhirClient, pds: PdsServer) -> None:
    found = client.search(family="Smith", given="Jane", birthdate="2010-10-22", gender="F", postcode="ls1 6ae")
    assert [(c.nhs_number, c.verified, c.restricted, c.score) for c in found] == [("9000000009", True, False, 0.75)]
    seen = pds.sandbox.requests[-1]
    assert seen.path.endswith("/Patient") and seen.request_id
    assert seen.query == {"family": ["Smith"], "given": ["Jane"], "birthdate": ["eq2010-10-22"],
                          "gender": ["female"], "address-postalcode": ["LS1 6AE"]}


def test_search_marks_the_sensitive_record_restricted(client: PdsFhirClient) -> None:
    [janet] = client.search(family="Smythe", given="Janet", birthdate="2005-06-16")
    assert janet.restricted and janet.nhs_number == "9000000025"


def test_search_with_no_match_is_an_empty_list(client: PdsFhirClient) -> None:
    assert client.search(family="Nobody", given="Here", birthdate="2011-01-01") == []


def test_search_needs_family_given_and_birth_date(client: PdsFhirClient, pds: PdsServer) -> None:
    with pytest.raises(PdsRequestError, match="all needed"):
        client.search(family="", given="Jane", birthdate="2010-10-22")
    assert pds.sandbox.requests == []  # refused before anything was sent


def test_read_by_nhs_number(client: PdsFhirClient) -> None:
    assert client.read("9000000009").verified
    assert client.read("900 000 0025").restricted
    assert client.read("9000000033").version_id == "2"


def test_read_errors_are_clear_and_carry_no_number(client: PdsFhirClient) -> None:
    with pytest.raises(PdsNotFoundError) as not_found:
        client.read("9990000018")
    assert not_found.value.code == "RESOURCE_NOT_FOUND" and "9990000018" not in str(not_found.value)
    with pytest.raises(PdsRequestError) as invalid:
        client.read("9000000001")  # ten digits, failing the modulus 11 check: PDS says so
    assert invalid.value.code == "INVALID_RESOURCE_ID" and "9000000001" not in str(invalid.value)
    with pytest.raises(PdsRequestError, match="ten digits"):
        client.read("../Patient")


def test_the_sandbox_refuses_a_malformed_search(client: PdsFhirClient, pds: PdsServer) -> None:
    # The client always sends eqYYYY-MM-DD; the server's own check is exercised with a raw request.
    import httpx

    r = httpx.get(pds.base_url + "/Patient", params={"family": "Smith", "birthdate": "2010-10-22"},
                  headers={"X-Request-ID": "1"})
    assert r.status_code == 400 and "INVALID_SEARCH_DATA" in r.text
    r = httpx.get(pds.base_url + "/Patient/9000000009")
    assert r.status_code == 412 and "PRECONDITION_FAILED" in r.text  # no X-Request-ID: the client always sends one


def test_transient_failures_are_retried_then_raised(client: PdsFhirClient, pds: PdsServer) -> None:
    pds.sandbox.fail_next(503)
    assert client.read("9000000009").verified  # one 503, then the answer
    pds.sandbox.fail_next(429, n=3)
    with pytest.raises(PdsTransientError, match="HTTP 429"):
        client.read("9000000009")
    assert len(pds.sandbox.requests) == 5


@pytest.mark.parametrize(("status", "file", "error"), [
    (409, "RESOURCE_VERSION_MISMATCH.json", PdsRequestError),
    (412, "PRECONDITION_FAILED.json", PdsRequestError),
    (400, "INVALID_SEARCH_DATA.json", PdsRequestError),
])
def test_served_error_bodies_become_their_errors(client: PdsFhirClient, pds: PdsServer, status: int, file: str,
                                                  error: type[Exception]) -> None:
    pds.sandbox.fail_next(status, file)
    with pytest.raises(error) as exc:
        client.search(family="Smith", given="Jane", birthdate="2010-10-22")
    assert file.removesuffix(".json") in str(exc.value) and "Smith" not in str(exc.value)


def test_a_body_that_is_not_json_is_refused(client: PdsFhirClient, pds: PdsServer) -> None:
    pds.sandbox.add_search("Smith", "Jo", "2010-10-22", {"resourceType": "Patient"})
    with pytest.raises(PdsPermanentError, match="not a searchset Bundle"):
        client.search(family="Smith", given="Jo", birthdate="2010-10-22")


def test_request_log_lines_hold_no_names_or_numbers(client: PdsFhirClient, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx's own INFO line is the one at risk; an in-process Airflow earlier in the session may have set that
    # logger to WARNING or stopped it propagating (Airflow's logging config does), so say what this test needs.
    monkeypatch.setattr(logging.getLogger("httpx"), "propagate", True)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.INFO, logger="httpx"):
        client.search(family="Smith", given="Jane", birthdate="2010-10-22", postcode="LS1 6AE")
        client.read("9000000009")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP Request" in text
    for value in ("Smith", "Jane", "2010-10-22", "LS1", "9000000009"):
        assert value not in text


def test_the_trace_is_off_unless_configured() -> None:
    assert PdsFhirClient.from_env({}) is None
    assert PdsFhirClient.from_env({"SCHOOLSLINK_PDS_TRACE_URL": "  "}) is None
    on = PdsFhirClient.from_env({"SCHOOLSLINK_PDS_TRACE_URL": "http://127.0.0.1:9/FHIR/R4/"})
    assert on is not None and on.base_url == "http://127.0.0.1:9/FHIR/R4"
    on.close()

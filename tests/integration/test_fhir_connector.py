"""The FHIR connector against the real Medplum peer, through a loopback proxy that counts requests and
injects what a trust's server does on a bad day (429, 500, slow answers, an entry refused with an
OperationOutcome). One Medplum server for this module, empty at start, so counts are exact.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from connectors.fhir.client import MAX_TRANSACTION, FhirClient
from connectors.fhir.errors import FhirPermanentError, FhirTransientError
from connectors.fhir.pull import IncrementalPull, PullState
from connectors.fhir.server import MedplumServer
from schoolslink.constants import NHS_NUMBER_SYSTEM, OUR_META_SOURCE, OUR_TAG_CODE, OUR_TAG_SYSTEM
from schoolslink.mapping import fhir_inbound as fin
from tests.integration.fault_proxy import FaultProxy

OUR_ID = "https://fhir.schoolslink.org.uk/Id/record"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    with MedplumServer(log_path=tmp_path_factory.mktemp("fhir") / "medplum.log") as s:
        yield s


@pytest.fixture()
def proxy(server: MedplumServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.base_url) as p:
        yield p


def _client(proxy: FaultProxy, **kw: Any) -> FhirClient:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return FhirClient(proxy.base_url, **kw)


def referral(rid: str, status: str = "active", *, ours: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": OUR_META_SOURCE,
                            "tag": [{"system": OUR_TAG_SYSTEM, "code": OUR_TAG_CODE}]} if ours else {}
    return {"resourceType": "ServiceRequest", "id": rid, "meta": meta, "status": status, "intent": "order",
            "subject": {"reference": "Patient/p-" + rid}}


def observation(rid: str, value: str = "attendance 93%") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "meta": {"source": OUR_META_SOURCE, "tag": [{"system": OUR_TAG_SYSTEM, "code": OUR_TAG_CODE}]},
            "identifier": [{"system": OUR_ID, "value": rid}],
            "code": {"text": "attendance"}, "subject": {"reference": "Patient/x"}, "valueString": value}


# --------------------------------------------------------------------------- incremental pull


def test_incremental_pull_reads_exactly_what_changed_and_none_of_our_writes(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    theirs = [referral(f"sr-{tag}-{i}") for i in range(30)]
    echoes = [referral(f"sr-{tag}-ours-{i}", ours=True) for i in range(5)]
    with _client(proxy) as client:
        assert all(r.ok for r in client.put_batch(theirs + echoes))
        first = IncrementalPull(client, "ServiceRequest", PullState(), page_size=7, is_own=fin.is_ours)
        got = [r["id"] for r in first]
        assert sorted(got) == sorted(r["id"] for r in theirs)
        assert first.stats.own_skipped == 5
        state = first.next_state()
        assert state.watermark is not None

        # Three of theirs change, we write two more of ours; the rest is untouched. Everything sits inside
        # the two-minute overlap window, so the next pull reads it all again: only the changes come out.
        changed = [referral(f"sr-{tag}-{i}", "completed") for i in (3, 11, 29)]
        client.put_batch(changed + [referral(f"sr-{tag}-ours-{i}", ours=True) for i in (5, 6)])
        second = IncrementalPull(client, "ServiceRequest", PullState.from_json(state.to_json()), page_size=7,
                                 is_own=fin.is_ours)
        got2 = list(second)
        assert sorted(r["id"] for r in got2) == sorted(r["id"] for r in changed)
        assert {r["status"] for r in got2} == {"completed"}
        assert second.stats.own_skipped == 2
        assert second.stats.already_seen == 32  # the 35 unchanged versions less the 3 replaced: read again, skipped

        # Nothing changed: nothing comes out, and it costs one search.
        proxy.reset()
        third = IncrementalPull(client, "ServiceRequest", second.next_state(), page_size=1000, is_own=fin.is_ours)
        assert list(third) == []
        assert [s.method for s in proxy.seen] == ["GET"]


def test_a_late_commit_inside_the_overlap_is_not_missed() -> None:
    """A version stamped before the watermark but visible only after the last pull (a transaction that
    committed late) is read by the next pull, once."""
    wm = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

    def stamp(t: datetime) -> str:
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    visible = [{"resourceType": "ServiceRequest", "id": "a", "meta": {"versionId": "1", "lastUpdated": stamp(wm)}}]
    late = {"resourceType": "ServiceRequest", "id": "late",
            "meta": {"versionId": "1", "lastUpdated": stamp(wm - timedelta(seconds=20))}}

    def handler(request: httpx.Request) -> httpx.Response:
        rows = sorted(visible, key=lambda r: r["meta"]["lastUpdated"])
        ge = request.url.params.get("_lastUpdated", "ge0000")[2:]
        rows = [r for r in rows if r["meta"]["lastUpdated"] >= ge] if ge != "0000" else rows
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r, "search": {"mode": "match"}} for r in rows]})

    with FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(handler)) as client:
        first = IncrementalPull(client, "ServiceRequest")
        assert [r["id"] for r in first] == ["a"]
        visible.append(late)
        second = IncrementalPull(client, "ServiceRequest", first.next_state())
        assert [r["id"] for r in second] == ["late"]
        third = IncrementalPull(client, "ServiceRequest", second.next_state())
        assert list(third) == []
        # Without the overlap the late version would never be read.
        blind = IncrementalPull(client, "ServiceRequest", first.next_state(), overlap=timedelta(0))
        assert list(blind) == []


# --------------------------------------------------------------------------- writes


def test_an_unchanged_resend_is_not_needed_and_a_rewrite_adds_a_version(proxy: FaultProxy) -> None:
    """The outbox is what keeps re-runs silent (tests/integration/test_fhir_delivery_faults.py runs it end to
    end); here: PUT by id lands at our id, and each PUT is one request per bundle of ``bundle_size``."""
    tag = uuid.uuid4().hex[:8]
    obs = [observation(f"ob-{tag}-{i}") for i in range(25)]
    with _client(proxy, bundle_size=10) as client:
        proxy.reset()
        results = client.put_batch(obs)
        assert [r.id for r in results] == [o["id"] for o in obs] and all(r.ok for r in results)
        assert [len(s.entries) for s in proxy.writes()] == [10, 10, 5]
        assert client.history_count("Observation", obs[0]["id"]) == 1


def test_429_and_500_are_retried_and_succeed(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    with _client(proxy) as client:
        proxy.fail(500, times=1)
        proxy.fail(429, times=2, retry_after="0")
        results = client.put_batch([observation(f"ob-{tag}-r")])
        assert results[0].ok
        posts = proxy.writes()
        assert [s.status for s in posts] == [500, 429, 429, 200]
        assert [s.injected for s in posts] == [True, True, True, False]
        assert client.read("Observation", f"ob-{tag}-r")["valueString"] == "attendance 93%"


def test_a_slow_answer_times_out_and_is_retried(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    with _client(proxy, timeout=0.5) as client:
        proxy.fail(0, times=1, delay=1.5)  # forwarded, but only after the client has given up
        assert client.put_batch([observation(f"ob-{tag}-slow")])[0].ok
        assert len(proxy.writes()) == 2


def test_retries_give_up_with_a_clear_transient_error(proxy: FaultProxy) -> None:
    with _client(proxy, max_retries=2) as client:
        proxy.fail(503, times=5)
        with pytest.raises(FhirTransientError, match=r"HTTP 503 .*gave up after 3 attempt"):
            client.put_batch([observation("ob-never")])
        assert len(proxy.writes()) == 3


def test_an_entry_refused_with_an_operation_outcome_does_not_stop_its_bundle_mates(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    obs = [observation(f"ob-{tag}-{i}") for i in range(5)]
    proxy.refuse_entries({obs[2]["id"]}, "Observation.code: code 'attendance' is not in the value set",
                         code="code-invalid")
    with _client(proxy) as client:
        results = client.put_batch(obs)
        assert [r.ok for r in results] == [True, True, False, True, True]
        bad = results[2]
        assert bad.status == 422 and bad.id == obs[2]["id"]
        assert bad.message == ("code-invalid: Observation.code: code 'attendance' is not in the value set "
                               "@ Observation")
        with pytest.raises(Exception, match="HTTP 404"):
            client.read("Observation", obs[2]["id"])


def test_conditional_writes_for_servers_that_assign_ids(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    obs = [observation(f"cond-{tag}-{i}") for i in range(3)]
    with _client(proxy) as client:
        proxy.reset()
        first = client.put_batch(obs, conditional=True)
        assert all(r.ok for r in first)
        sent = proxy.writes()[0].entries
        assert all(url.startswith("Observation?identifier=") for _, url in sent)
        client.put_batch([observation(f"cond-{tag}-0", "attendance 95%")], conditional=True)
        found = client.search("Observation", {"identifier": f"{OUR_ID}|cond-{tag}-0"})
        assert len(found) == 1 and found[0]["valueString"] == "attendance 95%"
        assert found[0]["id"] != f"cond-{tag}-0"  # the server chose the id
    with pytest.raises(ValueError, match="no identifier"):
        FhirClient("http://127.0.0.1:9").put_batch([referral("x")], conditional=True)


def test_small_atomic_groups_go_as_transactions(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    with _client(proxy) as client:
        results = client.transaction([observation(f"tx-{tag}-{i}") for i in range(3)])
        assert all(r.ok for r in results)
        assert proxy.writes()[-1].entries == [("PUT", f"Observation/tx-{tag}-{i}") for i in range(3)]
        with pytest.raises(ValueError, match="small atomic groups"):
            client.transaction([observation(f"tx-{tag}-{i}") for i in range(MAX_TRANSACTION + 1)])
        proxy.fail(422, times=1)  # the server refuses the group as a whole: nothing of it lands
        with pytest.raises(FhirPermanentError, match="transaction of 2 resource"):
            client.transaction([observation(f"tx-{tag}-a"), observation(f"tx-{tag}-b")])
        assert not client.search("Observation", {"_id": f"tx-{tag}-a"})


def test_patient_by_nhs_number_with_what_refers_to_it_in_one_round_trip(proxy: FaultProxy) -> None:
    tag = uuid.uuid4().hex[:8]
    patient = {"resourceType": "Patient", "id": f"pt-{tag}",
               "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": "9990000018"}]}
    sr = referral(f"sr-{tag}-nhs")
    sr["subject"] = {"reference": f"Patient/pt-{tag}"}
    with _client(proxy) as client:
        client.put_batch([patient, sr])  # the trust's own data, seeded: we never write a Patient in the pipeline
        proxy.reset()
        found = client.patients_by_nhs_number("999 000 0018", {"_revinclude": "ServiceRequest:subject"})
        assert {(r["resourceType"], r["id"]) for r in found} >= {("Patient", f"pt-{tag}"),
                                                                  ("ServiceRequest", f"sr-{tag}-nhs")}
        assert len(proxy.seen) == 1
        assert "9990000018" not in json.dumps([s.path for s in proxy.seen])  # the number rides in the query only
        with pytest.raises(ValueError, match="ten digits"):
            client.patients_by_nhs_number("12345")


def test_tls_verification_cannot_be_turned_off(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be turned off"):
        FhirClient("https://127.0.0.1:9/fhir", verify=False)
    with pytest.raises(ValueError, match="does not exist"):
        FhirClient("https://127.0.0.1:9/fhir", verify=str(tmp_path / "missing.pem"))


# --------------------------------------------------------------------------- the pipeline's pull


def test_nhs_sync_pull_reads_only_changes_and_skips_our_echoes(
    server: MedplumServer, proxy: FaultProxy, sl_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from schoolslink.demo import seed_trust
    from schoolslink.pipeline import sync
    from schoolslink.pipeline.common import store
    from schoolslink.store.db import migrate
    from schoolslink.store.schema import trust_referrals, watermarks
    from schoolslink.synth import synthesise

    migrate()
    synth = synthesise(sl_home, schools=2, pupils=120, seed=5, as_of=datetime(2026, 11, 26).date())
    trust = json.loads((sl_home / "synth-manifest.json").read_text()).get("trust_ods", "R9X")
    seed_trust(server.base_url, sl_home / "seed" / "fhir", trust)
    assert synth is not None
    # Everything on the shared module server that is not this trust's is still "new" on the first pull;
    # counts below are about the second pull, which must read exactly what changed.
    monkeypatch.setenv(f"SCHOOLSLINK_FHIR_BASE_{trust}", proxy.base_url)
    first = sync.pull_trust("run-1", trust)
    assert first["pulled_ServiceRequest"] > 0 and first["pulled_Patient"] > 0

    with FhirClient(server.base_url) as client:
        mine = [r for r in client.all_resources("ServiceRequest") if not fin.is_ours(r)]
        target = next(r for r in mine if r.get("status") == "active")
        target["status"] = "completed"
        echo = dict(mine[0], id="echo-" + uuid.uuid4().hex[:8], meta={"source": OUR_META_SOURCE})
        assert all(r.ok for r in client.put_batch([target, echo]))
    proxy.reset()
    second = sync.pull_trust("run-2", trust)
    assert second.get("pulled_ServiceRequest") == 1
    assert second.get("pulled_own_writes_skipped") == 1
    for rtype in ("Patient", "EpisodeOfCare", "Appointment", "PractitionerRole", "Consent"):
        assert not second.get(f"pulled_{rtype}"), rtype
    assert all(s.method == "GET" for s in proxy.seen)
    with store().connect() as conn:
        row = conn.execute(select(trust_referrals.c.fhir_status, trust_referrals.c.updated_run).where(
            trust_referrals.c.referral_ref == f"ServiceRequest/{target['id']}")).first()
        seen = conn.execute(select(watermarks.c.seen).where(watermarks.c.resource_type == "ServiceRequest")).scalar()
    assert row is not None and tuple(row) == ("completed", "run-2")
    assert isinstance(seen, dict) and any(k.startswith(target["id"] + "|") for k in seen)


def test_the_pull_authenticates_with_a_signed_jwt_from_the_trusts_airflow_connection(
    proxy: FaultProxy, sl_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connection -> endpoint -> private_key_jwt token from the real oidc-provider -> every request of the pull
    carries it; one token serves the whole pull."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from connectors.fhir.auth import public_jwk
    from connectors.fhir.oidc_peer import OidcProviderPeer
    from schoolslink.pipeline import sync
    from schoolslink.store.db import migrate

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    clients = [{"client_id": "schoolslink-r9x", "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [public_jwk(key, "sl-2026", "RS512")]}},
               {"client_id": "auditor", "client_secret": "auditor-secret",
                "token_endpoint_auth_method": "client_secret_basic"}]
    migrate()
    with OidcProviderPeer(clients, token_ttl=300, log_path=tmp_path / "oidc.log") as idp:
        monkeypatch.setenv("AIRFLOW_CONN_SCHOOLSLINK_FHIR_RJW", json.dumps({
            "conn_type": "http", "host": proxy.base_url, "login": "schoolslink-r9x", "password": key.decode(),
            "extra": {"auth": "private_key_jwt", "token_url": idp.token_url, "kid": "sl-2026", "alg": "RS512"}}))
        proxy.reset()
        sync.pull_trust("run-auth", "RJW")
        headers = {s.authorization for s in proxy.seen}
        assert len(proxy.seen) >= 6 and len(headers) == 1
        [header] = headers
        assert header is not None and header.startswith("Bearer ")
        info = idp.introspect(header.removeprefix("Bearer "), "auditor", "auditor-secret")
        assert info["active"] is True and info["client_id"] == "schoolslink-r9x"

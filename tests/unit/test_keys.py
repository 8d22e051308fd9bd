"""The two keys (schoolslink/keys.py): the id key names things and never moves with a pseudonym key rotation; the
pseudonym key makes the ledger's subjects, is versioned, and every key held finds a child's entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schoolslink import keys

UPN = "A801200110001"  # any text does for keying; the audit CLI checks UPNs before it keys them
NHS = "999 000 0018"


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(tmp_path / "home"))
    for name in ("SCHOOLSLINK_KEY", "SCHOOLSLINK_ID_KEY", "SCHOOLSLINK_KEY_VERSION", "SCHOOLSLINK_KEY_PREVIOUS",
                 "SCHOOLSLINK_ID_KEY_PREVIOUS", "SCHOOLSLINK_SECRETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCHOOLSLINK_KEY", "first-key")


def _names() -> tuple[str, str, str, str]:
    return (keys.learner_key(UPN), keys.patient_key(NHS), keys.resource_id("Observation", "R9X", "x"),
            keys.match_hash("100001", "Smith", "Amy", "2014-03-02"))


def test_rotating_the_pseudonym_key_changes_no_id_and_no_state_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _names()
    subject_v1 = keys.ledger_subject(before[0])
    monkeypatch.setenv("SCHOOLSLINK_KEY", "second-key")
    monkeypatch.setenv("SCHOOLSLINK_KEY_VERSION", "2")
    monkeypatch.setenv("SCHOOLSLINK_KEY_PREVIOUS", "1:first-key")
    assert _names() == before  # the version-1 key still names everything
    subject_v2 = keys.ledger_subject(before[0])
    assert subject_v2 != subject_v1 and subject_v2.startswith("lrn-") and len(subject_v2) <= 40
    assert keys.subject_keys_for_upn(UPN) == [("2", subject_v2), ("1", subject_v1)]
    assert [v for v, _ in keys.patient_keys_for_nhs(NHS)] == ["2", "1"]


def test_without_the_first_key_the_id_key_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _names()
    monkeypatch.setenv("SCHOOLSLINK_KEY", "third-key")
    monkeypatch.setenv("SCHOOLSLINK_KEY_VERSION", "3")
    monkeypatch.setenv("SCHOOLSLINK_KEY_PREVIOUS", "2:second-key")
    with pytest.raises(keys.KeyConfigError, match="set SCHOOLSLINK_ID_KEY"):
        keys.learner_key(UPN)
    monkeypatch.setenv("SCHOOLSLINK_ID_KEY", "first-key")
    assert _names() == before


def test_the_ledger_never_shows_a_state_key() -> None:
    lk, pk = keys.learner_key(UPN), keys.patient_key(NHS)
    assert keys.ledger_subject(lk) not in (lk, pk) and keys.ledger_subject(pk).startswith("pat-")
    assert keys.ledger_subject("odd").startswith("sub-")


def test_an_earlier_id_key_still_finds_old_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    old_subject = keys.ledger_subject(keys.learner_key(UPN))
    monkeypatch.setenv("SCHOOLSLINK_ID_KEY", "replacement-id-key")
    assert old_subject not in {s for _v, s in keys.subject_keys_for_upn(UPN)}
    monkeypatch.setenv("SCHOOLSLINK_ID_KEY_PREVIOUS", "1:first-key")
    assert old_subject in {s for _v, s in keys.subject_keys_for_upn(UPN)}


def test_a_malformed_previous_list_is_refused_without_echoing_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY_PREVIOUS", "1:ok,secret-without-version")
    with pytest.raises(ValueError) as err:
        keys.held_keys()
    assert "item 2" in str(err.value) and "secret" not in str(err.value)


def test_keys_come_from_airflows_secrets_backend_not_its_database(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before = _names()
    monkeypatch.delenv("SCHOOLSLINK_KEY")
    variables = tmp_path / "variables.json"
    variables.write_text(json.dumps({"schoolslink_key": "first-key", "schoolslink_key_version": "1"}))
    monkeypatch.setenv("SCHOOLSLINK_SECRETS", "airflow")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "airflow.secrets.local_filesystem.LocalFilesystemBackend")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND_KWARGS", json.dumps({"variables_file_path": str(variables)}))
    keys._from_secrets_backend.cache_clear()
    try:
        assert keys.key() == b"first-key"
        assert _names() == before
        assert not (tmp_path / "home" / "secrets").exists()  # no key file was made
    finally:
        keys._from_secrets_backend.cache_clear()


def test_no_backend_configured_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHOOLSLINK_KEY")
    monkeypatch.setenv("SCHOOLSLINK_SECRETS", "airflow")
    monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND", raising=False)
    keys._from_secrets_backend.cache_clear()
    try:
        with pytest.raises(keys.KeyConfigError, match="no secrets backend"):
            keys.key()
    finally:
        keys._from_secrets_backend.cache_clear()

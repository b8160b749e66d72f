"""Rectification on request (issue 14, GDPR art. 16), engine level, on the real database and the demo's real
downstream services (emailing and telephony over HTTP on 127.0.0.1, the support desk as a SQL database)."""

from __future__ import annotations

import json
from datetime import date

import psycopg
import pytest

from helpers import CRM_TABLES, add_contact, new_id, table_checksum, ts
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import optout, propagation, rectification, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy

CTX = RunContext("gdpr_subject_rectification", "run-1", "rectify")
PREFLIGHT = RunContext("gdpr_subject_rectification", "run-1", "preflight")
TODAY = date(2026, 6, 15)
NEW_PHONE = "+33 1 98 76 54 32"
TABLES = [*CRM_TABLES, "crm.support_tickets", "gdpr.request", "gdpr.erasure_propagation", "gdpr.suppression_list"]


def _ticket(conn: psycopg.Connection, contact_id: int | None, email: str) -> int:
    tid = new_id()
    conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
                 " VALUES (%s, %s, %s, 'Invoice', 'Hello', %s)", (tid, contact_id, email, ts(date(2026, 1, 1))))
    return tid


@pytest.fixture
def person(conn: psycopg.Connection) -> tuple[int, str]:
    cid = add_contact(conn, "client", date(2024, 1, 1))
    email = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    _ticket(conn, cid, email)
    _ticket(conn, None, f"  {email.upper()} ")  # sent before the account existed: found by its email
    conn.commit()
    return cid, email


def _rectify(conn: psycopg.Connection, policy: Policy, keys: Keys, params: dict) -> rectification.RectificationResult:
    request = rectification.parse_request({"request_id": "REQ-R-1", **params}, policy, today=TODAY)
    located = rectification.locate(conn, policy, keys, request)
    return rectification.apply(conn, policy, keys, CTX, request, located)


def _one(conn: psycopg.Connection, query: str, *params: object) -> tuple:
    row = conn.execute(query, params).fetchone()
    conn.rollback()
    assert row is not None
    return tuple(row)


def _audit_text(conn: psycopg.Connection) -> str:
    return str(_one(conn, "SELECT coalesce(string_agg(a::text, ' '), '') FROM gdpr.audit_log a")[0])


def test_a_rectified_phone_is_changed_in_the_warehouse_and_the_audit_names_the_column_not_the_values(
    conn, policy: Policy, keys: Keys, person
) -> None:
    cid, email = person
    old_phone = _one(conn, "SELECT direct_phone FROM crm.contacts WHERE contact_id = %s", cid)[0]

    result = _rectify(conn, policy, keys, {"email": email, "changes": {"direct_phone": f"  {NEW_PHONE} "}})

    assert (result.outcome, result.status) == ("rectified", "pending_propagation")
    assert result.rows == {"crm.contacts.direct_phone": 1}
    assert result.targets == ["emailing", "telephony"]  # the desk does not hold the phone
    assert _one(conn, "SELECT direct_phone FROM crm.contacts WHERE contact_id = %s", cid)[0] == NEW_PHONE
    rows = conn.execute("SELECT table_name, row_count, details FROM gdpr.audit_log WHERE action = 'rectify'"
                        ).fetchall()
    conn.rollback()
    assert [(t, n, d["column"]) for t, n, d in rows] == [("crm.contacts", 1, "direct_phone")]
    audit = _audit_text(conn)
    for value in (NEW_PHONE, old_phone, email, "98 76 54 32", "+33"):
        assert value not in audit
    kind, status, outcome, details = _one(
        conn, "SELECT kind, status, outcome, details FROM gdpr.request WHERE request_id = 'REQ-R-1'")
    assert (kind, status, outcome) == ("rectification", "pending_propagation", "rectified")
    assert details["columns"] == ["direct_phone"] and NEW_PHONE not in json.dumps(details)
    # the outbox carries the new value encrypted only
    payloads = conn.execute("SELECT target, identifier_ciphertext FROM gdpr.erasure_propagation ORDER BY 1").fetchall()
    conn.rollback()
    assert [t for t, _ in payloads] == ["emailing", "telephony"]
    assert all(NEW_PHONE.encode() not in bytes(c) and email.encode() not in bytes(c) for _, c in payloads)


def test_a_rectified_email_changes_every_copy_and_the_keyed_hashes_the_policy_keeps(
    conn, policy: Policy, keys: Keys, person
) -> None:
    cid, email = person
    new_email = f"renamed.{cid}@corrected.example"
    with conn.transaction():  # the person opted out: the suppression list holds the old address's hash
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source)"
                     " VALUES (%s, %s, 'opt_out', 'do_not_contact_flag')", (keys.subject_hash(email), keys.hmac_key_id))
    other = add_contact(conn, "prospect", date(2025, 1, 1))
    _ticket(conn, other, "someone.else@example.example")
    conn.commit()

    result = _rectify(conn, policy, keys, {"email": email, "changes": {"email": new_email.upper()}})

    assert result.rows == {"crm.support_tickets.requester_email": 2, "crm.contacts.email": 1,
                           "gdpr.suppression_list (keyed hash)": 1}
    assert result.targets == ["emailing", "telephony", "support_desk"]
    assert _one(conn, "SELECT email FROM crm.contacts WHERE contact_id = %s", cid)[0] == new_email
    assert _one(conn, "SELECT count(*) FROM crm.support_tickets WHERE requester_email = %s", new_email)[0] == 2
    assert _one(conn, "SELECT count(*) FROM crm.support_tickets WHERE lower(btrim(requester_email)) = %s",
                email)[0] == 0
    assert _one(conn, "SELECT count(*) FROM crm.support_tickets WHERE requester_email = 'someone.else@example.example'"
                )[0] == 1
    with conn.transaction():  # both addresses are suppressed now: the old entry is permanent
        assert optout.is_suppressed(conn, keys, new_email) and optout.is_suppressed(conn, keys, email)
    assert new_email not in _audit_text(conn) and email not in _audit_text(conn)


def test_a_pseudonymised_persons_email_hash_is_rehashed_from_the_new_address(
    conn, policy: Policy, keys: Keys, person
) -> None:
    """A former client the sweep pseudonymised keeps tickets whose requester email holds the keyed hash of the
    old address; a second, live record of the person is rectified. The hashed rows then hold the new address's
    hash, so that an erasure by the new address still finds them."""
    cid, email = person
    old_hash = keys.subject_hash(email)
    ghost = new_id()
    with conn.transaction():
        conn.execute("UPDATE crm.support_tickets SET requester_email = %s, contact_id = NULL WHERE contact_id = %s",
                     (old_hash, cid))
    new_email = f"fixed.{cid}@corrected.example"

    result = _rectify(conn, policy, keys, {"subject_id": cid, "changes": {"email": new_email}})

    assert result.rows["crm.support_tickets.requester_email (keyed hash)"] == 1
    assert _one(conn, "SELECT count(*) FROM crm.support_tickets WHERE requester_email = %s",
                keys.subject_hash(new_email))[0] == 1
    assert _one(conn, "SELECT count(*) FROM crm.support_tickets WHERE requester_email = %s", old_hash)[0] == 0
    assert ghost  # (an id, never used: the hashed rows are found by the hash alone)


@pytest.mark.parametrize(("changes", "message"), [
    ({"status": "client"}, "names column(s) the policy does not let a person rectify: `status`"),
    ({"direct_phone": "call me maybe"}, "`changes.direct_phone` does not match the policy's pattern"),
    ({"direct_phone": "+33 1 23 45 67 89 00 11 22 33 44"}, "`changes.direct_phone` must be 1-30 characters"),
    ({"email": "zoé@exämple.example"}, "`changes.email` does not match the policy's pattern"),
    ({"first_name": 42}, "`changes.first_name` must be text"),
    ({}, "`changes` must be an object of column -> new value"),
    ({"jane.doe@acme.example": "x"}, "1 other(s) (name not shown)"),
])
def test_a_refused_change_names_the_column_and_the_rule_never_the_value(
    conn, policy: Policy, keys: Keys, person, changes: dict, message: str
) -> None:
    _, email = person
    before = table_checksum(conn, TABLES)
    with pytest.raises(rectification.RectificationError) as info:
        _rectify(conn, policy, keys, {"email": email, "changes": changes})
    assert message in str(info.value)
    for value in ("call me maybe", "45 67 89", "zoé", "exämple", "jane.doe", email):
        assert value not in str(info.value)
    assert table_checksum(conn, TABLES) == before


def test_a_new_email_that_is_another_subjects_is_refused_before_any_change(
    conn, policy: Policy, keys: Keys, person
) -> None:
    _, email = person
    other = add_contact(conn, "prospect", date(2025, 1, 1), email="taken@example.example")
    conn.commit()
    before = table_checksum(conn, TABLES)
    request = rectification.parse_request({"request_id": "REQ-R-1", "email": email,
                                           "changes": {"email": "Taken@Example.example"}}, policy, today=TODAY)
    located = rectification.locate(conn, policy, keys, request)
    with pytest.raises(rectification.RectificationError, match=f"another subject \\(id {other}\\)") as info:
        rectification.plan(conn, policy, located, request)
    assert "taken@" not in str(info.value).lower()
    with pytest.raises(rectification.RectificationError, match="already the email of another subject"):
        rectification.apply(conn, policy, keys, CTX, request, located)
    assert table_checksum(conn, TABLES) == before


def test_a_dry_run_counts_and_changes_nothing_and_a_second_run_reports_the_recorded_result(
    conn, policy: Policy, keys: Keys, person
) -> None:
    _, email = person
    before = table_checksum(conn, TABLES)
    dry = _rectify(conn, policy, keys, {"email": email, "changes": {"last_name": "Durand"}, "dry_run": True})
    assert dry.rows == {"crm.contacts.last_name": 1} and dry.targets == []
    assert table_checksum(conn, TABLES) == before

    first = _rectify(conn, policy, keys, {"email": email, "changes": {"last_name": "Durand"}})
    again = _rectify(conn, policy, keys, {"email": email, "changes": {"last_name": "Durand"}})
    assert again.already_recorded and again.rows == first.rows and again.status == first.status
    assert _one(conn, "SELECT count(*) FROM gdpr.erasure_propagation")[0] == 2  # queued once


def test_a_request_id_of_another_kind_or_person_is_refused(conn, policy: Policy, keys: Keys, person) -> None:
    _, email = person
    with psycopg.connect(conn.info.dsn) as other:
        requests.register(other, keys, CTX, kind="erasure", request_id="REQ-R-1", identifier=email,
                          received_at=TODAY, today=TODAY)
    with pytest.raises(requests.RequestStoreError, match="of kind erasure, not rectification"):
        _rectify(conn, policy, keys, {"email": email, "changes": {"last_name": "Durand"}})


def test_a_pseudonymised_only_person_is_not_found_and_nothing_is_written_back(
    conn, policy: Policy, keys: Keys, person
) -> None:
    cid, email = person
    with conn.transaction():
        conn.execute("UPDATE crm.contacts SET pseudonymised_at = now(), email = %s, direct_phone = NULL"
                     " WHERE contact_id = %s", (keys.subject_hash(email), cid))
    result = _rectify(conn, policy, keys, {"email": email, "changes": {"direct_phone": NEW_PHONE}})
    assert (result.outcome, result.status, result.targets) == ("not_found", "not_found", [])
    assert _one(conn, "SELECT direct_phone FROM crm.contacts WHERE contact_id = %s", cid)[0] is None


def test_a_registered_rectification_keeps_its_changes_encrypted_with_the_identifier(
    conn, policy: Policy, keys: Keys, person
) -> None:
    _, email = person
    requests.register(conn, keys, CTX, kind="rectification", request_id="REQ-R-REG", identifier=email,
                      received_at=TODAY, today=TODAY, changes={"direct_phone": NEW_PHONE})
    stored = _one(conn, "SELECT identifier_ciphertext FROM gdpr.request WHERE request_id = 'REQ-R-REG'")[0]
    assert NEW_PHONE.encode() not in bytes(stored) and email.encode() not in bytes(stored)
    loaded = requests.load(conn, keys, "REQ-R-REG", "rectification")
    assert loaded.email == email and loaded.changes == {"direct_phone": NEW_PHONE}
    assert NEW_PHONE not in repr(loaded) and email not in repr(loaded)
    params, _ = requests.resolve(conn, keys, "rectification", {"request_id": "REQ-R-REG"})
    assert params["changes"] == {"direct_phone": NEW_PHONE}
    with pytest.raises(requests.RequestStoreError, match="alone, without the email or subject id or changes"):
        requests.resolve(conn, keys, "rectification", {"request_id": "REQ-R-REG", "changes": {"last_name": "X"}})
    with pytest.raises(requests.RequestStoreError, match="needs its changes"):
        requests.register(conn, keys, CTX, kind="rectification", request_id="REQ-R-REG2", identifier=email,
                          received_at=TODAY, today=TODAY)
    with pytest.raises(requests.RequestStoreError, match="only a rectification request takes changes"):
        requests.register(conn, keys, CTX, kind="erasure", request_id="REQ-R-REG3", identifier=email,
                          received_at=TODAY, today=TODAY, changes={"direct_phone": NEW_PHONE})


# -- propagation: the correction reaches every target that holds the column --------------------------------


def test_the_correction_reaches_each_target_that_holds_it_and_its_payload_is_destroyed(
    conn, policy: Policy, keys: Keys, person, downstream
) -> None:
    cid, email = person
    downstream.add_person(email)
    new_email = f"renamed.{cid}@corrected.example"
    result = _rectify(conn, policy, keys, {"email": email, "changes": {"direct_phone": NEW_PHONE,
                                                                        "email": new_email}})
    transport = AirflowTransport()
    for target in ("emailing", "telephony"):
        propagation.preflight(conn, policy, PREFLIGHT, target, transport)
    answers = {t: propagation.propagate(conn, policy, keys, PREFLIGHT, "REQ-R-1", t, transport)
               for t in result.targets}

    assert answers == {"emailing": "HTTP 204", "telephony": "HTTP 200", "support_desk": "SQL ok (1 row(s))"}
    emailing = downstream.emailing.contact(new_email)
    assert emailing is not None and emailing["attributes"]["SMS"] == NEW_PHONE
    assert not downstream.emailing.has_contact(email)
    telephony = downstream.telephony.contact(new_email)
    assert telephony is not None and telephony["phone"] == NEW_PHONE
    assert downstream.desk_rows(new_email) == 1 and downstream.desk_rows(email) == 0
    rows = conn.execute("SELECT status, key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
                        " WHERE request_id = 'REQ-R-1'").fetchall()
    conn.rollback()
    assert rows == [("acknowledged", None, None, None)] * 3
    with conn.transaction():
        record = propagation.complete_if_acknowledged(conn, CTX, "REQ-R-1")
    assert record is not None and record["kind"] == "rectification" and record["status"] == "completed"
    assert record["columns"] == ["direct_phone", "email"]
    audit = _audit_text(conn)
    assert NEW_PHONE not in audit and new_email not in audit and email not in audit


def test_the_catalog_check_names_a_rectifiable_column_or_a_copy_that_does_not_exist(conn) -> None:
    import copy as copy_module
    from pathlib import Path

    import yaml

    from warehouse_gdpr.engine.catalog import CatalogError, check_policy
    from warehouse_gdpr.engine.policy import parse_policy

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "include" / "policy.yaml").read_text())
    data = copy_module.deepcopy(data)
    data["rectification"]["columns"]["mobile"] = {"pattern": "[0-9 +]+", "max_length": 20}
    data["rectification"]["columns"]["email"]["copies"][0]["column"] = "requester_mail"
    with pytest.raises(CatalogError) as info:
        check_policy(conn, parse_policy(data, "variant"))
    assert "rectification.columns.mobile: column crm.contacts.mobile does not exist" in str(info.value)
    assert ("rectification.columns.email.copies[0]: column crm.support_tickets.requester_mail does not exist"
            in str(info.value))


def test_a_rectification_registered_by_subject_id_runs_as_that_persons_request(
    conn, policy: Policy, keys: Keys, person
) -> None:
    cid, _ = person
    requests.register(conn, keys, CTX, kind="rectification", request_id="REQ-R-ID", identifier=f"subject_id:{cid}",
                      received_at=TODAY, today=TODAY, changes={"direct_phone": NEW_PHONE})
    params, registered = requests.resolve(conn, keys, "rectification", {"request_id": "REQ-R-ID"})
    assert registered is not None and params["subject_id"] == cid
    request = rectification.parse_request(params, policy, today=TODAY)
    located = rectification.locate(conn, policy, keys, request)

    result = rectification.apply(conn, policy, keys, CTX, request, located)

    assert (result.outcome, result.rows) == ("rectified", {"crm.contacts.direct_phone": 1})
    again = rectification.apply(conn, policy, keys, CTX, request, located)
    assert again.already_recorded and again.outcome == "rectified"

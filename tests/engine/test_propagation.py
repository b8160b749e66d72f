"""Propagation of an erasure to downstream systems (warehouse_gdpr.engine.propagation), engine level.

The `downstream` fixture runs the emailing (Brevo-like) and telephony services over real HTTP on
127.0.0.1 and a real support-desk database. Each request is first recorded with `erasure.erase`,
then each target is tried with `propagation.propagate`.
"""

from __future__ import annotations

import json
import os
from datetime import date
from typing import Any

import psycopg
import pytest
from helpers import AS_OF, add_activity, add_contact

from warehouse_gdpr.engine import erasure, propagation
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr_demo.services import start_telephony
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.propagation import TargetNotAcknowledged

ERASE = RunContext("test", "run-1", "erase")
CTX = RunContext("test", "run-1", "propagate")
TODAY = date(2026, 6, 15)
TARGETS = ["emailing", "support_desk", "telephony"]


def _one(conn: psycopg.Connection, query: str, *params: object) -> tuple[Any, ...] | None:
    row = conn.execute(query, params).fetchone()
    conn.rollback()
    return row


def _outbox(conn: psycopg.Connection, request_id: str, target: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT status, attempts, key_id, nonce, identifier_ciphertext, last_result, last_attempt_at, acknowledged_at"
        " FROM gdpr.erasure_propagation WHERE request_id = %s AND target = %s", (request_id, target)
    ).fetchone()
    conn.rollback()
    assert row is not None
    keys = ("status", "attempts", "key_id", "nonce", "ciphertext", "last_result", "last_attempt_at", "acknowledged_at")
    return dict(zip(keys, row))


def _audit(conn: psycopg.Connection, request_id: str, target: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT action, outcome FROM gdpr.audit_log WHERE action IN ('propagate', 'destroy_identifier')"
        " AND details->>'request_id' = %s AND details->>'target' = %s ORDER BY audit_id", (request_id, target)
    ).fetchall()
    conn.rollback()
    return [(r[0], r[1]) for r in rows]


def _no_at_in_audit(conn: psycopg.Connection) -> bool:
    row = _one(conn, "SELECT count(*) FROM gdpr.audit_log a WHERE position('@' in a::text) > 0")
    return row == (0,)


def _desk_messages(desk_url: str) -> int:
    with psycopg.connect(desk_url) as desk:
        return int(desk.execute("SELECT count(*) FROM desk.ticket_messages").fetchone()[0])  # type: ignore[index]


@pytest.fixture
def person(conn: psycopg.Connection) -> tuple[int, str]:
    """A fresh erasable prospect in the CRM: (contact id, email)."""
    cid = add_contact(conn, "prospect", date(2025, 1, 1))
    add_activity(conn, cid, "email_open", date(2026, 1, 1))
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    conn.commit()
    return cid, email


def _erase(conn: psycopg.Connection, policy: Policy, keys: Keys, email: str, request_id: str) -> erasure.ErasureResult:
    request = erasure.parse_request({"email": email, "request_id": request_id}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, AS_OF)
    return erasure.erase(conn, policy, keys, ERASE, request, located, holds)


def _assert_acknowledged(conn: psycopg.Connection, request_id: str, target: str, attempts: int = 1) -> dict[str, Any]:
    row = _outbox(conn, request_id, target)
    assert row["status"] == "acknowledged" and row["attempts"] == attempts
    assert row["key_id"] is None and row["nonce"] is None and row["ciphertext"] is None  # identifier destroyed
    assert row["acknowledged_at"] is not None and row["last_attempt_at"] is not None
    assert "@" not in (row["last_result"] or "")
    audit = _audit(conn, request_id, target)
    assert audit[-2:] == [("propagate", "acknowledged"), ("destroy_identifier", "done")]
    return row


# -- each target acknowledges --------------------------------------------------------------------------


def test_emailing_target_deletes_the_contact_over_http(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person
    downstream.add_person(email)
    downstream.add_person("someone.else@example.example")
    _erase(conn, policy, keys, email, "REQ-P-1")

    result = propagation.propagate(conn, policy, keys, CTX, "REQ-P-1", "emailing")

    assert result == "HTTP 204"
    assert not downstream.emailing.has_contact(email)
    assert downstream.emailing.has_contact("someone.else@example.example")
    assert downstream.telephony.has_contact(email) and downstream.desk_rows(email) == 1  # other targets untouched
    _assert_acknowledged(conn, "REQ-P-1", "emailing")
    for other in ("telephony", "support_desk"):
        assert _outbox(conn, "REQ-P-1", other)["status"] == "pending"
    assert _no_at_in_audit(conn)


def test_telephony_target_deletes_the_contact_over_http(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-2")

    result = propagation.propagate(conn, policy, keys, CTX, "REQ-P-2", "telephony")

    assert result == "HTTP 200"
    assert not downstream.telephony.has_contact(email)
    assert downstream.emailing.has_contact(email)
    _assert_acknowledged(conn, "REQ-P-2", "telephony")
    assert _no_at_in_audit(conn)


def test_support_desk_target_deletes_tickets_and_messages(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person
    downstream.add_person(email.upper())  # the desk stored the address in capitals
    downstream.add_person("someone.else@example.example")
    assert downstream.desk_rows(email) == 1 and _desk_messages(downstream.desk_url) == 2
    _erase(conn, policy, keys, email, "REQ-P-3")

    result = propagation.propagate(conn, policy, keys, CTX, "REQ-P-3", "support_desk")

    assert result == "SQL ok (2 row(s))"
    assert downstream.desk_rows(email) == 0
    assert downstream.desk_rows("someone.else@example.example") == 1 and _desk_messages(downstream.desk_url) == 1
    _assert_acknowledged(conn, "REQ-P-3", "support_desk")
    assert _no_at_in_audit(conn)


def test_person_unknown_downstream_counts_as_acknowledged(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person  # never added downstream: 404 from both HTTP services, no row in the desk
    _erase(conn, policy, keys, email, "REQ-P-404")

    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-404", "emailing") == "HTTP 404 (already gone)"
    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-404", "telephony") == "HTTP 404 (already gone)"
    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-404", "support_desk") == "SQL ok (0 row(s))"

    for target in TARGETS:
        _assert_acknowledged(conn, "REQ-P-404", target)
    # a second call does not call the target again
    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-404", "emailing") == "already acknowledged"
    assert _outbox(conn, "REQ-P-404", "emailing")["attempts"] == 1


# -- failures ------------------------------------------------------------------------------------------


def test_a_500_is_not_acknowledged_then_the_retry_is(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-500")
    downstream.emailing.fail_next(1, 500)

    with pytest.raises(TargetNotAcknowledged) as info:
        propagation.propagate(conn, policy, keys, CTX, "REQ-P-500", "emailing")

    assert "@" not in str(info.value) and "@" not in repr(info.value)
    assert "HTTP 500" in str(info.value)
    row = _outbox(conn, "REQ-P-500", "emailing")
    assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 1, "HTTP 500")
    assert row["ciphertext"] is not None and row["nonce"] is not None and row["key_id"] is not None
    assert row["acknowledged_at"] is None
    plain = keys.decrypt(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]),
                         erasure.outbox_aad("REQ-P-500", "emailing", row["key_id"]))
    assert plain.decode() == email.lower()  # still decryptable for the retry
    assert downstream.emailing.has_contact(email)
    assert _audit(conn, "REQ-P-500", "emailing") == [("propagate", "failed")]

    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-500", "emailing") == "HTTP 204"

    assert not downstream.emailing.has_contact(email)
    _assert_acknowledged(conn, "REQ-P-500", "emailing", attempts=2)
    assert _audit(conn, "REQ-P-500", "emailing") == [
        ("propagate", "failed"), ("propagate", "acknowledged"), ("destroy_identifier", "done")]
    assert _no_at_in_audit(conn)


def test_a_target_down_stays_pending_until_it_is_back(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-DOWN")
    old_port = downstream.telephony.port
    snapshot = downstream.telephony.contacts_snapshot()
    downstream.telephony.stop()

    for attempt in (1, 2):
        with pytest.raises(TargetNotAcknowledged) as info:
            propagation.propagate(conn, policy, keys, CTX, "REQ-P-DOWN", "telephony")
        assert "@" not in str(info.value) and "127.0.0.1" not in str(info.value)
        row = _outbox(conn, "REQ-P-DOWN", "telephony")
        assert (row["status"], row["attempts"]) == ("pending", attempt)
        assert row["last_result"].startswith("no answer") and row["ciphertext"] is not None
    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-DOWN") is None

    downstream.telephony = start_telephony("test-token", port=old_port, contacts=snapshot)  # the fixture stops it
    assert downstream.telephony.has_contact(email)

    assert propagation.propagate(conn, policy, keys, CTX, "REQ-P-DOWN", "telephony") == "HTTP 200"

    assert not downstream.telephony.has_contact(email)
    _assert_acknowledged(conn, "REQ-P-DOWN", "telephony", attempts=3)
    assert _no_at_in_audit(conn)


def test_sql_target_unreachable_is_not_acknowledged_and_recorded(
    conn, policy: Policy, keys: Keys, downstream, person, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-SQLDOWN")
    desk = json.loads(os.environ["AIRFLOW_CONN_SUPPORT_DESK"])
    monkeypatch.setenv("AIRFLOW_CONN_SUPPORT_DESK", json.dumps({**desk, "schema": "no_such_desk_database"}))

    with pytest.raises(TargetNotAcknowledged) as info:
        propagation.propagate(conn, policy, keys, CTX, "REQ-P-SQLDOWN", "support_desk")

    assert "@" not in str(info.value)
    row = _outbox(conn, "REQ-P-SQLDOWN", "support_desk")
    assert (row["status"], row["attempts"]) == ("pending", 1) and row["ciphertext"] is not None
    assert _audit(conn, "REQ-P-SQLDOWN", "support_desk") == [("propagate", "failed")]
    assert downstream.desk_rows(email) == 1


def test_wrong_api_key_is_not_acknowledged(
    conn, policy: Policy, keys: Keys, downstream, person, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-401")
    monkeypatch.setenv("AIRFLOW_CONN_EMAILING", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": downstream.emailing.port, "schema": "http",
         "extra": {"api-key": "not-the-key"}}))

    with pytest.raises(TargetNotAcknowledged) as info:
        propagation.propagate(conn, policy, keys, CTX, "REQ-P-401", "emailing")

    assert "HTTP 401" in str(info.value) and "@" not in str(info.value)
    row = _outbox(conn, "REQ-P-401", "emailing")
    assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 1, "HTTP 401")
    assert row["ciphertext"] is not None
    assert downstream.emailing.has_contact(email)


def test_refused_request_has_nothing_to_propagate(conn, policy: Policy, keys: Keys, downstream) -> None:
    cid = add_contact(conn, "prospect", date(2025, 1, 1), litigation=True)
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    conn.commit()
    downstream.add_person(email)
    assert _erase(conn, policy, keys, email, "REQ-P-REF").status == "refused"

    with pytest.raises(ValueError, match="no outbox row") as info:
        propagation.propagate(conn, policy, keys, CTX, "REQ-P-REF", "emailing")
    assert "@" not in str(info.value)
    with pytest.raises(ValueError, match="not declared"):
        propagation.propagate(conn, policy, keys, CTX, "REQ-P-REF", "crm_backup")
    assert downstream.emailing.has_contact(email)


# -- completion and certificate ----------------------------------------------------------------------------


def test_certificate_once_every_target_acknowledged(conn, policy: Policy, keys: Keys, downstream, person) -> None:
    cid, email = person
    downstream.add_person(email)
    erased = _erase(conn, policy, keys, email, "REQ-P-CERT")
    assert erased.status == "pending_propagation"

    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT") is None  # nothing acknowledged yet
    propagation.propagate(conn, policy, keys, CTX, "REQ-P-CERT", "emailing")
    propagation.propagate(conn, policy, keys, CTX, "REQ-P-CERT", "telephony")
    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT") is None  # support_desk still pending
    assert _one(conn, "SELECT status, completed_at FROM gdpr.erasure_request WHERE request_id = 'REQ-P-CERT'") == (
        "pending_propagation", None)
    assert _one(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'certificate'") == (0,)
    propagation.propagate(conn, policy, keys, CTX, "REQ-P-CERT", "support_desk")

    certificate = propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT")

    assert certificate is not None
    assert (certificate["request_id"], certificate["status"], certificate["outcome"]) == (
        "REQ-P-CERT", "completed", "erased")
    assert certificate["received_at"] == TODAY.isoformat() and certificate["due_date"] == "2026-07-15"
    assert certificate["rows_by_table"] == erased.rows and certificate["rows_by_table"]["crm.contacts"] == 1
    assert certificate["completed_at"] is not None and certificate["holds"] == []
    assert [t["target"] for t in certificate["targets"]] == TARGETS
    for target in certificate["targets"]:
        assert target["status"] == "acknowledged" and target["acknowledged_at"] and target["attempts"] == 1
    assert "@" not in json.dumps(certificate)
    status = _one(conn, "SELECT status, completed_at IS NOT NULL FROM gdpr.erasure_request WHERE request_id = 'REQ-P-CERT'")
    assert status == ("completed", True)
    audit = conn.execute(
        "SELECT outcome, subject_hash, details, a::text FROM gdpr.audit_log a WHERE action = 'certificate'"
    ).fetchall()
    conn.rollback()
    assert len(audit) == 1
    outcome, subject_hash, details, text = audit[0]
    assert (outcome, subject_hash) == ("completed", keys.subject_hash(email))
    assert details == certificate and "@" not in text
    # already completed: no second certificate
    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT") is None
    assert _one(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'certificate'") == (1,)
    # no identifier is left anywhere in the outbox, nor any '@' in the audit log
    assert _one(conn, "SELECT count(*) FROM gdpr.erasure_propagation WHERE identifier_ciphertext IS NOT NULL"
                      " OR nonce IS NOT NULL OR key_id IS NOT NULL") == (0,)
    assert _no_at_in_audit(conn)
    assert not downstream.emailing.has_contact(email) and not downstream.telephony.has_contact(email)
    assert downstream.desk_rows(email) == 0


def test_a_target_is_never_called_twice_at_once(
    conn, warehouse: str, policy: Policy, keys: Keys, downstream, person
) -> None:
    """While one worker holds the outbox row (mid-call), another is told to try later and calls nothing."""
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-LOCK-1")
    with psycopg.connect(warehouse) as other:
        other.execute(
            "SELECT 1 FROM gdpr.erasure_propagation WHERE request_id = 'REQ-LOCK-1' AND target = 'emailing' FOR UPDATE"
        )
        with pytest.raises(TargetNotAcknowledged, match="another worker"):
            propagation.propagate(conn, policy, keys, CTX, "REQ-LOCK-1", "emailing")
        assert downstream.emailing.has_contact(email)
    assert propagation.propagate(conn, policy, keys, CTX, "REQ-LOCK-1", "emailing") == "HTTP 204"
    assert not downstream.emailing.has_contact(email)

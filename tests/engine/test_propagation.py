"""Propagation of an erasure to downstream systems (warehouse_gdpr.engine.propagation), engine level.

The `downstream` fixture runs the emailing (Brevo-like) and telephony services over real HTTP on
127.0.0.1 and a real support-desk database; `preflighted` also runs this run's preflight of both HTTP
targets. Each request is first recorded with `erasure.erase`, then each target is tried with
`propagation.propagate` through the Airflow transport (airflow/transport.py: HttpHook, DbApiHook).
The false acknowledgements at the end use small scripted real servers (tests/scripted_http.py).
"""

from __future__ import annotations

import ast
import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import AS_OF, add_activity, add_contact
from scripted_http import ScriptedServer, after, html_answer, json_answer, raw_answer, redirect, trickle
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import erasure, propagation
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy, load_policy
from warehouse_gdpr.engine.propagation import TargetNotAcknowledged
from warehouse_gdpr_demo.services import start_telephony

ROOT = Path(__file__).resolve().parents[2]

ERASE = RunContext("test", "run-1", "erase")
CTX = RunContext("test", "run-1", "propagate")
PREFLIGHT = RunContext("test", "run-1", "preflight")
TRANSPORT = AirflowTransport()
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
    return dict(zip(keys, row, strict=True))


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


@pytest.fixture
def preflighted(conn: psycopg.Connection, policy: Policy, downstream):  # type: ignore[no-untyped-def]
    """The downstream services, with this run's preflight of both HTTP targets passed (and audited)."""
    for target in ("emailing", "telephony"):
        assert propagation.preflight(conn, policy, PREFLIGHT, target, TRANSPORT) == "HTTP 200"
    return downstream


def _propagate(conn: psycopg.Connection, policy: Policy, keys: Keys, request_id: str, target: str) -> str:
    return propagation.propagate(conn, policy, keys, CTX, request_id, target, TRANSPORT)


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


def test_emailing_target_deletes_the_contact_over_http(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person
    downstream.add_person(email)
    downstream.add_person("someone.else@example.example")
    _erase(conn, policy, keys, email, "REQ-P-1")

    result = _propagate(conn, policy, keys, "REQ-P-1", "emailing")

    assert result == "HTTP 204; lookup 404"  # deleted, and the contact lookup confirms it
    assert not downstream.emailing.has_contact(email)
    assert downstream.emailing.has_contact("someone.else@example.example")
    assert downstream.telephony.has_contact(email) and downstream.desk_rows(email) == 1  # other targets untouched
    _assert_acknowledged(conn, "REQ-P-1", "emailing")
    for other in ("telephony", "support_desk"):
        assert _outbox(conn, "REQ-P-1", other)["status"] == "pending"
    assert _no_at_in_audit(conn)


def test_telephony_target_deletes_the_contact_over_http(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-2")

    result = _propagate(conn, policy, keys, "REQ-P-2", "telephony")

    assert result == "HTTP 200; lookup 404"  # with the API's {"deleted": true}
    assert not downstream.telephony.has_contact(email)
    assert downstream.emailing.has_contact(email)
    _assert_acknowledged(conn, "REQ-P-2", "telephony")
    assert _no_at_in_audit(conn)


def test_support_desk_target_deletes_tickets_and_messages(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person
    downstream.add_person(email.upper())  # the desk stored the address in capitals
    downstream.add_person("someone.else@example.example")
    assert downstream.desk_rows(email) == 1 and _desk_messages(downstream.desk_url) == 2
    _erase(conn, policy, keys, email, "REQ-P-3")

    result = _propagate(conn, policy, keys, "REQ-P-3", "support_desk")

    assert result == "SQL ok (2 row(s))"
    assert downstream.desk_rows(email) == 0
    assert downstream.desk_rows("someone.else@example.example") == 1 and _desk_messages(downstream.desk_url) == 1
    _assert_acknowledged(conn, "REQ-P-3", "support_desk")
    assert _no_at_in_audit(conn)


def test_person_unknown_downstream_counts_as_acknowledged(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person  # never added downstream: 404 from both HTTP services, no row in the desk
    _erase(conn, policy, keys, email, "REQ-P-404")

    # trusted because this run's preflight passed, the 404 is the API's own "no such contact", and the lookup agrees
    assert _propagate(conn, policy, keys, "REQ-P-404", "emailing") == "HTTP 404 (already gone); lookup 404"
    assert _propagate(conn, policy, keys, "REQ-P-404", "telephony") == "HTTP 404 (already gone); lookup 404"
    assert _propagate(conn, policy, keys, "REQ-P-404", "support_desk") == "SQL ok (0 row(s))"

    for target in TARGETS:
        _assert_acknowledged(conn, "REQ-P-404", target)
    # a second call does not call the target again
    assert _propagate(conn, policy, keys, "REQ-P-404", "emailing") == "already acknowledged"
    assert _outbox(conn, "REQ-P-404", "emailing")["attempts"] == 1


# -- failures ------------------------------------------------------------------------------------------


def test_a_500_is_not_acknowledged_then_the_retry_is(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-500")
    downstream.emailing.fail_next(1, 500)

    with pytest.raises(TargetNotAcknowledged) as info:
        _propagate(conn, policy, keys, "REQ-P-500", "emailing")

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

    assert _propagate(conn, policy, keys, "REQ-P-500", "emailing") == "HTTP 204; lookup 404"

    assert not downstream.emailing.has_contact(email)
    _assert_acknowledged(conn, "REQ-P-500", "emailing", attempts=2)
    assert _audit(conn, "REQ-P-500", "emailing") == [
        ("propagate", "failed"), ("propagate", "acknowledged"), ("destroy_identifier", "done")]
    assert _no_at_in_audit(conn)


def test_a_target_down_stays_pending_until_it_is_back(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-DOWN")
    old_port = downstream.telephony.port
    snapshot = downstream.telephony.contacts_snapshot()
    downstream.telephony.stop()

    for attempt in (1, 2):
        with pytest.raises(TargetNotAcknowledged) as info:
            _propagate(conn, policy, keys, "REQ-P-DOWN", "telephony")
        assert "@" not in str(info.value) and "127.0.0.1" not in str(info.value)
        row = _outbox(conn, "REQ-P-DOWN", "telephony")
        assert (row["status"], row["attempts"]) == ("pending", attempt)
        assert row["last_result"].startswith("no answer") and row["ciphertext"] is not None
    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-DOWN") is None

    downstream.telephony = start_telephony("test-token", port=old_port, contacts=snapshot)  # the fixture stops it
    assert downstream.telephony.has_contact(email)

    assert _propagate(conn, policy, keys, "REQ-P-DOWN", "telephony") == "HTTP 200; lookup 404"

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
        _propagate(conn, policy, keys, "REQ-P-SQLDOWN", "support_desk")

    assert "@" not in str(info.value)
    row = _outbox(conn, "REQ-P-SQLDOWN", "support_desk")
    assert (row["status"], row["attempts"]) == ("pending", 1) and row["ciphertext"] is not None
    assert _audit(conn, "REQ-P-SQLDOWN", "support_desk") == [("propagate", "failed")]
    assert downstream.desk_rows(email) == 1


def test_wrong_api_key_fails_the_preflight_and_nothing_is_sent(
    conn, policy: Policy, keys: Keys, downstream, person, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-P-401")
    monkeypatch.setenv("AIRFLOW_CONN_EMAILING", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": downstream.emailing.port, "schema": "http",
         "extra": {"api-key": "not-the-key"}}))

    with pytest.raises(propagation.PreflightFailed) as info:
        propagation.preflight(conn, policy, PREFLIGHT, "emailing", TRANSPORT)
    assert "HTTP 401 (credentials refused" in str(info.value) and not info.value.retryable
    with pytest.raises(TargetNotAcknowledged, match="no passed preflight in this run") as info:
        _propagate(conn, policy, keys, "REQ-P-401", "emailing")

    assert "@" not in str(info.value)
    row = _outbox(conn, "REQ-P-401", "emailing")
    assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 0, None)
    assert row["ciphertext"] is not None
    assert downstream.emailing.has_contact(email)
    assert downstream.emailing.contact_count() == 1
    assert _one(conn, "SELECT outcome, details->>'result' FROM gdpr.audit_log WHERE action = 'preflight'") == (
        "failed", "HTTP 401 (credentials refused: the connection's key or token)")


def test_refused_request_has_nothing_to_propagate(conn, policy: Policy, keys: Keys, downstream) -> None:
    cid = add_contact(conn, "prospect", date(2025, 1, 1), litigation=True)
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    conn.commit()
    downstream.add_person(email)
    assert _erase(conn, policy, keys, email, "REQ-P-REF").status == "refused"

    with pytest.raises(ValueError, match="no outbox row") as info:
        _propagate(conn, policy, keys, "REQ-P-REF", "emailing")
    assert "@" not in str(info.value)
    with pytest.raises(ValueError, match="not declared"):
        _propagate(conn, policy, keys, "REQ-P-REF", "crm_backup")
    assert downstream.emailing.has_contact(email)


# -- completion and certificate ----------------------------------------------------------------------------


def test_certificate_once_every_target_acknowledged(
    conn, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    cid, email = person
    downstream.add_person(email)
    erased = _erase(conn, policy, keys, email, "REQ-P-CERT")
    assert erased.status == "pending_propagation"

    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT") is None  # nothing acknowledged yet
    _propagate(conn, policy, keys, "REQ-P-CERT", "emailing")
    _propagate(conn, policy, keys, "REQ-P-CERT", "telephony")
    assert propagation.complete_if_acknowledged(conn, CTX, "REQ-P-CERT") is None  # support_desk still pending
    assert _one(conn, "SELECT status, completed_at FROM gdpr.erasure_request WHERE request_id = 'REQ-P-CERT'") == (
        "pending_propagation", None)
    assert _one(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'certificate'") == (0,)
    _propagate(conn, policy, keys, "REQ-P-CERT", "support_desk")

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
    status = _one(conn, "SELECT status, completed_at IS NOT NULL FROM gdpr.erasure_request"
                        " WHERE request_id = 'REQ-P-CERT'")
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
    conn, warehouse: str, policy: Policy, keys: Keys, downstream, preflighted, person
) -> None:
    """While another worker's claim on the outbox row runs, a second worker is told to try later and calls
    nothing; once that claim expired (a worker that died mid-call), the row can be claimed again."""
    _, email = person
    downstream.add_person(email)
    _erase(conn, policy, keys, email, "REQ-LOCK-1")
    with psycopg.connect(warehouse) as other:
        other.execute(
            "UPDATE gdpr.erasure_propagation SET claimed_until = now() + interval '5 minutes', claimed_by = 'other'"
            " WHERE request_id = 'REQ-LOCK-1' AND target = 'emailing'"
        )
    with pytest.raises(TargetNotAcknowledged, match="another worker"):
        _propagate(conn, policy, keys, "REQ-LOCK-1", "emailing")
    assert downstream.emailing.has_contact(email)
    assert _outbox(conn, "REQ-LOCK-1", "emailing")["attempts"] == 0
    with psycopg.connect(warehouse) as other:  # the other worker died: its claim expires
        other.execute("UPDATE gdpr.erasure_propagation SET claimed_until = now() - interval '1 second'"
                      " WHERE request_id = 'REQ-LOCK-1' AND target = 'emailing'")
    assert _propagate(conn, policy, keys, "REQ-LOCK-1", "emailing") == "HTTP 204; lookup 404"
    assert not downstream.emailing.has_contact(email)
    assert _one(conn, "SELECT claimed_until, claimed_by FROM gdpr.erasure_propagation"
                      " WHERE request_id = 'REQ-LOCK-1' AND target = 'emailing'") == (None, None)


# -- an acknowledgement must be true (issue 11 point 2) ------------------------------------------------------
#
# Each scenario: a real server on 127.0.0.1 that misbehaves as a real downstream system can; the erasure
# must stay pending with its identifier kept (encrypted), the attempt recorded and audited, nothing personal
# in the message. `_attempt` is what a DAG run does for one target: the preflight, then the erasure call.


def _policy_with(tmp_path: Path, target: dict[str, Any]) -> Policy:
    """The demo policy with one more erasure target (named `faulty` unless said otherwise)."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["targets"].append({"name": "faulty", **target})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_policy(path)


def _attempt(conn: psycopg.Connection, policy: Policy, keys: Keys, request_id: str, target: str = "faulty") -> str:
    propagation.preflight(conn, policy, PREFLIGHT, target, TRANSPORT)
    return _propagate(conn, policy, keys, request_id, target)


def _assert_pending(conn: psycopg.Connection, keys: Keys, request_id: str, email: str, target: str = "faulty") -> dict:
    row = _outbox(conn, request_id, target)
    assert row["status"] == "pending" and row["acknowledged_at"] is None
    plain = keys.decrypt(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]),
                         erasure.outbox_aad(request_id, target, row["key_id"]))
    assert plain.decode() == email.lower(), "the identifier is kept for the retry"
    assert ("destroy_identifier", "done") not in _audit(conn, request_id, target)
    assert propagation.complete_if_acknowledged(conn, CTX, request_id) is None
    assert _one(conn, "SELECT status FROM gdpr.erasure_request WHERE request_id = %s", request_id) == (
        "pending_propagation",)
    assert _no_at_in_audit(conn)
    return row


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ScriptedServer]]:
    """Start a scripted server as the `faulty` target's connection (stopped after the test)."""
    servers: list[ScriptedServer] = []

    def start(routes: list, **extra: str) -> ScriptedServer:
        server = ScriptedServer(routes)
        servers.append(server)
        monkeypatch.setenv("AIRFLOW_CONN_FAULTY", server.connection(**extra))
        return server

    yield start
    for server in servers:
        server.stop()


ACCOUNT = ("GET", "/v3/account", json_answer(200, {"companyName": "Acme", "plan": [{"type": "free"}]}))
BREVO = {"kind": "http", "connection_id": "faulty", "preset": "brevo"}
CUSTOM = {"kind": "http", "connection_id": "faulty", "method": "DELETE", "endpoint": "/v1/people/{identifier}",
          "preflight_endpoint": "/v3/account"}


@pytest.mark.parametrize(("target", "error_body"), [
    (BREVO, {"code": "unauthorized", "message": "Key not found"}),  # Brevo's error model, with a 200
    (CUSTOM, {"error": "contact is locked", "deleted": False}),
], ids=["brevo-preset", "declared-target"])
def test_a_200_with_an_error_in_its_body_is_not_an_acknowledgement(
    conn, tmp_path: Path, keys: Keys, person, scripted, target: dict, error_body: dict
) -> None:
    _, email = person
    policy = _policy_with(tmp_path, target)
    server = scripted([ACCOUNT, ("DELETE", "/v", json_answer(200, error_body))])
    _erase(conn, policy, keys, email, "REQ-F-200")

    with pytest.raises(TargetNotAcknowledged) as info:
        _attempt(conn, policy, keys, "REQ-F-200")

    assert "@" not in str(info.value) and "locked" not in str(info.value) and "Key not found" not in str(info.value)
    row = _assert_pending(conn, keys, "REQ-F-200", email)
    assert row["attempts"] == 1
    assert row["last_result"] in ("HTTP 200 with an error in the body", "HTTP 200")  # 200 is not Brevo's 204
    assert _audit(conn, "REQ-F-200", "faulty") == [("propagate", "failed")]
    assert [m for m, _ in server.requests] == ["GET", "DELETE"]


def test_a_302_to_a_login_page_is_not_followed_nor_an_acknowledgement(
    conn, tmp_path: Path, keys: Keys, person, scripted
) -> None:
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    server = scripted([ACCOUNT, ("DELETE", "/v3/contacts/", redirect("/login?next=/v3/contacts")),
                       ("GET", "/login", html_answer(200, "<html><form>Sign in</form></html>"))])
    _erase(conn, policy, keys, email, "REQ-F-302")

    with pytest.raises(TargetNotAcknowledged, match="HTTP 302") as info:
        _attempt(conn, policy, keys, "REQ-F-302")

    assert isinstance(info.value, propagation.TargetMisconfigured)  # retrying the same URL will not help
    assert _assert_pending(conn, keys, "REQ-F-302", email)["last_result"] == "HTTP 302 (a redirect, not followed)"
    assert not [p for _, p in server.requests if p.startswith("/login")], "the redirect was followed"


def test_a_302_on_the_preflight_fails_it(conn, tmp_path: Path, keys: Keys, person, scripted) -> None:
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    server = scripted([("GET", "/v3/account", redirect("/login")), ("GET", "/login", html_answer(200, "<html/>"))])
    _erase(conn, policy, keys, email, "REQ-F-302P")

    with pytest.raises(propagation.PreflightFailed, match="a redirect, not followed"):
        _attempt(conn, policy, keys, "REQ-F-302P")

    assert _assert_pending(conn, keys, "REQ-F-302P", email)["attempts"] == 0
    assert server.requests == [("GET", "/v3/account")]


def test_404_for_every_call_wrong_base_url_fails_the_preflight_and_sends_nothing(
    conn, tmp_path: Path, keys: Keys, person, scripted
) -> None:
    """A wrong base URL (or endpoint) answers 404 to everything: before, "404 = already gone" acknowledged it."""
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    server = scripted([])  # 404 for every call
    _erase(conn, policy, keys, email, "REQ-F-404")

    with pytest.raises(TargetNotAcknowledged) as info:
        _attempt(conn, policy, keys, "REQ-F-404")

    message = str(info.value)
    assert isinstance(info.value, propagation.PreflightFailed) and not info.value.retryable
    assert message.startswith("preflight of target faulty failed: GET /v3/account answered HTTP 404 (wrong base URL "
                              "or endpoint?)") and "stay pending" in message and "@" not in message
    assert _assert_pending(conn, keys, "REQ-F-404", email)["attempts"] == 0
    assert server.requests == [("GET", "/v3/account")], "nothing was sent for the person"
    with pytest.raises(propagation.PreflightFailed, match="no passed preflight in this run"):
        _propagate(conn, policy, keys, "REQ-F-404", "faulty")
    assert server.requests == [("GET", "/v3/account")]
    assert _one(conn, "SELECT outcome FROM gdpr.audit_log WHERE action = 'preflight'") == ("failed",)


def test_a_404_that_is_not_the_apis_not_found_answer_is_not_already_gone(
    conn, tmp_path: Path, keys: Keys, person, scripted
) -> None:
    """The account route answers, but the contacts route is wrong (a proxy's 404 page, not Brevo's)."""
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    scripted([ACCOUNT, ("DELETE", "/v3/contacts/", html_answer(404, "<h1>Not Found</h1>"))])
    _erase(conn, policy, keys, email, "REQ-F-404B")

    with pytest.raises(TargetNotAcknowledged, match="not the API's not-found answer"):
        _attempt(conn, policy, keys, "REQ-F-404B")

    assert _assert_pending(conn, keys, "REQ-F-404B", email)["attempts"] == 1


def test_a_deletion_the_lookup_does_not_confirm_is_not_an_acknowledgement(
    conn, tmp_path: Path, keys: Keys, person, scripted
) -> None:
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    scripted([ACCOUNT, ("DELETE", "/v3/contacts/", json_answer(204)),
              ("GET", "/v3/contacts/", json_answer(200, {"id": 7, "emailBlacklisted": False}))])
    _erase(conn, policy, keys, email, "REQ-F-LOOK")

    with pytest.raises(TargetNotAcknowledged, match="the lookup still finds the person"):
        _attempt(conn, policy, keys, "REQ-F-LOOK")

    assert _assert_pending(conn, keys, "REQ-F-LOOK", email)["last_result"] == (
        "HTTP 204; the lookup still finds the person (HTTP 200)")


TRICKLED_204 = raw_answer("HTTP/1.1 204 No Content", {"Connection": "close"})
TRICKLED_200 = raw_answer("HTTP/1.1 200 OK", {"Content-Type": "application/json", "Connection": "close"},
                          json.dumps({"deleted": True}).encode() + b" " * 200)


@pytest.mark.parametrize(("target", "answer"), [
    ({**BREVO, "timeout_seconds": 1}, TRICKLED_204),  # the status line and headers, byte by byte
    ({**CUSTOM, "timeout_seconds": 1, "success_codes": [200]}, TRICKLED_200),  # headers, then the body
], ids=["headers", "body"])
def test_a_trickling_target_is_cut_at_its_deadline(
    conn, warehouse: str, tmp_path: Path, keys: Keys, person, scripted, target: dict, answer: bytes
) -> None:
    """Each byte comes well within any per-read timeout; only an overall deadline ends the call. (The
    server would finish after about a minute, with an acknowledgement; no timing is asserted here.)"""
    _, email = person
    policy = _policy_with(tmp_path, target)
    scripted([ACCOUNT, ("DELETE", "/v", trickle(answer, every=60 / len(answer)))])
    _erase(conn, policy, keys, email, "REQ-F-SLOW")

    with pytest.raises(TargetNotAcknowledged, match="deadline") as info:
        _attempt(conn, policy, keys, "REQ-F-SLOW")

    assert "@" not in str(info.value)
    row = _assert_pending(conn, keys, "REQ-F-SLOW", email)
    assert (row["attempts"], row["last_result"]) == (1, "no whole answer within the 1 s deadline (cut)")
    assert _one(conn, "SELECT claimed_until FROM gdpr.erasure_propagation WHERE request_id = 'REQ-F-SLOW'"
                      " AND target = 'faulty'") == (None,), "the claim is released"


def test_no_transaction_is_held_while_a_target_answers_and_a_second_worker_skips(
    conn, warehouse: str, tmp_path: Path, keys: Keys, person, scripted
) -> None:
    """Worker A claims the row, commits and calls a slow target: its session is idle (no transaction, no row
    lock) during the call, a second worker is told to try later without calling, and A records the answer."""
    _, email = person
    policy = _policy_with(tmp_path, BREVO)
    release, started = threading.Event(), threading.Event()
    server = scripted([ACCOUNT, ("DELETE", "/v3/contacts/", after(release, json_answer(204), started)),
                       ("GET", "/v3/contacts/", json_answer(404, {"code": "document_not_found", "message": "x"}))])
    _erase(conn, policy, keys, email, "REQ-F-BUSY")
    propagation.preflight(conn, policy, PREFLIGHT, "faulty", TRANSPORT)
    results: list[object] = []
    with psycopg.connect(warehouse) as worker_a:
        pid = worker_a.info.backend_pid

        def run() -> None:
            try:
                results.append(propagation.propagate(worker_a, policy, keys, CTX, "REQ-F-BUSY", "faulty", TRANSPORT))
            except Exception as exc:  # noqa: BLE001 - reported below
                results.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert started.wait(30), "worker A never called the target"
            state = _one(conn, "SELECT state, backend_xid IS NULL FROM pg_stat_activity WHERE pid = %s", pid)
            assert state == ("idle", True), f"worker A holds a transaction across the call: {state}"
            locks = _one(conn, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                               " WHERE l.pid = %s AND c.relname = 'erasure_propagation'", pid)
            assert locks == (0,)
            with psycopg.connect(warehouse) as worker_b, pytest.raises(TargetNotAcknowledged, match="another worker"):
                propagation.propagate(worker_b, policy, keys, CTX, "REQ-F-BUSY", "faulty", TRANSPORT)
        finally:
            release.set()
            thread.join()
    assert results == ["HTTP 204; lookup 404"]
    assert [m for m, _ in server.requests].count("DELETE") == 1, "the target was called once"
    _assert_acknowledged(conn, "REQ-F-BUSY", "faulty")


def test_a_sql_statement_that_touches_too_many_rows_is_rolled_back(
    conn, tmp_path: Path, keys: Keys, downstream, person
) -> None:
    """`WHERE true OR ...` passed the placeholder check and wiped every ticket at the target."""
    _, email = person
    for n in range(6):
        downstream.add_person(f"someone.{n}@example.example")
    downstream.add_person(email)
    policy = _policy_with(tmp_path, {
        "kind": "sql", "connection_id": "support_desk", "max_rows": 5,
        "statements": [
            "DELETE FROM desk.ticket_messages WHERE ticket_id IN (SELECT ticket_id FROM desk.tickets"
            " WHERE lower(requester_email) = %(identifier)s)",
            "DELETE FROM desk.ticket_messages WHERE true OR ticket_id IN (SELECT ticket_id FROM desk.tickets"
            " WHERE lower(requester_email) = %(identifier)s)",
            "DELETE FROM desk.tickets WHERE true OR lower(requester_email) = %(identifier)s",
        ],
    })
    _erase(conn, policy, keys, email, "REQ-F-SQL")

    with pytest.raises(TargetNotAcknowledged) as info:
        _attempt(conn, policy, keys, "REQ-F-SQL")

    assert isinstance(info.value, propagation.TargetMisconfigured) and "@" not in str(info.value)
    row = _assert_pending(conn, keys, "REQ-F-SQL", email)
    assert row["last_result"] == ("SQL refused: the statements changed 7 row(s) (statements so far: 1, 6), more "
                                  "than max_rows 5; rolled back")
    assert _audit(conn, "REQ-F-SQL", "faulty") == [("propagate", "failed")]
    assert downstream.desk_rows(email) == 1 and _desk_messages(downstream.desk_url) == 7  # all rolled back
    with psycopg.connect(downstream.desk_url) as desk:
        assert desk.execute("SELECT count(*) FROM desk.tickets").fetchone()[0] == 7  # type: ignore[index]


def test_the_engine_does_not_import_airflow() -> None:
    """The seam: propagation and transport reach downstream systems only through the adapters passed in."""
    for module in ("engine/propagation.py", "transport/__init__.py"):
        tree = ast.parse((ROOT / "plugins" / "warehouse_gdpr" / module).read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.split(".")[0] in ("airflow", "requests", "urllib3")], module

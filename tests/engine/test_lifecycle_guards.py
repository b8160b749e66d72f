"""A request or an outbox row changes state only along its lifecycle, each change with its audit row, enforced by
the database against the engine's role (control schema v10). Each forbidden write is tried as the DAGs' login
role (gdpr_dag, a member of gdpr_engine): refused, nothing changed. The allowed path next to it works, through
the engine's own functions. Rows are set up by the owner, whom these guards do not bind (as the archive's)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg
import pytest
from psycopg import errors

from helpers import as_role
from warehouse_gdpr.engine import audit, propagation, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys

CTX = RunContext("gdpr_subject_erasure", "manual__lifecycle", "verify")
HINT = "a request and its outbox rows change only along their lifecycle (see gdpr_schema.sql, v10)"

pytestmark = pytest.mark.skipif(bool(os.environ.get("WAREHOUSE_TEST_URL")),
                                reason="needs the embedded server's gdpr_dag login without a password")


@pytest.fixture
def engine(warehouse: str) -> Iterator[psycopg.Connection]:
    """The engine's role; autocommit, so that each `transaction()` below is a real one, checked at COMMIT."""
    with psycopg.connect(as_role(warehouse, "gdpr_dag"), autocommit=True) as connection:
        assert connection.execute("SELECT pg_has_role('gdpr_engine', 'MEMBER')").fetchone() == (True,)
        yield connection


@pytest.fixture
def rows(conn: psycopg.Connection) -> None:
    """One request in each state, with its outbox rows (set up by the owner)."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " reason, completed_at, details) VALUES"
            " ('REQ-NEW', 'erasure', repeat('a', 64), '2026-06-01', '2026-07-01', 'registered', NULL, NULL, NULL,"
            "  '{}'),"
            " ('REQ-PENDING', 'erasure', repeat('b', 64), '2026-06-01', '2026-07-01', 'pending_propagation', 'erased',"
            "  'no legal hold', NULL, '{\"rows\": {\"crm.contacts\": 1}}'),"
            " ('REQ-ACKED', 'rectification', repeat('c', 64), '2026-06-01', '2026-07-01', 'pending_propagation',"
            "  'rectified', NULL, NULL, '{\"rows\": {\"crm.contacts\": 1}}'),"
            " ('REQ-DONE', 'erasure', repeat('d', 64), '2026-06-01', '2026-07-01', 'completed', 'erased',"
            "  'no legal hold', now(), '{\"rows\": {\"crm.contacts\": 1}}'),"
            " ('REQ-REFUSED', 'erasure', repeat('e', 64), '2026-06-01', '2026-07-01', 'refused', 'refused',"
            "  'legal hold: litigation', now(), '{}'),"
            " ('REQ-OLD', 'access', repeat('f', 64), '2020-01-01', '2020-02-01', 'completed', 'answered', NULL,"
            "  '2020-01-20', '{}')")
        conn.execute(
            "INSERT INTO gdpr.erasure_propagation (request_id, target, status, attempts, key_id, nonce,"
            " identifier_ciphertext, last_result, acknowledged_at) VALUES"
            " ('REQ-PENDING', 'emailing', 'pending', 2, 'archive-1', '\\x00', '\\x01', 'HTTP 503', NULL),"
            " ('REQ-PENDING', 'telephony', 'acknowledged', 1, NULL, NULL, NULL, 'SQL ok', now()),"
            " ('REQ-ACKED', 'emailing', 'acknowledged', 1, NULL, NULL, NULL, 'HTTP 204', now()),"
            " ('REQ-DONE', 'emailing', 'acknowledged', 1, NULL, NULL, NULL, 'HTTP 204', now()),"
            " ('REQ-OLD', 'emailing', 'acknowledged', 1, NULL, NULL, NULL, 'HTTP 204', '2020-01-20')")


def _state(conn: psycopg.Connection) -> tuple[list[Any], list[Any], int]:
    state = (conn.execute("SELECT r::text FROM gdpr.request r ORDER BY request_id").fetchall(),
             conn.execute("SELECT p::text FROM gdpr.erasure_propagation p ORDER BY request_id, target").fetchall(),
             conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return state


def _refused(conn: psycopg.Connection, engine: psycopg.Connection, *statements: str,
             audit_rows: tuple[dict[str, Any], ...] = ()) -> str:
    """Run `statements` (then write `audit_rows`) in one transaction of the engine: refused (at the statement or
    at COMMIT), nothing changed. Returns the refusal's message."""
    before = _state(conn)
    with pytest.raises(errors.InsufficientPrivilege) as info, engine.transaction():
        for statement in statements:
            engine.execute(statement)  # type: ignore[arg-type]
        for row in audit_rows:
            audit.record(engine, CTX, **row)
    assert _state(conn) == before
    return str(info.value.diag.message_primary)


def _status(conn: psycopg.Connection, request_id: str) -> str:
    status = conn.execute("SELECT status FROM gdpr.request WHERE request_id = %s", (request_id,)).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return status  # type: ignore[no-any-return]


# -- a request's status: forward only, along its lifecycle ------------------------------------------------


@pytest.mark.parametrize(("statement", "message"), [
    ("UPDATE gdpr.request SET status = 'registered', outcome = NULL, completed_at = NULL WHERE request_id = 'REQ-DONE'",
     "gdpr.request request REQ-DONE: completed -> registered refused"),
    ("UPDATE gdpr.request SET status = 'pending_propagation', completed_at = NULL WHERE request_id = 'REQ-DONE'",
     "gdpr.request request REQ-DONE: completed -> pending_propagation refused"),
    ("UPDATE gdpr.request SET status = 'completed', outcome = 'erased', reason = 'no legal hold'"
     " WHERE request_id = 'REQ-REFUSED'", "gdpr.request request REQ-REFUSED: refused -> completed refused"),
    ("UPDATE gdpr.request SET outcome = 'restricted' WHERE request_id = 'REQ-DONE'",
     "gdpr.request request REQ-DONE: this change of a completed request refused"),
    ("UPDATE gdpr.request SET details = '{\"rows\": {}}' WHERE request_id = 'REQ-DONE'",
     "gdpr.request request REQ-DONE: this change of a completed request refused"),
    ("UPDATE gdpr.request SET completed_at = now() - interval '1 day' WHERE request_id = 'REQ-DONE'",
     "gdpr.request request REQ-DONE: this change of a completed request refused"),
    ("UPDATE gdpr.request SET subject_hash = repeat('0', 64) WHERE request_id = 'REQ-REFUSED'",
     "gdpr.request request REQ-REFUSED: this change of a refused request refused"),
    ("UPDATE gdpr.request SET status = 'registered', outcome = NULL WHERE request_id = 'REQ-PENDING'",
     "gdpr.request request REQ-PENDING: pending_propagation -> registered refused"),
    ("UPDATE gdpr.request SET status = 'completed', completed_at = now() WHERE request_id = 'REQ-PENDING'",
     "gdpr.request request REQ-PENDING: completing it while a target is still pending refused"),
    ("UPDATE gdpr.request SET status = 'completed', completed_at = now(), outcome = 'restricted'"
     " WHERE request_id = 'REQ-ACKED'", "gdpr.request request REQ-ACKED: pending_propagation -> completed refused"),
    ("UPDATE gdpr.request SET status = 'completed', completed_at = '2026-06-02' WHERE request_id = 'REQ-ACKED'",
     "gdpr.request request REQ-ACKED: pending_propagation -> completed refused"),
    ("UPDATE gdpr.request SET details = '{\"rows\": {}}' WHERE request_id = 'REQ-PENDING'",
     "gdpr.request request REQ-PENDING: this change of a pending_propagation request refused"),
    ("UPDATE gdpr.request SET status = 'completed', outcome = 'erased', completed_at = '2026-06-02'"
     " WHERE request_id = 'REQ-NEW'", "gdpr.request request REQ-NEW: registered -> completed refused"),
    ("UPDATE gdpr.request SET status = 'in_progress' WHERE request_id = 'REQ-NEW'",
     "gdpr.request request REQ-NEW: registered -> in_progress refused"),
    ("UPDATE gdpr.request SET subject_hash = repeat('0', 64) WHERE request_id = 'REQ-NEW'",
     "gdpr.request request REQ-NEW: this change of a registered request refused"),
    ("INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status)"
     " VALUES ('REQ-X', 'erasure', repeat('a', 64), '2026-06-01', '2026-07-01', 'in_progress')",
     "gdpr.request request REQ-X: inserting it as in_progress refused"),
    ("INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome, completed_at)"
     " VALUES ('REQ-X', 'erasure', repeat('a', 64), '2026-06-01', '2026-07-01', 'completed', 'erased', '2026-06-02')",
     "gdpr.request request REQ-X: inserting it as completed refused"),
], ids=["completed-back-to-registered", "completed-back-to-pending", "refused-to-completed", "completed-outcome",
        "completed-details", "completed-backdated", "refused-subject", "pending-back-to-registered",
        "completed-with-a-target-pending", "completed-with-another-outcome", "completed-backdated-at-completion",
        "pending-details", "registered-to-completed-backdated", "in-progress", "registered-subject",
        "insert-in-progress", "insert-completed-backdated"])
def test_a_request_moves_only_along_its_lifecycle(conn: psycopg.Connection, engine: psycopg.Connection, rows: None,
                                                 statement: str, message: str) -> None:
    assert _refused(conn, engine, statement) == message


ERASED = {"action": "erasure_request", "outcome": "erased", "details": {"request_id": "REQ-NEW"}}


@pytest.mark.parametrize(("audit_rows", "change"), [
    ((), "the change registered -> completed of request REQ-NEW (erasure)"),
    (({"action": "register_request", "outcome": "erased", "details": {"request_id": "REQ-NEW"}},),
     "the change registered -> completed of request REQ-NEW (erasure)"),
    (({**ERASED, "outcome": "refused"},), "the change registered -> completed of request REQ-NEW (erasure)"),
    (({**ERASED, "details": {"request_id": "REQ-PENDING"}},),
     "the change registered -> completed of request REQ-NEW (erasure)"),
    (({**ERASED, "details": {}},), "the change registered -> completed of request REQ-NEW (erasure)"),
], ids=["no-audit-row", "another-action", "another-outcome", "another-request", "no-request"])
def test_a_request_is_run_only_with_its_audit_row_in_the_same_transaction(
    conn: psycopg.Connection, engine: psycopg.Connection, rows: None, audit_rows: tuple[dict[str, Any], ...],
    change: str,
) -> None:
    message = _refused(conn, engine, "UPDATE gdpr.request SET status = 'completed', outcome = 'erased',"
                       " completed_at = now() WHERE request_id = 'REQ-NEW'", audit_rows=audit_rows)
    assert message == f"gdpr.request: {change} has no audit row erasure_request with outcome erased in its transaction"


def test_a_dry_run_audit_row_or_one_of_an_earlier_transaction_does_not_count(
    conn: psycopg.Connection, engine: psycopg.Connection, rows: None
) -> None:
    with engine.transaction():
        audit.record(engine, CTX, **ERASED)  # committed alone, before the change
    with pytest.raises(errors.InsufficientPrivilege), engine.transaction():
        engine.execute("UPDATE gdpr.request SET status = 'completed', outcome = 'erased', completed_at = now()"
                       " WHERE request_id = 'REQ-NEW'")
        audit.record(engine, RunContext("d", "r", "t", dry_run=True), **ERASED)
    assert _status(conn, "REQ-NEW") == "registered"
    with engine.transaction():  # with it: the run is recorded
        engine.execute("UPDATE gdpr.request SET status = 'completed', outcome = 'erased', completed_at = now()"
                       " WHERE request_id = 'REQ-NEW'")
        audit.record(engine, CTX, **ERASED)
    assert _status(conn, "REQ-NEW") == "completed"


@pytest.mark.parametrize(("statement", "message"), [
    ("INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome, completed_at)"
     " VALUES ('REQ-X', 'access', repeat('a', 64), '2026-06-01', '2026-07-01', 'completed', 'answered', now())",
     "gdpr.request: the insert of request REQ-X (access) has no audit row access_request with outcome answered in "
     "its transaction"),
    ("INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status)"
     " VALUES ('REQ-X', 'erasure', repeat('a', 64), '2026-06-01', '2026-07-01', 'registered')",
     "gdpr.request: the insert of request REQ-X (erasure) has no audit row register_request with outcome registered "
     "in its transaction"),
    ("UPDATE gdpr.request SET extended_due_date = '2026-09-01', extension_reason = 'complex', extended_at = now()"
     " WHERE request_id = 'REQ-NEW'",
     "gdpr.request: the change registered -> registered of request REQ-NEW (erasure) has no audit row extend_request "
     "with outcome extended in its transaction"),
    ("UPDATE gdpr.request SET status = 'completed', completed_at = now() WHERE request_id = 'REQ-ACKED'",
     "gdpr.request: the change pending_propagation -> completed of request REQ-ACKED (rectification) has no audit row "
     "certificate or request_record with outcome completed in its transaction"),
], ids=["insert-completed", "insert-registered", "extension", "completion-without-its-record"])
def test_every_other_step_of_a_request_has_its_audit_row(conn: psycopg.Connection, engine: psycopg.Connection,
                                                          rows: None, statement: str, message: str) -> None:
    assert _refused(conn, engine, statement) == message


def test_the_engine_registers_extends_runs_and_completes_a_request(
    conn: psycopg.Connection, engine: psycopg.Connection, keys: Keys
) -> None:
    """The allowed path, through the engine's own functions, as the engine's role."""
    requests.register(engine, keys, CTX, kind="rectification", request_id="REQ-OK", identifier="jane@acme.example",
                      received_at=date(2026, 6, 1), today=date(2026, 6, 15), changes={"phone": "+33 1 00 00 00 00"})
    requests.extend(engine, CTX, "REQ-OK", "complex", today=date(2026, 6, 15))
    with engine.transaction():
        requests.recorded(engine, "REQ-OK", "rectification", keys.subject_hash("jane@acme.example"), for_update=True)
        requests.record_outcome(engine, request_id="REQ-OK", kind="rectification",
                                subject_hash=keys.subject_hash("jane@acme.example"), received_at=date(2026, 6, 1),
                                status="pending_propagation", outcome="rectified", reason="", details={"rows": {}})
        propagation.queue(engine, keys, "REQ-OK", "rectification", "emailing", {"identifier": "jane@acme.example"})
        audit.record(engine, CTX, action="rectification_request", outcome="rectified",
                     details={"request_id": "REQ-OK", "status": "pending_propagation"})
    assert propagation.complete_if_acknowledged(engine, CTX, "REQ-OK") is None  # a target pending
    with engine.transaction():  # as propagation.propagate records an acknowledgement
        engine.execute("UPDATE gdpr.erasure_propagation SET attempts = attempts + 1, last_result = 'HTTP 204',"
                       " last_attempt_at = now() WHERE request_id = 'REQ-OK'")
        audit.record(engine, CTX, action="propagate", outcome="acknowledged",
                     details={"request_id": "REQ-OK", "target": "emailing", "result": "HTTP 204"})
        engine.execute("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                       " key_id = NULL, nonce = NULL, identifier_ciphertext = NULL WHERE request_id = 'REQ-OK'")
    record = propagation.complete_if_acknowledged(engine, CTX, "REQ-OK")
    assert record is not None and record["status"] == "completed"
    assert conn.execute("SELECT status, extended_due_date IS NOT NULL, identifier_ciphertext IS NULL"
                        " FROM gdpr.request WHERE request_id = 'REQ-OK'").fetchone() == ("completed", True, True)
    actions = [r[0] for r in conn.execute("SELECT action FROM gdpr.audit_log WHERE details->>'request_id' = 'REQ-OK'"
                                          " ORDER BY audit_id").fetchall()]
    assert actions == ["register_request", "extend_request", "rectification_request", "propagate", "request_record",
                       "destroy_identifier"]


# -- the outbox: pending, tried, acknowledged once with its audit row --------------------------------------


PENDING = "WHERE request_id = 'REQ-PENDING' AND target = 'emailing'"
ACKED = "WHERE request_id = 'REQ-PENDING' AND target = 'telephony'"
ACKNOWLEDGE = ("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(), key_id = NULL,"
               " nonce = NULL, identifier_ciphertext = NULL, claimed_until = NULL, claimed_by = NULL ")
ROW = "gdpr.erasure_propagation row of request REQ-PENDING and target"


@pytest.mark.parametrize(("statement", "message"), [
    (f"UPDATE gdpr.erasure_propagation SET status = 'pending', acknowledged_at = NULL {ACKED}",
     f"{ROW} telephony: acknowledged -> pending refused"),
    (f"UPDATE gdpr.erasure_propagation SET last_result = 'HTTP 204' {ACKED}",
     f"{ROW} telephony: acknowledged -> acknowledged refused"),
    (f"UPDATE gdpr.erasure_propagation SET acknowledged_at = now() - interval '1 day' {ACKED}",
     f"{ROW} telephony: acknowledged -> acknowledged refused"),
    (ACKNOWLEDGE.replace("acknowledged_at = now()", "acknowledged_at = '2026-06-01'") + PENDING,
     f"{ROW} emailing: this acknowledgement refused"),
    (ACKNOWLEDGE.replace("status = 'acknowledged'", "status = 'acknowledged', attempts = 3") + PENDING,
     f"{ROW} emailing: this acknowledgement refused"),
    (f"UPDATE gdpr.erasure_propagation SET attempts = 0 {PENDING}",
     f"{ROW} emailing: this change of a pending row refused"),
    (f"UPDATE gdpr.erasure_propagation SET target = 'desk' {PENDING}",
     f"{ROW} desk: this change of a pending row refused"),
    (f"UPDATE gdpr.erasure_propagation SET key_id = 'archive-2' {PENDING}",
     f"{ROW} emailing: this change of a pending row refused"),
    ("INSERT INTO gdpr.erasure_propagation (request_id, target, status, acknowledged_at)"
     " VALUES ('REQ-PENDING', 'desk', 'acknowledged', now())",
     f"{ROW} desk: inserting it other than pending, untried, for a request pending propagation refused"),
    ("INSERT INTO gdpr.erasure_propagation (request_id, target, status) VALUES ('REQ-DONE', 'desk', 'pending')",
     "gdpr.erasure_propagation row of request REQ-DONE and target desk: inserting it other than pending, untried, "
     "for a request pending propagation refused"),
], ids=["un-acknowledge", "acknowledged-result", "acknowledged-backdated", "acknowledge-backdated",
        "acknowledge-with-attempts", "attempts-reset", "target", "key", "insert-acknowledged", "insert-for-completed"])
def test_an_outbox_row_moves_only_along_its_lifecycle(conn: psycopg.Connection, engine: psycopg.Connection,
                                                     rows: None, statement: str, message: str) -> None:
    assert _refused(conn, engine, statement) == message


@pytest.mark.parametrize("audit_rows", [
    (),
    ({"action": "propagate", "outcome": "failed", "details": {"request_id": "REQ-PENDING", "target": "emailing"}},),
    ({"action": "propagate", "outcome": "acknowledged", "details": {"request_id": "REQ-PENDING", "target": "desk"}},),
    ({"action": "propagate", "outcome": "acknowledged", "details": {"request_id": "REQ-ACKED", "target": "emailing"}},),
    ({"action": "destroy_identifier", "outcome": "acknowledged",
      "details": {"request_id": "REQ-PENDING", "target": "emailing"}},),
], ids=["no-audit-row", "failed", "another-target", "another-request", "another-action"])
def test_an_acknowledgement_needs_its_audit_row_in_the_same_transaction(
    conn: psycopg.Connection, engine: psycopg.Connection, rows: None, audit_rows: tuple[dict[str, Any], ...]
) -> None:
    assert _refused(conn, engine, ACKNOWLEDGE + PENDING, audit_rows=audit_rows) == (
        "gdpr.erasure_propagation: the acknowledgement of request REQ-PENDING target emailing has no audit row "
        "propagate with outcome acknowledged in its transaction")


def test_deadline_warnings_stay_allowed_in_bulk_on_open_requests_only(
    conn: psycopg.Connection, engine: psycopg.Connection, rows: None
) -> None:
    with engine.transaction():  # as gdpr_propagation_retry's check_deadlines does
        assert engine.execute("UPDATE gdpr.request SET deadline_warned_at = now()"
                              " WHERE completed_at IS NULL").rowcount == 3
    assert _refused(conn, engine, "UPDATE gdpr.request SET deadline_warned_at = now()"
                    " WHERE request_id = 'REQ-DONE'") == (
        "gdpr.request request REQ-DONE: this change of a completed request refused")


def test_claims_and_attempts_stay_allowed_in_bulk(conn: psycopg.Connection, engine: psycopg.Connection,
                                                  rows: None) -> None:
    with engine.transaction():
        assert engine.execute("UPDATE gdpr.erasure_propagation SET claimed_until = now() + interval '1 minute',"
                              " claimed_by = 'w' WHERE status = 'pending'").rowcount == 1
        assert engine.execute("UPDATE gdpr.erasure_propagation SET attempts = attempts + 1, last_result = 'HTTP 503',"
                              " last_attempt_at = now(), claimed_until = NULL, claimed_by = NULL"
                              " WHERE status = 'pending'").rowcount == 1
    assert conn.execute(f"SELECT attempts FROM gdpr.erasure_propagation {PENDING}").fetchone() == (3,)


# -- deletion: only the purge, past the retention period, audited in its statement ------------------------


@pytest.mark.parametrize("statement", [
    "DELETE FROM gdpr.request WHERE request_id = 'REQ-OLD'",
    "DELETE FROM gdpr.erasure_propagation WHERE request_id = 'REQ-OLD'",
    "SELECT * FROM gdpr.purge_requests('P1M', now(), 100, 'd', 'r', 't')",
    "SELECT * FROM gdpr.purge_requests('P3Y', now() + interval '10 years', 100, 'd', 'r', 't')",
    "SELECT * FROM gdpr.purge_requests('P3Y', now(), 0, 'd', 'r', 't')",
], ids=["delete-request", "delete-outbox", "keep-for-a-month", "as-of-in-the-future", "no-limit"])
def test_the_engine_deletes_requests_only_through_the_purge(conn: psycopg.Connection, engine: psycopg.Connection,
                                                            rows: None, statement: str) -> None:
    _refused(conn, engine, statement)


def test_the_purge_deletes_what_is_past_keep_for_with_its_audit_rows(
    conn: psycopg.Connection, engine: psycopg.Connection, rows: None
) -> None:
    ctx = RunContext("gdpr_retention_sweep", "run", "purge_requests")
    assert requests.purge(engine, ctx, "P3Y", "2026-06-15T00:00:00+00:00", 100) == {
        "requests": 1, "outbox": 1, "identifiers_destroyed": 0}
    assert conn.execute("SELECT count(*) FROM gdpr.request WHERE request_id = 'REQ-OLD'").fetchone() == (0,)
    assert conn.execute("SELECT table_name, row_count, details FROM gdpr.audit_log WHERE action = 'purge_requests'"
                        " ORDER BY audit_id").fetchall() == [
        ("gdpr.request", 1, {"kind": "access", "keep_for": "P3Y"}),
        ("gdpr.erasure_propagation", 1, {"keep_for": "P3Y"})]


# -- certificates and records: what gdpr.request and the outbox hold ---------------------------------------


def _certificate(conn: psycopg.Connection, request_id: str) -> dict[str, Any]:
    """What propagation.write_certificate would write now (read by the owner, nothing written)."""
    with conn.transaction():
        certificate = propagation.write_certificate(conn, CTX, request_id)
        raise psycopg.Rollback()
    return certificate


@pytest.mark.parametrize(("request_id", "action", "forge"), [
    ("REQ-PENDING", "certificate", {"status": "completed"}),          # targets still pending
    ("REQ-NEW", "certificate", {"status": "completed", "outcome": "erased"}),
    ("REQ-REFUSED", "certificate", {"status": "completed", "outcome": "erased"}),
    ("REQ-DONE", "certificate", {"rows_by_table": {"crm.contacts": 1, "crm.notes": 4}}),
    ("REQ-DONE", "certificate", {"targets": []}),
    ("REQ-PENDING", "certificate", {"targets": [{"target": "emailing", "status": "acknowledged"},
                                                {"target": "telephony", "status": "acknowledged"}]}),
    ("REQ-DONE", "request_record", {}),                                # an erasure's is a certificate
    ("REQ-GONE", "certificate", {}),                                   # no such request
], ids=["pending-as-completed", "registered-as-completed", "refused-as-completed", "more-rows", "no-targets",
        "targets-acknowledged", "record-of-an-erasure", "no-request"])
def test_a_forged_certificate_is_refused(conn: psycopg.Connection, engine: psycopg.Connection, rows: None,
                                         request_id: str, action: str, forge: dict[str, Any]) -> None:
    certificate = {**_certificate(conn, "REQ-DONE" if request_id == "REQ-GONE" else request_id), **forge,
                   "request_id": request_id}
    subject = conn.execute("SELECT coalesce(max(subject_hash), repeat('d', 64)) FROM gdpr.request"
                           " WHERE request_id = %s", (request_id,)).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    message = _refused(conn, engine, audit_rows=({"action": action, "outcome": certificate["status"],
                                                  "subject_hash": subject, "details": certificate},))
    assert message == (f"gdpr.audit_log: a certificate or record of request {request_id} must say what gdpr.request "
                       "and the outbox hold (kind, status, outcome, subject, rows, targets)")


def test_the_owner_may_not_forge_a_certificate_either(conn: psycopg.Connection, rows: None) -> None:
    certificate = {**_certificate(conn, "REQ-PENDING"), "status": "completed"}
    with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
        audit.record(conn, CTX, action="certificate", outcome="completed", subject_hash="b" * 64, details=certificate)


def test_a_true_certificate_is_written_whatever_the_status(conn: psycopg.Connection, engine: psycopg.Connection,
                                                           rows: None) -> None:
    for request_id in ("REQ-PENDING", "REQ-DONE", "REQ-REFUSED"):
        with engine.transaction():
            assert propagation.write_certificate(engine, CTX, request_id)["request_id"] == request_id
    assert conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'certificate'").fetchone() == (3,)

"""The request store (warehouse_gdpr.engine.requests) on a real PostgreSQL: register, load, resolve a DAG's
params, extend, destroy the identifier, list, purge. The identifier is personal data: no exception,
audit row or listing may contain it, and bad input changes nothing."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import psycopg
import pytest

from warehouse_gdpr.engine import erasure, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.erasure import ErasureRequest, RequestError
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.requests import RequestStoreError

CTX = RunContext("warehouse-gdpr", "cli__test", "request_new")
TODAY = date(2026, 6, 15)
EMAIL = "  Jane.Doe@ACME.example "  # as typed: spaces and capitals


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    value = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return int(value)


def _state(conn: psycopg.Connection) -> tuple[Any, ...]:
    """Everything a request operation may change."""
    rows = conn.execute("SELECT * FROM gdpr.request ORDER BY request_id").fetchall()
    audit = conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0]  # type: ignore[index]
    outbox = conn.execute("SELECT * FROM gdpr.erasure_propagation ORDER BY 1, 2").fetchall()
    conn.rollback()
    return rows, audit, outbox


def _register(conn: psycopg.Connection, keys: Keys, request_id: str = "REQ-R-1", kind: str = "erasure",
              identifier: str = EMAIL, received: date = TODAY, today: date = TODAY) -> dict[str, Any]:
    return requests.register(conn, keys, CTX, kind=kind, request_id=request_id, identifier=identifier,
                             received_at=received, today=today)


def _all_text(conn: psycopg.Connection) -> str:
    text = conn.execute(
        "SELECT coalesce(string_agg(a::text, ' '), '') FROM gdpr.audit_log a"
    ).fetchone()[0] + conn.execute(  # type: ignore[index]
        "SELECT coalesce(string_agg(r::text, ' '), '') FROM gdpr.request r").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return str(text)


# -- dates -------------------------------------------------------------------------------------------


def test_due_date_is_the_erasure_rule_and_the_extension_three_months() -> None:
    day = date(2023, 1, 1)
    while day < date(2029, 1, 1):  # leap years, month ends, December
        assert requests.due_date(day) == ErasureRequest("R", "a@b.example", None, day).due_date, day
        day += timedelta(days=1)
    assert requests.add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    assert requests.add_months(date(2028, 1, 31), 1) == date(2028, 2, 29)
    assert requests.add_months(date(2026, 11, 30), 3) == date(2027, 2, 28)
    assert requests.add_months(date(2026, 12, 15), 1) == date(2027, 1, 15)


# -- register and load ----------------------------------------------------------------------------------


def test_register_stores_the_identifier_encrypted_and_the_keyed_hash(conn: psycopg.Connection, keys: Keys) -> None:
    out = _register(conn, keys)
    assert out == {"request_id": "REQ-R-1", "kind": "erasure", "received_at": "2026-06-15", "due_date": "2026-07-15",
                   "subject_hash": keys.subject_hash("jane.doe@acme.example")}
    row = conn.execute(
        "SELECT kind, status, outcome, received_at, due_date, key_id, identifier_ciphertext FROM gdpr.request"
    ).fetchone()
    conn.rollback()
    assert row[:5] == ("erasure", "registered", None, TODAY, date(2026, 7, 15))
    assert row[5] == keys.store_key_id and b"jane" not in bytes(row[6]).lower()  # the store key, not the archive's
    assert "jane" not in _all_text(conn).lower() and "@" not in _all_text(conn)
    audit = conn.execute("SELECT action, outcome, subject_hash, details FROM gdpr.audit_log").fetchall()
    assert audit == [("register_request", "registered", out["subject_hash"],
                      {"request_id": "REQ-R-1", "kind": "erasure", "received_at": "2026-06-15",
                       "due_date": "2026-07-15", "by": "email"})]

    loaded = requests.load(conn, keys, "REQ-R-1", "erasure")
    assert (loaded.email, loaded.subject_id, loaded.due_date) == ("jane.doe@acme.example", None, date(2026, 7, 15))
    assert "jane" not in repr(loaded)


def test_register_by_subject_id(conn: psycopg.Connection, keys: Keys) -> None:
    out = _register(conn, keys, "REQ-R-ID", kind="access", identifier="subject_id:42\n", received=date(2026, 1, 31))
    assert out["due_date"] == "2026-02-28" and out["subject_hash"] == keys.hash_value("subject-id:42")
    loaded = requests.load(conn, keys, "REQ-R-ID", "access")
    assert (loaded.email, loaded.subject_id) == (None, 42)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "deletion"}, "unknown request kind: give one of access, portability, rectification, restriction,"
                               " restriction_lift, erasure, objection"),
        ({"request_id": "x"}, "the request id must be 3-64 characters"),
        ({"request_id": "jane.doe@acme.example"}, "the request id must be 3-64 characters"),
        ({"identifier": "p\u0430ul@example.com"}, "the identifier is neither a plain ASCII email address"),
        ({"identifier": "paul@example"}, "the identifier is neither a plain ASCII email address"),
        ({"identifier": "subject_id:-3"}, "`subject_id:N` needs a positive integer N"),
        ({"identifier": "subject_id:abc"}, "`subject_id:N` needs a positive integer N"),
        ({"received": TODAY + timedelta(days=1)}, "the date of receipt is in the future"),
        # the bound the subject DAG applies (erasure.MAX_RECEIVED_AGE_DAYS): refused here, not when it runs
        ({"received": TODAY - timedelta(days=366)}, "the date of receipt is more than 365 days before today"),
    ],
)
def test_register_refuses_bad_input_and_changes_nothing(
    conn: psycopg.Connection, keys: Keys, change: dict[str, Any], message: str
) -> None:
    before = _state(conn)
    with pytest.raises(RequestStoreError) as info:
        _register(conn, keys, **change)
    assert str(info.value).startswith(message)
    for value in change.values():
        if isinstance(value, str) and value != "x":
            assert value not in str(info.value), "a refused value was echoed"
    assert _state(conn) == before


def test_a_request_id_is_registered_once(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys)
    before = _state(conn)
    with pytest.raises(RequestStoreError, match=r"^request REQ-R-1 already exists \(erasure, registered\): nothing"):
        _register(conn, keys, kind="access", identifier="other.person@example.com")
    assert _state(conn) == before


def test_load_refuses_unknown_ids_other_kinds_and_a_moved_ciphertext(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, "REQ-R-A", kind="access")
    _register(conn, keys, "REQ-R-E", identifier="someone.else@example.com")
    with pytest.raises(RequestStoreError, match="^no request REQ-R-NONE is registered: register it first"):
        requests.load(conn, keys, "REQ-R-NONE", "erasure")
    with pytest.raises(RequestStoreError, match="^request REQ-R-A is of kind access, not erasure"):
        requests.load(conn, keys, "REQ-R-A", "erasure")
    with conn.transaction():  # a DBA copies another request's ciphertext: the AAD refuses it
        conn.execute("UPDATE gdpr.request a SET nonce = e.nonce, identifier_ciphertext = e.identifier_ciphertext"
                     " FROM gdpr.request e WHERE a.request_id = 'REQ-R-A' AND e.request_id = 'REQ-R-E'")
    with pytest.raises(RequestStoreError, match="^the encrypted identifier of request REQ-R-A does not decrypt"):
        requests.load(conn, keys, "REQ-R-A", "access")


# -- a DAG's params ------------------------------------------------------------------------------------


def test_resolve_params(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, received=date(2026, 6, 1))
    _register(conn, keys, "REQ-R-ACC", kind="access")
    before = _state(conn)
    resolved = requests.resolve_params(conn, keys, "erasure", {"request_id": "REQ-R-1", "email": None,
                                                                "subject_id": None, "dry_run": True})
    assert resolved == {"request_id": "REQ-R-1", "email": "jane.doe@acme.example", "subject_id": None,
                        "received_at": "2026-06-01", "dry_run": True}
    assert erasure.parse_request(resolved, today=TODAY).due_date == date(2026, 7, 1)
    same_day = {"request_id": "REQ-R-1", "received_at": "2026-06-01"}
    assert requests.resolve_params(conn, keys, "erasure", same_day)["email"] == "jane.doe@acme.example"
    # Not registered: the params go through as they are (the direct path).
    direct = {"request_id": "REQ-DIRECT-1", "email": "paul@example.com"}
    assert requests.resolve_params(conn, keys, "erasure", direct) == direct

    refused = [
        ({"request_id": "REQ-R-1", "email": "jane.doe@acme.example"},
         'request REQ-R-1 is registered with its identifier: trigger it with {"request_id": "REQ-R-1"} alone'),
        ({"request_id": "REQ-R-1", "subject_id": 7}, "request REQ-R-1 is registered with its identifier"),
        ({"request_id": "REQ-R-ACC"}, "request REQ-R-ACC is of kind access, not erasure"),
        ({"request_id": "REQ-R-ACC", "email": "x@example.com"}, "request REQ-R-ACC is of kind access, not erasure"),
        ({"request_id": "REQ-R-NONE"}, "no request REQ-R-NONE is registered"),
        ({"request_id": "REQ-R-1", "received_at": "2026-06-02"},
         "request REQ-R-1 was registered as received on 2026-06-01: leave `received_at` empty"),
    ]
    for params, message in refused:
        with pytest.raises(RequestStoreError) as info:
            requests.resolve_params(conn, keys, "erasure", params)
        assert str(info.value).startswith(message), params
        assert "@" not in str(info.value)
    assert _state(conn) == before


def test_a_registered_erasure_runs_in_place_and_its_identifier_is_destroyed(
    conn: psycopg.Connection, keys: Keys, policy: Policy
) -> None:
    email = conn.execute("SELECT email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
                         " AND NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id)"
                         " AND NOT EXISTS (SELECT 1 FROM crm.invoices x WHERE x.contact_id = c.contact_id)"
                         " ORDER BY contact_id LIMIT 1").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    _register(conn, keys, "REQ-R-RUN", identifier=email.upper(), received=date(2026, 6, 1))
    request = erasure.parse_request(requests.resolve_params(conn, keys, "erasure", {"request_id": "REQ-R-RUN"}),
                                    today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    result = erasure.erase(conn, policy, keys, CTX, request, located, {})
    assert (result.outcome, result.status, result.due_date) == ("erased", "pending_propagation", "2026-07-01")
    row = conn.execute("SELECT kind, status, outcome, received_at, subject_hash, identifier_ciphertext IS NOT NULL,"
                       " details ? 'run_at' FROM gdpr.request").fetchone()
    conn.rollback()
    assert row == ("erasure", "pending_propagation", "erased", date(2026, 6, 1), keys.subject_hash(email), True, True)
    with conn.transaction():  # not complete yet: nothing destroyed
        assert requests.destroy_identifier(conn, CTX, "REQ-R-RUN") is False
        conn.execute("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', key_id = NULL, nonce = NULL,"
                     " identifier_ciphertext = NULL")
    from warehouse_gdpr.engine import propagation

    certificate = propagation.complete_if_acknowledged(conn, CTX, "REQ-R-RUN")
    assert certificate is not None and certificate["status"] == "completed"
    assert _count(conn, "SELECT count(*) FROM gdpr.request WHERE identifier_ciphertext IS NULL AND key_id IS NULL") == 1
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'destroy_identifier'"
                        " AND table_name = 'gdpr.request' AND subject_hash = %s", keys.subject_hash(email)) == 1
    with pytest.raises(RequestStoreError, match="is completed since .*: its identifier was destroyed"):
        requests.load(conn, keys, "REQ-R-RUN", "erasure")
    assert email.lower() not in _all_text(conn).lower()


def test_erase_refuses_the_id_of_another_kind(conn: psycopg.Connection, keys: Keys, policy: Policy) -> None:
    _register(conn, keys, "REQ-R-ACC", kind="access")
    before = _state(conn)
    request = erasure.parse_request({"request_id": "REQ-R-ACC", "subject_id": 1}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    with pytest.raises(RequestError, match="^`request_id` REQ-R-ACC is already the id of a request of kind access, "
                                           "not an erasure: nothing was changed"):
        erasure.erase(conn, policy, keys, CTX, request, located, {})
    assert _state(conn) == before
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = 1") == 1


# -- extension -----------------------------------------------------------------------------------------


def test_extend_once_before_the_first_due_date(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, received=date(2026, 5, 31))
    out = requests.extend(conn, CTX, "REQ-R-1", "  Twelve systems to search; the person was told on 2026-06-10. ",
                          today=date(2026, 6, 30))
    assert out == {"request_id": "REQ-R-1", "kind": "erasure", "due_date": "2026-06-30",
                   "extended_due_date": "2026-08-31"}
    row = conn.execute("SELECT due_date, extended_due_date, extension_reason, extended_at IS NOT NULL"
                       " FROM gdpr.request").fetchone()
    assert row == (date(2026, 6, 30), date(2026, 8, 31),
                   "Twelve systems to search; the person was told on 2026-06-10.", True)
    audit = conn.execute(
        "SELECT action, outcome, details FROM gdpr.audit_log WHERE action = 'extend_request'").fetchall()
    conn.rollback()
    assert audit == [("extend_request", "extended", {"request_id": "REQ-R-1", "kind": "erasure",
                                                      "due_date": "2026-06-30", "extended_due_date": "2026-08-31",
                                                      "reason_length": 60})]
    assert requests.load(conn, keys, "REQ-R-1", "erasure").due_date == date(2026, 8, 31)
    assert conn.execute("SELECT due_date FROM gdpr.erasure_request").fetchall() == []  # not run: not in the old view

    before = _state(conn)
    with pytest.raises(RequestStoreError, match=r"^request REQ-R-1 was already extended on .* to 2026-08-31: an "
                                                r"extension is given once; nothing was changed$"):
        requests.extend(conn, CTX, "REQ-R-1", "again", today=date(2026, 6, 30))
    assert _state(conn) == before


@pytest.mark.parametrize(
    ("request_id", "reason", "today", "message"),
    [
        ("REQ-R-1", "complex", date(2026, 7, 16),
         "request REQ-R-1 was due on 2026-07-15: an extension is decided, and the person told, within the first month"),
        ("REQ-R-NONE", "complex", TODAY, "no request REQ-R-NONE: nothing was changed"),
        ("REQ-R-1", "   ", TODAY, "the reason must be 1-500 characters (it is 0)"),
        ("REQ-R-1", "jane.doe@acme.example " * 30, TODAY, "the reason must be 1-500 characters (it is 659)"),
        ("bad id!", "complex", TODAY, "the request id must be 3-64 characters"),
    ],
)
def test_extend_refuses_and_changes_nothing(
    conn: psycopg.Connection, keys: Keys, request_id: str, reason: str, today: date, message: str
) -> None:
    _register(conn, keys)
    before = _state(conn)
    with pytest.raises(RequestStoreError) as info:
        requests.extend(conn, CTX, request_id, reason, today=today)
    assert str(info.value).startswith(message)
    assert "@" not in str(info.value) and "bad id!" not in str(info.value)
    assert _state(conn) == before


def test_a_completed_request_is_not_extended(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys)
    with conn.transaction():
        conn.execute("UPDATE gdpr.request SET status = 'not_found', outcome = 'not_found', completed_at = now()")
    before = _state(conn)
    with pytest.raises(RequestStoreError, match="^request REQ-R-1 is not_found: nothing to extend"):
        requests.extend(conn, CTX, "REQ-R-1", "complex", today=TODAY)
    assert _state(conn) == before


# -- listing -------------------------------------------------------------------------------------------


def _completed(conn: psycopg.Connection, request_id: str, completed: str, kind: str = "erasure",
               targets: tuple[str, ...] = ()) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at) VALUES (%s, %s, repeat('d', 64), %s::date - 20, %s::date + 10, 'completed', 'erased', %s)",
            (request_id, kind, completed, completed, completed),
        )
        for target in targets:
            conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status, acknowledged_at)"
                         " VALUES (%s, %s, 'acknowledged', %s)", (request_id, target, completed))


def test_listing_open_overdue_and_targets(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, "REQ-L-OVERDUE", received=date(2026, 5, 1))              # due 2026-06-01
    _register(conn, keys, "REQ-L-OPEN", kind="access", received=date(2026, 6, 10))  # due 2026-07-10
    _completed(conn, "REQ-L-DONE", "2026-06-01", targets=("emailing", "telephony"))
    with conn.transaction():
        conn.execute("UPDATE gdpr.erasure_propagation SET status = 'pending' WHERE target = 'telephony'")
    requests.extend(conn, CTX, "REQ-L-OPEN", "complex", today=TODAY)                 # due 2026-09-10

    rows = requests.listing(conn, TODAY)
    assert [r["request_id"] for r in rows] == ["REQ-L-OVERDUE", "REQ-L-OPEN", "REQ-L-DONE"]
    overdue, open_, done = rows
    assert overdue == {
        "request_id": "REQ-L-OVERDUE", "kind": "erasure", "status": "registered", "outcome": None,
        "received_at": "2026-05-01", "due_date": "2026-06-01", "first_due_date": "2026-06-01", "extended": False,
        "extended_at": None, "days_left": -14, "overdue": True, "completed_at": None, "identifier_held": True,
        "targets": {},
    }
    assert (open_["due_date"], open_["first_due_date"], open_["extended"], open_["days_left"], open_["overdue"]) == (
        "2026-09-10", "2026-07-10", True, 87, False)
    assert done["targets"] == {"emailing": "acknowledged", "telephony": "pending"} and done["days_left"] is None
    assert [r["request_id"] for r in requests.listing(conn, TODAY, open_only=True)] == ["REQ-L-OVERDUE", "REQ-L-OPEN"]
    assert [r["request_id"] for r in requests.listing(conn, TODAY, overdue_only=True)] == ["REQ-L-OVERDUE"]
    assert keys.subject_hash("jane.doe@acme.example") not in str(rows) and "complex" not in str(rows)


# -- purge ---------------------------------------------------------------------------------------------

AS_OF = "2026-06-15T00:00:00+00:00"


def test_purge_after_keep_for_with_the_outbox_rows(conn: psycopg.Connection, keys: Keys) -> None:
    _completed(conn, "REQ-P-OLD-1", "2023-01-10", targets=("emailing", "support_desk"))
    _completed(conn, "REQ-P-OLD-2", "2023-06-14", kind="access")
    _completed(conn, "REQ-P-OLD-3", "2022-12-01", kind="objection")
    _completed(conn, "REQ-P-KEPT", "2023-06-16", targets=("emailing",))   # not three years yet
    _register(conn, keys, "REQ-P-OPEN", received=date(2025, 6, 16), today=TODAY)  # never completed: never purged
    _register(conn, keys, "REQ-P-LEFT")
    with conn.transaction():  # a completed request that still holds its identifier (a forgotten destruction)
        conn.execute("UPDATE gdpr.request SET status = 'refused', outcome = 'refused', completed_at = now()"
                     " WHERE request_id = 'REQ-P-LEFT'")

    dry_ctx = RunContext("gdpr_retention_sweep", "dry", "purge_requests", dry_run=True)
    dry = requests.purge(conn, dry_ctx, "P3Y", AS_OF, 2)
    assert dry == {"requests": 3, "outbox": 2, "identifiers_destroyed": 1}
    assert _count(conn, "SELECT count(*) FROM gdpr.request") == 6
    assert _count(conn, "SELECT count(*) FROM gdpr.request WHERE identifier_ciphertext IS NOT NULL") == 2

    ctx = RunContext("gdpr_retention_sweep", "run", "purge_requests")
    assert requests.purge(conn, ctx, "P3Y", AS_OF, 2) == {"requests": 3, "outbox": 2, "identifiers_destroyed": 1}
    left = [r[0] for r in conn.execute("SELECT request_id FROM gdpr.request ORDER BY 1").fetchall()]
    assert left == ["REQ-P-KEPT", "REQ-P-LEFT", "REQ-P-OPEN"]
    assert conn.execute("SELECT request_id, target FROM gdpr.erasure_propagation").fetchall() == [
        ("REQ-P-KEPT", "emailing")]
    assert conn.execute("SELECT request_id FROM gdpr.request WHERE identifier_ciphertext IS NOT NULL").fetchall() == [
        ("REQ-P-OPEN",)]
    audit = conn.execute(
        "SELECT table_name, sum(row_count)::int, count(*)::int FROM gdpr.audit_log WHERE run_id = 'run'"
        " AND action IN ('purge_requests', 'destroy_identifier') GROUP BY 1 ORDER BY 1").fetchall()
    conn.rollback()
    assert audit == [("gdpr.erasure_propagation", 2, 1), ("gdpr.request", 4, 4)]  # two batches: 2 + 1, by kind; 1 id
    assert requests.purge(conn, ctx, "P3Y", AS_OF, 2) == {"requests": 0, "outbox": 0, "identifiers_destroyed": 0}
    assert requests.purge(conn, ctx, "P1Y", "2026-06-15T00:00:00+00:00", 100)["requests"] == 1  # the policy's period


def test_keep_for_is_a_policy_duration(policy: Policy) -> None:
    from pathlib import Path

    import yaml

    from warehouse_gdpr.engine.policy import PolicyError, parse_policy

    assert policy.requests.keep_for == "P3Y"
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "include" / "policy.yaml").read_text(encoding="utf-8"))
    data["requests"] = {"keep_for": "three years"}
    with pytest.raises(PolicyError, match=r"requests\.keep_for: expected an ISO 8601 duration such as P3Y"):
        parse_policy(data, "policy.yaml")
    data["requests"] = {"keep_for": "P5Y"}
    assert parse_policy(data).requests.keep_for == "P5Y"
    del data["requests"]
    assert parse_policy(data).requests.keep_for == "P3Y"

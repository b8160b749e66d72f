"""Subject erasure at engine level (warehouse_gdpr.engine.erasure), on a real PostgreSQL.

parse_request -> locate -> holds_in_force -> erase -> verify, called directly. The email is
personal data: no exception, repr, audit row or leftover column may contain it.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from helpers import AS_OF, add_activity, add_contact, add_contract, add_invoice, new_id, table_checksum
from warehouse_gdpr.engine import erasure, propagation, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys, archive_aad
from warehouse_gdpr.engine.erasure import ErasureRequest, RequestError
from warehouse_gdpr.engine.policy import Policy, parse_policy

CTX = RunContext("test", "run-1", "erase")
TODAY = date(2026, 6, 15)  # the seeded template's today (AS_OF)
GOOD_EMAIL = "paul.durand@example.com"
TARGETS = ["emailing", "support_desk", "telephony"]
CRM_ALL = ["crm.contacts", "crm.activities", "crm.notes", "crm.contracts", "crm.invoices", "crm.support_tickets"]
CONTROL = ["gdpr.suppression_list", "gdpr.erasure_request", "gdpr.erasure_propagation"]


# -- helpers ---------------------------------------------------------------------------------------


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    value = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return int(value)


def _one(conn: psycopg.Connection, query: str, *params: object) -> tuple[Any, ...] | None:
    row = conn.execute(query, params).fetchone()
    conn.rollback()
    return row


def _run(conn: psycopg.Connection, policy: Policy, keys: Keys, params: dict[str, Any], as_of: str = AS_OF):
    """The engine's steps, as the DAG's erase task chains them."""
    request = erasure.parse_request(params, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, as_of)
    result = erasure.erase(conn, policy, keys, CTX, request, located, holds, as_of)
    return request, located, holds, result


def _erasable_prospect(conn: psycopg.Connection) -> tuple[int, str]:
    """A seeded prospect with no hold (no litigation, no contract, no invoice), with activities and notes."""
    row = _one(
        conn,
        "SELECT contact_id, email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
        " AND NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id)"
        " AND NOT EXISTS (SELECT 1 FROM crm.invoices x WHERE x.contact_id = c.contact_id)"
        " AND EXISTS (SELECT 1 FROM crm.activities a WHERE a.contact_id = c.contact_id)"
        " AND EXISTS (SELECT 1 FROM crm.notes n WHERE n.contact_id = c.contact_id)"
        " ORDER BY contact_id LIMIT 1",
    )
    assert row is not None, "the seeded template must hold an erasable prospect with activities and notes"
    return int(row[0]), str(row[1])


def _email_of(conn: psycopg.Connection, contact_id: int) -> str:
    """The contact's email, read inside the current transaction (no rollback)."""
    return str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0])  # type: ignore[index]


def _add_ticket(conn: psycopg.Connection, contact_id: int | None, email: str) -> int:
    tid = new_id()
    conn.execute(
        "INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
        " VALUES (%s, %s, %s, 'Question about my invoice', 'Hello, could you resend it?', now())",
        (tid, contact_id, email),
    )
    return tid


def _add_note(conn: psycopg.Connection, contact_id: int) -> None:
    conn.execute(
        "INSERT INTO crm.notes (note_id, contact_id, author, body, created_at)"
        " VALUES (%s, %s, 'Claire Martin', 'Called about the renewal', now())",
        (new_id(), contact_id),
    )


def _linked(conn: psycopg.Connection, table: str, ids: list[int], email: str | None = None) -> int:
    """Rows of a crm table linked to the contact ids (support tickets: or carrying the email)."""
    if table == "crm.support_tickets" and email is not None:
        return _count(
            conn,
            "SELECT count(*) FROM crm.support_tickets WHERE contact_id = ANY(%s) OR lower(requester_email) = lower(%s)",
            ids, email,
        )
    return _count(conn, f"SELECT count(*) FROM {table} WHERE contact_id = ANY(%s)", ids)  # fixed names only


def _email_hits(conn: psycopg.Connection, email: str) -> tuple[dict[str, int], int]:
    """({schema.table.column: rows containing the email}, columns scanned) over every text-like column
    (text, varchar, char, json, jsonb, arrays) of every table and view of the database."""
    columns = conn.execute(
        "SELECT table_schema, table_name, column_name FROM information_schema.columns"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        " AND (data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')"
        "      OR (data_type = 'ARRAY' AND udt_name IN ('_text', '_varchar', '_bpchar', '_json', '_jsonb')))"
        " ORDER BY 1, 2, 3"
    ).fetchall()
    hits: dict[str, int] = {}
    for schema, table, column in columns:
        n = conn.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE position(lower(%s) in lower({c}::text)) > 0").format(
                t=sql.Identifier(schema, table), c=sql.Identifier(column)
            ),
            (email,),
        ).fetchone()[0]  # type: ignore[index]
        if n:
            hits[f"{schema}.{table}.{column}"] = int(n)
    conn.rollback()
    return hits, len(columns)


def _audit_rows_with_at(conn: psycopg.Connection) -> int:
    return _count(conn, "SELECT count(*) FROM gdpr.audit_log a WHERE position('@' in a::text) > 0")


def _state(conn: psycopg.Connection) -> dict[str, str]:
    """Checksums of every crm table and of the control tables (the audit log excepted)."""
    return table_checksum(conn, CRM_ALL + CONTROL)


# -- parse_request -------------------------------------------------------------------------------------

LONG_EMAIL = "a" * (255 - len("@example.com")) + "@example.com"
assert len(LONG_EMAIL) == 255


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"email": "x@", "request_id": "REQ-1"}, "email"),
        ({"email": "a@b", "request_id": "REQ-1"}, "email"),
        ({"email": "no-at-sign", "request_id": "REQ-1"}, "email"),
        ({"email": "'; drop table crm.contacts; --", "request_id": "REQ-1"}, "email"),
        ({"email": "p\u0430ul@example.com", "request_id": "REQ-1"}, "email"),  # Cyrillic а
        ({"email": "paul\uff20example.com", "request_id": "REQ-1"}, "email"),  # fullwidth ＠
        ({"email": LONG_EMAIL, "request_id": "REQ-1"}, "email"),
        ({"email": LONG_EMAIL + "m", "request_id": "REQ-1"}, "email"),
        ({"email": GOOD_EMAIL, "subject_id": 3, "request_id": "REQ-1"}, "subject_id"),
        ({"request_id": "REQ-1"}, "subject_id"),
        ({"email": None, "subject_id": None, "request_id": "REQ-1"}, "email"),
        ({"email": GOOD_EMAIL, "request_id": "'; drop table crm.contacts; --"}, "request_id"),
        ({"email": GOOD_EMAIL, "request_id": "R1"}, "request_id"),
        ({"email": GOOD_EMAIL, "request_id": "REQ 2026 1"}, "request_id"),
        ({"email": GOOD_EMAIL}, "request_id"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "not-a-date"}, "received_at"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "2026-02-30"}, "received_at"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "2026-06-16"}, "received_at"),  # future
        ({"subject_id": 0, "request_id": "REQ-1"}, "subject_id"),
        ({"subject_id": "3", "request_id": "REQ-1"}, "subject_id"),
        ({"email": GOOD_EMAIL + "\nother@example.com", "request_id": "REQ-1"}, "email"),
        ({"email": ["paul@example.com"], "request_id": "REQ-1"}, "email"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "1900-01-01"}, "received_at"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "2025-06-14"}, "received_at"),  # 366 days
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": "20260601"}, "received_at"),
        ({"emial": GOOD_EMAIL, "subject_id": 3, "request_id": "REQ-1"}, "emial"),
        ({"email": GOOD_EMAIL, "request_id": "REQ-1", "dyr_run": True}, "dyr_run"),
    ],
    ids=[
        "email-x@", "email-a@b", "email-no-at", "email-sql", "email-cyrillic", "email-fullwidth-at",
        "email-255", "email-256", "both", "neither", "both-none", "request_id-sql", "request_id-short",
        "request_id-spaces", "request_id-missing", "received_at-text", "received_at-feb30",
        "received_at-future", "subject_id-zero", "subject_id-str", "email-two-lines", "email-list",
        "received_at-1900", "received_at-366-days", "received_at-basic-format", "unknown-emial", "unknown-dyr_run",
    ],
)
def test_parse_request_refuses_with_a_message_naming_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        erasure.parse_request(params, today=TODAY)
    message = str(info.value)
    assert f"`{field}`" in message
    texts = [message, repr(info.value), *map(str, info.value.args)]
    for value in (params.get("email"), params.get("emial"), GOOD_EMAIL, params.get("received_at")):
        if isinstance(value, str):
            assert all(value.lower() not in t.lower() for t in texts)
    assert all("@" not in t and "\uff20" not in t for t in texts)
    assert info.value.__cause__ is None


def test_parse_request_accepts_a_good_request() -> None:
    request = erasure.parse_request(
        {"email": " Paul.Durand+crm@Example.COM ", "request_id": "REQ-2026.0001:a_b", "received_at": "2026-06-01"},
        today=TODAY,
    )
    assert (request.request_id, request.subject_id, request.received_at, request.dry_run) == (
        "REQ-2026.0001:a_b", None, date(2026, 6, 1), False)
    assert request.email is not None and request.email.strip().lower() == "paul.durand+crm@example.com"

    by_id = erasure.parse_request({"subject_id": 42, "request_id": "REQ-2", "dry_run": True}, today=TODAY)
    assert (by_id.email, by_id.subject_id, by_id.received_at, by_id.dry_run) == (None, 42, TODAY, True)

    longest = "a" * (254 - len("@example.com")) + "@example.com"
    assert erasure.parse_request({"email": longest, "request_id": "REQ-3"}, today=TODAY).email == longest
    # received today is not in the future
    assert erasure.parse_request({"email": GOOD_EMAIL, "request_id": "REQ-4", "received_at": "2026-06-15"},
                                 today=TODAY).received_at == TODAY


@pytest.mark.parametrize("spelled", ["  Paul.Durand@Example.COM ", "paul.durand@example.com\n",
                                     "\tPAUL.DURAND@EXAMPLE.COM\r\n", "\u00a0paul.durand@example.com"])
def test_parse_request_normalises_case_and_surrounding_whitespace(spelled: str) -> None:
    """The runbook's promise: case and surrounding spaces (a trailing newline from a paste) do not matter."""
    assert erasure.parse_request({"email": spelled, "request_id": "REQ-1"}, today=TODAY).email == GOOD_EMAIL


def test_an_unknown_param_whose_name_looks_like_data_is_not_named() -> None:
    with pytest.raises(RequestError) as info:
        erasure.parse_request({"email": GOOD_EMAIL, "request_id": "REQ-1", "Paul.Durand@example.com": True},
                              today=TODAY)
    assert "unknown param" in str(info.value) and "name not shown" in str(info.value)
    assert "@" not in str(info.value) and "durand" not in str(info.value).lower()


def test_received_at_bound_is_365_days() -> None:
    """Older than a month is accepted (already overdue, the first task warns); older than 365 days is refused."""
    for days in (0, 30, 45, 365):
        received = TODAY - timedelta(days=days)
        request = erasure.parse_request(
            {"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": received.isoformat()}, today=TODAY)
        assert request.received_at == received
    with pytest.raises(RequestError, match="more than 365 days"):
        erasure.parse_request({"email": GOOD_EMAIL, "request_id": "REQ-1",
                               "received_at": (TODAY - timedelta(days=366)).isoformat()}, today=TODAY)


@pytest.mark.parametrize(
    ("received", "due"),
    [
        ("2026-01-31", date(2026, 2, 28)),
        ("2028-01-31", date(2028, 2, 29)),  # leap year
        ("2025-12-15", date(2026, 1, 15)),
        ("2025-12-31", date(2026, 1, 31)),
        ("2026-03-31", date(2026, 4, 30)),
        ("2026-06-15", date(2026, 7, 15)),
    ],
)
def test_due_date_is_one_calendar_month_later(received: str, due: date) -> None:
    request = erasure.parse_request({"email": GOOD_EMAIL, "request_id": "REQ-1", "received_at": received},
                                    today=date.fromisoformat(received) + timedelta(days=40))
    assert request.due_date == due


# -- erase: the subject found by email -----------------------------------------------------------------


def test_subject_found_by_email_is_erased_everywhere_in_one_call(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    _add_ticket(conn, cid, email)
    _add_ticket(conn, None, email)  # never linked to the contact: only the email finds it
    _add_ticket(conn, None, email.upper())
    conn.commit()
    other_tickets = _count(conn, "SELECT count(*) FROM crm.support_tickets") - 3
    before = {t: _linked(conn, t, [cid], email) for t in CRM_ALL}
    assert before["crm.activities"] and before["crm.notes"] and before["crm.support_tickets"] == 3
    hits_before, _ = _email_hits(conn, email)
    assert set(hits_before) == {"crm.contacts.email", "crm.support_tickets.requester_email"}

    request, located, holds, result = _run(
        conn, policy, keys, {"email": email, "request_id": "REQ-2026-0001", "received_at": "2026-06-10"})

    assert located.subject_ids == [cid] and holds == {}
    assert located.rows == before
    assert (result.outcome, result.status, result.already_recorded) == ("erased", "pending_propagation", False)
    assert result.targets == [t.name for t in policy.erasure.targets]
    assert result.due_date == "2026-07-10"
    assert result.rows == before
    subject_hash = keys.subject_hash(email)
    assert result.subject_hash == subject_hash
    # every linked row is gone; nobody else's
    for table in CRM_ALL:
        assert _linked(conn, table, [cid], email) == 0, table
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets") == other_tickets
    # suppressed, by keyed hash
    assert _one(conn, "SELECT key_id, reason, source, request_id FROM gdpr.suppression_list WHERE email_hash = %s",
                subject_hash) == (keys.hmac_key_id, "erasure", "erasure_request", "REQ-2026-0001")
    # the request, recorded
    row = _one(conn, "SELECT subject_hash, received_at, due_date, status, outcome, completed_at, details"
                     " FROM gdpr.erasure_request WHERE request_id = 'REQ-2026-0001'")
    assert row is not None
    assert row[:6] == (subject_hash, date(2026, 6, 10), date(2026, 7, 10), "pending_propagation", "erased", None)
    assert row[6]["rows"] == before and sorted(row[6]["targets"]) == TARGETS
    # the outbox: one pending row per target, the identifier only encrypted
    outbox = conn.execute(
        "SELECT target, status, attempts, key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
        " WHERE request_id = 'REQ-2026-0001' ORDER BY target"
    ).fetchall()
    conn.rollback()
    assert [r[0] for r in outbox] == TARGETS
    for target, status, attempts, key_id, nonce, ciphertext in outbox:
        assert (status, attempts) == ("pending", 0)
        assert email.encode() not in bytes(ciphertext)
        plain = keys.decrypt(key_id, bytes(nonce), bytes(ciphertext),
                             erasure.outbox_aad("REQ-2026-0001", target, key_id))
        assert plain.decode() == email.strip().lower()
    # audit: one erase row per table with its count, by subject hash; no '@' anywhere in the log
    audited = dict(conn.execute(
        "SELECT table_name, row_count FROM gdpr.audit_log WHERE run_id = 'run-1' AND action = 'erase'"
        " AND outcome = 'erased' AND subject_hash = %s", (subject_hash,)
    ).fetchall())
    conn.rollback()
    assert audited == before
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'erasure_request' AND subject_hash = %s",
                  subject_hash) == 1
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'suppress' AND subject_hash = %s",
                  subject_hash) == 1
    assert _audit_rows_with_at(conn) == 0
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}


def test_after_erasure_the_email_is_in_no_column_of_the_database(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    _add_ticket(conn, cid, email)
    _add_ticket(conn, None, email)
    _add_ticket(conn, None, email.upper())  # a copy typed in capitals
    conn.commit()
    hits, scanned = _email_hits(conn, email)
    assert scanned >= 30  # crm and gdpr text/json columns: the scan is not vacuous
    assert hits == {"crm.contacts.email": 1, "crm.support_tickets.requester_email": 3}

    request, _, _, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-SCAN-1"})

    assert result.outcome == "erased"
    assert _email_hits(conn, email)[0] == {}
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}


def test_a_copy_of_the_email_with_surrounding_blanks_is_erased_too(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    _add_ticket(conn, None, "  " + email.upper() + " ")
    conn.commit()
    assert _email_hits(conn, email)[0] == {"crm.contacts.email": 1, "crm.support_tickets.requester_email": 1}

    _run(conn, policy, keys, {"email": email, "request_id": "REQ-SCAN-2"})

    assert _email_hits(conn, email)[0] == {}


def test_email_lookup_ignores_case_and_surrounding_blanks(conn, policy: Policy, keys: Keys) -> None:
    cid = add_contact(conn, "prospect", date(2025, 1, 1), email="zoe.x@example.example")
    add_activity(conn, cid, "email_open", date(2026, 1, 1))
    conn.commit()

    _, located, _, result = _run(conn, policy, keys, {"email": "  Zoe.X@Example.EXAMPLE ", "request_id": "REQ-CASE"})

    assert located.subject_ids == [cid]
    assert located.subject_hash == keys.subject_hash("zoe.x@example.example")
    assert result.outcome == "erased" and result.rows["crm.contacts"] == 1 and result.rows["crm.activities"] == 1
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", cid) == 0
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s",
                  keys.subject_hash("zoe.x@example.example")) == 1


def test_every_contact_with_the_email_is_erased(conn, policy: Policy, keys: Keys) -> None:
    first = add_contact(conn, "prospect", date(2025, 1, 1), email="dup.person@example.example")
    second = add_contact(conn, "lead", date(2024, 1, 1), email="Dup.Person@Example.example")
    add_activity(conn, first, "web_visit", date(2026, 1, 1))
    add_activity(conn, second, "form_submit", date(2026, 2, 1))
    conn.commit()

    _, located, _, result = _run(conn, policy, keys, {"email": "dup.person@example.example", "request_id": "REQ-DUP"})

    assert located.subject_ids == [first, second]
    assert result.outcome == "erased" and result.rows["crm.contacts"] == 2 and result.rows["crm.activities"] == 2
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s)", [first, second]) == 0
    assert _email_hits(conn, "dup.person@example.example")[0] == {}


def test_by_subject_id_erases_and_hashes_the_subjects_email(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    _add_ticket(conn, None, email)
    conn.commit()
    before = {t: _linked(conn, t, [cid], email) for t in CRM_ALL}

    request, located, _, result = _run(conn, policy, keys, {"subject_id": cid, "request_id": "REQ-BY-ID"})

    assert located.subject_ids == [cid] and located.email == email.lower()
    assert result.outcome == "erased" and result.status == "pending_propagation"
    assert result.subject_hash == keys.subject_hash(email)
    assert result.rows == before  # including the unlinked ticket, found by the subject's email
    for table in CRM_ALL:
        assert _linked(conn, table, [cid], email) == 0, table
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s AND reason = 'erasure'",
                  keys.subject_hash(email)) == 1
    rows = conn.execute("SELECT target, key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
                        " WHERE request_id = 'REQ-BY-ID' ORDER BY target").fetchall()
    conn.rollback()
    assert [r[0] for r in rows] == TARGETS
    for target, key_id, nonce, ciphertext in rows:
        aad = erasure.outbox_aad("REQ-BY-ID", target, key_id)
        assert keys.decrypt(key_id, bytes(nonce), bytes(ciphertext), aad).decode() == email.lower()
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}
    assert _email_hits(conn, email)[0] == {}


def test_unknown_email_is_not_found_but_suppressed_recorded_and_propagated(conn, policy: Policy, keys: Keys) -> None:
    email = "nobody.here@nowhere.example"
    crm_before = table_checksum(conn, CRM_ALL)

    _, located, holds, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-NF"})

    assert not located.found and holds == {}
    assert (result.outcome, result.status, result.rows) == ("not_found", "pending_propagation", {})
    assert table_checksum(conn, CRM_ALL) == crm_before
    assert _one(conn, "SELECT reason, request_id FROM gdpr.suppression_list WHERE email_hash = %s",
                keys.subject_hash(email)) == ("erasure", "REQ-NF")
    assert _one(conn, "SELECT outcome, status, subject_hash FROM gdpr.erasure_request WHERE request_id = 'REQ-NF'") == (
        "not_found", "pending_propagation", keys.subject_hash(email))
    # downstream systems may still know the person
    assert [r[0] for r in conn.execute(
        "SELECT target FROM gdpr.erasure_propagation WHERE request_id = 'REQ-NF' AND status = 'pending'"
        " AND identifier_ciphertext IS NOT NULL ORDER BY target").fetchall()] == TARGETS
    conn.rollback()
    assert _audit_rows_with_at(conn) == 0


# -- holds -----------------------------------------------------------------------------------------------


def _held_client(conn: psycopg.Connection, hold: str) -> int:
    if hold == "active_contract":
        cid = add_contact(conn, "client", date(2023, 1, 1))
        add_contract(conn, cid, date(2023, 2, 1), None)
        add_invoice(conn, cid, date(2010, 1, 1))  # too old to hold anything on its own
    else:  # invoice_under_10_years: the contract ended, its last invoice is 5 years old
        cid = add_contact(conn, "former_client", date(2018, 1, 1))
        add_contract(conn, cid, date(2018, 2, 1), date(2021, 6, 1))
        add_invoice(conn, cid, date(2021, 6, 1))
    add_activity(conn, cid, "email_reply", date(2025, 3, 1))
    add_activity(conn, cid, "call_attempt", date(2025, 4, 1))
    _add_note(conn, cid)
    return cid


@pytest.mark.parametrize("hold", ["active_contract", "invoice_under_10_years"])
def test_restricting_hold_keeps_accounting_records_and_flags_the_subject(
    conn, policy: Policy, keys: Keys, hold: str
) -> None:
    cid = _held_client(conn, hold)
    email = _email_of(conn, cid)
    _add_ticket(conn, cid, email)
    _add_ticket(conn, None, email)
    conn.commit()
    contracts = _linked(conn, "crm.contracts", [cid])
    invoices = _linked(conn, "crm.invoices", [cid])
    assert contracts and invoices

    request, _, holds, result = _run(conn, policy, keys, {"email": email, "request_id": f"REQ-{hold}"})

    assert holds == {hold: "restrict"}
    assert (result.outcome, result.status) == ("restricted", "pending_propagation")
    assert hold in result.reason
    for table in ("crm.activities", "crm.notes", "crm.support_tickets"):
        assert _linked(conn, table, [cid], email) == 0, table
    assert _linked(conn, "crm.contracts", [cid]) == contracts
    assert _linked(conn, "crm.invoices", [cid]) == invoices
    assert _one(conn, "SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", cid) == (True,)
    assert set(result.rows) == {"crm.activities", "crm.notes", "crm.support_tickets"}
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s",
                  keys.subject_hash(email)) == 1
    assert _count(conn, "SELECT count(*) FROM gdpr.erasure_propagation WHERE request_id = %s", f"REQ-{hold}") == 3
    assert _one(conn, "SELECT outcome, details->'holds' FROM gdpr.erasure_request WHERE request_id = %s",
                f"REQ-{hold}") == ("restricted", [hold])
    # what remains (the subject row, contracts, invoices) is allowed
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}
    assert _audit_rows_with_at(conn) == 0


def test_litigation_hold_refuses_and_changes_nothing_but_suppression(conn, policy: Policy, keys: Keys) -> None:
    cid = add_contact(conn, "client", date(2023, 1, 1), litigation=True)
    add_contract(conn, cid, date(2023, 2, 1), None)
    add_activity(conn, cid, "email_reply", date(2025, 3, 1))
    _add_note(conn, cid)
    email = _email_of(conn, cid)
    _add_ticket(conn, None, email)
    conn.commit()
    crm_before = table_checksum(conn, CRM_ALL)

    request, _, holds, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-LIT"})

    assert holds == {"active_contract": "restrict", "litigation": "refuse"}
    assert (result.outcome, result.status, result.targets, result.rows) == ("refused", "refused", [], {})
    assert "litigation" in result.reason
    assert table_checksum(conn, CRM_ALL) == crm_before
    assert _count(conn, "SELECT count(*) FROM gdpr.erasure_propagation WHERE request_id = 'REQ-LIT'") == 0
    row = _one(conn, "SELECT status, outcome, completed_at IS NOT NULL FROM gdpr.erasure_request"
                     " WHERE request_id = 'REQ-LIT'")
    assert row == ("refused", "refused", True)
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s",
                  keys.subject_hash(email)) == 1
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}
    assert _audit_rows_with_at(conn) == 0


# -- idempotence and dry run ---------------------------------------------------------------------------------


def test_same_request_id_again_returns_the_recorded_result_and_changes_nothing(
    conn, policy: Policy, keys: Keys
) -> None:
    cid, email = _erasable_prospect(conn)
    params = {"email": email, "request_id": "REQ-IDEM", "received_at": "2026-06-01"}
    _, _, _, first = _run(conn, policy, keys, params)
    assert first.outcome == "erased" and not first.already_recorded
    state = _state(conn)
    counts = {t: _count(conn, f"SELECT count(*) FROM {t}") for t in CRM_ALL + CONTROL}

    _, _, _, again = _run(conn, policy, keys, params)

    assert again.already_recorded is True
    assert (again.outcome, again.status, again.due_date, again.rows, again.subject_hash) == (
        first.outcome, first.status, first.due_date, first.rows, first.subject_hash)
    assert sorted(again.targets) == sorted(first.targets)
    assert _state(conn) == state
    assert {t: _count(conn, f"SELECT count(*) FROM {t}") for t in CRM_ALL + CONTROL} == counts
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s",
                  keys.subject_hash(email)) == 1
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE outcome = 'already_recorded'") == 1


def test_same_request_id_for_another_email_is_refused(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    other = add_contact(conn, "prospect", date(2025, 1, 1))
    other_email = _email_of(conn, other)
    conn.commit()
    _run(conn, policy, keys, {"email": email, "request_id": "REQ-REUSED"})
    state = _state(conn)

    with pytest.raises(RequestError) as info:
        _run(conn, policy, keys, {"email": other_email, "request_id": "REQ-REUSED"})

    assert "request_id" in str(info.value) or "REQ-REUSED" in str(info.value)
    assert "@" not in str(info.value) and "@" not in repr(info.value)
    assert _state(conn) == state
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", other) == 1


def test_same_request_id_for_another_subject_id_is_refused(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    other = add_contact(conn, "prospect", date(2025, 1, 1))
    conn.commit()
    _run(conn, policy, keys, {"subject_id": cid, "request_id": "REQ-REUSED-ID"})
    state = _state(conn)

    with pytest.raises(RequestError):
        _run(conn, policy, keys, {"subject_id": other, "request_id": "REQ-REUSED-ID"})

    assert _state(conn) == state


def test_dry_run_changes_nothing_and_writes_one_audit_row(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    _add_ticket(conn, None, email)
    conn.commit()
    state = _state(conn)
    audit_before = _count(conn, "SELECT count(*) FROM gdpr.audit_log")
    expected = {t: _linked(conn, t, [cid], email) for t in CRM_ALL}

    _, _, _, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-DRY", "dry_run": True})

    assert result.outcome == "erased" and result.rows == expected and not result.already_recorded
    assert _state(conn) == state
    rows = conn.execute("SELECT action, outcome, subject_hash, row_count, details FROM gdpr.audit_log"
                        " ORDER BY audit_id OFFSET %s", (audit_before,)).fetchall()
    conn.rollback()
    assert len(rows) == 1
    action, outcome, subject_hash, row_count, details = rows[0]
    assert (action, outcome, subject_hash, row_count) == ("erase", "dry_run", keys.subject_hash(email),
                                                          sum(expected.values()))
    assert details["would_be"] == "erased" and details["rows"] == expected
    assert _audit_rows_with_at(conn) == 0
    # the real request can follow the dry run under the same id
    _, _, _, real = _run(conn, policy, keys, {"email": email, "request_id": "REQ-DRY"})
    assert real.outcome == "erased" and not real.already_recorded


# -- no email in exceptions or reprs ---------------------------------------------------------------------------


def test_repr_of_request_located_and_result_never_show_the_email(conn, policy: Policy, keys: Keys) -> None:
    cid, email = _erasable_prospect(conn)
    spelled = "  " + email.upper() + " "
    request = erasure.parse_request({"email": spelled, "request_id": "REQ-REPR"}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, AS_OF)
    result = erasure.erase(conn, policy, keys, CTX, request, located, holds)
    by_id = erasure.parse_request({"subject_id": cid, "request_id": "REQ-REPR-2"}, today=TODAY)
    located_by_id = erasure.locate(conn, policy, keys, by_id)  # after erasure: not found, no email

    for obj in (request, located, result, by_id, located_by_id):
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            assert email.lower() not in text.lower() and "@" not in text, type(obj).__name__
    assert isinstance(request, ErasureRequest) and "REQ-REPR" in repr(request)
    assert "@" not in repr(located.rows)


# -- params: what is stored, one request id per person, the suppression entry shown first (issues 10 and 11) --


def test_an_email_with_a_trailing_newline_is_stored_normalised(conn, policy: Policy, keys: Keys) -> None:
    """Nothing of the raw spelling is kept: the outbox holds the normalised email, the hashes are of it."""
    email = "nobody.here@nowhere.example"
    _, located, _, result = _run(conn, policy, keys,
                                 {"email": " NoBody.Here@NoWhere.example\n", "request_id": "REQ-NL"})
    assert located.email == email and result.subject_hash == keys.subject_hash(email)
    assert _one(conn, "SELECT reason FROM gdpr.suppression_list WHERE email_hash = %s", keys.subject_hash(email)) == (
        "erasure",)
    rows = conn.execute("SELECT target, key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
                        " WHERE request_id = 'REQ-NL'").fetchall()
    conn.rollback()
    assert len(rows) == len(TARGETS)
    for target, key_id, nonce, ciphertext in rows:
        stored = keys.decrypt(key_id, bytes(nonce), bytes(ciphertext), erasure.outbox_aad("REQ-NL", target, key_id))
        assert stored == email.encode(), "the outbox must hold the normalised email, no newline, no capital"


def test_a_reused_request_id_with_an_unknown_subject_never_reports_another_persons_result(
    conn, policy: Policy, keys: Keys
) -> None:
    cid, email = _erasable_prospect(conn)
    _, _, _, first = _run(conn, policy, keys, {"subject_id": cid, "request_id": "REQ-ID-1"})
    assert first.outcome == "erased"
    state = _state(conn)
    audit_before = _count(conn, "SELECT count(*) FROM gdpr.audit_log")

    for params in ({"subject_id": 987_654_321, "request_id": "REQ-ID-1"},  # no such subject
                   {"email": "nobody.here@nowhere.example", "request_id": "REQ-ID-1"}):  # no such person
        request = erasure.parse_request(params, today=TODAY)
        located = erasure.locate(conn, policy, keys, request)
        with pytest.raises(RequestError) as info:
            erasure.recorded_request(conn, keys, request, located)  # what validate_request asks first
        conn.rollback()
        assert "`request_id` REQ-ID-1 was already used" in str(info.value) and "@" not in str(info.value)
        with pytest.raises(RequestError):
            _run(conn, policy, keys, params)
    assert _state(conn) == state
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log") == audit_before

    # the same subject id again, after its row is gone, is still recognised: the recorded result, nothing changed
    _, _, _, again = _run(conn, policy, keys, {"subject_id": cid, "request_id": "REQ-ID-1"})
    assert again.already_recorded and (again.outcome, again.subject_hash) == ("erased", first.subject_hash)
    assert _state(conn) == state


@pytest.mark.parametrize("second_person", [False, True], ids=["same-person", "other-person"])
def test_two_erasures_of_one_request_id_at_the_same_moment_get_a_clear_answer(
    warehouse: str, policy: Policy, keys: Keys, second_person: bool
) -> None:
    """Two runs (two connections) erase under one request id at once: the second waits for the first and then
    gets the recorded result (same person) or a clear refusal (another person), never a raw UniqueViolation."""
    import threading
    import time

    with psycopg.connect(warehouse) as setup:
        cid, email = _erasable_prospect(setup)
        other = add_contact(setup, "prospect", date(2025, 1, 1))
        other_email = _email_of(setup, other)
        setup.commit()
    emails = [email, other_email if second_person else email]
    outcome: dict[int, object] = {}
    monitor = psycopg.connect(warehouse, autocommit=True)
    blocker = psycopg.connect(warehouse)
    # hold the first run inside its transaction: a lock on the contact row it is about to delete
    blocker.execute("SELECT 1 FROM crm.contacts WHERE contact_id = %s FOR UPDATE", (cid,))

    def run(i: int) -> None:
        with psycopg.connect(warehouse) as c:
            try:
                request = erasure.parse_request({"email": emails[i], "request_id": "REQ-RACE"}, today=TODAY)
                located = erasure.locate(c, policy, keys, request)
                holds = erasure.holds_in_force(c, policy, located, AS_OF)
                outcome[i] = erasure.erase(c, policy, keys, CTX, request, located, holds)
            except Exception as exc:  # noqa: BLE001 - the assertion below says which
                outcome[i] = exc

    def waiting() -> int:
        return int(monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND wait_event_type = 'Lock'").fetchone()[0])  # type: ignore[index]

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    try:
        threads[0].start()
        deadline = time.monotonic() + 30
        while waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        threads[1].start()
        while waiting() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting() == 2, "both erasures must be waiting at once for the race to be real"
    finally:
        blocker.rollback()
        blocker.close()
        for t in threads:
            t.join(60)
        monitor.close()

    first, second = outcome[0], outcome[1]
    assert isinstance(first, erasure.ErasureResult) and first.outcome == "erased", first
    if second_person:
        assert isinstance(second, RequestError), repr(second)
        assert "`request_id` REQ-RACE was already used" in str(second) and "@" not in str(second)
    else:
        assert isinstance(second, erasure.ErasureResult) and second.already_recorded, repr(second)
        assert (second.outcome, second.subject_hash) == ("erased", first.subject_hash)
    with psycopg.connect(warehouse) as check:
        assert _count(check, "SELECT count(*) FROM gdpr.erasure_request WHERE request_id = 'REQ-RACE'") == 1
        assert _count(check, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", other) == 1


def test_a_dry_run_for_an_unknown_email_says_it_would_add_a_suppression_entry(conn, policy: Policy, keys: Keys) -> None:
    email = "nobody.here@nowhere.example"
    before = _state(conn)
    _, _, _, dry = _run(conn, policy, keys, {"email": email, "request_id": "REQ-NF-DRY", "dry_run": True})
    assert dry.outcome == "not_found" and dry.suppression.startswith("would add a suppression entry (permanent")
    assert _state(conn) == before
    assert _one(conn, "SELECT details->>'suppression' FROM gdpr.audit_log WHERE outcome = 'dry_run'") == (
        dry.suppression,)
    _, _, _, real = _run(conn, policy, keys, {"email": email, "request_id": "REQ-NF-DRY"})
    assert (real.outcome, real.suppression) == ("not_found", "added")
    _, _, _, dry_again = _run(conn, policy, keys, {"email": email, "request_id": "REQ-NF-DRY-2", "dry_run": True})
    assert dry_again.suppression == "already on the suppression list"
# -- people the tool already pseudonymised (issue 10, point 3) ------------------------------------------------

POLICY_FILE = Path(__file__).resolve().parents[2] / "include" / "policy.yaml"
OBLIGATION = "French Commercial Code L123-22 (accounting records)"


def _pseudonymised_former_client(conn: psycopg.Connection, policy: Policy, keys: Keys, email: str,
                                 invoice_issued: date) -> tuple[int, str]:
    """A former client (contract ended 3 years and 10 days before AS_OF) with an activity, a note, a linked
    ticket and one invoice, pseudonymised by the sweep. Returns (contact id, invoice id)."""
    cid = add_contact(conn, "former_client", date(2015, 1, 1), email=email)
    add_contract(conn, cid, date(2015, 1, 1), date(2023, 6, 5))
    add_activity(conn, cid, "email_open", date(2023, 5, 1))
    _add_note(conn, cid)
    _add_ticket(conn, cid, email)
    iid = new_id()
    conn.execute("INSERT INTO crm.invoices (invoice_id, contact_id, issued_on, amount_eur, billing_name)"
                 " VALUES (%s, %s, %s, 10, 'Zoé Testperson')", (iid, cid, invoice_issued))
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, RunContext("sweep", "s-1", "apply"), AS_OF)
    assert _one(conn, "SELECT pseudonymised_at IS NOT NULL, email = %s FROM crm.contacts WHERE contact_id = %s",
                keys.subject_hash(email), cid) == (True, True)
    return cid, str(iid)


def _old_style_archive_row(conn: psycopg.Connection, keys: Keys, table: str, pk: str, subject_id: str) -> None:
    """An archive row as the former policy wrote it (rules[].archive_for: every pseudonymised table)."""
    key_id, nonce, ciphertext = keys.archive_encrypt(b'{"note": "original"}',
                                                     archive_aad(table, pk, keys.archive_key_id))
    conn.execute(
        "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, run_id, purge_after, key_id,"
        " nonce, ciphertext) VALUES (%s, %s, %s, 'former_clients', 'old-run', '2036-06-15T00:00:00+00:00', %s, %s, %s)",
        (table, pk, subject_id, key_id, nonce, ciphertext))
    conn.commit()


def _archive_rows_of(conn: psycopg.Connection, subject_id: int) -> set[tuple[str, str]]:
    rows = conn.execute("SELECT source_table, source_pk FROM gdpr_archive.archived_row WHERE subject_id = %s",
                        (str(subject_id),)).fetchall()
    conn.rollback()
    return set(rows)


def test_a_pseudonymised_former_client_erased_by_email_is_found_and_told_what_the_law_keeps(
    conn, policy: Policy, keys: Keys
) -> None:
    """Old main answered `not_found` here, while the warehouse held the pseudonymised rows and the archive
    the encrypted originals."""
    email = f"zoe.former.{new_id()}@scenario.example"
    cid, invoice = _pseudonymised_former_client(conn, policy, keys, email, date(2022, 5, 1))
    note_pk = str(_one(conn, "SELECT note_id FROM crm.notes WHERE contact_id = %s", cid)[0])  # type: ignore[index]
    _old_style_archive_row(conn, keys, "crm.notes", note_pk, str(cid))  # archived by the former policy
    assert _archive_rows_of(conn, cid) == {("crm.invoices", invoice), ("crm.notes", note_pk)}

    request, located, holds, result = _run(
        conn, policy, keys, {"email": "  " + email.upper() + " ", "request_id": "REQ-PSEUDO-1"})

    assert located.subject_ids == [cid]
    assert located.rows["crm.activities"] == located.rows["crm.notes"] == located.rows["crm.support_tickets"] == 1
    assert holds == {"invoice_under_10_years": "restrict"}
    assert result.outcome == "restricted"
    assert result.reason == (
        "legal hold: invoice_under_10_years; held records kept and restricted; archived originals kept by legal "
        f"obligation: crm.invoices (1 rows) until 2032-05-01, {OBLIGATION}")
    kept = [{"table": "crm.invoices", "rows": 1, "obligation": OBLIGATION, "until": "2032-05-01"}]
    assert result.archive == {"destroyed": {"crm.notes": 1}, "kept": kept}
    # the archive keeps only what the obligation keeps; the pseudonymised live rows are erased
    assert _archive_rows_of(conn, cid) == {("crm.invoices", invoice)}
    for table in ("crm.activities", "crm.notes", "crm.support_tickets"):
        assert _linked(conn, table, [cid]) == 0, table
    assert _one(conn, "SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", cid) == (True,)
    # recorded, audited with counts, certified
    assert _one(conn, "SELECT details->'archive' FROM gdpr.erasure_request WHERE request_id = 'REQ-PSEUDO-1'") == (
        result.archive,)
    audited = conn.execute(
        "SELECT outcome, row_count, details->>'source_table', details->>'until' FROM gdpr.audit_log"
        " WHERE action = 'erase_archive' AND details->>'request_id' = 'REQ-PSEUDO-1' ORDER BY outcome"
    ).fetchall()
    conn.rollback()
    assert audited == [("destroyed", 1, "crm.notes", None), ("kept", 1, "crm.invoices", "2032-05-01")]
    with conn.transaction():
        certificate = propagation.write_certificate(conn, CTX, "REQ-PSEUDO-1")
    assert certificate["archive"]["kept"] == kept and certificate["outcome"] == "restricted"
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}
    assert _audit_rows_with_at(conn) == 0


def test_an_unlinked_ticket_the_sweep_pseudonymised_is_found_by_the_hash_of_the_email(
    conn, policy: Policy, keys: Keys
) -> None:
    """A ticket sent before the account existed (no contact_id) is pseudonymised with its person: its
    requester email becomes the subject hash. An erasure by email still finds and deletes it (the
    matcher's keyed-hash side), and verify rescans it the same way."""
    email = f"zoe.unlinked.{new_id()}@scenario.example"
    cid = add_contact(conn, "former_client", date(2015, 1, 1), email=email)
    add_contract(conn, cid, date(2015, 1, 1), date(2023, 6, 5))
    ticket = _add_ticket(conn, None, "  " + email.upper())
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, RunContext("sweep", "s-2", "apply"), AS_OF)
    assert _one(conn, "SELECT requester_email FROM crm.support_tickets WHERE ticket_id = %s", ticket) == (
        keys.subject_hash(email),)

    request, located, _, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-UNLINKED"})

    assert located.rows["crm.support_tickets"] == 1
    assert result.rows["crm.support_tickets"] == 1
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets WHERE ticket_id = %s", ticket) == 0
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}


def test_a_hold_set_after_the_holds_were_read_is_honoured_under_the_lock(conn, policy: Policy, keys: Keys) -> None:
    """Lock, then re-check: the first task read no hold; a litigation flag committed before `erase` takes its
    locks must refuse the erasure (nothing deleted), and the change is audited. And the other way round: a
    hold lifted meanwhile no longer keeps anything."""
    cid, email = _erasable_prospect(conn)
    request = erasure.parse_request({"email": email, "request_id": "REQ-LOCK-1"}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    assert erasure.holds_in_force(conn, policy, located, AS_OF) == {}
    conn.execute("UPDATE crm.contacts SET litigation_hold = true WHERE contact_id = %s", (cid,))  # another writer
    conn.commit()
    crm = table_checksum(conn, CRM_ALL)

    result = erasure.erase(conn, policy, keys, CTX, request, located, {}, AS_OF)

    assert (result.outcome, result.status) == ("refused", "refused") and result.rows == {}
    assert table_checksum(conn, CRM_ALL) == crm  # nothing erased (the request is recorded, the email suppressed)
    assert _one(conn, "SELECT details->'now' FROM gdpr.audit_log WHERE outcome = 'holds_changed_under_lock'"
                " AND details->>'request_id' = 'REQ-LOCK-1'") == (["litigation"],)

    conn.execute("UPDATE crm.contacts SET litigation_hold = false WHERE contact_id = %s", (cid,))
    conn.commit()
    request = erasure.parse_request({"email": email, "request_id": "REQ-LOCK-2"}, today=TODAY)
    result = erasure.erase(conn, policy, keys, CTX, request, located, {"litigation": "refuse"}, AS_OF)
    assert result.outcome == "erased" and _linked(conn, "crm.contacts", [cid]) == 0


def test_an_obligation_alone_restricts_and_everything_else_is_erased(conn, keys: Keys) -> None:
    """No hold in force (the invoice is older than 10 years), but the archive keeps it until as_of + 10
    years (an obligation without `from`): `restricted`, the live rows all gone, the archived invoice kept."""
    data = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))
    del data["tables"][4]["archive"]["from"]
    policy = parse_policy(data, "variant.yaml")
    email = f"zoe.older.{new_id()}@scenario.example"
    cid, invoice = _pseudonymised_former_client(conn, policy, keys, email, date(2015, 3, 1))

    request, _, holds, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-PSEUDO-2"})

    assert holds == {}
    assert (result.outcome, result.status) == ("restricted", "pending_propagation")
    assert result.reason == (
        f"archived originals kept by legal obligation: crm.invoices (1 rows) until 2036-06-15, {OBLIGATION}")
    assert result.archive == {"destroyed": {}, "kept": [
        {"table": "crm.invoices", "rows": 1, "obligation": OBLIGATION, "until": "2036-06-15"}]}
    for table in CRM_ALL:
        assert _linked(conn, table, [cid]) == 0, table
    assert _archive_rows_of(conn, cid) == {("crm.invoices", invoice)}
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}


def test_archive_rows_alone_are_found_by_subject_id_and_destroyed(conn, policy: Policy, keys: Keys) -> None:
    """A subject whose live row is gone but whose originals the former policy archived: not `not_found`."""
    ghost = new_id()
    _old_style_archive_row(conn, keys, "crm.contacts", str(ghost), str(ghost))
    _old_style_archive_row(conn, keys, "crm.notes", str(new_id()), str(ghost))

    request, located, _, result = _run(conn, policy, keys, {"subject_id": ghost, "request_id": "REQ-GHOST"})

    assert located.subject_ids == [] and located.found
    assert (result.outcome, result.status) == ("erased", "completed")
    assert result.archive == {"destroyed": {"crm.contacts": 1, "crm.notes": 1}, "kept": []}
    assert _archive_rows_of(conn, ghost) == set()
    assert erasure.verify(conn, policy, keys, request, result.outcome) == {}
    # and nothing left anywhere: now the answer is not_found
    _, _, _, again = _run(conn, policy, keys, {"subject_id": ghost, "request_id": "REQ-GHOST-2"})
    assert again.outcome == "not_found"


def test_verify_fails_while_an_archive_row_no_obligation_keeps_remains(conn, policy: Policy, keys: Keys) -> None:
    ghost = new_id()
    _old_style_archive_row(conn, keys, "crm.notes", str(new_id()), str(ghost))
    request = erasure.parse_request({"subject_id": ghost, "request_id": "REQ-V"}, today=TODAY)
    assert erasure.verify(conn, policy, keys, request, "erased") == {"gdpr_archive.archived_row": 1}
    assert erasure.verify(conn, policy, keys, request, "refused") == {}


def test_a_pseudonymised_person_is_found_under_every_pepper(conn, policy: Policy, keys: Keys) -> None:
    """Pseudonymised under pepper-1, erased after a rotation to pepper-2 (the hash in the column is the chain
    up to pepper-1); and a row hashed the former way (HMAC of the stored email under the then-current pepper)."""
    email = f"zoe.rotated.{new_id()}@scenario.example"
    cid, _ = _pseudonymised_former_client(conn, policy, keys, email, date(2022, 5, 1))
    rotated = dataclasses.replace(keys, hmac_key_id="pepper-2", pepper=os.urandom(32),
                                  hmac_chain=((keys.hmac_key_id, keys.pepper),))
    assert rotated.subject_hash(email) != keys.subject_hash(email)
    legacy_email = f"zoe.legacy.{new_id()}@scenario.example"
    legacy = add_contact(conn, "former_client", date(2015, 1, 1), email=legacy_email)
    conn.execute("UPDATE crm.contacts SET email = %s, pseudonymised_at = now() WHERE contact_id = %s",
                 (rotated.hash_value(legacy_email), legacy))
    conn.commit()

    _, located, _, result = _run(conn, policy, rotated, {"email": email.upper(), "request_id": "REQ-ROT-1"})
    assert located.subject_ids == [cid] and result.outcome == "restricted"
    _, located, _, result = _run(conn, policy, rotated, {"email": legacy_email, "request_id": "REQ-ROT-2"})
    assert located.subject_ids == [legacy] and result.outcome == "erased"
    assert _linked(conn, "crm.contacts", [legacy]) == 0


def test_not_found_only_when_nothing_is_held_anywhere(conn, policy: Policy, keys: Keys) -> None:
    email = f"nobody.{new_id()}@scenario.example"
    _, located, _, result = _run(conn, policy, keys, {"email": email, "request_id": "REQ-NOBODY"})
    assert (located.found, result.outcome, result.archive) == (False, "not_found", {})
    assert result.reason == "nothing of the subject is held: no live, pseudonymised or archived row"

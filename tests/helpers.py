"""Small builders for precise scenarios on top of the seeded template (ids far above the seeded ones)."""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timezone

import psycopg

from warehouse_gdpr.engine import candidates as candidate_sql
from warehouse_gdpr.engine.policy import Policy

AS_OF = "2026-06-15T00:00:00+00:00"
AS_OF_DATE = date(2026, 6, 15)
THREE_YEARS_BEFORE = date(2023, 6, 15)  # AS_OF - P3Y

_next_id = [9_000_000]


def new_id() -> int:
    _next_id[0] += 1
    return _next_id[0]


def ts(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def add_contact(
    conn: psycopg.Connection,
    status: str,
    created: date,
    *,
    litigation: bool = False,
    email: str | None = None,
) -> int:
    cid = new_id()
    conn.execute(
        "INSERT INTO crm.contacts (contact_id, company_id, status, email, first_name, last_name, direct_phone,"
        " job_title, created_at, litigation_hold)"
        " VALUES (%s, (SELECT min(company_id) FROM crm.companies), %s, %s, 'Zoé', 'Testperson', '+33 6 00 00 00 00',"
        " 'CTO', %s, %s)",
        (cid, status, email or f"zoe.testperson.{cid}@scenario.example", ts(created), litigation),
    )
    return cid


def add_activity(conn: psycopg.Connection, contact_id: int, kind: str, day: date) -> None:
    conn.execute(
        "INSERT INTO crm.activities (activity_id, contact_id, kind, occurred_at, subject_line) VALUES (%s, %s, %s, %s, %s)",
        (new_id(), contact_id, kind, ts(day), "Re: scenario"),
    )


def add_contract(conn: psycopg.Connection, contact_id: int, start: date, end: date | None) -> None:
    conn.execute(
        "INSERT INTO crm.contracts (contract_id, contact_id, start_date, end_date, value_eur) VALUES (%s, %s, %s, %s, 1000)",
        (new_id(), contact_id, start, end),
    )


def add_invoice(conn: psycopg.Connection, contact_id: int, issued: date) -> None:
    conn.execute(
        "INSERT INTO crm.invoices (invoice_id, contact_id, issued_on, amount_eur, billing_name) VALUES (%s, %s, %s, 10, 'Zoé Testperson')",
        (new_id(), contact_id, issued),
    )


def candidates(conn: psycopg.Connection, policy: Policy, rule_name: str, as_of: str = AS_OF) -> dict[int, list[str]]:
    """{subject id: blocking holds} of every candidate of a rule."""
    rule = policy.rule(rule_name)
    rows = conn.execute(
        candidate_sql.batch_query(policy, rule, first=True), {**candidate_sql.rule_params(policy, rule, as_of), "limit": 10**9}
    ).fetchall()
    conn.rollback()
    return {r[0]: list(r[1]) for r in rows}


def table_checksum(conn: psycopg.Connection, tables: list[str]) -> dict[str, str]:
    """md5 of every row of each table, ordered: equal checksums mean no row changed."""
    out = {}
    for table in tables:
        rows = conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1").fetchall()  # test-only, fixed names
        out[table] = hashlib.md5("\n".join(r[0] for r in rows).encode()).hexdigest()
    conn.rollback()
    return out


CRM_TABLES = ["crm.contacts", "crm.activities", "crm.notes", "crm.contracts", "crm.invoices"]

"""The demo CRM generator (warehouse_gdpr_demo.data), against a real PostgreSQL.

Each test seeds its own copy of the template database (conftest `warehouse`/`conn`: the embedded
server, or $WAREHOUSE_TEST_URL's); `seed` drops and recreates schema `crm` there.
"""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from warehouse_gdpr_demo.data import main, seed, years_before

TODAY = dt.date(2025, 6, 15)
N = 2000
OWN = "('email_open', 'link_click', 'email_reply', 'web_visit', 'event_attended', 'content_download', 'form_submit')"
REP = "('call_attempt', 'email_sent', 'note_added')"
LINE = {"line": years_before(TODAY, 3), "today": TODAY}  # query parameters


@pytest.fixture
def _demo_db(conn: psycopg.Connection) -> psycopg.Connection:
    """A connection to this test's own database (a fresh copy of the seeded template)."""
    return conn


def _scalar(conn: psycopg.Connection, query: str, params: dict | None = None):
    return conn.execute(query, params).fetchone()[0]


def _checksum(conn: psycopg.Connection) -> tuple[str, ...]:
    return tuple(
        _scalar(conn, f"SELECT md5(string_agg(t::text, '|' ORDER BY {key})) FROM crm.{table} t")
        for table, key in (("contacts", "contact_id"), ("activities", "activity_id"), ("notes", "note_id"),
                           ("contracts", "contract_id"), ("invoices", "invoice_id"))
    )


def test_years_before_handles_leap_day() -> None:
    assert years_before(dt.date(2024, 2, 29), 3) == dt.date(2021, 2, 28)
    assert years_before(dt.date(2025, 6, 15), 3) == dt.date(2022, 6, 15)


def test_same_arguments_give_same_data(_demo_db: psycopg.Connection) -> None:
    seed(_demo_db, contacts=N, seed=7, today=TODAY)
    first = _checksum(_demo_db)
    seed(_demo_db, contacts=N, seed=7, today=TODAY)
    assert _checksum(_demo_db) == first
    seed(_demo_db, contacts=N, seed=8, today=TODAY)
    assert _checksum(_demo_db)[0] != first[0]


def test_row_counts_scale_with_contacts(_demo_db: psycopg.Connection) -> None:
    small = seed(_demo_db, contacts=N // 2, seed=1, today=TODAY)
    large = seed(_demo_db, contacts=N, seed=1, today=TODAY)
    for table, count in large.items():
        assert _scalar(_demo_db, f"SELECT count(*) FROM crm.{table}") == count, table
    assert (small["contacts"], large["contacts"]) == (N // 2, N)
    assert (small["companies"], large["companies"]) == (N // 16, N // 8)
    assert 4 * N <= large["activities"] <= 6 * N
    assert 0.3 * N <= large["notes"] <= 0.7 * N
    customers = _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE status IN ('client', 'former_client')")
    assert customers <= large["contracts"] <= 3 * customers
    assert large["invoices"] >= large["contracts"]
    for table in ("activities", "notes", "contracts", "invoices"):
        assert 1.6 <= large[table] / small[table] <= 2.4, table


def test_every_status_present_in_the_expected_mix(_demo_db: psycopg.Connection) -> None:
    seed(_demo_db, contacts=N, today=TODAY)
    shares = dict(_demo_db.execute("SELECT status, count(*)::float / %s FROM crm.contacts GROUP BY 1", [N]))
    expected = {"prospect": 0.40, "lead": 0.25, "client": 0.20, "former_client": 0.15}
    assert shares.keys() == expected.keys()
    for status, share in expected.items():
        assert abs(shares[status] - share) < 0.05, status
    assert 0 < _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE litigation_hold") < 0.03 * N
    assert 0 < _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE do_not_contact") < 0.05 * N


def test_rep_only_recent_prospect_exists(_demo_db: psycopg.Connection) -> None:
    """Latest activity is a rep's, within 3 years; the person's own last interaction is older."""
    seed(_demo_db, contacts=N, today=TODAY)
    count = _scalar(_demo_db, f"""
        SELECT count(*) FROM crm.contacts c
        WHERE c.status = 'prospect'
          AND (SELECT max(occurred_at) FROM crm.activities a WHERE a.contact_id = c.contact_id AND kind IN {OWN})
              < %(line)s::timestamptz
          AND (SELECT kind FROM crm.activities a WHERE a.contact_id = c.contact_id
               ORDER BY occurred_at DESC LIMIT 1) IN {REP}
          AND (SELECT max(occurred_at) FROM crm.activities a WHERE a.contact_id = c.contact_id AND kind IN {REP})
              >= %(line)s::timestamptz""", LINE)
    assert count > 0


def test_boundary_cases_around_the_three_year_line(_demo_db: psycopg.Connection) -> None:
    seed(_demo_db, contacts=N, today=TODAY)
    clocks = {row[0] for row in _demo_db.execute(f"""
        SELECT coalesce((SELECT max(occurred_at) FROM crm.activities a
                         WHERE a.contact_id = c.contact_id AND kind IN {OWN}), c.created_at)
        FROM crm.contacts c WHERE status IN ('prospect', 'lead')""")}
    ends = {row[0] for row in _demo_db.execute("""
        SELECT max(end_date) FROM crm.contracts JOIN crm.contacts USING (contact_id)
        WHERE status = 'former_client' GROUP BY contact_id""")}
    for days in (-1, 0, 1):
        day = LINE["line"] + dt.timedelta(days=days)
        assert dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc) in clocks, days
        assert day in ends, days


def test_every_rule_and_hold_has_work(_demo_db: psycopg.Connection) -> None:
    seed(_demo_db, contacts=N, today=TODAY)
    expired, kept = _demo_db.execute(f"""
        SELECT count(*) FILTER (WHERE clock < %(line)s), count(*) FILTER (WHERE clock >= %(line)s)
        FROM (SELECT coalesce((SELECT max(occurred_at) FROM crm.activities a
                               WHERE a.contact_id = c.contact_id AND kind IN {OWN}), c.created_at) AS clock
              FROM crm.contacts c WHERE status IN ('prospect', 'lead')) s""", LINE).fetchone()
    assert expired > 0.3 * N * 0.65 and kept > 0.2 * N * 0.65
    former = dict(_demo_db.execute("""
        SELECT kind, count(*) FROM (
            SELECT (max(k.end_date) < %(line)s)::text || '/' || coalesce(bool_or(
                       i.issued_on > %(today)s::date - interval '10 years'), false)::text AS kind
            FROM crm.contacts c JOIN crm.contracts k USING (contact_id) LEFT JOIN crm.invoices i USING (contact_id)
            WHERE c.status = 'former_client' GROUP BY c.contact_id) s
        GROUP BY kind""", LINE).fetchall())
    # "ended more than 3 years ago / has an invoice under 10 years": pseudonymise, with and without the
    # invoice hold, and not yet due.
    assert {"true/true", "true/false", "false/true"} <= former.keys()
    active = _scalar(_demo_db, """
        SELECT count(*) FROM crm.contacts c WHERE status = 'client' AND EXISTS (
            SELECT 1 FROM crm.contracts k WHERE k.contact_id = c.contact_id
              AND (k.end_date IS NULL OR k.end_date >= %(today)s))""", LINE)
    assert active == _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE status = 'client'")


def test_values_look_real_and_stay_fictional(_demo_db: psycopg.Connection) -> None:
    seed(_demo_db, contacts=N, today=TODAY)
    email = r"^[a-z]+\.[a-z]+\.\d+@[a-z0-9-]+\.example$"
    assert _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE email !~ %s", [email]) == 0
    assert _scalar(_demo_db, "SELECT count(DISTINCT lower(email)) FROM crm.contacts") == N
    assert _scalar(_demo_db, "SELECT count(*) FROM crm.contacts WHERE first_name IN ('Hélène', 'François')") > 0
    assert _scalar(_demo_db, r"SELECT count(*) FROM crm.contacts WHERE direct_phone !~ '^\+\d+ [67]( \d\d){4}$'") == 0
    assert _scalar(_demo_db, """SELECT count(*) FROM crm.notes n JOIN crm.contacts c USING (contact_id)
                               WHERE position(c.first_name IN n.body) = 0""") == 0
    assert _scalar(_demo_db, """SELECT count(*) FROM crm.invoices i JOIN crm.contacts c USING (contact_id)
                               WHERE i.billing_name <> c.first_name || ' ' || c.last_name""") == 0
    assert _scalar(_demo_db, """SELECT count(*) FROM crm.activities a JOIN crm.contacts c USING (contact_id)
                               WHERE a.occurred_at <= c.created_at OR a.occurred_at > %(today)s""", LINE) == 0
    assert _scalar(_demo_db, "SELECT count(*) FROM crm.contracts WHERE end_date <= start_date") == 0


def test_command_line_seeds_and_prints_counts(
    warehouse: str, _demo_db: psycopg.Connection, capsys: pytest.CaptureFixture
) -> None:
    main(["--url", warehouse, "--contacts", "100", "--seed", "3", "--today", "2025-06-15"])
    out = capsys.readouterr().out
    assert "contacts" in out and "100" in out
    assert _scalar(_demo_db, "SELECT count(*) FROM crm.contacts") == 100

"""catalog.check_policy against a live copy of the seeded warehouse.

Each test gets its own database (conftest `warehouse`/`conn`), so catalog changes made here (dropped
index, altered column) do not leak into other tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from warehouse_gdpr.engine.catalog import CatalogError, CatalogReport, check_policy
from warehouse_gdpr.engine.policy import Policy, parse_policy

DEMO = Path(__file__).resolve().parents[2] / "include" / "policy.yaml"
HEADER = "the policy does not match the warehouse (nothing was changed):"


@pytest.fixture(scope="module")
def demo_data() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text(encoding="utf-8"))


def _variant(demo_data: dict[str, Any], mutate: Callable[[dict[str, Any]], None]) -> Policy:
    data = copy.deepcopy(demo_data)
    mutate(data)
    return parse_policy(data, "variant")


def _problems(exc: pytest.ExceptionInfo[CatalogError]) -> list[str]:
    lines = str(exc.value).splitlines()
    assert lines[0] == HEADER
    return [line.removeprefix("  - ") for line in lines[1:]]


def _state(conn: psycopg.Connection) -> tuple[Any, ...]:
    """What a check must never change: the audit log, the control schema, the CRM data."""
    return conn.execute(
        """
        SELECT (SELECT count(*) FROM gdpr.audit_log),
               (SELECT count(*) FROM gdpr_archive.archived_row),
               (SELECT md5(string_agg(c::text, '|' ORDER BY contact_id)) FROM crm.contacts c),
               (SELECT count(*) FROM crm.notes),
               (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = 'crm'::regnamespace)
        """
    ).fetchone()


@pytest.fixture
def dag_conn(warehouse: str) -> Iterator[psycopg.Connection]:
    """The same database as the least-privileged DAG login role (member of gdpr_engine)."""
    params = conninfo_to_dict(warehouse)
    params["user"] = "gdpr_dag"
    params.pop("password", None)
    with psycopg.connect(make_conninfo(**params)) as connection:  # type: ignore[arg-type]
        yield connection


# -- the demo policy ---------------------------------------------------------------------------


def test_demo_policy_passes_without_warnings(conn: psycopg.Connection, policy: Policy) -> None:
    report = check_policy(conn, policy)
    assert isinstance(report, CatalogReport)
    assert report.warnings == []
    assert report.tables == 6
    # email, first_name, last_name, direct_phone, job_title, subject_line, body, author, billing_name,
    # requester_email, body (support tickets)
    assert report.columns == 11


def test_demo_policy_passes_as_the_dag_role(dag_conn: psycopg.Connection, policy: Policy) -> None:
    assert dag_conn.execute("SELECT current_user").fetchone()[0] == "gdpr_dag"
    report = check_policy(dag_conn, policy)
    assert report.warnings == []
    assert (report.tables, report.columns) == (6, 11)


# -- tables and columns ------------------------------------------------------------------------


def test_missing_table_is_named_with_its_policy_path(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["tables"][1].update(table="crm.activity_log"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == ["tables[1].table: table crm.activity_log does not exist"]


def test_missing_interactions_table(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["interactions"].update(table="crm.events"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    # The table is reported once per column the policy needs from it.
    assert _problems(info) == [
        "interactions.table: table crm.events does not exist",
        "interactions.subject_column: table crm.events does not exist",
        "interactions.kind_column: table crm.events does not exist",
        "interactions.at_column: table crm.events does not exist",
    ]


def test_missing_schema(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["tables"][4].update(table="billing.invoices"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == ["tables[4].table: table billing.invoices does not exist"]


def test_missing_column_is_named_with_its_policy_path(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["tables"][0]["columns"].update(nickname={"pseudonymise": "null"}))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == ["tables[0].columns.nickname: column crm.contacts.nickname does not exist"]


def test_missing_key_columns(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["tables"][2]["primary_key"] = "id"
        d["tables"][3]["subject_column"] = "customer_id"
        d["subject"]["phone_column"] = "mobile"

    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, mutate))
    assert _problems(info) == [
        "subject.phone_column: column crm.contacts.mobile does not exist",
        "tables[2].primary_key: column crm.notes.id does not exist",
        "tables[3].subject_column: column crm.contracts.customer_id does not exist",
    ]


def test_several_problems_are_all_listed_in_one_error(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["tables"][1]["table"] = "crm.activity_log"
        d["tables"][0]["columns"]["nickname"] = {"pseudonymise": "null"}
        d["tables"][2]["columns"]["author"] = {"pseudonymise": "null"}
        d["interactions"]["at_column"] = "happened_at"
        d["rules"][0]["statuses"]["column"] = "stage"
        d["rules"][1]["clock"]["fallback"] = "inserted_at"
        d["rules"][2]["clock"]["column"] = "value_eur"

    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, mutate))
    assert _problems(info) == [
        "tables[0].columns.nickname: column crm.contacts.nickname does not exist",
        "tables[1].table: table crm.activity_log does not exist",
        "tables[2].columns.author: column crm.notes.author is NOT NULL, so it cannot be pseudonymised to null",
        "interactions.at_column: column crm.activities.happened_at does not exist",
        "rules[0].statuses.column: column crm.contacts.stage does not exist",
        "rules[1].clock.fallback: column crm.contacts.inserted_at does not exist",
        "rules[2].clock.column: crm.contracts.value_eur is numeric, expected a date",
    ]


# -- column types ------------------------------------------------------------------------------


def test_null_on_a_not_null_column_is_refused(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["tables"][0]["columns"].update(email={"pseudonymise": "null"}))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables[0].columns.email: column crm.contacts.email is NOT NULL, so it cannot be pseudonymised to null"
    ]


def test_hash_on_a_non_text_column_is_refused(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["tables"][3]["columns"] = {"value_eur": {"pseudonymise": "hash"}, "start_date": {"pseudonymise": "hash"}}

    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, mutate))
    assert _problems(info) == [
        "tables[3].columns.value_eur: column crm.contracts.value_eur is numeric; hash and fixed need a text column",
        "tables[3].columns.start_date: column crm.contracts.start_date is date; hash and fixed need a text column",
    ]


@pytest.mark.parametrize(("column", "problem"), [
    ("issued_date", "tables[4].archive.from: column crm.invoices.issued_date does not exist"),
    ("amount_eur", "tables[4].archive.from: column crm.invoices.amount_eur is numeric, expected a date or timestamp"),
])
def test_an_archive_period_counts_from_an_existing_date_column(
    conn: psycopg.Connection, demo_data: dict[str, Any], column: str, problem: str
) -> None:
    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, lambda d: d["tables"][4]["archive"].update({"from": column})))
    assert _problems(info) == [problem]


def test_fixed_on_a_non_text_column_is_refused(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(
        demo_data, lambda d: d["tables"][0]["columns"].update(do_not_contact={"pseudonymise": "fixed", "value": "x"})
    )
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables[0].columns.do_not_contact: column crm.contacts.do_not_contact is boolean; "
        "hash and fixed need a text column"
    ]


def test_hash_needs_room_for_64_characters(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.contacts ALTER COLUMN email TYPE varchar(63)")
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables[0].columns.email: column crm.contacts.email holds 63 characters; a hash needs 64"
    ]


@pytest.mark.parametrize("type_", ["varchar(64)", "varchar(320)", "char(64)", "varchar"])
def test_hash_accepts_text_types_wide_enough(conn: psycopg.Connection, policy: Policy, type_: str) -> None:
    with conn.transaction():
        conn.execute(f"ALTER TABLE crm.contacts ALTER COLUMN email TYPE {type_}")
    assert check_policy(conn, policy).warnings == []


def test_fixed_value_longer_than_the_column(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("UPDATE crm.contacts SET job_title = left(job_title, 7)")
        conn.execute("ALTER TABLE crm.contacts ALTER COLUMN job_title TYPE varchar(7)")  # 'redacted' has 8
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables[0].columns.job_title: column crm.contacts.job_title holds 7 characters; the fixed value is longer"
    ]


def test_fixed_value_that_fits_exactly(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("UPDATE crm.contacts SET job_title = left(job_title, 8)")
        conn.execute("ALTER TABLE crm.contacts ALTER COLUMN job_title TYPE varchar(8)")
    assert check_policy(conn, policy).warnings == []


def test_marker_must_be_a_timestamp(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["subject"].update(pseudonymised_marker="job_title"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "subject.pseudonymised_marker: column crm.contacts.job_title is text, expected a timestamp"
    ]


# -- hold predicates ---------------------------------------------------------------------------


def test_hold_predicate_that_does_not_compile(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["holds"][2].update(predicate="s.no_such_column"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "holds[2] (litigation).predicate: does not compile: column s.no_such_column does not exist"
    ]


def test_every_bad_hold_is_listed(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["holds"][0]["predicate"] = "EXISTS (SELECT 1 FROM crm.orders o WHERE o.contact_id = s.contact_id)"
        d["holds"][2]["predicate"] = "s.email"  # compiles as SQL, but is not a boolean

    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, mutate))
    assert _problems(info) == [
        'holds[0] (active_contract).predicate: does not compile: relation "crm.orders" does not exist',
        "holds[2] (litigation).predicate: does not compile: argument of WHERE must be type boolean, not type text",
    ]


def test_hold_predicate_syntax_error(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["holds"][1].update(predicate="s.litigation_hold AND AND true"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        'holds[1] (invoice_under_10_years).predicate: does not compile: syntax error at or near "AND"'
    ]


def test_hold_predicate_the_dag_role_may_not_read(
    conn: psycopg.Connection, dag_conn: psycopg.Connection, demo_data: dict[str, Any]
) -> None:
    """Compiled with the caller's privileges: a table the engine cannot read is caught before any write."""
    with conn.transaction():
        conn.execute("CREATE TABLE crm.legal_cases (contact_id bigint)")  # no grant to gdpr_engine
    policy = _variant(
        demo_data,
        lambda d: d["holds"][2].update(
            predicate="EXISTS (SELECT 1 FROM crm.legal_cases l WHERE l.contact_id = s.contact_id)"
        ),
    )
    assert check_policy(conn, policy).warnings == []  # the owner may read it
    with pytest.raises(CatalogError) as info:
        check_policy(dag_conn, policy)
    assert _problems(info) == [
        "holds[2] (litigation).predicate: does not compile: permission denied for table legal_cases"
    ]


def test_hold_predicate_is_compiled_not_run(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    """EXPLAIN plans the predicate: a predicate that would fail at run time still passes, nothing is executed."""
    policy = _variant(
        demo_data, lambda d: d["holds"][2].update(predicate="s.contact_id / (s.contact_id - s.contact_id) > 0")
    )
    assert check_policy(conn, policy).warnings == []


def test_as_of_is_bound_when_compiling(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    policy = _variant(demo_data, lambda d: d["holds"][2].update(predicate="s.created_at < :as_of - interval '1 day'"))
    assert check_policy(conn, policy).warnings == []


# -- index warnings ----------------------------------------------------------------------------


def test_missing_index_on_a_subject_column_warns(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("DROP INDEX crm.notes_contact_idx")
    report = check_policy(conn, policy)
    assert report.warnings == [
        "crm.notes.contact_id has no index starting with it: sweeps and erasures will scan the table"
    ]
    assert (report.tables, report.columns) == (6, 11)


def test_missing_index_on_the_interactions_table_warns_twice(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("DROP INDEX crm.activities_contact_kind_idx")
    assert check_policy(conn, policy).warnings == [
        "crm.activities.contact_id has no index starting with it: sweeps and erasures will scan the table",
        "crm.activities.contact_id has no index: clock evaluation will scan the table",
    ]


def test_index_not_starting_with_the_subject_column_warns(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("DROP INDEX crm.invoices_contact_idx")
        conn.execute("CREATE INDEX invoices_issued_contact_idx ON crm.invoices (issued_on, contact_id)")
    assert check_policy(conn, policy).warnings == [
        "crm.invoices.contact_id has no index starting with it: sweeps and erasures will scan the table"
    ]


# -- a failing check changes nothing -----------------------------------------------------------


def test_failing_check_changes_nothing(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    conn.commit()
    before = _state(conn)
    conn.commit()
    bad_table = _variant(demo_data, lambda d: d["tables"][1].update(table="crm.activity_log"))
    bad_hold = _variant(
        demo_data, lambda d: d["holds"][2].update(predicate="s.no_such_column OR s.litigation_hold")
    )
    for policy in (bad_table, bad_hold):
        with pytest.raises(CatalogError):
            check_policy(conn, policy)
        # The connection is still usable (the failed EXPLAIN was rolled back to its savepoint) ...
        assert conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR
        conn.commit()
    # ... and a fresh connection sees exactly what was there before.
    with psycopg.connect(conn.info.dsn) as other:
        assert _state(other) == before
    assert before[0] == 0  # the template holds no audit rows: nothing was recorded by the check either


# -- rules that select nobody (issue 10, point 4) ------------------------------------------------------


def _former_clients_without_a_date(conn: psycopg.Connection) -> tuple[int, int]:
    """Adds a former client with no contract and one with an open contract only; returns (those without a
    date for the contracts clock, unpseudonymised former clients)."""
    from datetime import date

    from helpers import add_contact, add_contract

    add_contact(conn, "former_client", date(2019, 1, 1))
    open_only = add_contact(conn, "former_client", date(2019, 1, 1))
    add_contract(conn, open_only, date(2019, 1, 1), None)
    conn.commit()
    missing, total = conn.execute(
        "SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id"
        " AND x.end_date IS NOT NULL)), count(*) FROM crm.contacts c WHERE status = 'former_client'"
        " AND pseudonymised_at IS NULL").fetchone()  # type: ignore[misc]
    conn.rollback()
    return missing, total


def test_a_rule_that_never_selects_some_subjects_warns(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    missing, total = _former_clients_without_a_date(conn)
    assert missing == 2  # the seeded former clients all have an ended contract
    no_fallback = _variant(demo_data, lambda d: d["rules"][2]["clock"].pop("fallback", None))
    assert check_policy(conn, no_fallback).warnings == [
        f"rules[2] (former_clients): 2 of the {total} subjects with status in (former_client) have no row with a"
        " end_date in crm.contracts and the clock has no fallback (set clock.fallback, e.g. created_at);"
        " the rule never selects them"
    ]
    # The demo policy's fallback (created_at, NOT NULL) gives every one of them a date: nothing to say.
    assert check_policy(conn, parse_policy(demo_data, "demo")).warnings == []


def test_a_fallback_column_that_may_be_empty_is_counted_too(
    conn: psycopg.Connection, demo_data: dict[str, Any]
) -> None:
    _, total = _former_clients_without_a_date(conn)
    nullable = _variant(demo_data, lambda d: d["rules"][2]["clock"].update(fallback="pseudonymised_at"))
    assert check_policy(conn, nullable).warnings == [
        f"rules[2] (former_clients): 2 of the {total} subjects with status in (former_client) have no row with a"
        " end_date in crm.contracts and no pseudonymised_at; the rule never selects them"
    ]


def test_a_rule_whose_statuses_match_no_subject_warns(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    # A value absent from the data is refused unless acknowledged (expect_absent); acknowledged, it warns.
    typo = _variant(demo_data, lambda d: d["rules"][2]["statuses"].update(
        values=["former-client"], expect_absent=["former-client"]))
    assert "rules[2] (former_clients): no subject has status in (former-client): the rule selects nobody" \
        " (check statuses.values)" in check_policy(conn, typo).warnings


def test_a_fallback_must_be_a_date_column(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, lambda d: d["rules"][2]["clock"].update(fallback="email")))
    assert _problems(info) == ["rules[2].clock.fallback: crm.contacts.email is text, expected a date"]


# -- keys that are not keys, unmapped references (issue 11.3) ----------------------------------------


def test_a_unique_index_on_the_column_alone_is_a_key(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.notes DROP CONSTRAINT notes_pkey")
        conn.execute("CREATE UNIQUE INDEX notes_note_id_key ON crm.notes (note_id)")
    assert check_policy(conn, policy).warnings == []


@pytest.mark.parametrize(
    "index",
    [
        "CREATE UNIQUE INDEX notes_pair ON crm.notes (note_id, contact_id)",  # unique only as a pair
        "CREATE UNIQUE INDEX notes_partial ON crm.notes (note_id) WHERE note_id > 0",  # not every row
        "CREATE INDEX notes_plain ON crm.notes (note_id)",  # not unique
        "",
    ],
    ids=["two_columns", "partial", "not_unique", "none"],
)
def test_a_primary_key_that_is_not_a_key_is_refused(conn: psycopg.Connection, policy: Policy, index: str) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.notes DROP CONSTRAINT notes_pkey")
        if index:
            conn.execute(index)  # type: ignore[arg-type]
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables[2].primary_key: crm.notes.note_id is not a key (no primary key, unique constraint or unique index "
        "on that column alone): rows sharing a value would be treated together"
    ]


def test_subject_columns_of_another_integer_width_join(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.notes ALTER COLUMN contact_id TYPE integer")
    assert check_policy(conn, policy).warnings == []


def test_the_interactions_subject_column_is_checked_too(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.activities ADD COLUMN contact_uuid uuid")
    policy = _variant(demo_data, lambda d: d["interactions"].update(subject_column="contact_uuid"))
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "interactions.subject_column: crm.activities.contact_uuid is uuid, but the subject key "
        "crm.contacts.contact_id is bigint"
    ]


def test_a_table_of_another_schema_referencing_the_subject_must_be_mapped(
    conn: psycopg.Connection, policy: Policy
) -> None:
    with conn.transaction():
        conn.execute("CREATE SCHEMA billing")
        conn.execute("CREATE TABLE billing.reminders (reminder_id bigint PRIMARY KEY,"
                     " contact_id bigint CONSTRAINT reminders_contact_fk REFERENCES crm.contacts)")
    with pytest.raises(CatalogError) as info:
        check_policy(conn, policy)
    assert _problems(info) == [
        "tables: billing.reminders has a foreign key (reminders_contact_fk) to crm.contacts but is not mapped: add it "
        "to `tables` (with its primary_key and subject_column) so that its rows are deleted or pseudonymised with "
        "their subject"
    ]


def test_a_second_reference_to_the_subject_in_a_mapped_table_warns(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE crm.support_tickets ADD COLUMN assignee_id bigint"
                     " CONSTRAINT tickets_assignee_fk REFERENCES crm.contacts")
        conn.execute("CREATE INDEX ON crm.support_tickets (assignee_id)")
    assert check_policy(conn, policy).warnings == [
        "crm.support_tickets.assignee_id references crm.contacts (tickets_assignee_fk) but the policy joins that table "
        "on contact_id: rows linked only through those columns are not treated with that subject (deleting the "
        "subject fails, or cascades, as the foreign key says)"
    ]


# -- kinds and status values that occur nowhere (issue 11.3) -------------------------------------------


def test_absent_values_are_refused_all_at_once(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["interactions"]["subject_initiated"] += ["webinar_registerd", "Email_open"]
        d["rules"][1]["statuses"]["values"] = ["lead", "leed"]

    with pytest.raises(CatalogError) as info:
        check_policy(conn, _variant(demo_data, mutate))
    assert _problems(info) == [
        "interactions.subject_initiated: 'webinar_registerd', 'Email_open' occur nowhere in crm.activities.kind "
        "(a typo?); if that is intended, list them under interactions.expect_absent",
        "rules[1].statuses.values: 'leed' occurs nowhere in crm.contacts.status (a typo?); if that is intended, "
        "list it under rules[1].statuses.expect_absent",
    ]


def test_acknowledged_absent_values_only_warn(conn: psycopg.Connection, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["interactions"]["subject_initiated"].append("webinar_registered")
        d["interactions"]["expect_absent"] = ["webinar_registered"]
        d["rules"][0]["statuses"].update(values=["prospect", "suspect"], expect_absent=["suspect"])
        d["rules"][1]["statuses"]["expect_absent"] = ["lead"]  # acknowledged, but present now

    report = check_policy(conn, _variant(demo_data, mutate))
    assert report.warnings == [
        "interactions.subject_initiated: 'webinar_registered' occurs nowhere in crm.activities.kind yet "
        "(listed in expect_absent)",
        "rules[0].statuses.values: 'suspect' occurs nowhere in crm.contacts.status yet (listed in expect_absent)",
        "rules[1].statuses.values: 'lead' occurs in crm.contacts.status now: remove it from expect_absent",
    ]


def test_an_empty_table_only_warns(conn: psycopg.Connection, policy: Policy) -> None:
    with conn.transaction():
        conn.execute("TRUNCATE crm.activities")
    assert check_policy(conn, policy).warnings == [
        "interactions.subject_initiated: crm.activities is empty, so its interaction kinds could not be compared "
        "with the data"
    ]


def test_values_the_dag_role_may_not_read_are_a_clear_error(
    conn: psycopg.Connection, dag_conn: psycopg.Connection, policy: Policy
) -> None:
    with conn.transaction():
        conn.execute("REVOKE SELECT ON crm.activities FROM gdpr_engine")
    with pytest.raises(CatalogError) as info:
        check_policy(dag_conn, policy)
    assert _problems(info) == [
        "the policy's values could not be compared with the data: permission denied for table activities "
        "(SQLSTATE 42501)"
    ]
    assert dag_conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR

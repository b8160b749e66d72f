"""What the engine's role may not do to the control schema, enforced by the database (control schema v8):
each forbidden write, tried as the DAGs' login role (gdpr_dag, a member of gdpr_engine), is refused and
changes nothing; the allowed path next to it works."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ARCHIVE_ROW = (
    "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, purge_after, key_id, nonce,"
    " ciphertext) VALUES (%s, %s, %s, 'former_clients', now() + %s::interval, 'archive-1', '\\x00', '\\x01')"
    " RETURNING archive_id"
)
ERASE = "SELECT source_table, destroyed FROM gdpr.erase_archived_rows(%s, %s, %s, %s, %s, %s, %s)"


def _as(url: str, user: str) -> str:
    params = conninfo_to_dict(url)
    params["user"] = user
    params.pop("password", None)
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture
def engine(warehouse: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(_as(warehouse, "gdpr_dag")) as connection:
        yield connection


def _archive(conn: psycopg.Connection, rows: list[tuple[str, str, str, str]]) -> list[int]:
    """(source table, source pk, subject id, purge_after relative to now) rows, committed."""
    with conn.transaction():
        return [conn.execute(ARCHIVE_ROW, row).fetchone()[0] for row in rows]  # type: ignore[index]


def _left(conn: psycopg.Connection) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT source_table, source_pk FROM gdpr_archive.archived_row WHERE subject_id LIKE 'g%'"
                        " ORDER BY 1, 2").fetchall()
    conn.commit()
    return rows  # type: ignore[return-value]


def _audit(conn: psycopg.Connection, action: str) -> list[tuple]:
    rows = conn.execute("SELECT outcome, row_count, subject_hash, details->>'request_id', details->>'source_table',"
                        " dag_id FROM gdpr.audit_log WHERE action = %s ORDER BY audit_id", (action,)).fetchall()
    conn.commit()
    return rows


# -- the archive: deleted only once past purge_after, or by an audited erasure ----------------------


@pytest.mark.parametrize("statement", [
    "DELETE FROM gdpr_archive.archived_row WHERE subject_id = 'g1'",
    "DELETE FROM gdpr_archive.archived_row WHERE subject_id LIKE 'g%'",  # the due row with the others: all refused
    "WITH d AS (DELETE FROM gdpr_archive.archived_row WHERE source_pk = 'i1' RETURNING 1) SELECT count(*) FROM d",
])
def test_the_engine_may_not_delete_an_archive_row_before_its_purge_date(
    conn: psycopg.Connection, engine: psycopg.Connection, statement: str
) -> None:
    ids = _archive(conn, [("crm.invoices", "i1", "g1", "10 years"), ("crm.contacts", "c2", "g2", "-1 day")])
    with pytest.raises(errors.InsufficientPrivilege) as info, engine.transaction():
        engine.execute(statement)  # type: ignore[arg-type]
    assert info.value.diag.message_primary.startswith(
        f"gdpr_archive.archived_row: archive row {ids[0]} is kept until ")
    assert info.value.diag.message_primary.endswith(
        "only an erasure (gdpr.erase_archived_rows, audited) may delete it earlier")
    assert _left(conn) == [("crm.contacts", "c2"), ("crm.invoices", "i1")]


def test_the_engine_purges_a_row_past_its_purge_date(conn: psycopg.Connection, engine: psycopg.Connection) -> None:
    _archive(conn, [("crm.invoices", "i1", "g1", "10 years"), ("crm.contacts", "c2", "g2", "-1 second")])
    with engine.transaction():
        assert engine.execute("DELETE FROM gdpr_archive.archived_row WHERE subject_id LIKE 'g%'"
                              " AND purge_after <= now()").rowcount == 1
    assert _left(conn) == [("crm.invoices", "i1")]


def test_an_erasure_deletes_early_only_with_its_audit_rows_in_the_same_transaction(
    conn: psycopg.Connection, engine: psycopg.Connection
) -> None:
    _archive(conn, [("crm.invoices", "i1", "g1", "10 years"), ("crm.invoices", "i2", "g1", "2 years"),
                    ("crm.contacts", "c1", "g1", "10 years"), ("crm.contacts", "c2", "g2", "10 years")])
    args = (["g1"], ["crm.invoices"], "REQ-G1", "ab" * 32, "gdpr_subject_erasure", "manual__g1", "erase")
    # Rolled back: the rows and the audit rows go back together.
    with engine.transaction(force_rollback=True):
        assert engine.execute(ERASE, args).fetchall() == [("crm.contacts", 1)]
        assert engine.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'erase_archive'").fetchone() == (1,)
    assert _audit(conn, "erase_archive") == []
    assert len(_left(conn)) == 4
    # Kept tables are kept while their purge date is ahead; the rest of the person's archive goes, audited.
    with engine.transaction():
        assert engine.execute(ERASE, args).fetchall() == [("crm.contacts", 1)]
    assert _left(conn) == [("crm.contacts", "c2"), ("crm.invoices", "i1"), ("crm.invoices", "i2")]
    assert _audit(conn, "erase_archive") == [
        ("destroyed", 1, "ab" * 32, "REQ-G1", "crm.contacts", "gdpr_subject_erasure")]
    # Without a legal obligation (no kept table), everything of the person.
    with engine.transaction():
        assert engine.execute(ERASE, (["g1"], [], "REQ-G1B", "ab" * 32, "d", "r", "t")).fetchall() == [
            ("crm.invoices", 2)]
    assert _left(conn) == [("crm.contacts", "c2")]


def test_an_erasure_without_its_request_or_subject_is_refused(
    conn: psycopg.Connection, engine: psycopg.Connection
) -> None:
    _archive(conn, [("crm.contacts", "c1", "g1", "10 years")])
    for request_id, subject_hash in ((None, "ab" * 32), ("REQ-G1", None)):
        with pytest.raises(errors.InvalidParameterValue, match="an erasure names its request id and the subject"), \
                engine.transaction():
            engine.execute(ERASE, (["g1"], [], request_id, subject_hash, "d", "r", "t"))
    assert _left(conn) == [("crm.contacts", "c1")]


@pytest.mark.parametrize(("role", "message"), [
    ("gdpr_auditor", "permission denied for function erase_archived_rows"),
    ("gdpr_archive_reader", "permission denied for schema gdpr"),
    ("gdpr_list_reader", "permission denied for function erase_archived_rows"),
])
def test_only_the_engine_may_erase_archived_rows(conn: psycopg.Connection, role: str, message: str) -> None:
    _archive(conn, [("crm.contacts", "c1", "g1", "10 years")])
    conn.execute(f"SET ROLE {role}")  # type: ignore[arg-type]
    with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():
        conn.execute(ERASE, (["g1"], [], "REQ-G1", "ab" * 32, "d", "r", "t"))
    assert info.value.diag.message_primary == message
    conn.execute("RESET ROLE")
    assert _left(conn) == [("crm.contacts", "c1")]


@pytest.mark.parametrize("statement", [
    "ALTER TABLE gdpr_archive.archived_row DISABLE TRIGGER archived_row_guard",
    "SET session_replication_role = replica",
    "DROP TRIGGER archived_row_guard ON gdpr_archive.archived_row",
    "CREATE OR REPLACE FUNCTION gdpr.guard_archive_delete() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RETURN OLD; END $$",
    "UPDATE gdpr_archive.archived_row SET purge_after = now() - interval '1 day'",
])
def test_the_engine_may_not_switch_the_archive_guard_off(
    conn: psycopg.Connection, engine: psycopg.Connection, statement: str
) -> None:
    _archive(conn, [("crm.contacts", "c1", "g1", "10 years")])
    with pytest.raises(errors.InsufficientPrivilege), engine.transaction():
        engine.execute(statement)  # type: ignore[arg-type]
    with pytest.raises(errors.InsufficientPrivilege), engine.transaction():
        engine.execute("DELETE FROM gdpr_archive.archived_row WHERE subject_id = 'g1'")
    assert _left(conn) == [("crm.contacts", "c1")]

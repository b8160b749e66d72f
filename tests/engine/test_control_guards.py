"""What the engine's role may not do to the control schema, enforced by the database (control schema v8):
each forbidden write, tried as the DAGs' login role (gdpr_dag, a member of gdpr_engine), is refused and
changes nothing; the allowed path next to it works."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from helpers import as_role
from warehouse_gdpr.engine import audit, optout
from warehouse_gdpr.engine.crypto import Keys

ARCHIVE_ROW = (
    "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, purge_after, key_id, nonce,"
    " ciphertext) VALUES (%s, %s, %s, 'former_clients', now() + %s::interval, 'archive-1', '\\x00', '\\x01')"
    " RETURNING archive_id"
)
ERASE = "SELECT source_table, destroyed FROM gdpr.erase_archived_rows(%s, %s, %s, %s, %s, %s, %s)"


@pytest.fixture
def engine(warehouse: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(as_role(warehouse, "gdpr_dag")) as connection:
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


# -- the suppression list: never deleted, never re-keyed in place ----------------------------------

PERSON = "kept.listed@example.example"


def _rotated(extra: dict[str, Any]) -> Keys:
    """The keys after a pepper rotation: pepper-2 current, the old pepper in the chain."""
    pepper = base64.b64encode(os.urandom(32)).decode()
    return Keys.from_extra({**extra, "hmac_key_id": "pepper-2", "hmac_pepper": pepper,
                            "hmac_chain": [{"key_id": extra["hmac_key_id"], "pepper": extra["hmac_pepper"]}]})


def _listed(conn: psycopg.Connection, keys: Keys) -> str:
    """The person on the list (erased: reason 'erasure'), under the current key; returns the stored hash."""
    stored = keys.subject_hash(PERSON)
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
                     " VALUES (%s, %s, 'erasure', 'erasure_request', 'REQ-KEPT-1')", (stored, keys.hmac_key_id))
    return stored


def _entries(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute("SELECT email_hash, key_id, reason, request_id, rekeyed_at IS NOT NULL"
                        " FROM gdpr.suppression_list ORDER BY first_seen, email_hash").fetchall()
    conn.commit()
    return rows


def _suppressed(conn: psycopg.Connection, keys: Keys) -> bool:
    try:
        return optout.is_suppressed(conn, keys, PERSON)
    finally:
        conn.rollback()


@pytest.mark.parametrize(("statement", "message"), [
    # re-keyed to a random, well-formed hash under another key id: allowed before version 8
    ("UPDATE gdpr.suppression_list SET email_hash = encode(sha256('x'::bytea), 'hex'), key_id = 'pepper-2'",
     "permission denied for table suppression_list"),
    ("UPDATE gdpr.suppression_list SET email_hash = encode(sha256('x'::bytea), 'hex')",
     "permission denied for table suppression_list"),
    ("DELETE FROM gdpr.suppression_list", "permission denied for table suppression_list"),
    ("TRUNCATE gdpr.suppression_list", "permission denied for table suppression_list"),
    ("UPDATE gdpr.suppression_list SET reason = 'opt_out', request_id = NULL",
     "gdpr.suppression_list is permanent: UPDATE refused"),
    ("UPDATE gdpr.suppression_list SET rekeyed_at = now(), request_id = 'REQ-OTHER'",
     "gdpr.suppression_list is permanent: UPDATE refused"),
])
def test_the_engine_may_not_take_anyone_off_the_list(
    conn: psycopg.Connection, engine: psycopg.Connection, keys: Keys, statement: str, message: str
) -> None:
    _listed(conn, keys)
    before = _entries(conn)
    with pytest.raises(errors.InsufficientPrivilege) as info, engine.transaction():
        engine.execute(statement)  # type: ignore[arg-type]
    assert info.value.diag.message_primary == message
    assert _entries(conn) == before
    assert _suppressed(conn, keys)


def test_a_rekeyed_mark_is_set_once_and_changes_nothing_else(
    conn: psycopg.Connection, engine: psycopg.Connection, keys: Keys
) -> None:
    stored = _listed(conn, keys)
    with engine.transaction():
        assert engine.execute("UPDATE gdpr.suppression_list SET rekeyed_at = now()").rowcount == 1
    for statement in ("UPDATE gdpr.suppression_list SET rekeyed_at = NULL",
                      "UPDATE gdpr.suppression_list SET rekeyed_at = now() - interval '1 day'"):
        with pytest.raises(errors.InsufficientPrivilege, match="permanent: UPDATE refused"), engine.transaction():
            engine.execute(statement)  # type: ignore[arg-type]
    assert _entries(conn) == [(stored, keys.hmac_key_id, "erasure", "REQ-KEPT-1", True)]


def test_the_owner_may_not_rekey_in_place_either(conn: psycopg.Connection, keys: Keys) -> None:
    stored = _listed(conn, keys)
    with pytest.raises(errors.InsufficientPrivilege, match="permanent: UPDATE refused"), conn.transaction():
        conn.execute("UPDATE gdpr.suppression_list SET email_hash = encode(sha256('x'::bytea), 'hex'),"
                     " key_id = 'pepper-2'")
    assert _entries(conn)[0][:2] == (stored, keys.hmac_key_id)


def test_a_forged_rekeying_leaves_the_person_on_the_list(
    conn: psycopg.Connection, engine: psycopg.Connection, keys: Keys, key_extra: dict[str, Any]
) -> None:
    """What a job with the engine's role can do at most after a rotation: add a random entry under the new
    key and mark the old one re-keyed. The old entry stays, and every lookup still finds the person."""
    old = _listed(conn, keys)
    keys2 = _rotated(key_extra)
    with engine.transaction():
        engine.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
                       " VALUES (encode(sha256('forged'::bytea), 'hex'), 'pepper-2', 'erasure', 'erasure_request',"
                       " 'REQ-KEPT-1')")
        engine.execute("UPDATE gdpr.suppression_list SET rekeyed_at = now() WHERE email_hash = %s", (old,))
    assert (old, keys.hmac_key_id, "erasure", "REQ-KEPT-1", True) in _entries(conn)
    assert _suppressed(conn, keys2)
    # The sync's own re-keying: the right entry under the new key, the old one kept.
    rekeyed = optout.rekey(conn, keys2, audit.RunContext("gdpr_optout_sync", "manual__kept", "rekey"))
    assert rekeyed["stale"] == {}  # already marked: the forged mark cost a re-keyed copy, not the person
    assert _suppressed(conn, keys2)


def test_the_sync_rekeys_by_adding_and_keeps_the_old_entry(
    conn: psycopg.Connection, engine: psycopg.Connection, keys: Keys, key_extra: dict[str, Any]
) -> None:
    old = _listed(conn, keys)
    keys2 = _rotated(key_extra)
    result = optout.rekey(engine, keys2, audit.RunContext("gdpr_optout_sync", "manual__rekey", "rekey"))
    assert (result["rekeyed"], result["superseded"]) == (1, 0)
    entries = _entries(conn)
    assert (old, keys.hmac_key_id, "erasure", "REQ-KEPT-1", True) in entries
    assert (keys2.subject_hash(PERSON), "pepper-2", "erasure", "REQ-KEPT-1", False) in entries
    assert optout.rekey(engine, keys2, audit.RunContext("gdpr_optout_sync", "manual__rekey2", "rekey"))["stale"] == {}
    assert _suppressed(conn, keys2)

"""The audit log's hash chain (control schema v8, engine/auditchain.py) on a live PostgreSQL: every writer
is chained at commit, in commit order, without a gap; `verify` finds what a superuser did behind the
triggers' back; the upgrade chains an installed warehouse's rows."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import schema_before_v8
from warehouse_gdpr.engine import audit, auditchain, schema
from warehouse_gdpr.engine.sqlfiles import read_sql

CTX = audit.RunContext(dag_id="gdpr_retention_sweep", run_id="manual__chain", task_id="apply")


def _url(url: str, user: str) -> str:
    params = conninfo_to_dict(url)
    params["user"] = user
    params.pop("password", None)
    return make_conninfo(**params)  # type: ignore[arg-type]


def _write(conn: psycopg.Connection, n: int = 1, **fields: object) -> None:
    """n audit rows in one transaction."""
    with conn.transaction():
        for i in range(n):
            audit.record(conn, CTX, action=str(fields.get("action", "delete")), outcome="ok", rule="r",
                         table="crm.contacts", row_count=i, details={"batch": i})


def _chain(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(
        "SELECT audit_id, chain_seq, prev_hash, row_hash FROM gdpr.audit_log ORDER BY chain_seq NULLS LAST, audit_id"
    ).fetchall()
    conn.commit()
    return rows


def _superuser(conn: psycopg.Connection, *statements: str) -> None:
    """What an owner or superuser can do: switch the triggers off, change the log, switch them on again."""
    with conn.transaction():
        conn.execute("ALTER TABLE gdpr.audit_log DISABLE TRIGGER ALL")
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_delete")
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate")
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_chain")


def _verify(conn: psycopg.Connection, **kwargs: object) -> auditchain.Verification:
    conn.commit()
    return auditchain.verify(conn, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def dag_conn(warehouse: str) -> Iterator[psycopg.Connection]:
    """The DAGs' login role (a member of gdpr_engine)."""
    with psycopg.connect(_url(warehouse, "gdpr_dag")) as connection:
        yield connection


# -- every writer is chained -------------------------------------------------------------------


def test_a_fresh_warehouse_has_an_empty_chain_that_verifies(conn: psycopg.Connection) -> None:
    head = auditchain.read_head(conn)
    assert (head.chain_seq, head.audit_id, head.row_hash) == (0, None, auditchain.genesis(head.chain_id))
    result = _verify(conn)
    assert result.ok and result.rows_checked == 0 and result.last.chain_seq == 0


def test_rows_are_chained_at_commit_and_python_recomputes_each_hash(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    _write(dag_conn, 3)  # the engine's role: it may insert, the database chains
    _write(conn, 2)  # the owner
    rows = _chain(conn)
    assert [r[1] for r in rows] == [1, 2, 3, 4, 5]
    head = auditchain.read_head(conn)
    assert rows[0][2] == auditchain.genesis(head.chain_id)
    assert all(rows[i][2] == rows[i - 1][3] for i in range(1, 5)), "each prev_hash is the previous row_hash"
    assert (head.chain_seq, head.audit_id, head.row_hash) == (5, rows[-1][0], rows[-1][3])
    result = _verify(conn)
    assert result.ok, result.broken
    assert (result.rows_checked, result.last.chain_seq, result.last.row_hash) == (5, 5, rows[-1][3])
    # From an exported head: only the rows after it are recomputed.
    middle = auditchain.ChainHead(head.chain_id, 3, rows[2][0], rows[2][3])
    result = _verify(conn, start=middle, exported=middle)
    assert result.ok and result.first == 3 and result.rows_checked == 3


def test_python_and_the_database_hash_awkward_values_alike(conn: psycopg.Connection) -> None:
    """The canonical encoding: NULLs, non-ASCII text, JSON numbers as written, a session in another time
    zone (logged_at is hashed in UTC), a separator-like value in a field."""
    with conn.transaction():
        conn.execute("SET LOCAL TIME ZONE 'Pacific/Chatham'")
        audit.record(conn, CTX, action="x~1:y", outcome="ok", rule=None, table=None, subject_hash="ab" * 32,
                     details={"n": 1.50, "big": 12345678901234567890, "s": "é😀\"\\\n", "l": [None, True, {"b": 1}]})
        audit.record(conn, CTX, action="", outcome="0:", details={})
    conn.execute("SET TIME ZONE 'America/Los_Angeles'")
    result = _verify(conn)
    assert result.ok, result.broken
    assert result.rows_checked == 2


def test_the_chain_columns_are_the_databases_to_set(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    with pytest.raises(errors.InsufficientPrivilege) as info, dag_conn.transaction():  # the engine: by the grants
        dag_conn.execute("INSERT INTO gdpr.audit_log (action, outcome, chain_seq, prev_hash, row_hash)"
                         " VALUES ('delete', 'ok', 1, repeat('0', 64), repeat('0', 64))")
    assert info.value.diag.message_primary == "permission denied for table audit_log"
    with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():  # the owner: the chain trigger
        conn.execute("INSERT INTO gdpr.audit_log (action, outcome, chain_seq) VALUES ('delete', 'forged', 1)")
    assert info.value.diag.message_primary == (
        "gdpr.audit_log: chain_seq, prev_hash and row_hash are set by the database, not by an INSERT")
    for statement in ("UPDATE gdpr.audit_log SET row_hash = repeat('0', 64)",
                      "UPDATE gdpr.audit_log SET chain_seq = NULL, prev_hash = NULL, row_hash = NULL"):
        _write(conn)
        conn.execute("SET gdpr.audit_chaining = 'on'")  # the chain trigger's permission does not reach a chained row
        with pytest.raises(errors.InsufficientPrivilege, match="append-only: UPDATE refused"), conn.transaction():
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("RESET gdpr.audit_chaining")
    assert _verify(conn).ok


def test_the_audit_log_columns_are_the_ones_the_hash_covers(conn: psycopg.Connection) -> None:
    """A column added to gdpr.audit_log without adding it to the hash would be left unprotected."""
    columns = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'gdpr.audit_log'::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum")]
    assert sorted(columns) == sorted(auditchain.CONTENT_COLUMNS + auditchain.CHAIN_COLUMNS)


# -- concurrent writers ------------------------------------------------------------------------


def test_chain_order_is_commit_order_and_an_open_transaction_blocks_nobody(warehouse: str) -> None:
    """A transaction that wrote an audit row and is still working holds no chain lock: another writer
    commits meanwhile, and takes the earlier position although its audit id is higher."""
    with psycopg.connect(warehouse) as first, psycopg.connect(warehouse) as second:
        first.execute("BEGIN")
        audit.record(first, CTX, action="slow", outcome="ok")
        second.execute("SET lock_timeout = '5s'")
        second.commit()
        _write(second, action="fast")  # would wait for `first` (and fail after 5 s) if it held the chain
        first.commit()
        rows = first.execute("SELECT action, audit_id, chain_seq FROM gdpr.audit_log ORDER BY chain_seq").fetchall()
        first.commit()
        assert [r[0] for r in rows] == ["fast", "slow"]
        assert rows[0][1] > rows[1][1], "audit ids are handed out at insert, positions at commit"
        assert _verify(first).ok


def test_two_concurrent_writers_keep_one_unbroken_chain(warehouse: str) -> None:
    transactions, per_transaction = 40, 3
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            with psycopg.connect(_url(warehouse, "gdpr_dag")) as connection:
                barrier.wait()
                for _ in range(transactions):
                    with connection.transaction():
                        for i in range(per_transaction):
                            audit.record(connection, audit.RunContext(name, "run", "task"), action="write",
                                         outcome="ok", row_count=i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("gdpr_optout_sync", "gdpr_erasure_retry")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with psycopg.connect(warehouse) as conn:
        total = 2 * transactions * per_transaction
        seqs = [r[0] for r in conn.execute("SELECT chain_seq FROM gdpr.audit_log ORDER BY chain_seq")]
        assert seqs == list(range(1, total + 1))
        # Each transaction's rows are consecutive: a commit appends its rows together.
        writers = [r[0] for r in conn.execute("SELECT dag_id FROM gdpr.audit_log ORDER BY chain_seq")]
        runs = [writers[i:i + per_transaction] for i in range(0, total, per_transaction)]
        assert all(len(set(run)) == 1 for run in runs)
        assert writers.count("gdpr_optout_sync") == writers.count("gdpr_erasure_retry") == total // 2
        result = _verify(conn)
        assert result.ok and result.rows_checked == total


# -- what a superuser does behind the triggers' back is found -----------------------------------


def test_a_deleted_middle_row_is_found(conn: psycopg.Connection) -> None:
    _write(conn, 5)
    rows = _chain(conn)
    _superuser(conn, f"DELETE FROM gdpr.audit_log WHERE audit_id = {rows[2][0]}")
    result = _verify(conn)
    assert result.broken == auditchain.Break(rows[3][0], 4, (
        f"the chain skips position 3, after position 2 (audit id {rows[1][0]}): rows were deleted"))
    assert result.rows_checked == 2


@pytest.mark.parametrize("disable", ["ALL", "audit_log_no_update_delete"])
def test_an_edited_row_is_found(conn: psycopg.Connection, disable: str) -> None:
    _write(conn, 4)
    rows = _chain(conn)
    with conn.transaction():
        conn.execute(f"ALTER TABLE gdpr.audit_log DISABLE TRIGGER {disable}")  # type: ignore[arg-type]
        conn.execute("UPDATE gdpr.audit_log SET row_count = 0, outcome = 'dry_run' WHERE audit_id = %s", (rows[1][0],))
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_delete")
    result = _verify(conn)
    assert result.broken == auditchain.Break(rows[1][0], 2, "its content does not match its hash: the row was edited")


def test_an_edited_row_whose_hash_was_recomputed_is_found_at_the_next_row(conn: psycopg.Connection) -> None:
    _write(conn, 4)
    rows = _chain(conn)
    _superuser(conn, "UPDATE gdpr.audit_log SET row_count = 999 WHERE chain_seq = 2",
               "UPDATE gdpr.audit_log SET row_hash = gdpr.audit_row_hash(2, prev_hash, audit_log) WHERE chain_seq = 2")
    result = _verify(conn)
    assert result.broken is not None and (result.broken.audit_id, result.broken.chain_seq) == (rows[2][0], 3)
    assert "its prev_hash is not the hash of the row before it (position 2" in result.broken.reason


def _rewrite_from(conn: psycopg.Connection, position: int) -> None:
    """A thorough forger: edit a row, then recompute every later hash and the database's head."""
    _superuser(
        conn,
        f"UPDATE gdpr.audit_log SET row_count = 999 WHERE chain_seq = {position}",
        "DO $$ DECLARE r gdpr.audit_log; prev text; BEGIN"
        f" SELECT row_hash INTO prev FROM gdpr.audit_log WHERE chain_seq = {position - 1};"
        f" FOR r IN SELECT * FROM gdpr.audit_log WHERE chain_seq >= {position} ORDER BY chain_seq LOOP"
        "  UPDATE gdpr.audit_log SET prev_hash = prev, row_hash = gdpr.audit_row_hash(r.chain_seq, prev, r)"
        "  WHERE audit_id = r.audit_id RETURNING row_hash INTO prev; END LOOP;"
        " UPDATE gdpr.audit_chain_head SET row_hash = prev; END $$",
    )


def test_a_rewritten_chain_is_found_only_through_an_exported_head(conn: psycopg.Connection, tmp_path: Path) -> None:
    _write(conn, 4)
    store = auditchain.PathHeadStore(tmp_path)
    exported = _verify(conn).last
    store.save(exported)
    _write(conn, 2)
    _rewrite_from(conn, 2)
    assert _verify(conn).ok, "a consistent rewrite leaves nothing inside the warehouse to see"
    latest = store.latest(exported.chain_id)
    assert latest == exported
    result = _verify(conn, exported=latest)
    assert result.broken is not None and result.broken.chain_seq == 4
    assert result.broken.reason.startswith("differs from the head exported outside the warehouse (position 4")
    result = _verify(conn, start=latest, exported=latest)  # as each DAG's last task does
    assert result.broken is not None and result.broken.chain_seq == 4


def test_a_truncated_tail_is_found_through_the_database_head_and_the_exported_head(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    _write(conn, 5)
    rows = _chain(conn)
    store = auditchain.PathHeadStore(tmp_path)
    store.save(_verify(conn).last)
    _superuser(conn, "DELETE FROM gdpr.audit_log WHERE chain_seq >= 4")
    result = _verify(conn)
    assert result.broken == auditchain.Break(rows[4][0], 5, (
        "the database's chain head (gdpr.audit_chain_head) is at position 5, beyond the end of the log "
        f"(position 3 (audit id {rows[2][0]})): rows at the end were deleted"))
    # A forger who also rewinds the head leaves nothing to see inside the warehouse ...
    with conn.transaction():
        conn.execute("UPDATE gdpr.audit_chain_head SET chain_seq = 3, audit_id = %s, row_hash = %s",
                     (rows[2][0], rows[2][3]))
    assert _verify(conn).ok
    # ... but the head exported outside it is beyond the end of the log.
    exported = store.latest(auditchain.read_head(conn).chain_id)
    result = _verify(conn, exported=exported)
    assert result.broken is not None and (result.broken.audit_id, result.broken.chain_seq) == (rows[4][0], 5)
    assert "is beyond the end of the log (position 3" in result.broken.reason
    assert "rows at the end were deleted (a truncated tail)" in result.broken.reason
    result = _verify(conn, start=exported, exported=exported)
    assert result.broken is not None and result.broken.chain_seq == 5
    assert "is gone: rows were deleted or the warehouse was restored from an older backup" in result.broken.reason


def test_a_row_inserted_with_the_triggers_disabled_is_found(conn: psycopg.Connection) -> None:
    _write(conn, 2)
    _superuser(conn, "INSERT INTO gdpr.audit_log (dag_id, action, outcome) VALUES ('gdpr_subject_erasure',"
                     " 'erase', 'ok')")
    result = _verify(conn)
    assert result.broken is not None and result.broken.chain_seq is None and result.unchained == 1
    assert result.broken.reason.startswith("not chained (1 row(s) without a chain position, this is the first)")
    # Running the DDL again does not chain it: only the upgrade to version 8 chains existing rows.
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    assert _verify(conn).unchained == 1


def test_a_replaced_chain_head_is_found(conn: psycopg.Connection, tmp_path: Path) -> None:
    """Giving the warehouse a new chain id (so that no exported head applies) breaks position 1."""
    _write(conn, 2)
    store = auditchain.PathHeadStore(tmp_path)
    old = _verify(conn).last
    store.save(old)
    with conn.transaction():
        conn.execute("UPDATE gdpr.audit_chain_head SET chain_id = gen_random_uuid()")
    new_id = auditchain.read_head(conn).chain_id
    assert store.latest(new_id) is None
    result = _verify(conn)
    assert result.broken is not None and result.broken.chain_seq == 1
    assert "its prev_hash is not the hash of the row before it (position 0)" in result.broken.reason
    result = _verify(conn, exported=old)
    assert result.broken is not None and f"belongs to chain {old.chain_id}" in result.broken.reason


# -- the upgrade ---------------------------------------------------------------------------------


def test_the_upgrade_chains_an_installed_warehouses_rows(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    """A warehouse from before version 8, with audit rows, some written by concurrent transactions (ids
    not in commit order): the owner's upgrade chains them in audit id order; the engine goes on chained."""
    schema_before_v8(conn)
    _write(dag_conn, 3)
    _write(conn, 2)
    assert schema.installed_version(conn) == 7
    conn.commit()
    assert schema.ensure_schema(conn) is True
    rows = _chain(conn)
    assert [r[1] for r in rows] == [1, 2, 3, 4, 5]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert _verify(conn).ok
    _write(dag_conn, 2)
    result = _verify(conn)
    assert result.ok and result.rows_checked == 7


# -- the exported heads ----------------------------------------------------------------------------


def test_the_head_store_keeps_every_export_and_finds_the_latest(tmp_path: Path) -> None:
    store = auditchain.PathHeadStore(tmp_path)
    chain = "0b6c3f1e-0000-4000-8000-000000000001"
    assert store.latest(chain) is None
    for seq in (9, 10, 2):
        where = store.save(auditchain.ChainHead(chain, seq, 100 + seq, f"{seq:064x}", "2026-06-15T12:00:00+00:00",
                                                "gdpr_optout_sync/manual__1"))
        assert where == str(tmp_path / "audit_chain" / chain / f"head-{seq:020d}.json")
    store.save(auditchain.ChainHead("another-chain", 50, 1, "f" * 64))
    (tmp_path / "audit_chain" / chain / "notes.txt").write_text("not a head")
    latest = store.latest(chain)
    assert latest is not None and (latest.chain_seq, latest.audit_id, latest.exported_by) == (
        10, 110, "gdpr_optout_sync/manual__1")
    # The same head again is fine; another row at an exported position is refused.
    store.save(auditchain.ChainHead(chain, 10, 110, f"{10:064x}"))
    with pytest.raises(auditchain.ChainUnavailable, match="already holds another row for position 10"):
        store.save(auditchain.ChainHead(chain, 10, 111, "e" * 64))
    # A file altered to point elsewhere is refused, not trusted.
    path = tmp_path / "audit_chain" / chain / f"head-{10:020d}.json"
    path.write_text(path.read_text().replace('"chain_seq": 10', '"chain_seq": 3'))
    with pytest.raises(auditchain.ChainUnavailable, match="names another chain or position than its file name"):
        store.latest(chain)


def test_rows_restored_from_a_backup_make_the_chain_hold_again(conn: psycopg.Connection) -> None:
    """The runbook's repair: the deleted rows, re-inserted exactly (chain columns included) by the owner
    with the chain trigger off for that transaction."""
    _write(conn, 5)
    with conn.transaction():
        conn.execute("CREATE TABLE public.audit_backup AS SELECT * FROM gdpr.audit_log")
    rows = _chain(conn)
    _superuser(conn, f"DELETE FROM gdpr.audit_log WHERE audit_id IN ({rows[1][0]}, {rows[2][0]})")
    assert _verify(conn).broken is not None
    with conn.transaction():
        conn.execute("ALTER TABLE gdpr.audit_log DISABLE TRIGGER audit_log_chain")
        conn.execute("INSERT INTO gdpr.audit_log OVERRIDING SYSTEM VALUE SELECT * FROM public.audit_backup"
                     " WHERE audit_id NOT IN (SELECT audit_id FROM gdpr.audit_log)")
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_chain")
    result = _verify(conn)
    assert result.ok and result.rows_checked == 5
    _write(conn)  # and the chain goes on
    assert _verify(conn).ok

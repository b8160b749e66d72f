"""The control schema (include/sql/gdpr_schema.sql, warehouse_gdpr.engine.schema) on a live PostgreSQL.

Roles are cluster-wide (shared by every test database of the server); schemas, tables and grants
are per database, so each test works on its own copy (`warehouse`/`conn`) or a scratch database.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import schema_before_v8
from warehouse_gdpr.engine import audit, schema
from warehouse_gdpr.engine.sqlfiles import read_sql

# The versions the DDL records: 7 is the request lifecycle (branch lifecycle, not merged here yet).
VERSIONS = [1, 2, 3, 4, 5, 6, 8]
CTX = audit.RunContext(dag_id="gdpr_retention_sweep", run_id="manual__test", task_id="apply")


def _url(url: str, *, user: str | None = None, dbname: str | None = None) -> str:
    params = conninfo_to_dict(url)
    if user:
        params["user"] = user
        params.pop("password", None)
    if dbname:
        params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


def _record(conn: psycopg.Connection, action: str = "delete", outcome: str = "ok") -> None:
    with conn.transaction():
        audit.record(conn, CTX, action=action, outcome=outcome, rule="r", table="crm.contacts", row_count=3)


def _count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(table))).fetchone()[0]


def _add_archive_row(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, purge_after, key_id,"
            " nonce, ciphertext) VALUES ('crm.contacts', '1', '1', 'former_clients', now() + interval '10 years',"
            " 'archive-1', '\\x00'::bytea, '\\x01'::bytea)"
        )


@pytest.fixture(scope="module")
def plain_user(server_url: str) -> str:
    """A login role with no grant at all (cluster-wide: created once if missing, never dropped)."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        with contextlib.suppress(errors.DuplicateObject):  # created concurrently by another session
            admin.execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'plain_user') THEN "
                "CREATE ROLE plain_user LOGIN; END IF; END $$"
            )
        member = admin.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = 'plain_user'"
        ).fetchone()[0]
    assert member == 0, "plain_user must not be a member of any role"
    return "plain_user"


@pytest.fixture
def empty_db(server_url: str) -> Iterator[str]:
    """Owner URL of a brand-new database without the control schema."""
    name = f"gdpr_test_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _url(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dag_conn(warehouse: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(_url(warehouse, user="gdpr_dag")) as connection:
        yield connection


def test_owner_is_a_superuser(conn: psycopg.Connection) -> None:
    """The trigger tests below are only meaningful if the owner could otherwise do anything."""
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is True


# -- ensure_schema -----------------------------------------------------------------------------


def test_ensure_schema_on_an_installed_warehouse_does_nothing(conn: psycopg.Connection) -> None:
    assert schema.installed_version(conn) == schema.SCHEMA_VERSION
    assert schema.ensure_schema(conn) is False
    assert schema.ensure_schema(conn) is False
    assert conn.execute("SELECT array_agg(version) FROM gdpr.schema_version").fetchone()[0] == VERSIONS


def test_ensure_schema_installs_then_is_idempotent(empty_db: str) -> None:
    with psycopg.connect(empty_db) as probe:
        assert schema.installed_version(probe) is None
    with psycopg.connect(empty_db) as conn:
        assert schema.ensure_schema(conn) is True  # on a fresh connection: its own transaction, committed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert schema.installed_version(conn) == schema.SCHEMA_VERSION
        _record(conn)
        assert schema.ensure_schema(conn) is False
    with psycopg.connect(empty_db) as other:  # visible to another session: it was committed
        assert schema.installed_version(other) == schema.SCHEMA_VERSION
        assert _count(other, "gdpr.audit_log") == 1
        tables = {r[0] for r in other.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname IN ('gdpr', 'gdpr_archive')"
        )}
        assert tables == {
            "gdpr.schema_version", "gdpr.audit_log", "gdpr_archive.archived_row",
            "gdpr.suppression_list", "gdpr.erasure_request", "gdpr.erasure_propagation", "gdpr.quarantine",
            "gdpr.processing_register", "gdpr.audit_chain_head",
        }


def test_running_the_ddl_file_again_by_hand_keeps_everything(conn: psycopg.Connection) -> None:
    _record(conn)
    _add_archive_row(conn)
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    assert _count(conn, "gdpr.audit_log") == 1
    assert _count(conn, "gdpr_archive.archived_row") == 1
    assert conn.execute("SELECT array_agg(version) FROM gdpr.schema_version").fetchone()[0] == VERSIONS
    triggers = conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'gdpr.audit_log'::regclass AND NOT tgisinternal"
        " ORDER BY tgname"
    ).fetchall()
    assert triggers == [("audit_log_chain", "A"), ("audit_log_no_truncate", "A"), ("audit_log_no_update_delete", "A")]
    assert schema.ensure_schema(conn) is False


WHAT_TO_RUN = "`warehouse-gdpr schema install --url <owner URL>` (or with $WAREHOUSE_URL set instead of --url"


def test_ensure_schema_without_the_privilege_to_install(empty_db: str, plain_user: str) -> None:
    with psycopg.connect(_url(empty_db, user=plain_user)) as conn, pytest.raises(schema.SchemaError) as info:
        schema.ensure_schema(conn)
    message = str(info.value)
    assert message.startswith("the gdpr control schema is not installed and this connection (role plain_user) "
                              "may not install it (permission denied")
    assert WHAT_TO_RUN in message and "`warehouse-gdpr schema sql`" in message
    assert "include/" not in message  # the wheel has no include/ folder
    with psycopg.connect(empty_db) as owner:  # nothing was half-installed
        assert owner.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'gdpr%'").fetchone()[0] == 0


def test_ensure_schema_by_a_role_outside_gdpr_engine(warehouse: str, plain_user: str) -> None:
    with psycopg.connect(_url(warehouse, user=plain_user)) as conn, pytest.raises(schema.SchemaError) as info:
        schema.ensure_schema(conn)
    assert str(info.value) == (
        "this connection (role plain_user) may not read the gdpr control schema (permission denied for schema "
        "gdpr): a DBA grants gdpr_engine to its login role (README, Control schema and roles)."
    )


def _downgrade_to_version_5(conn: psycopg.Connection) -> None:
    """The control schema as version 5 left it: no index on the archive's subject ids (what version 6 added)."""
    schema_before_v8(conn)
    with conn.transaction():
        conn.execute("DROP INDEX gdpr_archive.archived_row_subject_idx")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version = 6")
    assert schema.installed_version(conn) == 5
    conn.commit()


def _downgrade_to_version_4(conn: psycopg.Connection) -> None:
    """The control schema as version 4 left it: no claim columns on the outbox (what version 5 added)."""
    _downgrade_to_version_5(conn)
    with conn.transaction():
        conn.execute("ALTER TABLE gdpr.erasure_propagation DROP COLUMN claimed_until, DROP COLUMN claimed_by")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version = 5")
    assert schema.installed_version(conn) == 4
    conn.commit()


def _downgrade_to_version_3(conn: psycopg.Connection) -> None:
    """The control schema as version 3 left it: no gdpr.processing_register (what version 4 added)."""
    _downgrade_to_version_4(conn)
    with conn.transaction():
        conn.execute("DROP TABLE gdpr.processing_register")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version = 4")
    assert schema.SCHEMA_VERSION == 8, "simulate the versions before the current one here"
    assert schema.installed_version(conn) == 3
    conn.commit()


def test_an_older_schema_is_upgraded_by_the_owner_not_by_the_engine(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    """The DAGs connect as a member of gdpr_engine: after a package upgrade they name the installed and
    the needed version and what the owner runs; the owner's run then upgrades, keeping every row."""
    _record(conn)
    _downgrade_to_version_3(conn)
    with pytest.raises(schema.SchemaError) as info:
        schema.ensure_schema(dag_conn)
    message = str(info.value)
    assert message.startswith(f"the gdpr control schema is out of date (installed version 3, this package needs "
                              f"{schema.SCHEMA_VERSION}) and this connection (role gdpr_dag) may not upgrade it "
                              "(permission denied")
    assert WHAT_TO_RUN in message and "not installed" not in message and "include/" not in message
    assert dag_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # rolled back, usable
    assert schema.installed_version(dag_conn) == 3
    dag_conn.commit()

    assert schema.ensure_schema(conn) is True
    assert schema.installed_version(dag_conn) == schema.SCHEMA_VERSION
    assert dag_conn.execute("SELECT to_regclass('gdpr_archive.archived_row_subject_idx')").fetchone()[0] is not None
    assert _count(conn, "gdpr.audit_log") == 1
    assert schema.ensure_schema(dag_conn) is False  # the DAGs go on as the engine
    with dag_conn.transaction():  # with the grants of the current version
        dag_conn.execute(
            "INSERT INTO gdpr.processing_register (sha256, policy_file, activities, markdown, html)"
            " VALUES (repeat('a', 64), 'policy.yaml', 1, '# r', '<h1>r</h1>')"
        )


def test_version_5_adds_the_outbox_claim_and_keeps_pending_erasures(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    """v5's step on its own: the outbox of a v4 warehouse gets claimed_until/claimed_by, its rows kept, and
    the engine's role may claim a row (propagation holds no transaction across a downstream call)."""
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.erasure_request (request_id, subject_hash, received_at, due_date, status,"
                     " outcome) VALUES ('REQ-V5', repeat('b', 64), current_date, current_date + 30,"
                     " 'pending_propagation', 'erased')")
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status, key_id, nonce,"
                     " identifier_ciphertext) VALUES ('REQ-V5', 'emailing', 'pending', 'k1', '\\x00', '\\x01')")
    _downgrade_to_version_4(conn)
    with pytest.raises(schema.SchemaError, match=rf"installed version 4, this package needs {schema.SCHEMA_VERSION}"):
        schema.ensure_schema(dag_conn)
    dag_conn.rollback()

    assert schema.ensure_schema(conn) is True

    row = dag_conn.execute(
        "UPDATE gdpr.erasure_propagation SET claimed_until = now() + interval '1 minute', claimed_by = 'test'"
        " WHERE request_id = 'REQ-V5' RETURNING status, key_id, identifier_ciphertext IS NOT NULL, claimed_by"
    ).fetchone()
    dag_conn.commit()
    assert row == ("pending", "k1", True, "test")
    auditor = conn.execute(
        "SELECT has_column_privilege('gdpr_auditor', 'gdpr.erasure_propagation', 'claimed_until', 'SELECT'),"
        " has_column_privilege('gdpr_auditor', 'gdpr.erasure_propagation', 'identifier_ciphertext', 'SELECT')"
    ).fetchone()
    assert auditor == (True, False)


# -- the audit log is append-only --------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "op"),
    [
        ("UPDATE gdpr.audit_log SET outcome = 'forged'", "UPDATE"),
        ("UPDATE gdpr.audit_log SET row_count = 0 WHERE audit_id = 1", "UPDATE"),
        ("DELETE FROM gdpr.audit_log", "DELETE"),
        ("DELETE FROM gdpr.audit_log WHERE audit_id = 1", "DELETE"),
        ("TRUNCATE gdpr.audit_log", "TRUNCATE"),
        ("TRUNCATE ONLY gdpr.audit_log RESTART IDENTITY", "TRUNCATE"),
    ],
)
@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
def test_audit_log_refuses_changes_even_for_the_superuser(
    conn: psycopg.Connection, statement: str, op: str, replica: bool
) -> None:
    _record(conn, outcome="ok")
    _record(conn, outcome="ok")
    if replica:  # what pg_restore / logical replication use to skip ordinary triggers
        conn.execute("SET session_replication_role = replica")
        assert conn.execute("SHOW session_replication_role").fetchone()[0] == "replica"
    conn.commit()
    with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():
        conn.execute(statement)
    assert info.value.diag.message_primary == f"gdpr.audit_log is append-only: {op} refused"
    conn.execute("RESET session_replication_role")
    assert conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'ok' AND row_count = 3) FROM gdpr.audit_log"
    ).fetchone() == (2, 2)


def test_superuser_may_still_insert(conn: psycopg.Connection) -> None:
    _record(conn, action="check_policy")
    rows = audit.rows_for_run(conn, CTX.dag_id, CTX.run_id)
    summary = [(r["action"], r["outcome"], r["row_count"], r["dry_run"]) for r in rows]
    assert summary == [("check_policy", "ok", 3, False)]


# -- grants ------------------------------------------------------------------------------------


@pytest.fixture(params=["set_role", "gdpr_dag_login"])
def engine(request: pytest.FixtureRequest, conn: psycopg.Connection, warehouse: str) -> Iterator[psycopg.Connection]:
    """A connection acting as gdpr_engine: SET ROLE on the owner's, or the gdpr_dag login (a member)."""
    if request.param == "set_role":
        conn.execute("SET ROLE gdpr_engine")
        conn.commit()
        assert conn.execute("SELECT current_user").fetchone()[0] == "gdpr_engine"
        yield conn
    else:
        with psycopg.connect(_url(warehouse, user="gdpr_dag")) as dag:
            assert dag.execute("SELECT current_user").fetchone()[0] == "gdpr_dag"
            yield dag


def test_engine_may_insert_and_read_audit_rows(engine: psycopg.Connection) -> None:
    _record(engine, action="delete", outcome="ok")
    rows = audit.rows_for_run(engine, CTX.dag_id, CTX.run_id)
    assert [(r["action"], r["table_name"], r["row_count"]) for r in rows] == [("delete", "crm.contacts", 3)]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE gdpr.audit_log SET outcome = 'forged'",
        "DELETE FROM gdpr.audit_log",
        "TRUNCATE gdpr.audit_log",
        "ALTER TABLE gdpr.audit_log DISABLE TRIGGER audit_log_no_update_delete",
        "INSERT INTO gdpr.schema_version (version) VALUES (99)",
        "UPDATE gdpr_archive.archived_row SET ciphertext = '\\x00'::bytea",
        "CREATE TABLE gdpr.shadow (id int)",
    ],
)
def test_engine_is_denied_by_grants(engine: psycopg.Connection, statement: str) -> None:
    _record(engine)
    with pytest.raises(errors.InsufficientPrivilege) as info, engine.transaction():
        engine.execute(statement)
    message = info.value.diag.message_primary or ""
    # Denied by the grants, before any trigger runs.
    assert "append-only" not in message
    assert message.startswith(("permission denied for", "must be owner of"))
    assert _count(engine, "gdpr.audit_log") == 1


def test_engine_may_archive_and_purge(engine: psycopg.Connection) -> None:
    _add_archive_row(engine)
    assert _count(engine, "gdpr_archive.archived_row") == 1
    with engine.transaction():  # a row past its purge date (before it: tests/engine/test_control_guards.py)
        engine.execute(
            "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, purge_after, key_id,"
            " nonce, ciphertext) VALUES ('crm.contacts', '2', '2', 'former_clients', now() - interval '1 day',"
            " 'archive-1', '\\x00'::bytea, '\\x01'::bytea)")
        assert engine.execute("DELETE FROM gdpr_archive.archived_row WHERE purge_after <= now()").rowcount == 1
    assert _count(engine, "gdpr_archive.archived_row") == 1


@pytest.mark.parametrize(
    ("statement", "schema_name"),
    [
        ("SELECT * FROM gdpr_archive.archived_row", "gdpr_archive"),
        ("SELECT * FROM gdpr.audit_log", "gdpr"),
        ("INSERT INTO gdpr.audit_log (action, outcome) VALUES ('delete', 'forged')", "gdpr"),
    ],
)
def test_plain_role_is_denied(warehouse: str, plain_user: str, statement: str, schema_name: str) -> None:
    with psycopg.connect(_url(warehouse, user=plain_user)) as conn, pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute(statement)
    assert info.value.diag.message_primary == f"permission denied for schema {schema_name}"


def test_plain_role_is_denied_even_with_schema_usage(conn: psycopg.Connection, warehouse: str, plain_user: str) -> None:
    """Table grants, not only schema usage, keep the archive closed to PUBLIC."""
    with conn.transaction():
        conn.execute("GRANT USAGE ON SCHEMA gdpr_archive, gdpr TO plain_user")
    with psycopg.connect(_url(warehouse, user=plain_user)) as other:
        for table in ("archived_row", "audit_log"):
            with pytest.raises(errors.InsufficientPrivilege) as info, other.transaction():
                other.execute(f"SELECT * FROM {'gdpr_archive' if table == 'archived_row' else 'gdpr'}.{table}")
            assert info.value.diag.message_primary == f"permission denied for table {table}"


def _as_role(conn: psycopg.Connection, role: str) -> psycopg.Connection:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    conn.commit()
    assert conn.execute("SELECT current_user").fetchone()[0] == role
    return conn


def test_archive_reader_may_read_the_archive_only(conn: psycopg.Connection) -> None:
    _add_archive_row(conn)
    _record(conn)
    reader = _as_role(conn, "gdpr_archive_reader")
    row = reader.execute("SELECT source_table, source_pk, key_id FROM gdpr_archive.archived_row").fetchall()
    assert row == [("crm.contacts", "1", "archive-1")]
    reader.commit()
    denied = {
        "DELETE FROM gdpr_archive.archived_row": "permission denied for table archived_row",
        "UPDATE gdpr_archive.archived_row SET key_id = 'x'": "permission denied for table archived_row",
        "SELECT * FROM gdpr.audit_log": "permission denied for schema gdpr",
    }
    for statement, message in denied.items():
        with pytest.raises(errors.InsufficientPrivilege) as info, reader.transaction():
            reader.execute(statement)
        assert info.value.diag.message_primary == message, statement
    assert _count(reader, "gdpr_archive.archived_row") == 1


def test_auditor_may_read_the_audit_log_only(conn: psycopg.Connection) -> None:
    _record(conn)
    _add_archive_row(conn)
    auditor = _as_role(conn, "gdpr_auditor")
    assert auditor.execute("SELECT action, outcome, row_count FROM gdpr.audit_log").fetchall() == [("delete", "ok", 3)]
    assert auditor.execute("SELECT max(version) FROM gdpr.schema_version").fetchone()[0] == schema.SCHEMA_VERSION
    auditor.commit()
    denied = {
        "INSERT INTO gdpr.audit_log (action, outcome) VALUES ('delete', 'forged')":
            "permission denied for table audit_log",
        "SELECT * FROM gdpr_archive.archived_row": "permission denied for schema gdpr_archive",
        "SELECT * FROM crm.contacts": "permission denied for schema crm",
    }
    for statement, message in denied.items():
        with pytest.raises(errors.InsufficientPrivilege) as info, auditor.transaction():
            auditor.execute(statement)
        assert info.value.diag.message_primary == message, statement
    assert _count(auditor, "gdpr.audit_log") == 1

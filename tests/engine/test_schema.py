"""The control schema (include/sql/gdpr_schema.sql, warehouse_gdpr.engine.schema) on a live PostgreSQL.

Roles are cluster-wide (shared by every test database of the server); schemas, tables and grants
are per database, so each test works on its own copy (`warehouse`/`conn`) or a scratch database.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from warehouse_gdpr.engine import audit, auditchain, schema
from warehouse_gdpr.engine.sqlfiles import read_sql

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


def _relkind(conn: psycopg.Connection, name: str) -> str:
    """'r' for a table, 'v' for a view."""
    return conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (name,)).fetchone()[0]  # type: ignore[index,no-any-return]


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
    assert conn.execute("SELECT array_agg(version) FROM gdpr.schema_version").fetchone()[0] == list(
        range(1, schema.SCHEMA_VERSION + 1))


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
            "gdpr.suppression_list", "gdpr.request", "gdpr.erasure_propagation", "gdpr.quarantine",
            "gdpr.processing_register", "gdpr.audit_chain_head", "gdpr.restriction", "gdpr.audit_xact",
            "gdpr.journal", "gdpr.journal_outside",
        }
        views = {r[0] for r in other.execute(
            "SELECT schemaname || '.' || viewname FROM pg_views WHERE schemaname = 'gdpr'")}
        assert views == {"gdpr.erasure_request"}  # read-only, for readers of versions 1-4


def test_running_the_ddl_file_again_by_hand_keeps_everything(conn: psycopg.Connection) -> None:
    _record(conn)
    _add_archive_row(conn)
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    assert _count(conn, "gdpr.audit_log") == 1
    assert _count(conn, "gdpr_archive.archived_row") == 1
    assert conn.execute("SELECT array_agg(version) FROM gdpr.schema_version").fetchone()[0] == list(
        range(1, schema.SCHEMA_VERSION + 1))
    triggers = conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'gdpr.audit_log'::regclass AND NOT tgisinternal"
        " ORDER BY tgname"
    ).fetchall()
    assert triggers == [("audit_log_chain", "A"), ("audit_log_no_truncate", "A"), ("audit_log_no_update_delete", "A"),
                        ("audit_log_rows_inserted", "A")]  # version 10: certificates checked, audited requests marked
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


DATA = Path(__file__).parent / "data"
PREVIOUS = 11  # the released version before schema.SCHEMA_VERSION: its frozen DDL is data/gdpr_schema_v11.sql


def _install_version(conn: psycopg.Connection, version: int) -> None:
    """The control schema exactly as release `version` installed it (its DDL frozen in tests/engine/data)."""
    assert schema.SCHEMA_VERSION == PREVIOUS + 1, "freeze the previous version's DDL in tests/engine/data"
    with conn.transaction():
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
        conn.execute((DATA / f"gdpr_schema_v{version}.sql").read_text(encoding="utf-8"))  # type: ignore[arg-type]
    assert schema.installed_version(conn) == version
    assert _relkind(conn, "gdpr.erasure_request") == ("r" if version < 7 else "v")
    conn.commit()


def _install_version_3(conn: psycopg.Connection) -> None:
    """The control schema as version 3 left it: version 4's, without gdpr.processing_register (what 4 added)."""
    _install_version(conn, 4)
    with conn.transaction():
        conn.execute("DROP TABLE gdpr.processing_register")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version = 4")
    assert schema.installed_version(conn) == 3
    conn.commit()


@pytest.mark.parametrize("version", [3, PREVIOUS])
def test_an_older_schema_is_upgraded_by_the_owner_not_by_the_engine(
    conn: psycopg.Connection, dag_conn: psycopg.Connection, version: int
) -> None:
    """The DAGs connect as a member of gdpr_engine: after a package upgrade they name the installed and
    the needed version and what the owner runs; the owner's run then upgrades, keeping every row."""
    if version == 3:
        _install_version_3(conn)
    else:
        _install_version(conn, version)
    _record(conn)
    if version == PREVIOUS:  # requests and outbox rows an installed warehouse holds, in each state
        _fill_lifecycle(conn)
    with pytest.raises(schema.SchemaError) as info:
        schema.ensure_schema(dag_conn)
    message = str(info.value)
    assert message.startswith(f"the gdpr control schema is out of date (installed version {version}, this package "
                              f"needs {schema.SCHEMA_VERSION}) and this connection (role gdpr_dag) may not upgrade it "
                              "(permission denied")
    assert WHAT_TO_RUN in message and "not installed" not in message and "include/" not in message
    assert dag_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # rolled back, usable
    assert schema.installed_version(dag_conn) == version
    dag_conn.commit()

    assert schema.ensure_schema(conn) is True
    assert schema.installed_version(dag_conn) == schema.SCHEMA_VERSION
    assert dag_conn.execute("SELECT to_regclass('gdpr_archive.archived_row_subject_idx')").fetchone()[0] is not None
    assert _count(conn, "gdpr.audit_log") == 1
    conn.commit()
    chained = auditchain.verify(conn)  # version 8: the installed warehouse's audit rows are chained
    assert chained.ok and chained.rows_checked == 1
    assert schema.ensure_schema(dag_conn) is False  # the DAGs go on as the engine
    with dag_conn.transaction():  # with the grants of the current version
        dag_conn.execute(
            "INSERT INTO gdpr.processing_register (sha256, policy_file, activities, markdown, html)"
            " VALUES (repeat('a', 64), 'policy.yaml', 1, '# r', '<h1>r</h1>')"
        )
        dag_conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status)"
            " VALUES ('REQ-ENGINE-1', 'access', repeat('b', 64), current_date, current_date + 30, 'registered')"
        )
        audit.record(dag_conn, CTX, action="register_request", outcome="registered",  # version 10: audited with it
                     details={"request_id": "REQ-ENGINE-1"})
    if version == PREVIOUS:
        _go_on_with_the_lifecycle(conn, dag_conn)


def _fill_lifecycle(conn: psycopg.Connection) -> None:
    """As the previous version's engine left them: a completed request and its acknowledged outbox row, a request
    pending propagation with one target acknowledged and one pending, a registered one."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at, details) VALUES"
            " ('REQ-V9-DONE', 'erasure', repeat('1', 64), '2026-01-31', '2026-02-28', 'completed', 'erased',"
            "  '2026-02-02 09:00+00', '{\"rows\": {\"crm.contacts\": 1}}'),"
            " ('REQ-V9-PENDING', 'rectification', repeat('2', 64), '2026-05-20', '2026-06-20', 'pending_propagation',"
            "  'rectified', NULL, '{\"rows\": {\"crm.contacts\": 1}}'),"
            " ('REQ-V9-NEW', 'access', repeat('3', 64), '2026-06-01', '2026-07-01', 'registered', NULL, NULL, '{}')")
        conn.execute(
            "INSERT INTO gdpr.erasure_propagation (request_id, target, status, attempts, key_id, nonce,"
            " identifier_ciphertext, last_result, acknowledged_at) VALUES"
            " ('REQ-V9-DONE', 'emailing', 'acknowledged', 1, NULL, NULL, NULL, 'HTTP 204', '2026-02-02 09:00+00'),"
            " ('REQ-V9-PENDING', 'emailing', 'acknowledged', 2, NULL, NULL, NULL, 'HTTP 204', '2026-05-21 11:00+00'),"
            " ('REQ-V9-PENDING', 'telephony', 'pending', 7, 'archive-1', '\\x00'::bytea, '\\x01'::bytea, 'HTTP 503',"
            "  NULL)")


def _go_on_with_the_lifecycle(conn: psycopg.Connection, dag_conn: psycopg.Connection) -> None:
    """After the upgrade, the rows are as they were; the engine moves them on only along their lifecycle."""
    from warehouse_gdpr.engine import propagation

    dag_conn.commit()  # its inserts above, checked at COMMIT
    assert conn.execute("SELECT request_id, status FROM gdpr.request WHERE request_id LIKE 'REQ-V9-%'"
                        " ORDER BY 1").fetchall() == [("REQ-V9-DONE", "completed"), ("REQ-V9-NEW", "registered"),
                                                      ("REQ-V9-PENDING", "pending_propagation")]
    conn.rollback()
    with pytest.raises(errors.InsufficientPrivilege), dag_conn.transaction():  # completed back to pending
        dag_conn.execute("UPDATE gdpr.request SET status = 'pending_propagation', completed_at = NULL"
                         " WHERE request_id = 'REQ-V9-DONE'")
    with pytest.raises(errors.InsufficientPrivilege), dag_conn.transaction():  # acknowledged without its audit row
        dag_conn.execute("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                         " key_id = NULL, nonce = NULL, identifier_ciphertext = NULL"
                         " WHERE request_id = 'REQ-V9-PENDING' AND target = 'telephony'")
    with dag_conn.transaction():  # acknowledged with it, as propagation.propagate does
        dag_conn.execute("UPDATE gdpr.erasure_propagation SET attempts = attempts + 1, last_result = 'HTTP 204',"
                         " last_attempt_at = now() WHERE request_id = 'REQ-V9-PENDING' AND target = 'telephony'")
        audit.record(dag_conn, CTX, action="propagate", outcome="acknowledged", table="target:telephony",
                     details={"request_id": "REQ-V9-PENDING", "target": "telephony", "result": "HTTP 204"})
        dag_conn.execute("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                         " key_id = NULL, nonce = NULL, identifier_ciphertext = NULL"
                         " WHERE request_id = 'REQ-V9-PENDING' AND target = 'telephony'")
    record = propagation.complete_if_acknowledged(dag_conn, CTX, "REQ-V9-PENDING")
    assert record is not None and record["status"] == "completed" and record["rows_by_table"] == {"crm.contacts": 1}


# -- version 7: one request lifecycle (gdpr.request), the erasure requests migrated in place -----------

OLD_COLUMNS = ("request_id, subject_hash, received_at, due_date, status, outcome, reason, created_at, completed_at,"
               " deadline_warned_at, details")
# The claim of a worker that died mid-call (version 5's outbox lease): kept by the upgrade, it expires by itself.
DEAD_CLAIM = ("2026-05-21 11:05+00", "gdpr_erasure_retry/scheduled__2026-05-21/propagate/0123456789ab")


def _fill_old_version(conn: psycopg.Connection) -> None:
    """Erasure requests and their outbox as an older engine wrote them: completed, pending, refused; from
    version 5 on, the pending outbox row also carries the claim of a worker that died mid-call."""
    with conn.transaction():
        conn.execute(
            f"INSERT INTO gdpr.erasure_request ({OLD_COLUMNS}) VALUES"
            " ('REQ-OLD-1', repeat('1', 64), '2026-01-31', '2026-02-28', 'completed', 'erased', 'no legal hold',"
            "  '2026-02-01 10:00+00', '2026-02-02 09:00+00', NULL, '{\"rows\": {\"crm.contacts\": 1},"
            "  \"targets\": [\"emailing\"], \"holds\": []}'),"
            " ('REQ-OLD-2', repeat('2', 64), '2026-05-20', '2026-06-20', 'pending_propagation', 'restricted',"
            "  'legal hold: litigation', '2026-05-21 10:00+00', NULL, '2026-06-14 00:00+00',"
            "  '{\"rows\": {\"crm.notes\": 4}, \"targets\": [\"emailing\", \"telephony\"],"
            "  \"holds\": [\"litigation\"]}'),"
            " ('REQ-OLD-3', repeat('3', 64), '2026-04-01', '2026-05-01', 'refused', 'refused', 'legal hold: tax',"
            "  '2026-04-02 10:00+00', '2026-04-02 10:00+00', NULL, '{}')"
        )
        conn.execute(
            "INSERT INTO gdpr.erasure_propagation (request_id, target, status, attempts, key_id, nonce,"
            " identifier_ciphertext, last_result, acknowledged_at) VALUES"
            " ('REQ-OLD-1', 'emailing', 'acknowledged', 1, NULL, NULL, NULL, 'HTTP 204', '2026-02-02 09:00+00'),"
            " ('REQ-OLD-2', 'emailing', 'acknowledged', 2, NULL, NULL, NULL, 'HTTP 204', '2026-05-21 11:00+00'),"
            " ('REQ-OLD-2', 'telephony', 'pending', 7, 'archive-1', '\\x00'::bytea, '\\x01'::bytea, 'HTTP 503', NULL)"
        )
        if schema.installed_version(conn) >= 5:
            conn.execute("UPDATE gdpr.erasure_propagation SET claimed_until = %s, claimed_by = %s"
                         " WHERE request_id = 'REQ-OLD-2' AND target = 'telephony'", DEAD_CLAIM)


def _snapshot(conn: psycopg.Connection) -> tuple[list[tuple], list[tuple]]:
    requests = conn.execute(f"SELECT {OLD_COLUMNS} FROM gdpr.erasure_request ORDER BY request_id").fetchall()
    outbox = conn.execute("SELECT * FROM gdpr.erasure_propagation ORDER BY request_id, target").fetchall()
    conn.rollback()
    return requests, outbox


@pytest.mark.parametrize("steps", [(4,), (5,), (6,), (5, 6), (4, 5, 6)],
                         ids=["from-v4", "from-v5", "from-v6", "v5-then-v6", "v4-then-v5-then-v6"])
def test_a_warehouse_with_erasure_requests_upgrades_in_place(
    conn: psycopg.Connection, dag_conn: psycopg.Connection, steps: tuple[int, ...]
) -> None:
    """Installed at steps[0] and filled, upgraded in place by each later release's DDL in turn (as an operator
    who upgraded one release at a time did), then by this one's."""
    _install_version(conn, steps[0])
    _fill_old_version(conn)
    for version in steps[1:]:
        with conn.transaction():
            conn.execute((DATA / f"gdpr_schema_v{version}.sql").read_text(encoding="utf-8"))  # type: ignore[arg-type]
        assert schema.installed_version(conn) == version
    requests_before, outbox_before = _snapshot(conn)
    assert len(requests_before) == 3 and len(outbox_before) == 3
    if steps[-1] < 5:  # version 5 adds the claim columns, empty
        outbox_before = [(*row, None, None) for row in outbox_before]

    assert schema.ensure_schema(conn) is True

    assert schema.installed_version(conn) == schema.SCHEMA_VERSION
    assert _relkind(conn, "gdpr.erasure_request") == "v"
    assert conn.execute("SELECT to_regclass('gdpr_archive.archived_row_subject_idx')").fetchone()[0] is not None  # v6
    # Every row kept, column for column, readable under the old name; the outbox untouched, claims included.
    assert _snapshot(conn) == (requests_before, outbox_before)
    claim = conn.execute("SELECT claimed_until, claimed_by FROM gdpr.erasure_propagation"
                         " WHERE request_id = 'REQ-OLD-2' AND target = 'telephony'").fetchone()
    assert claim[1] == (DEAD_CLAIM[1] if steps[0] >= 5 else None)  # filled at version 5: a claim to keep
    migrated = conn.execute(
        f"SELECT {OLD_COLUMNS} FROM gdpr.request WHERE kind = 'erasure' ORDER BY request_id").fetchall()
    assert migrated == requests_before
    assert conn.execute("SELECT count(*) FROM gdpr.request WHERE identifier_ciphertext IS NOT NULL"
                        " OR extended_due_date IS NOT NULL").fetchone()[0] == 0
    # The outbox's foreign key now points at gdpr.request, and holds.
    fks = conn.execute(
        "SELECT conname, confrelid::regclass::text FROM pg_constraint"
        " WHERE conrelid = 'gdpr.erasure_propagation'::regclass AND contype = 'f'").fetchall()
    assert fks == [("erasure_propagation_request_fkey", "gdpr.request")]
    conn.commit()
    with pytest.raises(errors.ForeignKeyViolation), conn.transaction():
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status)"
                     " VALUES ('REQ-NONE', 'x', 'pending')")

    # Idempotent: running the installer or the DDL again changes nothing.
    assert schema.ensure_schema(conn) is False
    with conn.transaction():
        conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
    assert _snapshot(conn) == (requests_before, outbox_before)

    # The engine carries on with the migrated rows: the engine's role claims the pending row (the dead
    # worker's claim has expired), the target acknowledges, the request completes.
    from warehouse_gdpr.engine import propagation

    claimed = dag_conn.execute(
        "UPDATE gdpr.erasure_propagation p SET claimed_until = now() + interval '1 minute', claimed_by = 'test'"
        " FROM gdpr.request r WHERE r.request_id = p.request_id AND p.request_id = 'REQ-OLD-2' AND p.status = 'pending'"
        " AND (p.claimed_until IS NULL OR p.claimed_until <= now()) RETURNING p.target, r.subject_hash"
    ).fetchall()
    dag_conn.commit()
    assert claimed == [("telephony", "2" * 64)]
    with conn.transaction():
        conn.execute("UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                     " claimed_until = NULL, claimed_by = NULL, key_id = NULL, nonce = NULL,"
                     " identifier_ciphertext = NULL"
                     " WHERE request_id = 'REQ-OLD-2'")
    certificate = propagation.complete_if_acknowledged(dag_conn, CTX, "REQ-OLD-2")
    assert certificate is not None and certificate["status"] == "completed" and certificate["outcome"] == "restricted"
    assert certificate["rows_by_table"] == {"crm.notes": 4} and len(certificate["targets"]) == 2
    assert conn.execute("SELECT status, completed_at IS NOT NULL FROM gdpr.erasure_request"
                        " WHERE request_id = 'REQ-OLD-2'").fetchone() == ("completed", True)


def test_a_dbas_view_on_the_old_table_stops_the_upgrade_loudly(conn: psycopg.Connection) -> None:
    """A view reading gdpr.erasure_request would otherwise follow the rows anywhere: the upgrade refuses to
    guess, says why, and leaves the previous version as it was."""
    _install_version(conn, 6)
    _fill_old_version(conn)
    with conn.transaction():
        conn.execute("CREATE VIEW public.dba_erasures AS SELECT request_id, status FROM gdpr.erasure_request")
    with pytest.raises(errors.DependentObjectsStillExist) as info:
        schema.ensure_schema(conn)
    assert "dba_erasures" in (info.value.diag.message_detail or "")
    conn.rollback()
    assert schema.installed_version(conn) == 6
    assert _count(conn, "gdpr.erasure_request") == 3
    assert conn.execute("SELECT to_regclass('gdpr.request')").fetchone()[0] is None


def _request_row(conn: psycopg.Connection, request_id: str = "REQ-G-1", status: str = "registered") -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at, key_id, nonce, identifier_ciphertext) VALUES (%s, 'erasure', repeat('c', 64),"
            " '2026-06-01', '2026-07-01', %s, CASE WHEN %s = 'registered' THEN NULL ELSE 'erased' END,"
            " CASE WHEN %s = 'completed' THEN now() END, 'archive-1', '\\x00', '\\x01')",
            (request_id, status, status, status),
        )
        # the engine's role (set_role) registers or runs a request with its audit row (version 10)
        audit.record(conn, CTX, action="register_request" if status == "registered" else "erasure_request",
                     outcome="registered" if status == "registered" else "erased", details={"request_id": request_id})


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE gdpr.request SET kind = 'access'",
        "UPDATE gdpr.request SET received_at = '2020-01-01'",
        "UPDATE gdpr.request SET due_date = '2030-01-01'",
        "UPDATE gdpr.request SET created_at = now()",
        "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, created_at)"
        " VALUES ('REQ-X', 'access', 'h', current_date, current_date, 'registered', '2020-01-01')",
    ],
)
def test_engine_may_not_rewrite_what_a_request_is(engine: psycopg.Connection, conn: psycopg.Connection,
                                                   statement: str) -> None:
    _request_row(conn)
    with pytest.raises(errors.InsufficientPrivilege) as info, engine.transaction():
        engine.execute(statement)
    assert info.value.diag.message_primary.startswith("permission denied for")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO gdpr.erasure_request (request_id, subject_hash, received_at, due_date, status, outcome)"
        " VALUES ('REQ-X', 'h', current_date, current_date, 'completed', 'erased')",
        "UPDATE gdpr.erasure_request SET status = 'completed', outcome = 'erased', completed_at = now()",
        "DELETE FROM gdpr.erasure_request",
    ],
)
def test_a_write_through_the_old_name_fails_loudly(engine: psycopg.Connection, conn: psycopg.Connection,
                                                  statement: str) -> None:
    """gdpr.erasure_request is a read-only view now: an old writer gets an error, never a silent no-op."""
    _request_row(conn, status="completed")
    with pytest.raises((errors.InsufficientPrivilege, errors.FeatureNotSupported)), engine.transaction():
        engine.execute(statement)
    assert engine.execute("SELECT status, outcome FROM gdpr.request").fetchall() == [("completed", "erased")]


def test_an_open_request_is_never_deleted_and_an_extension_never_rewritten(conn: psycopg.Connection) -> None:
    _request_row(conn, "REQ-G-OPEN")
    _request_row(conn, "REQ-G-DONE", status="completed")
    with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():
        conn.execute("DELETE FROM gdpr.request")  # the owner too
    assert info.value.diag.message_primary == "gdpr.request: request REQ-G-OPEN is not complete and may not be deleted"
    with conn.transaction():
        conn.execute("UPDATE gdpr.request SET extended_due_date = '2026-09-01', extension_reason = 'complex',"
                     " extended_at = now() WHERE request_id = 'REQ-G-OPEN'")
    for change in ("extended_due_date = '2026-08-01'", "extension_reason = 'other'",
                   "extended_due_date = NULL, extension_reason = NULL, extended_at = NULL"):
        with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():
            conn.execute(f"UPDATE gdpr.request SET {change} WHERE request_id = 'REQ-G-OPEN'")
        assert "was already extended; an extension is given once" in info.value.diag.message_primary
    with pytest.raises(errors.CheckViolation), conn.transaction():  # beyond three months after receipt
        conn.execute("UPDATE gdpr.request SET extended_due_date = '2026-09-02', extension_reason = 'x',"
                     " extended_at = now() WHERE request_id = 'REQ-G-DONE'")
    with pytest.raises(errors.CheckViolation), conn.transaction():  # reason capped at 500 characters
        conn.execute("UPDATE gdpr.request SET extended_due_date = '2026-09-01',"
                     " extension_reason = repeat('x', 501), extended_at = now() WHERE request_id = 'REQ-G-DONE'")
    with conn.transaction():
        assert conn.execute("DELETE FROM gdpr.request WHERE request_id = 'REQ-G-DONE'").rowcount == 1


def test_auditor_reads_requests_but_not_the_encrypted_identifier(conn: psycopg.Connection) -> None:
    _request_row(conn, "REQ-G-AUD", status="completed")
    auditor = _as_role(conn, "gdpr_auditor")
    assert auditor.execute("SELECT request_id, kind, status FROM gdpr.request").fetchall() == [
        ("REQ-G-AUD", "erasure", "completed")]
    assert auditor.execute("SELECT request_id, status FROM gdpr.erasure_request").fetchall() == [
        ("REQ-G-AUD", "completed")]
    auditor.commit()
    for column in ("identifier_ciphertext", "nonce", "key_id"):
        with pytest.raises(errors.InsufficientPrivilege), auditor.transaction():
            auditor.execute(f"SELECT {column} FROM gdpr.request")


def test_version_5_adds_the_outbox_claim_and_keeps_pending_erasures(
    conn: psycopg.Connection, dag_conn: psycopg.Connection
) -> None:
    """v5's step (with the later ones): the outbox of a v4 warehouse gets claimed_until/claimed_by, its rows
    kept, and the engine's role may claim a row (propagation holds no transaction across a downstream call)."""
    _install_version(conn, 4)
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.erasure_request (request_id, subject_hash, received_at, due_date, status,"
                     " outcome) VALUES ('REQ-V5', repeat('b', 64), current_date, current_date + 30,"
                     " 'pending_propagation', 'erased')")
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status, key_id, nonce,"
                     " identifier_ciphertext) VALUES ('REQ-V5', 'emailing', 'pending', 'k1', '\\x00', '\\x01')")
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

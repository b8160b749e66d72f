"""The demo can never touch a real warehouse: it reads its own variable, and refuses to drop schemas
holding rows it did not create (a control schema with audit rows or requests, a real `crm`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from warehouse_gdpr.engine import audit, schema
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr_demo import data, run, safety


@pytest.fixture
def real_warehouse(server_url: str) -> Iterator[str]:
    """A database the demo did not seed: the control schema installed, one audit row of a real run."""
    name = f"gdpr_real_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(server_url, dbname=name)
    with psycopg.connect(url) as conn:
        schema.ensure_schema(conn)
        with conn.transaction():
            audit.record(conn, RunContext("gdpr_subject_erasure", "manual__real", "erase", False),
                         action="erasure_request", outcome="erased")
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _audit_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0]  # type: ignore[index]


def test_the_demo_reads_its_own_variable_not_the_operators_warehouse_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAREHOUSE_URL", "postgresql://owner@real-warehouse/prod")
    monkeypatch.setenv("WAREHOUSE_GDPR_DEMO_URL", "postgresql://owner@demo-host/demo")
    assert run.warehouse_url() == ("postgresql://owner@demo-host/demo", False)


def test_seed_refuses_a_control_schema_with_audit_rows_it_did_not_create(real_warehouse: str) -> None:
    before = _audit_rows(real_warehouse)
    with pytest.raises(safety.NotADemoWarehouse, match="refusing to run the demo here: .*gdpr.audit_log"):
        run.seed_warehouse(real_warehouse, 20)
    assert _audit_rows(real_warehouse) == before == 1
    with psycopg.connect(real_warehouse) as conn:
        assert conn.execute("SELECT to_regnamespace('crm')").fetchone()[0] is None  # nothing created either


def test_data_seed_refuses_a_real_crm_schema(server_url: str) -> None:
    name = f"gdpr_realcrm_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(make_conninfo(server_url, dbname=name)) as conn:
            conn.execute("CREATE SCHEMA crm; CREATE TABLE crm.contacts (id int); INSERT INTO crm.contacts VALUES (1)")
            conn.commit()
            with pytest.raises(safety.NotADemoWarehouse, match="crm.contacts"):
                data.seed(conn, contacts=10)
            assert conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0] == 1  # type: ignore[index]
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_main_exits_with_a_clear_error_and_changes_nothing(
    real_warehouse: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WAREHOUSE_GDPR_DEMO_URL", real_warehouse)
    monkeypatch.setenv("DEMO_CONTACTS", "20")
    assert run.main() == 2
    err = capsys.readouterr().err
    assert "refusing to run the demo here" in err and "WAREHOUSE_GDPR_DEMO_URL" in err
    assert _audit_rows(real_warehouse) == 1


def test_a_database_the_demo_seeded_can_be_reseeded(server_url: str) -> None:
    name = f"gdpr_demo_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(server_url, dbname=name)
    try:
        run.seed_warehouse(url, 20)
        with psycopg.connect(url) as conn, conn.transaction():
            audit.record(conn, RunContext("gdpr_retention_sweep", "demo", "apply", False), action="batch",
                         outcome="done")
        counts = run.seed_warehouse(url, 30)  # marked as the demo's: its history may start over
        assert counts["contacts"] == 30
        assert _audit_rows(url) == 0
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

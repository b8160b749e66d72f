"""warehouse_gdpr_demo.compose_seed, the compose stack's `warehouse-init`: run against a real empty database and
real demo services, then run again (as `docker compose up` does after a restart): nothing is reseeded, but
a control schema left by an older version of the package is upgraded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from warehouse_gdpr.engine import schema
from warehouse_gdpr_demo import compose_seed
from warehouse_gdpr_demo.services import DemoService, start_emailing, start_telephony

KEY, TOKEN, PASSWORD = "seed-test-key", "seed-test-token", "seed-test-password"


@pytest.fixture
def empty_db(server_url: str) -> Iterator[tuple[str, str]]:
    """(URL of an empty warehouse database, name of the desk database to create); both dropped after."""
    warehouse, desk = f"gdpr_compose_{uuid.uuid4().hex[:10]}", f"gdpr_compose_desk_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(warehouse)))
    try:
        yield make_conninfo(server_url, dbname=warehouse), desk
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            for name in (warehouse, desk):
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute("ALTER ROLE gdpr_dag PASSWORD NULL")  # other tests log in without one


@pytest.fixture
def services() -> Iterator[tuple[DemoService, DemoService]]:
    emailing, telephony = start_emailing(KEY), start_telephony(TOKEN)
    yield emailing, telephony
    emailing.stop()
    telephony.stop()


def test_seeds_once_then_leaves_the_warehouse_alone(
    empty_db: tuple[str, str], services: tuple[DemoService, DemoService], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, desk = empty_db
    emailing, telephony = services
    monkeypatch.setenv("WAREHOUSE_GDPR_DEMO_URL", url)
    monkeypatch.setenv("GDPR_DAG_PASSWORD", PASSWORD)
    monkeypatch.setenv("DEMO_EMAILING_API_KEY", KEY)
    monkeypatch.setenv("DEMO_TELEPHONY_TOKEN", TOKEN)
    args = ["--emailing-url", emailing.base_url, "--telephony-url", telephony.base_url + "/",
            "--contacts", "80", "--desk-db", desk]

    assert compose_seed.main(args) == 0
    first = capsys.readouterr().out
    assert "Seeded the demo CRM: " in first and "80 contacts" in first
    synced = emailing.contact_count()
    assert synced > 0 and telephony.contact_count() == synced
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT max(version) FROM gdpr.schema_version").fetchone()[0] is not None  # type: ignore[index]
        assert conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0] == 80  # type: ignore[index]
        # What the DAGs' login role may do is what make demo grants it.
        assert conn.execute("SELECT pg_has_role('gdpr_dag', 'gdpr_engine', 'member')").fetchone()[0]  # type: ignore[index]
        if conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:  # type: ignore[index]
            assert conn.execute(
                "SELECT rolcanlogin AND rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'gdpr_dag'"
            ).fetchone()[0]  # type: ignore[index]
        # A change made in between (a run of the DAGs) must survive the next `docker compose up`.
        conn.execute("UPDATE crm.contacts SET first_name = 'Changed' WHERE contact_id = 1")
        # A volume seeded by an older version of the package: control schema version 3.
        conn.execute("ALTER TABLE gdpr.erasure_propagation DROP COLUMN claimed_until, DROP COLUMN claimed_by")
        conn.execute("DROP TABLE gdpr.processing_register")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version >= 4")
    with psycopg.connect(make_conninfo(url, dbname=desk)) as conn:
        assert conn.execute("SELECT count(*) FROM desk.tickets").fetchone()[0] == synced  # type: ignore[index]
    for email in list(emailing.contacts_snapshot())[:3]:
        assert email not in first  # counts only on stdout

    assert compose_seed.main(args) == 0
    second = capsys.readouterr().out
    assert "seeded already" in second and "Seeded the demo CRM" not in second
    assert f"Upgraded the control schema from version 3 to {schema.SCHEMA_VERSION}." in second
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT first_name FROM crm.contacts WHERE contact_id = 1").fetchone()[0] == "Changed"  # type: ignore[index]
        assert schema.installed_version(conn) == schema.SCHEMA_VERSION
        assert conn.execute("SELECT to_regclass('gdpr.processing_register')").fetchone()[0] is not None  # type: ignore[index]
    assert emailing.contact_count() == synced

    assert compose_seed.main(args) == 0  # and nothing to upgrade the time after
    assert "Upgraded" not in capsys.readouterr().out


def test_refuses_to_run_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDPR_DAG_PASSWORD", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        compose_seed.main(["--emailing-url", "http://x", "--telephony-url", "http://y"])
    assert exit_info.value.code == 2

"""Shared fixtures: a real PostgreSQL (embedded, or $WAREHOUSE_TEST_URL), a seeded template database
cloned per test, generated keys, and a throw-away Airflow home on SQLite for dag.test().

Airflow reads its configuration when first imported, so the Airflow environment is set here, at
import time of this conftest, before any test module imports airflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(tempfile.mkdtemp(prefix="warehouse-gdpr-tests-"))
TODAY = date(2026, 6, 15)  # the seeded template's "today": fixed so that tests are reproducible

os.environ["AIRFLOW_HOME"] = str(RUNTIME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["WAREHOUSE_GDPR_POLICY"] = str(ROOT / "include" / "policy.yaml")
sys.path.insert(0, str(ROOT / "plugins"))

from warehouse_gdpr.engine import schema  # noqa: E402
from warehouse_gdpr.engine.crypto import Keys, generate_extras  # noqa: E402
from warehouse_gdpr.engine.policy import Policy, load_policy  # noqa: E402
from warehouse_gdpr_demo import data as demo_data  # noqa: E402
from warehouse_gdpr_demo import embedded  # noqa: E402
from warehouse_gdpr_demo.sqlfiles import read_sql  # noqa: E402

TEMPLATE_DB = "gdpr_test_template"
TEMPLATE_CONTACTS = 1500


def _with_db(url: str, dbname: str, user: str | None = None) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    if user:
        params["user"] = user
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """Admin URL of the PostgreSQL server the tests use."""
    external = os.environ.get("WAREHOUSE_TEST_URL")
    if external:
        yield external
        return
    url = embedded.start(RUNTIME / "pg")
    try:
        yield url
    finally:
        embedded.stop(RUNTIME / "pg")
        shutil.rmtree(RUNTIME, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> str:
    """A database with the demo CRM (seeded for TODAY), the control schema and the demo grants."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    with psycopg.connect(_with_db(server_url, TEMPLATE_DB)) as conn:
        demo_data.seed(conn, contacts=TEMPLATE_CONTACTS, seed=7, today=TODAY)
        schema.ensure_schema(conn)
        with conn.transaction():
            conn.execute(read_sql("demo_grants.sql"))  # type: ignore[arg-type]
    return TEMPLATE_DB


@pytest.fixture
def warehouse(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh copy of the template database for one test; returns its owner URL."""
    name = f"gdpr_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    with psycopg.connect(_with_db(server_url, name)) as copy:
        # A copy of a database is a fork of its audit chain (same chain id); each test's warehouse is a
        # warehouse of its own, whose exported heads must not meet another's in the shared $AIRFLOW_HOME.
        copy.execute("UPDATE gdpr.audit_chain_head SET chain_id = n.id, row_hash = gdpr.audit_chain_genesis(n.id)"
                     " FROM (SELECT gen_random_uuid() AS id) AS n WHERE chain_seq = 0")
    try:
        yield _with_db(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def conn(warehouse: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(warehouse) as connection:
        yield connection


@pytest.fixture(scope="session")
def key_extras() -> tuple[dict[str, object], dict[str, object]]:
    """(the keys connection's extra, the archive's private connection's extra), as `make demo` generates them."""
    return generate_extras()


@pytest.fixture(scope="session")
def key_extra(key_extras: tuple[dict[str, object], dict[str, object]]) -> dict[str, object]:
    return key_extras[0]


@pytest.fixture(scope="session")
def private_extra(key_extras: tuple[dict[str, object], dict[str, object]]) -> dict[str, object]:
    return key_extras[1]


@pytest.fixture(scope="session")
def public_keys(key_extra: dict[str, object]) -> Keys:
    """What every task holds: the pepper, the store key, the archive's public key (no private key)."""
    return Keys.from_extra(key_extra)


@pytest.fixture(scope="session")
def keys(public_keys: Keys, private_extra: dict[str, object]) -> Keys:
    """Every key, the archive's private key included (what the access request and legal hold)."""
    return public_keys.with_private(private_extra)


@pytest.fixture(scope="session")
def policy() -> Policy:
    return load_policy(ROOT / "include" / "policy.yaml")


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """Airflow's SQLite metadata DB, migrated once per session."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=dict(os.environ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return Path(os.environ["AIRFLOW_HOME"])


@pytest.fixture
def airflow_conns(
    monkeypatch: pytest.MonkeyPatch, warehouse: str, key_extra: dict[str, object], private_extra: dict[str, object]
) -> str:
    """Point the DAGs' connections at this test's warehouse copy, as the least-privileged gdpr_dag role
    (on an external $WAREHOUSE_TEST_URL server, with its own credentials: gdpr_dag has no password there)."""
    url = warehouse if os.environ.get("WAREHOUSE_TEST_URL") else _with_db(
        warehouse, conninfo_to_dict(warehouse)["dbname"], user="gdpr_dag")  # type: ignore[arg-type]
    conn = embedded.airflow_conn_json(url)
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_KEYS", json.dumps({"conn_type": "generic", "extra": key_extra}))
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_ARCHIVE_PRIVATE",
                       json.dumps({"conn_type": "generic", "extra": private_extra}))
    return warehouse


# -- erasure: real downstream services on 127.0.0.1 and a support-desk database ------------------

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ["no_proxy"] = os.environ["NO_PROXY"]


class Downstream:
    """The three demo targets of the policy's erasure section, running for one test."""

    def __init__(self, emailing, telephony, desk_url: str, webhook=None) -> None:  # type: ignore[no-untyped-def]
        self.emailing = emailing
        self.telephony = telephony
        self.desk_url = desk_url
        self.webhook = webhook  # the sales team's webhook (restriction.notify)

    def add_person(self, email: str) -> None:
        self.emailing.add_contact(email, attributes={"FIRSTNAME": "Zoé"})
        self.telephony.add_contact(email, phone="+33 6 00 00 00 00")
        with psycopg.connect(self.desk_url) as desk:
            tid = desk.execute(
                "INSERT INTO desk.tickets (requester_email, subject) VALUES (%s, 'Invoice question')"
                " RETURNING ticket_id",
                (email,),
            ).fetchone()[0]  # type: ignore[index]
            desk.execute("INSERT INTO desk.ticket_messages (ticket_id, body) VALUES (%s, 'Hello, Zoé here')", (tid,))

    def desk_rows(self, email: str) -> int:
        with psycopg.connect(self.desk_url) as desk:
            return desk.execute(
                "SELECT count(*) FROM desk.tickets WHERE lower(requester_email) = lower(%s)", (email,)
            ).fetchone()[0]  # type: ignore[index]


@pytest.fixture
def downstream(server_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Downstream]:
    from warehouse_gdpr_demo.services import start_emailing, start_telephony, start_webhook

    name = f"gdpr_desk_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    desk_url = _with_db(server_url, name)
    with psycopg.connect(desk_url) as desk:
        desk.execute(read_sql("demo_support_desk.sql"))  # type: ignore[arg-type]
    emailing = start_emailing("test-api-key")
    telephony = start_telephony("test-token")
    monkeypatch.setenv("AIRFLOW_CONN_EMAILING", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": emailing.port, "schema": "http",
         "extra": {"api-key": "test-api-key"}}))
    monkeypatch.setenv("AIRFLOW_CONN_TELEPHONY", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": telephony.port, "schema": "http",
         "extra": {"Authorization": "Bearer test-token"}}))
    monkeypatch.setenv("AIRFLOW_CONN_SUPPORT_DESK", json.dumps(embedded.airflow_conn_json(desk_url)))
    webhook = start_webhook("test-webhook-token")
    monkeypatch.setenv("AIRFLOW_CONN_SALES_WEBHOOK", json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "port": webhook.port, "schema": "http",
         "extra": {"Authorization": "Bearer test-webhook-token"}}))
    services = Downstream(emailing, telephony, desk_url, webhook)
    try:
        yield services
    finally:
        services.emailing.stop()
        services.telephony.stop()
        webhook.stop()
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fast_retry_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo policy with erasure retries short enough for dag.test() (which waits real time)."""
    import yaml

    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["retries"] = 1
    data["erasure"]["retry_delay_seconds"] = 1
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return path


@pytest.fixture
def no_targets(tmp_path: Path) -> Policy:
    """The demo policy without downstream targets (for what the warehouse alone holds: the access request's
    tests)."""
    import yaml

    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["targets"] = []
    data["processing_register"]["activities"][0]["processors"][1]["targets"] = []
    path = tmp_path / "no_targets.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_policy(path)

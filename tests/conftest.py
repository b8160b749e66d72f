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

from warehouse_gdpr import demo_data, embedded, schema  # noqa: E402
from warehouse_gdpr.crypto import Keys, generate_extra  # noqa: E402
from warehouse_gdpr.policy import Policy, load_policy  # noqa: E402
from warehouse_gdpr.sqlfiles import read_sql  # noqa: E402

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
def key_extra() -> dict[str, object]:
    return generate_extra()


@pytest.fixture(scope="session")
def keys(key_extra: dict[str, object]) -> Keys:
    return Keys.from_extra(key_extra)


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
    monkeypatch: pytest.MonkeyPatch, warehouse: str, key_extra: dict[str, object]
) -> str:
    """Point the DAGs' connections at this test's warehouse copy, as the least-privileged gdpr_dag role."""
    dag_url = _with_db(warehouse, conninfo_to_dict(warehouse)["dbname"], user="gdpr_dag")  # type: ignore[arg-type]
    params = conninfo_to_dict(dag_url)
    conn = {
        "conn_type": "postgres",
        "host": params.get("host", ""),
        "login": params.get("user", ""),
        "password": params.get("password", "") or "",
        "schema": params["dbname"],
    }
    if params.get("port"):
        conn["port"] = int(params["port"])  # type: ignore[arg-type]
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_KEYS", json.dumps({"conn_type": "generic", "extra": key_extra}))
    return warehouse

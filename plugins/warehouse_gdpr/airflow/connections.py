"""Airflow glue: where the policy file is, and how a task gets its connections and keys.

Nothing here runs at DAG import time except `policy_path()` (no file, database or network access).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy, load_policy

if TYPE_CHECKING:
    from warehouse_gdpr.engine.catalog import CatalogReport

log = logging.getLogger(__name__)

POLICY_ENV = "WAREHOUSE_GDPR_POLICY"


def policy_path() -> Path:
    """$WAREHOUSE_GDPR_POLICY, else the repository's include/policy.yaml."""
    override = os.environ.get(POLICY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "include" / "policy.yaml"


def airflow_home() -> Path:
    """$AIRFLOW_HOME (where relative output paths of the policy go), else ~/airflow like Airflow itself."""
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def connect(policy: Policy) -> psycopg.Connection:
    """A psycopg 3 connection to the warehouse through the policy's Airflow connection."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=policy.airflow.warehouse_connection_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise RuntimeError("warehouse-gdpr needs psycopg 3: install apache-airflow-providers-postgres with psycopg")
    conn.autocommit = False
    return conn


def load_keys(policy: Policy) -> Keys:
    """Keys from the policy's keys connection (any Airflow secrets backend)."""
    from airflow.sdk import BaseHook

    conn_id = policy.airflow.keys_connection_id
    try:
        connection = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException and backend errors alike
        raise RuntimeError(
            f"the keys connection {conn_id!r} is not defined ({type(exc).__name__}); create it with the "
            "hmac_pepper and archive_keys extras (see README, 'Keys')"
        ) from None
    return Keys.from_extra(connection.extra_dejson, conn_id)


def run_context(context: Any, dry_run: bool) -> RunContext:
    return RunContext(
        dag_id=context["dag"].dag_id,
        run_id=context["run_id"],
        task_id=context["ti"].task_id,
        dry_run=dry_run,
    )


def as_of(context: Any) -> str:
    """The instant the retention clocks are measured against: the run's data interval end (stable on retry)."""
    moment = context.get("data_interval_end") or context.get("logical_date") or context["dag_run"].run_after
    return moment.isoformat()


def prepare_warehouse(conn: psycopg.Connection, policy: Policy) -> "CatalogReport":
    """Before any write: install the control schema if missing, check the policy against the live
    catalog, log its warnings (indexes, rules that select nobody). Configuration errors fail the task at once (no retry)."""
    from airflow.sdk.exceptions import AirflowFailException

    from warehouse_gdpr.engine import catalog, schema

    try:
        schema.ensure_schema(conn)
        report = catalog.check_policy(conn, policy)
    except (catalog.CatalogError, schema.SchemaError) as exc:
        log.error("%s", exc)
        raise AirflowFailException(str(exc)) from None
    for warning in report.warnings:
        log.warning("policy check: %s", warning)
    return report

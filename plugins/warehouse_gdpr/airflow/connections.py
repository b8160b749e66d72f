"""Airflow glue: where the policy file is, how a task gets its connections and keys, and the one
policy of a run (`run_policy`).

Nothing here runs at DAG import time except `policy_path()` (no file, database or network access).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import tuple_row

from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys
from warehouse_gdpr.engine.errors import ConfigurationError
from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from warehouse_gdpr.engine.auditchain import PathHeadStore
    from warehouse_gdpr.engine.catalog import CatalogReport

log = logging.getLogger(__name__)

POLICY_ENV = "WAREHOUSE_GDPR_POLICY"
PIN_KEY = "policy_sha256"  # the XCom of a run's first task: the SHA-256 of the policy file it validated


def policy_path() -> Path:
    """The policy file named by $WAREHOUSE_GDPR_POLICY (for DAGs built without an explicit path).

    There is no fallback: a file guessed next to the installed package (a virtualenv's lib folder, once
    installed from the wheel) is never the one the operator means."""
    override = os.environ.get(POLICY_ENV)
    if override:
        return Path(override)
    raise ConfigurationError(
        f"no policy file: set {POLICY_ENV} to its path, or pass the path to warehouse_gdpr.dags.build_all(path) "
        "in your dags file (README, 'Deploy to your Airflow')"
    )


def airflow_home() -> Path:
    """$AIRFLOW_HOME (where relative output paths of the policy go), else ~/airflow like Airflow itself."""
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def evidence_store(policy: Policy) -> PathHeadStore:
    """The policy's `evidence.location` as an `airflow.sdk.ObjectStoragePath` (a URL as given; a folder
    as a file:// URL, a relative one under $AIRFLOW_HOME), behind the engine's head-store interface."""
    from airflow.sdk import ObjectStoragePath

    from warehouse_gdpr.airflow.storage import root_url
    from warehouse_gdpr.engine.auditchain import PathHeadStore

    return PathHeadStore(ObjectStoragePath(root_url(policy.evidence.location, airflow_home())))


def policy_pinned(context: Any) -> bool:
    """Whether the run's first task validated and pinned a policy (`run_policy`)."""
    first = [t.task_id for t in context["dag"].roots]
    return any(context["ti"].xcom_pull(task_ids=task_id, key=PIN_KEY) for task_id in first)


def connect(policy: Policy) -> psycopg.Connection:
    """A psycopg 3 connection to the warehouse through the policy's Airflow connection."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=policy.airflow.warehouse_connection_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise ConfigurationError(
            "warehouse-gdpr needs psycopg 3: install apache-airflow-providers-postgres with psycopg")
    conn.autocommit = False
    # The engine unpacks rows as tuples, whatever the connection's extra asks for ({"cursor": "dictcursor"}).
    conn.row_factory = tuple_row
    return conn


def load_keys(policy: Policy, archive_private: bool = False) -> Keys:
    """Keys from the policy's keys connection (any Airflow secrets backend). With `archive_private` (the
    access request, the archive-reading commands: nothing else), also the archive's private keys from the
    policy's `archive_private_connection_id` connection, which every other task does without: the sweep and
    erasure encrypt to the public key. Required then when the keys connection lists a public archive key, with
    the private key of each public key it lists."""
    from airflow.sdk import BaseHook

    conn_id = policy.airflow.keys_connection_id
    private_id = policy.airflow.archive_private_connection_id
    try:
        connection = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException and backend errors alike
        raise KeyConfigError(
            f"the keys connection {conn_id!r} is not defined ({type(exc).__name__}); create it with the "
            "hmac_pepper, store and archive key extras (see README, 'Keys')"
        ) from None
    keys = Keys.from_extra(connection.extra_dejson, conn_id, private_connection_id=private_id)
    if not archive_private:
        return keys
    try:
        private = BaseHook.get_connection(private_id)
    except Exception as exc:  # noqa: BLE001 - as above
        if keys.archive_public_keys:
            raise KeyConfigError(
                f"the archive's private connection {private_id!r} is not defined ({type(exc).__name__}): reading "
                "the archive (encrypted to a public key) needs its archive_private_keys (see README, 'Keys')"
            ) from None
        return keys.with_private(None)  # the earlier layout: every archive key is symmetric
    keys = keys.with_private(private.extra_dejson, private_id)
    missing = sorted(set(keys.archive_public_keys) - set(keys.archive_private_keys))
    if missing:  # e.g. the compose stack's default: the connection defined, its extra empty
        raise KeyConfigError(
            f"the archive's private connection {private_id!r} lacks archive_private_keys for {missing}, the public "
            "key(s) of the keys connection: reading the archive needs them (see README, 'Keys')")
    return keys


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


def prepare_warehouse(conn: psycopg.Connection, policy: Policy) -> CatalogReport:
    """Before any write: install the control schema if missing, check the policy against the live
    catalog, log its warnings (indexes, rules that select nobody). Raises CatalogError or SchemaError
    (configuration errors: the task fails at once, see airflow/errors.py)."""
    from warehouse_gdpr.engine import catalog, schema

    schema.ensure_schema(conn)
    report = catalog.check_policy(conn, policy)
    for warning in report.warnings:
        log.warning("policy check: %s", warning)
    return report


def run_policy(policy_file: str | Path, context: Any) -> Policy:
    """The policy of this run, the same file for every task of it.

    The run's first task (the one with no upstream task) reads the file, parses exactly the bytes it
    read and pins their SHA-256 (XCom `policy_sha256`). Every later task reads the file again and
    refuses it (ConfigurationError: no retry) unless its SHA-256 is the pinned one, so `apply` never
    runs a file other than the one `check_policy` validated. Every task body of every DAG calls this.
    The first task also refuses a warehouse restored from a backup (`journal_tasks.refuse_if_restored`)."""
    path = Path(policy_file)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    sha256 = hashlib.sha256(content).hexdigest()
    ti = context["ti"]
    if not ti.task.upstream_task_ids:
        policy = load_policy(path, content)
        # A warehouse restored from a backup is refused before the policy is pinned (nothing of the run then
        # runs, the audit chain check included): airflow/tasks/journal.py.
        from warehouse_gdpr.airflow.tasks import journal as journal_tasks

        journal_tasks.refuse_if_restored(policy, context)
        ti.xcom_push(key=PIN_KEY, value=sha256)
        log.info("Policy %s (sha256 %s) pinned for run %s: every task of the run uses this file.",
                 path, sha256, context["run_id"])
        return policy
    first = [t.task_id for t in context["dag"].roots]
    pinned = [p for p in (ti.xcom_pull(task_ids=task_id, key=PIN_KEY) for task_id in first) if p]
    if not pinned:
        raise ConfigurationError(
            f"no policy was validated in this run ({', '.join(first)} did not pin one): clear the run from "
            f"{first[0]} or trigger a new run")
    if sha256 not in pinned:
        raise ConfigurationError(
            f"the policy file {path} changed since {first[0]} validated it in this run (sha256 {pinned[0][:12]}… "
            f"then, {sha256[:12]}… now): a run never mixes two policies. Clear the run from {first[0]} "
            "(or trigger a new run) to use the new file.")
    return load_policy(path, content)

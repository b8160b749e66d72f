"""What each task of `gdpr_subject_rectification` does (the preflight and propagate tasks are erasure's, which
serve every kind of request through the one outbox). The DAG file only wires them.

The email and the new values are read from the run's params (or, for a request registered with `warehouse-gdpr
request new --kind rectification` and triggered with its id alone, decrypted from gdpr.request in memory) and
never returned: XComs carry the request id, the subject's keyed hash, column names and counts.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import date
from typing import Any

import psycopg
from airflow.sdk.exceptions import AirflowFailException

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.airflow.tasks import journal as journal_tasks
from warehouse_gdpr.engine import audit, erasure, propagation, rectification, requests
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.rectification import RectificationRequest
from warehouse_gdpr.engine.sweep import format_table

log = logging.getLogger(__name__)


def run_params(context: Any) -> dict[str, Any]:
    """The run's params, with every key of the trigger's conf (a key that is no param, such as a typo, must be
    refused even where [core] dag_run_conf_overrides_params is off and Airflow leaves it out)."""
    params = dict(context["params"])
    for key in getattr(context.get("dag_run"), "conf", None) or {}:
        params.setdefault(key, None)
    return params


def _request(context: Any, conn: psycopg.Connection, keys: Keys, policy: Policy) -> RectificationRequest:
    """The run's request, from its params or from the registered request (identifier and changes decrypted in
    memory). A malformed one raises before any change (no retry)."""
    params = run_params(context)
    try:
        erasure.refuse_unknown_params(params, rectification.PARAMS)
        resolved, registered = requests.resolve(conn, keys, rectification.KIND, params)
        request = rectification.parse_request(resolved, policy)
    except (ValueError, requests.RequestStoreError) as exc:
        log.error("The rectification request is refused before any change: %s", exc)
        raise
    if registered is not None and registered.due_date != requests.due_date(request.received_at):
        request = dataclasses.replace(request, extended_due_date=registered.due_date)
    return request


@task_errors
def validate_request(policy_file: str, context: Any) -> dict[str, Any]:
    """Check the params (columns and values against the policy), keys and live catalog; locate the person and
    count the rows each change would touch. Writes nothing but an audit row."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        request = _request(context, conn, keys, policy)
        located = rectification.locate(conn, policy, keys, request)
        try:
            recorded = requests.recorded(conn, request.request_id, rectification.KIND, located.subject_hash,
                                         requested_by=rectification.requested_by(keys, request, located))
            rows = rectification.plan(conn, policy, located, request)
        except (ValueError, requests.RequestStoreError) as exc:
            log.error("The rectification request is refused before any change: %s", exc)
            raise
        finally:
            conn.rollback()
        targets = propagation.targets_for(policy, rectification.KIND, request.changes) if located.email else []
        with conn.transaction():
            audit.record(conn, connections.run_context(context, request.dry_run), action="locate",
                         outcome="found" if rows else "not_found", subject_hash=located.subject_hash,
                         row_count=sum(rows.values()),
                         details={"request_id": request.request_id, "kind": rectification.KIND,
                                  "columns": sorted(request.changes), "rows": rows})
    log.info("Rectification request %s (subject %s…, due %s), columns %s:\n%s\nDownstream targets to tell: %s.",
             request.request_id, located.subject_hash[:12], request.due_date, ", ".join(sorted(request.changes)),
             format_table(["table.column", "rows to correct"], [[k, n] for k, n in rows.items()])
             if rows else "(no live record of the person: nothing to correct)", ", ".join(targets) or "none")
    if recorded is not None:
        log.info("Request %s was already processed (status %s): rectify reports the recorded result and changes "
                 "nothing.", request.request_id, recorded["status"])
    return {"request_id": request.request_id, "subject_hash": located.subject_hash, "columns": sorted(request.changes),
            "rows": rows, "due_date": request.due_date.isoformat(), "dry_run": request.dry_run}


@task_errors
def rectify(policy_file: str, context: Any) -> dict[str, Any]:
    """Correct every row of the person holding a changed column, record the request and its outbox: one
    transaction."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys, policy)
        ctx = connections.run_context(context, request.dry_run)
        located = rectification.locate(conn, policy, keys, request)
        result = rectification.apply(conn, policy, keys, ctx, request, located)
    if not request.dry_run:  # a corrected email's suppression entry (engine/journal.py)
        journal_tasks.flush(policy)
    if result.already_recorded:
        log.info("Request %s was already processed (status %s): nothing changed.", request.request_id, result.status)
    else:
        log.info("Request %s %s %s (%s). Status: %s.", request.request_id,
                 "would be" if request.dry_run else "was", result.outcome.upper(), result.reason or "dry run",
                 result.status)
    if result.rows:
        log.info("Rows %s:\n%s", "that would be corrected" if request.dry_run else "corrected",
                 format_table(["table.column", "rows"], [[t, n] for t, n in result.rows.items()]))
    out = result.as_dict()
    done = request.dry_run or result.already_recorded and result.status == "completed"
    out["targets"] = [] if done else result.targets
    return out


@task_errors
def verify(policy_file: str, context: Any) -> dict[str, Any]:
    """Check that every place now holds the new values, then record the request (or name the pending targets)."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys, policy)
        ctx = connections.run_context(context, request.dry_run)
        row = conn.execute("SELECT status FROM gdpr.request WHERE request_id = %s AND kind = %s AND status <> "
                           "'registered'", (request.request_id, rectification.KIND)).fetchone()
        conn.rollback()
        if request.dry_run or row is None:
            log.info("Dry run: nothing was rectified, nothing to verify.")
            return {"request_id": request.request_id, "status": "dry_run"}
        left = rectification.verify(conn, policy, request.request_id, request.changes)
        with conn.transaction():
            audit.record(conn, ctx, action="verify", outcome="clean" if not left else "rows_left",
                         row_count=sum(left.values()), details={"request_id": request.request_id, "left": left})
        if left:
            raise AirflowFailException(
                f"request {request.request_id}: rows of the person still hold another value after the correction: "
                f"{left} (a concurrent write?). Trigger the request again with a new request id.")
        record = complete(conn, ctx, request.request_id)
    return finish(request.request_id, record, request.due_date)


def complete(conn: psycopg.Connection, ctx: audit.RunContext, request_id: str) -> dict[str, Any]:
    """Complete the request when every target acknowledged (or none was told), and its record; else the record
    as it stands (status pending_propagation)."""
    record = propagation.complete_if_acknowledged(conn, ctx, request_id)
    if record is None:
        with conn.transaction():
            record = propagation.write_record(conn, ctx, request_id)
            if record["status"] in requests.TERMINAL:
                requests.destroy_identifier(conn, ctx, request_id)
    return record


def finish(request_id: str, record: dict[str, Any], due: date) -> dict[str, Any]:
    """Log the record; fail naming the targets still pending (gdpr_erasure_retry keeps trying them)."""
    log.info("Request %s (%s): outcome %s, status %s.\n%s", request_id, record["kind"], record["outcome"],
             record["status"],
             format_table(["target", "status", "attempts", "acknowledged at"],
                          [[t["target"], t["status"], t["attempts"], t["acknowledged_at"] or "-"]
                           for t in record["targets"]]) if record["targets"] else "(no downstream target)")
    pending = [t["target"] for t in record["targets"] if t["status"] == "pending"]
    if pending:
        raise AirflowFailException(
            f"request {request_id}: done in the warehouse, but {len(pending)} target(s) have not acknowledged: "
            f"{', '.join(pending)}. gdpr_erasure_retry retries them hourly; the request is due on {due}.")
    return {"request_id": request_id, "status": record["status"], "outcome": record["outcome"]}

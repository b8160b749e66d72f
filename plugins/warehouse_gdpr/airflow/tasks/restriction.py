"""What each task of `gdpr_subject_restriction` does (restrict, or lift; the preflight and propagate tasks are
erasure's, which serve every kind of request through the one outbox). The DAG file only wires them.

The email is read from the run's params (or decrypted in memory from a registered request) and never
returned: XComs carry the request id, the subject's keyed hash, the action, outcomes and counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import psycopg

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.airflow.tasks import journal as journal_tasks
from warehouse_gdpr.airflow.tasks.rectification import complete, finish, run_params
from warehouse_gdpr.engine import audit, erasure, requests, restriction
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.restriction import RestrictionRequest

log = logging.getLogger(__name__)


def _request(context: Any, conn: psycopg.Connection, keys: Keys) -> RestrictionRequest:
    """The run's request: its `action` (or the registered request's kind) and the person, from its params or
    from the registered request. A malformed one raises before any change (no retry)."""
    params = run_params(context)
    try:
        erasure.refuse_unknown_params(params, restriction.PARAMS)
        kind = restriction.kind_of(conn, params)
        resolved, registered = requests.resolve(conn, keys, kind, params)
        request = restriction.parse_request(resolved, kind=kind)
    except (ValueError, requests.RequestStoreError) as exc:
        log.error("The restriction request is refused before any change: %s", exc)
        raise
    if registered is not None and registered.due_date != requests.due_date(request.received_at):
        request = dataclasses.replace(request, extended_due_date=registered.due_date)
    return request


@task_errors
def validate_request(policy_file: str, context: Any) -> dict[str, Any]:
    """Check the params, the policy, keys and live catalog (and the database guard when the policy enables it);
    locate the person and say whether a restriction is in force. Writes nothing but an audit row."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        restriction.require_guard(conn, policy)
        request = _request(context, conn, keys)
        located = restriction.locate(conn, policy, keys, request)
        try:
            recorded = requests.recorded(conn, request.request_id, request.kind, located.subject_hash,
                                         requested_by=restriction.requested_by(keys, request, located))
            current = restriction.in_force(conn, policy, keys, located)
        except requests.RequestStoreError as exc:
            log.error("The restriction request is refused before any change: %s", exc)
            raise
        finally:
            conn.rollback()
        with conn.transaction():
            audit.record(conn, connections.run_context(context, request.dry_run), action="locate",
                         outcome="restricted" if current else "not_restricted", subject_hash=located.subject_hash,
                         row_count=len(located.subject_ids),
                         details={"request_id": request.request_id, "kind": request.kind,
                                  "in_force_since_request": current[3] if current else None})
    log.info("Request %s (%s, subject %s…, due %s): %d subject row(s); a restriction is %s.", request.request_id,
             request.action, located.subject_hash[:12], request.due_date, len(located.subject_ids),
             f"in force (request {current[3]})" if current else "not in force")
    if recorded is not None:
        log.info("Request %s was already processed (status %s): nothing will change.", request.request_id,
                 recorded["status"])
    return {"request_id": request.request_id, "subject_hash": located.subject_hash, "action": request.action,
            "in_force": current is not None, "dry_run": request.dry_run}


@task_errors
def apply(policy_file: str, context: Any) -> dict[str, Any]:
    """Restrict (record, flag) or lift, record the request and its outbox: one transaction."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys)
        ctx = connections.run_context(context, request.dry_run)
        located = restriction.locate(conn, policy, keys, request)
        result = restriction.apply(conn, policy, keys, ctx, request, located)
    if not request.dry_run:
        journal_tasks.flush(policy)
    log.info("Request %s (%s) %s %s: %s. Status: %s. Downstream and the sales team: %s.", request.request_id,
             request.action, "would be" if request.dry_run else "was", result.outcome.upper(), result.reason,
             result.status, ", ".join(result.targets) or "none")
    out = result.as_dict()
    done = request.dry_run or result.already_recorded and result.status == "completed"
    out["targets"] = [] if done else result.targets
    return out


@task_errors
def verify(policy_file: str, context: Any) -> dict[str, Any]:
    """Complete the request once every target acknowledged, and its record; else name the pending targets."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys)
        ctx = connections.run_context(context, request.dry_run)
        row = conn.execute("SELECT status FROM gdpr.request WHERE request_id = %s AND kind = %s"
                           " AND status <> 'registered'", (request.request_id, request.kind)).fetchone()
        conn.rollback()
        if request.dry_run or row is None:
            log.info("Dry run: nothing was changed, nothing to verify.")
            return {"request_id": request.request_id, "status": "dry_run"}
        record = complete(conn, ctx, request.request_id)
    return finish(request.request_id, record, request.due_date)

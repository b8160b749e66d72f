"""What each task of `gdpr_subject_erasure` and `gdpr_erasure_retry` does. The DAG files only wire them.

The email is read from the run's params by the tasks that need it and never returned: XComs carry
the request id, the subject's keyed hash, outcomes and counts.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.engine import audit, erasure, propagation
from warehouse_gdpr.engine.crypto import KeyError_
from warehouse_gdpr.engine.erasure import ErasureRequest, RequestError
from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy
from warehouse_gdpr.engine.sweep import format_table

log = logging.getLogger(__name__)


def _request(context: Any) -> ErasureRequest:
    try:
        return erasure.parse_request(context["params"])
    except RequestError as exc:
        log.error("The erasure request is refused before any change: %s", exc)
        raise AirflowFailException(f"invalid erasure request: {exc}") from None


def _policy(policy_file: str) -> Policy:
    try:
        return load_policy(policy_file)
    except PolicyError as exc:
        raise AirflowFailException(str(exc)) from None


def validate_request(policy_file: str, context: Any) -> dict[str, Any]:
    """Check the params together and the policy, keys and live catalog. Writes nothing but an audit row."""
    request = _request(context)
    policy = _policy(policy_file)
    try:
        keys = connections.load_keys(policy)
    except (KeyError_, RuntimeError) as exc:
        raise AirflowFailException(str(exc)) from None
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        located = erasure.locate(conn, policy, keys, request)
        holds = erasure.holds_in_force(conn, policy, located, connections.as_of(context))
        outcome, reason = erasure.decide(located, holds)
        with conn.transaction():
            audit.record(conn, connections.run_context(context, request.dry_run), action="locate", outcome=outcome,
                         subject_hash=located.subject_hash, row_count=sum(located.rows.values()),
                         details={"request_id": request.request_id, "rows": located.rows, "holds": sorted(holds),
                                  "archive": [a.as_dict() for a in located.archive]})
    archived = [[f"gdpr_archive: {a.source_table} ({f'kept until {a.until}' if a.obligation else 'to destroy'})",
                 a.rows] for a in located.archive]
    log.info(
        "Request %s (subject %s…, due %s): %s — %s\n%s", request.request_id, located.subject_hash[:12],
        request.due_date, outcome, reason,
        format_table(["table", "rows linked to the subject"], [[t, n] for t, n in located.rows.items()] + archived),
    )
    return {"request_id": request.request_id, "subject_hash": located.subject_hash, "expected_outcome": outcome,
            "due_date": request.due_date.isoformat(), "dry_run": request.dry_run}


def erase(policy_file: str, context: Any) -> dict[str, Any]:
    """Erase everywhere, suppress, record the request and the outbox: one transaction."""
    request = _request(context)
    policy = _policy(policy_file)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, request.dry_run)
    with connections.connect(policy) as conn:
        located = erasure.locate(conn, policy, keys, request)
        holds = erasure.holds_in_force(conn, policy, located, connections.as_of(context))
        try:
            result = erasure.erase(conn, policy, keys, ctx, request, located, holds)
        except RequestError as exc:
            raise AirflowFailException(str(exc)) from None
    verb = "would be" if request.dry_run else "was"
    if result.already_recorded:
        log.info("Request %s was already processed (status %s): nothing changed.", request.request_id, result.status)
    else:
        log.info("Request %s %s %s (%s). Status: %s.", request.request_id, verb, result.outcome.upper(),
                 result.reason, result.status)
    if result.rows:
        log.info("Rows %s:\n%s", "that would be erased" if request.dry_run else "erased",
                 format_table(["table", "rows"], [[t, n] for t, n in result.rows.items()]))
    out = result.as_dict()
    out["targets"] = [] if request.dry_run or result.already_recorded and result.status == "completed" else result.targets
    return out


def propagate(policy_file: str, target: str, context: Any) -> str:
    """Tell one downstream system to erase the person; raise (Airflow retries) until it acknowledges."""
    params = context["params"]
    policy = _policy(policy_file)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, False)
    with connections.connect(policy) as conn:
        try:
            return propagation.propagate(conn, policy, keys, ctx, params["request_id"], target)
        except propagation.TargetNotAcknowledged as exc:
            log.warning("%s. Airflow retries with backoff; after the last retry gdpr_erasure_retry keeps trying.", exc)
            raise


def verify(policy_file: str, context: Any) -> dict[str, Any]:
    """Rescan every mapped table, then certify (or report what is pending). Fails if anything is left."""
    request = _request(context)
    policy = _policy(policy_file)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, request.dry_run)
    with connections.connect(policy) as conn:
        row = conn.execute(
            "SELECT outcome, status FROM gdpr.erasure_request WHERE request_id = %s", (request.request_id,)
        ).fetchone()
        conn.rollback()
        if request.dry_run or row is None:
            log.info("Dry run: nothing was erased, nothing to verify.")
            return {"request_id": request.request_id, "status": "dry_run"}
        outcome, status = row
        remaining = erasure.verify(conn, policy, keys, request, outcome)
        with conn.transaction():
            audit.record(conn, ctx, action="verify", outcome="clean" if not remaining else "rows_left",
                         row_count=sum(remaining.values()), details={"request_id": request.request_id,
                                                                     "remaining": remaining})
        if remaining:
            raise AirflowFailException(
                f"request {request.request_id}: rows still linked to the subject after erasure: {remaining}. "
                "Check the policy's table map (a table the policy does not know?) and trigger the request again."
            )
        certificate = propagation.complete_if_acknowledged(conn, ctx, request.request_id)
        if certificate is None:
            with conn.transaction():
                certificate = propagation.write_certificate(conn, ctx, request.request_id)
        _warn_deadline(certificate, policy)
    log.info(
        "Request %s: outcome %s, status %s.\n%s", request.request_id, certificate["outcome"], certificate["status"],
        format_table(["target", "status", "attempts", "acknowledged at"],
                     [[t["target"], t["status"], t["attempts"], t["acknowledged_at"] or "-"] for t in certificate["targets"]])
        if certificate["targets"] else "(no downstream target)",
    )
    pending = [t["target"] for t in certificate["targets"] if t["status"] == "pending"]
    if pending:
        raise AirflowFailException(
            f"request {request.request_id}: {certificate['outcome']} in the warehouse, but {len(pending)} target(s) "
            f"have not acknowledged: {', '.join(pending)}. gdpr_erasure_retry retries them hourly; "
            f"the request is due on {certificate['due_date']}."
        )
    return {"request_id": request.request_id, "status": certificate["status"], "outcome": certificate["outcome"]}


def _warn_deadline(certificate: dict[str, Any], policy: Policy) -> None:
    if certificate["status"] != "pending_propagation":
        return
    due = date.fromisoformat(certificate["due_date"])
    if date.today() >= due - timedelta(days=policy.erasure.deadline_warning_days):
        log.warning("Request %s is not complete and is due on %s: see the pending targets below.",
                    certificate["request_id"], due)


# -- gdpr_erasure_retry --------------------------------------------------------------------------


def retry_pending(policy_file: str, context: Any) -> dict[str, Any]:
    """Try every pending outbox row once; complete and certify requests whose targets all acknowledged."""
    policy = _policy(policy_file)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, False)
    tried = acknowledged = 0
    completed: list[str] = []
    with connections.connect(policy) as conn:
        pending = conn.execute(
            "SELECT request_id, target FROM gdpr.erasure_propagation WHERE status = 'pending' ORDER BY request_id, target"
        ).fetchall()
        conn.rollback()
        for request_id, target in pending:
            tried += 1
            try:
                propagation.propagate(conn, policy, keys, ctx, request_id, target)
                acknowledged += 1
            except propagation.TargetNotAcknowledged as exc:
                log.warning("%s", exc)
            except ValueError as exc:  # a target removed from the policy: say so, keep the row pending
                log.error("%s: the outbox row stays pending until the target is declared again", exc)
        for request_id in sorted({r for r, _ in pending}):
            if propagation.complete_if_acknowledged(conn, ctx, request_id):
                completed.append(request_id)
    log.info("Retried %d pending propagation(s): %d acknowledged, %d still pending; completed requests: %s",
             tried, acknowledged, tried - acknowledged, ", ".join(completed) or "none")
    return {"tried": tried, "acknowledged": acknowledged, "completed": completed}


def check_deadlines(policy_file: str, context: Any) -> dict[str, Any]:
    """Make requests near or past their due date visible: log warnings, flag them, audit."""
    policy = _policy(policy_file)
    ctx = connections.run_context(context, False)
    days = policy.erasure.deadline_warning_days
    with connections.connect(policy) as conn, conn.transaction():
        rows = conn.execute(
            "SELECT request_id, due_date, subject_hash,"
            " (SELECT count(*) FROM gdpr.erasure_propagation p WHERE p.request_id = r.request_id AND p.status = 'pending')"
            " FROM gdpr.erasure_request r WHERE status = 'pending_propagation' AND due_date - %s <= current_date"
            " ORDER BY due_date",
            (days,),
        ).fetchall()
        for request_id, due, subject_hash, pending in rows:
            overdue = due < date.today()
            conn.execute("UPDATE gdpr.erasure_request SET deadline_warned_at = now() WHERE request_id = %s", (request_id,))
            audit.record(conn, ctx, action="deadline_warning", outcome="overdue" if overdue else "due_soon",
                         subject_hash=subject_hash, details={"request_id": request_id, "due_date": due.isoformat(),
                                                             "pending_targets": pending})
            (log.error if overdue else log.warning)(
                "Erasure request %s is %s (due %s) with %d target(s) pending: check gdpr.erasure_propagation "
                "and the target's availability (runbook: 'a target stays pending').",
                request_id, "OVERDUE" if overdue else "due within %d days" % days, due, pending,
            )
    return {"flagged": [r[0] for r in rows]}

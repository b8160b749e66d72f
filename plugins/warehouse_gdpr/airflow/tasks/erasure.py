"""What each task of `gdpr_subject_erasure` and `gdpr_erasure_retry` does. The DAG files only wire them.

The email is read from the run's params by the tasks that need it (or, for a request registered with
`warehouse-gdpr request new` and triggered with its id alone, decrypted from gdpr.request in memory)
and never returned: XComs carry the request id, the subject's keyed hash, outcomes and counts. Every
task reads the policy the run pinned (`connections.run_policy`); `task_errors` maps failures
(airflow/errors.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import psycopg
from airflow.sdk.exceptions import AirflowFailException

from warehouse_gdpr.airflow import connections, errors
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.airflow.tasks import journal as journal_tasks
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import audit, erasure, propagation, requests
from warehouse_gdpr.engine.erasure import ErasureRequest
from warehouse_gdpr.engine.errors import ConfigurationError, TransientError
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.sweep import format_table

log = logging.getLogger(__name__)


def _request(context: Any, conn: psycopg.Connection, keys: Any) -> ErasureRequest:
    """The run's request: from its params, or from the registered request when they hold its id alone
    (requests.resolve_params decrypts the identifier in memory; it never reaches a log or an XCom). A
    malformed one raises RequestError or RequestStoreError (refused before any change, no retry)."""
    params = dict(context["params"])
    # A key of the trigger's conf that is no param (a typo such as `emial`) must be refused, even where
    # [core] dag_run_conf_overrides_params is off and Airflow leaves it out of the params.
    dag_run = context.get("dag_run")
    for key in getattr(dag_run, "conf", None) or {}:
        params.setdefault(key, None)
    try:
        erasure.refuse_unknown_params(params)
        resolved, registered = requests.resolve(conn, keys, "erasure", params)
        request = erasure.parse_request(resolved)
    except (erasure.RequestError, requests.RequestStoreError) as exc:
        log.error("The erasure request is refused before any change: %s", exc)
        raise
    if registered is not None and registered.due_date != request.first_due_date:  # extended (art. 12(3))
        request = dataclasses.replace(request, extended_due_date=registered.due_date)
    return request


def _policy(policy_file: str, context: Any) -> Policy:
    return connections.run_policy(policy_file, context)


def resolve_notifier(path: str | None) -> Callable[[Any], Any] | None:
    """The policy's `erasure.on_failure_callback` (`package.module:attribute`), imported: a notifier instance
    (e.g. `pager = SlackNotifier(...)` at module level) or a function taking the context. Raises ValueError
    with a clear message. Imported here (Airflow layer): by the DAG factory at build time, and by
    check_deadlines, which reports a broken one; never by the engine."""
    if not path:
        return None
    module_name, _, attribute = path.partition(":")
    where = f"erasure.on_failure_callback `{path}`"
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or an error raised by the module itself
        raise ValueError(f"{where}: module {module_name} cannot be imported ({type(exc).__name__}: {exc}); "
                         "install it where the DAGs run or fix the path") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where}: {module_name} has no attribute {attribute}") from None
        target = getattr(target, part)
    if isinstance(target, type) or not callable(target):
        raise ValueError(f"{where} is {'a class' if isinstance(target, type) else 'not callable'}: point it to a "
                         "notifier instance (e.g. `pager = SlackNotifier(...)` in that module) or to a function "
                         "taking the context")
    return target


@task_errors
def validate_request(policy_file: str, context: Any) -> dict[str, Any]:
    """Check the params together and the policy, keys and live catalog. Writes nothing but an audit row."""
    policy = _policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        request = _request(context, conn, keys)
        located = erasure.locate(conn, policy, keys, request)
        try:  # a request id already used for another person: refused before anything is written
            recorded = erasure.recorded_request(conn, keys, request, located)
        except erasure.RequestError as exc:
            log.error("The erasure request is refused before any change: %s", exc)
            raise
        finally:
            conn.rollback()
        holds = erasure.holds_in_force(conn, policy, located, connections.as_of(context))
        outcome, reason = erasure.decide(located, holds)
        suppression = erasure.suppression_effect(conn, located)
        conn.rollback()
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
    if recorded is not None:
        log.info("Request %s was already processed (status %s): erase reports the recorded result and changes "
                 "nothing.", request.request_id, recorded.status)
    elif located.email:
        log.info("Suppression list: %s.", suppression)
    if request.due_date < date.today() and recorded is None:
        log.warning("Request %s was received on %s: it is already past its due date (%s), %d day(s) overdue.",
                    request.request_id, request.received_at, request.due_date, (date.today() - request.due_date).days)
    return {"request_id": request.request_id, "subject_hash": located.subject_hash, "expected_outcome": outcome,
            "due_date": request.due_date.isoformat(), "dry_run": request.dry_run, "suppression": suppression}


@task_errors
def erase(policy_file: str, context: Any) -> dict[str, Any]:
    """Erase everywhere, suppress, record the request and the outbox: one transaction."""
    policy = _policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys)
        ctx = connections.run_context(context, request.dry_run)
        located = erasure.locate(conn, policy, keys, request)
        as_of = connections.as_of(context)
        holds = erasure.holds_in_force(conn, policy, located, as_of)
        result = erasure.erase(conn, policy, keys, ctx, request, located, holds, as_of)
    if not request.dry_run:
        journal_tasks.flush(policy)
    verb = "would be" if request.dry_run else "was"
    if result.already_recorded:
        log.info("Request %s was already processed (status %s): nothing changed.", request.request_id, result.status)
    else:
        log.info("Request %s %s %s (%s). Status: %s.", request.request_id, verb, result.outcome.upper(),
                 result.reason, result.status)
    if request.dry_run and not result.already_recorded:
        log.info("Dry run, suppression list: %s.", result.suppression)
    if result.rows:
        log.info("Rows %s:\n%s", "that would be erased" if request.dry_run else "erased",
                 format_table(["table", "rows"], [[t, n] for t, n in result.rows.items()]))
    out = result.as_dict()
    done = request.dry_run or result.already_recorded and result.status == "completed"
    out["targets"] = [] if done else result.targets
    return out


@task_errors
def preflight(policy_file: str, target: str, context: Any) -> str:
    """Prove the target's base URL and credentials (an authenticated call) before anything is sent to it.
    A wrong URL, a redirect or refused credentials fail at once (no retry); no answer or a 5xx retries."""
    policy = _policy(policy_file, context)
    ctx = connections.run_context(context, False)
    with connections.connect(policy) as conn:
        try:
            return propagation.preflight(conn, policy, ctx, target, AirflowTransport())
        except propagation.PreflightFailed as exc:
            if exc.retryable:
                log.warning("%s. Airflow retries with backoff.", exc)
                raise
            log.error("%s", exc)
            raise AirflowFailException(str(exc)) from None
        except ValueError as exc:  # a target no longer in the policy
            raise AirflowFailException(str(exc)) from None


@task_errors
def propagate(policy_file: str, target: str, context: Any) -> str:
    """Tell one downstream system to erase the person; raise (Airflow retries) until it acknowledges."""
    params = context["params"]
    policy = _policy(policy_file, context)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, False)
    with connections.connect(policy) as conn:
        try:
            return propagation.propagate(conn, policy, keys, ctx, params["request_id"], target, AirflowTransport())
        except propagation.TargetMisconfigured as exc:
            log.error("%s. Retrying will not help: the erasure stays pending until the target is fixed; "
                      "gdpr_erasure_retry then completes it.", exc)
            raise AirflowFailException(str(exc)) from None
        except propagation.TargetNotAcknowledged as exc:
            log.warning("%s. Airflow retries with backoff; after the last retry gdpr_erasure_retry keeps trying.", exc)
            raise


@task_errors
def verify(policy_file: str, context: Any) -> dict[str, Any]:
    """Rescan every mapped table, then certify (or report what is pending). Fails if anything is left."""
    policy = _policy(policy_file, context)
    keys = connections.load_keys(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys)
        ctx = connections.run_context(context, request.dry_run)
        row = conn.execute(
            "SELECT outcome, status FROM gdpr.request WHERE request_id = %s AND kind = 'erasure'"
            " AND status <> 'registered'", (request.request_id,)
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
                if certificate["status"] in requests.TERMINAL:  # verified and certified: the request is complete
                    requests.destroy_identifier(conn, ctx, request.request_id)
        _warn_deadline(certificate, policy)
    log.info(
        "Request %s: outcome %s, status %s.\n%s", request.request_id, certificate["outcome"], certificate["status"],
        format_table(["target", "status", "attempts", "acknowledged at"],
                     [[t["target"], t["status"], t["attempts"], t["acknowledged_at"] or "-"]
                      for t in certificate["targets"]])
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


@task_errors
def preflight_pending(policy_file: str, context: Any) -> dict[str, Any]:
    """Preflight every HTTP target that has pending erasures (once per run). Fails, after trying them all,
    when one failed: its erasures stay pending (retry_pending sends it nothing) while the others go on."""
    policy = _policy(policy_file, context)
    ctx = connections.run_context(context, False)
    declared = propagation.declared_targets(policy)
    passed: list[str] = []
    failed: dict[str, str] = {}
    with connections.connect(policy) as conn:
        targets = [r[0] for r in conn.execute(
            "SELECT DISTINCT target FROM gdpr.erasure_propagation WHERE status = 'pending' ORDER BY target"
        ).fetchall()]
        conn.rollback()
        for target in targets:
            if target not in declared:
                continue  # retry_pending says so
            try:
                propagation.preflight(conn, policy, ctx, target, AirflowTransport())
                passed.append(target)
            except propagation.PreflightFailed as exc:
                log.error("%s", exc)
                failed[target] = str(exc)
    if failed:
        raise AirflowFailException(
            f"{len(failed)} target(s) failed their preflight: {'; '.join(failed.values())}. The other targets' "
            "erasures are retried by retry_pending."
        )
    return {"passed": passed}


@task_errors
def retry_pending(policy_file: str, context: Any) -> dict[str, Any]:
    """Try every pending outbox row once (an HTTP target only if its preflight passed in this run);
    complete and certify requests whose targets all acknowledged.

    Each row is isolated: one that fails (an identifier that does not decrypt, a lost connection, a
    target no longer in the policy) is reported and the others are still tried. The task then fails,
    naming each failed request and target with the error's class (no personal data); a target that
    simply has not acknowledged yet is not a failure (the row stays pending for the next run)."""
    policy = _policy(policy_file, context)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, False)
    transport = AirflowTransport()
    tried = acknowledged = 0
    completed: list[str] = []
    failures: list[tuple[str, bool, str]] = []  # (request/target, retryable, why)

    def failed(what: str, exc: Exception) -> None:
        retryable, why = errors.classify(exc) or (True, type(exc).__name__)
        failures.append((what, retryable, why))
        log.error("%s: %s. The other pending propagations are still tried.", what, why)

    conn = connections.connect(policy)
    try:
        pending = conn.execute(
            "SELECT request_id, target FROM gdpr.erasure_propagation WHERE status = 'pending'"
            " ORDER BY request_id, target"
        ).fetchall()
        conn.rollback()
        declared = propagation.declared_targets(policy)
        for request_id, target in pending:
            tried += 1
            if target not in declared:
                failed(f"request {request_id}, target {target}", ConfigurationError(
                    f"target {target} is not declared in the policy's erasure.targets (nor as restriction.notify): "
                    "the outbox row stays pending until it is declared again"))
                continue
            try:
                propagation.propagate(conn, policy, keys, ctx, request_id, target, transport)
                acknowledged += 1
            except propagation.TargetNotAcknowledged as exc:
                log.warning("%s", exc)
            except Exception as exc:  # noqa: BLE001 - isolated: reported at the end, the others go on
                failed(f"request {request_id}, target {target}", exc)
                conn = _usable(conn, policy)
        for request_id in sorted({r for r, _ in pending}):
            try:
                if propagation.complete_if_acknowledged(conn, ctx, request_id):
                    completed.append(request_id)
            except Exception as exc:  # noqa: BLE001 - isolated, as above
                failed(f"request {request_id}, completion", exc)
                conn = _usable(conn, policy)
    finally:
        conn.close()
    log.info("Retried %d pending propagation(s): %d acknowledged, %d still pending; completed requests: %s",
             tried, acknowledged, tried - acknowledged, ", ".join(completed) or "none")
    if failures:
        message = (f"{len(failures)} of {tried} pending propagation(s) failed, the others were tried: "
                   + "; ".join(f"{what}: {why}" for what, _, why in failures))
        raise (TransientError if any(r for _, r, _ in failures) else ConfigurationError)(message)
    return {"tried": tried, "acknowledged": acknowledged, "completed": completed}


def _usable(conn: psycopg.Connection, policy: Policy) -> psycopg.Connection:
    """The same connection if it still works, else a new one (after a lost connection)."""
    if not conn.closed and not conn.broken:
        return conn
    conn.close()
    return connections.connect(policy)


def _why_open(request_id: str, kind: str, status: str, targets: list[str]) -> str:
    """Why an open request is not answered yet, and what on-call does about it (no personal data)."""
    if targets:
        return f"target(s) {', '.join(targets)} pending"
    dag_id = requests.DAG_FOR_KIND.get(kind)
    if dag_id is None:
        return f"registered; no DAG of this package answers a request of kind {kind}: answer it and record it"
    if status == "registered":
        return f'registered but never run: trigger {dag_id} with {{"request_id": "{request_id}"}}'
    return f"no target pending but not completed: trigger {dag_id} with its request id again to finish it"


@task_errors
def check_deadlines(policy_file: str, retried: dict[str, Any] | None, context: Any) -> dict[str, Any]:
    """Make requests near or past their due date visible: flag them, audit, warn for the ones due soon, and
    FAIL the task (a red run; the policy's `erasure.on_failure_callback` pages) for any overdue request with a
    target still pending, naming the request, its pending targets and the days overdue. As the DAG's last
    task, it also fails the run when a target failed its preflight in this run (its erasures wait on a fix),
    and when retry_pending failed (`retried` is None), once the deadlines are checked (a run's state is its
    last task's)."""
    policy = _policy(policy_file, context)
    ctx = connections.run_context(context, False)
    days = policy.erasure.deadline_warning_days
    notifier_error = None
    try:  # a broken pager hook never stops the retries: reported at the end of this last task
        resolve_notifier(policy.erasure.on_failure_callback)
    except ValueError as exc:
        notifier_error = str(exc)
    with connections.connect(policy) as conn, conn.transaction():
        rows = conn.execute(
            "SELECT request_id, coalesce(extended_due_date, due_date) AS due, subject_hash, kind,"
            " current_date - coalesce(extended_due_date, due_date),"
            " ARRAY(SELECT p.target FROM gdpr.erasure_propagation p"
            "       WHERE p.request_id = r.request_id AND p.status = 'pending' ORDER BY p.target)"
            ", status FROM gdpr.request r WHERE completed_at IS NULL"
            " AND coalesce(extended_due_date, due_date) - %s <= current_date ORDER BY due, request_id",
            (days,),
        ).fetchall()
        conn.execute("UPDATE gdpr.request SET deadline_warned_at = now() WHERE request_id = ANY(%s)",
                     ([r[0] for r in rows],))
        audit.record_many(conn, ctx, [
            dict(action="deadline_warning", outcome="overdue" if late > 0 else "due_soon", subject_hash=subject_hash,
                 details={"request_id": request_id, "due_date": due.isoformat(), "pending_targets": len(targets),
                          "targets": targets, "days_overdue": max(late, 0), "kind": kind, "status": status})
            for request_id, due, subject_hash, kind, late, targets, status in rows])
        for request_id, due, _, kind, late, targets, status in rows:
            (log.error if late > 0 else log.warning)(
                "%s request %s is %s (due %s): %s%s.", kind.capitalize().replace("_", " "), request_id,
                f"OVERDUE by {late} day(s)" if late > 0 else f"due within {days} days", due,
                _why_open(request_id, kind, status, targets),
                ": check gdpr.erasure_propagation and the target's availability (runbook: 'A target stays pending')"
                if targets else "")
    with connections.connect(policy) as conn:
        unproven = propagation.failed_preflights(conn, ctx)
    preflight_message = (
        f"target(s) {', '.join(unproven)} failed their preflight in this run: their erasures stay pending "
        "until the connection is fixed (see the preflight task's log; runbook: 'A preflight fails')"
    ) if unproven else ""
    # a kind no DAG of this package answers (objection) is logged above, never fails the run: nothing here
    # could complete it
    overdue_rows = [(r[0], r[4], r[5], r[3], r[6]) for r in rows if r[4] > 0 and r[3] in requests.DAG_FOR_KIND]
    problems: list[str] = []  # every reason the run is red, in one message
    if overdue_rows:
        problems.append(
            f"{len(overdue_rows)} request(s) past their due date and not answered: "
            + "; ".join(f"request {rid}: {_why_open(rid, kind, status, t)}, {late} day(s) overdue"
                        for rid, late, t, kind, status in overdue_rows)
            + ". Runbook: 'An erasure is overdue'"
            + (f". Your pager was not called: {notifier_error}" if notifier_error else "")
        )
    elif notifier_error:
        problems.append(f"{notifier_error}. Overdue erasures cannot page anyone until it is fixed")
    if retried is None:
        problems.append("retry_pending failed: its log names each request and target that failed, and why. "
                        "The deadlines were checked")
    if preflight_message:
        problems.append(preflight_message)
    if problems:
        raise AirflowFailException(". ".join(problems) + ".")
    return {"flagged": [r[0] for r in rows]}

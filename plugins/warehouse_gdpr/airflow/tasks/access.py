"""What each task of `gdpr_subject_access` does (the right of access, art. 15, and portability, art. 20).

validate_request -> preflight[target] -> answer. The email is read from the run's params by the tasks that
need it (or, for a request registered with `warehouse-gdpr request new` and triggered with its id alone,
decrypted from gdpr.request in memory) and never returned: XComs carry the request id, counts, the
package's location and SHA-256. The data itself only ever exists in the memory of the `answer` task, which
gathers it, renders the package, writes it encrypted and records the request as completed in gdpr.request
(engine/access.py). Every task reads the policy the run pinned (`connections.run_policy`);
`task_errors` maps failures (airflow/errors.py).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import date
from typing import Any

import psycopg

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.airflow.storage import ObjectStoragePackages
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import access, audit, erasure, propagation, requests
from warehouse_gdpr.engine.access import AccessRequest
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.errors import TransientError
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.sweep import format_table
from warehouse_gdpr.transport import StoreError

log = logging.getLogger(__name__)


def _request(context: Any, conn: psycopg.Connection, keys: Keys) -> AccessRequest:
    """The run's request: from its params, or from the registered request when they hold its id alone
    (requests.resolve decrypts the identifier in memory; it never reaches a log or an XCom). The kind of a
    registered request decides between access and portability. A malformed one raises RequestError or
    RequestStoreError (refused before anything is read, no retry)."""
    params = dict(context["params"])
    # A key of the trigger's conf that is no param (a typo such as `portabilty`) must be refused, even where
    # [core] dag_run_conf_overrides_params is off and Airflow leaves it out of the params.
    dag_run = context.get("dag_run")
    for key in getattr(dag_run, "conf", None) or {}:
        params.setdefault(key, None)
    try:
        access.refuse_unknown_params(params)
        alone = not params.get("email") and params.get("subject_id") is None
        if alone and not params.get("portability") and isinstance(params.get("request_id"), str):
            row = conn.execute("SELECT kind FROM gdpr.request WHERE request_id = %s",
                               (params["request_id"],)).fetchone()
            conn.rollback()
            if row is not None and row[0] == "portability":  # registered as a portability request
                params["portability"] = True
        kind = "portability" if params.get("portability") is True else "access"
        resolved, registered = requests.resolve(conn, keys, kind, params)
        request = access.parse_request(resolved)
    except (erasure.RequestError, requests.RequestStoreError) as exc:
        log.error("The access request is refused before anything is read: %s", exc)
        raise
    if registered is not None and registered.due_date != request.base.first_due_date:  # extended (art. 12(3))
        request = dataclasses.replace(request, base=dataclasses.replace(request.base,
                                                                        extended_due_date=registered.due_date))
    return request


def packages(policy: Policy) -> ObjectStoragePackages:
    """The policy's package store (`access.location`; a relative folder is under $AIRFLOW_HOME)."""
    try:
        return ObjectStoragePackages(policy.access.location, connections.airflow_home())
    except StoreError as exc:
        raise TransientError(str(exc)) from None


def _rows_table(rows: dict[str, int]) -> str:
    return format_table(["where", "rows"], [[t, n] for t, n in rows.items()])


@task_errors
def validate_request(policy_file: str, context: Any) -> dict[str, Any]:
    """Check the params, the policy (what article 15(1) needs to be stated included), the keys and the live
    catalog; locate the person and count their rows. Writes nothing but an audit row."""
    policy = connections.run_policy(policy_file, context)
    access.check_policy(policy)
    keys = connections.load_keys(policy, archive_private=True)  # fails here when the private connection is missing
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        request = _request(context, conn, keys)
        try:
            access.check_not_answered(conn, request)
        except erasure.RequestError as exc:
            log.error("The access request is refused before anything is read: %s", exc)
            raise
        located = erasure.locate(conn, policy, keys, request.base)
        with conn.transaction():
            audit.record(conn, connections.run_context(context, request.dry_run), action="locate",
                         outcome="found" if located.found else "not_found", subject_hash=located.subject_hash,
                         row_count=sum(located.rows.values()),
                         details={"request_id": request.request_id, "kind": request.kind, "rows": located.rows})
    log.info("%s request %s (subject %s…, due %s): %s.\n%s", request.kind.capitalize(), request.request_id,
             located.subject_hash[:12], request.due_date, "found" if located.found else "nothing held in the warehouse",
             _rows_table(located.rows))
    if request.due_date < date.today():
        log.warning("Request %s was received on %s: it is already past its due date (%s).", request.request_id,
                    request.received_at, request.due_date)
    asked = not request.dry_run and not request.portability and located.email is not None
    return {"request_id": request.request_id, "kind": request.kind, "dry_run": request.dry_run,
            "rows": located.rows, "targets": access.http_targets_to_preflight(policy) if asked else []}


@task_errors
def answer(policy_file: str, context: Any) -> dict[str, Any]:
    """Gather everything held on the person, ask the downstream systems, write the encrypted package. A
    downstream system without a usable answer fails the task (retried when it may pass): no package then.
    Another run of the same request id (answered meanwhile, or still answering it) fails the task at once,
    having read and written nothing (access.answering)."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy, archive_private=True)  # the archive's originals are part of the answer
    store = packages(policy)
    with connections.connect(policy) as conn:
        request = _request(context, conn, keys)
        ctx = connections.run_context(context, request.dry_run)
        preflights = {t for t in access.http_targets_to_preflight(policy) if propagation.preflight_passed(conn, ctx, t)}
        try:
            result = access.answer(conn, policy, keys, ctx, request, AirflowTransport(), store, preflights)
        except StoreError as exc:
            raise TransientError(str(exc)) from None
    log.info("%s request %s: %s.\n%s", request.kind.capitalize(), request.request_id, result.outcome,
             _rows_table(result.rows))
    if result.written is None:
        log.info("Dry run: no package written.")
        return {"request_id": request.request_id, "kind": request.kind, "outcome": result.outcome,
                "rows": result.rows}
    log.info("Package written to %s (sha256 %s, %d bytes, encrypted with key %s, deleted after %s). Unpack it "
             "with: warehouse-gdpr access unpack %s --out DIR", result.written.location, result.written.sha256,
             result.written.bytes, result.written.key_id, result.written.expires_at, request.request_id)
    log.info("Time: %s", ", ".join(f"{k} {v:.3f} s" for k, v in result.seconds.items()))
    return {"request_id": request.request_id, "kind": request.kind, "outcome": result.outcome, "rows": result.rows,
            "location": result.written.location, "sha256": result.written.sha256}

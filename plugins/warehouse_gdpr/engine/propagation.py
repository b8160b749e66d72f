"""Propagate an erasure to downstream systems through the outbox (gdpr.erasure_propagation).

One call of `propagate` tries one target once: it decrypts the identifier from the outbox, calls the
target, and records the attempt. On acknowledgement (a success code, or 404 "already gone") the
outbox row is marked acknowledged and its ciphertext destroyed, in the same transaction as the audit
rows. On failure it records the attempt and raises `TargetNotAcknowledged`, so Airflow retries with
backoff; after the last retry the row stays pending for the `gdpr_erasure_retry` DAG.

Target kinds: `http` (Airflow HTTP connection gives base URL and auth; presets for Brevo and HubSpot)
and `sql` (any Airflow connection whose hook gives a DB-API connection). Nothing here logs a URL, a
body or an identifier: only the target name and the HTTP status.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import psycopg

from . import audit
from .audit import RunContext
from .crypto import Keys
from .erasure import outbox_aad
from .policy import HttpTarget, Policy, SqlTarget

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # https://developers.brevo.com/reference/delete-contact
    "brevo": {"method": "DELETE", "endpoint": "/v3/contacts/{identifier}", "body": None},
    # https://developers.hubspot.com/docs/api/crm/contacts (GDPR delete)
    "hubspot": {
        "method": "POST",
        "endpoint": "/crm/v3/objects/contacts/gdpr-delete",
        "body": {"objectId": "{identifier}", "idProperty": "email"},
    },
}


class TargetNotAcknowledged(RuntimeError):
    """The target did not acknowledge the erasure (yet). The message holds no personal data."""


def _fill(template: Any, identifier: str) -> Any:
    if isinstance(template, str):
        return identifier if template == "{identifier}" else template
    if isinstance(template, dict):
        return {k: _fill(v, identifier) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, identifier) for v in template]
    return template


def call_http(target: HttpTarget, identifier: str) -> tuple[bool, str]:
    """(acknowledged, result): one HTTP call; 404 counts as done (already gone)."""
    from airflow.providers.http.hooks.http import HttpHook

    preset = PRESETS.get(target.preset or "", {})
    method = target.method or preset["method"]
    endpoint = (target.endpoint or preset["endpoint"]).replace("{identifier}", quote(identifier, safe=""))
    body = target.body if target.body is not None else preset.get("body")
    hook = HttpHook(method=method, http_conn_id=target.connection_id)
    try:
        session = hook.get_conn()  # base URL and auth (headers, basic auth) from the Airflow connection
    except Exception as exc:  # noqa: BLE001 - e.g. the connection is not defined: a failed attempt
        return False, f"connection {target.connection_id!r} not usable ({type(exc).__name__})"
    url = hook.url_from_endpoint(endpoint)
    try:
        response = session.request(
            method, url, data=json.dumps(_fill(body, identifier)) if body is not None else None,
            headers={"Content-Type": "application/json"} if body is not None else None, timeout=30,
        )
    except Exception as exc:  # noqa: BLE001 - requests' messages contain the URL (personal data): keep the type only
        return False, f"no answer ({type(exc).__name__})"
    finally:
        session.close()
    if response.status_code == 404:
        return True, "HTTP 404 (already gone)"
    if response.status_code in target.success_codes:
        return True, f"HTTP {response.status_code}"
    return False, f"HTTP {response.status_code}"


def call_sql(target: SqlTarget, identifier: str) -> tuple[bool, str]:
    """Run the target's parameterised statements in one transaction on its Airflow connection."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(target.connection_id).get_hook().get_conn()
    except Exception as exc:  # noqa: BLE001 - unknown connection, unreachable server: a failed attempt
        return False, f"cannot connect ({type(exc).__name__})"
    try:
        rows = 0
        with conn.cursor() as cur:
            for statement in target.statements:
                cur.execute(statement, {"identifier": identifier})
                rows += max(cur.rowcount, 0)
        conn.commit()
    except Exception as exc:  # noqa: BLE001 - a driver message may quote the parameter: keep the type only
        conn.rollback()
        return False, f"SQL error ({type(exc).__name__})"
    finally:
        conn.close()
    return True, f"SQL ok ({rows} row(s))"


def propagate(
    conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request_id: str, target_name: str
) -> str:
    """Try one target for one request. Returns the result; raises TargetNotAcknowledged on failure."""
    target = next((t for t in policy.erasure.targets if t.name == target_name), None)
    if target is None:
        raise ValueError(f"target {target_name!r} is not declared in the policy's erasure.targets")
    # The outbox row stays locked from the read to the record of the attempt, so two workers (this
    # run's task and gdpr_erasure_retry) never call the same target for the same request at once.
    with conn.transaction():
        row = conn.execute(
            "SELECT p.status, p.key_id, p.nonce, p.identifier_ciphertext, r.subject_hash"
            " FROM gdpr.erasure_propagation p JOIN gdpr.erasure_request r USING (request_id)"
            " WHERE p.request_id = %s AND p.target = %s FOR UPDATE OF p SKIP LOCKED",
            (request_id, target_name),
        ).fetchone()
        if row is None:
            exists = conn.execute(
                "SELECT 1 FROM gdpr.erasure_propagation WHERE request_id = %s AND target = %s",
                (request_id, target_name),
            ).fetchone()
            if exists is None:
                raise ValueError(f"no outbox row for request {request_id} and target {target_name}")
            raise TargetNotAcknowledged(
                f"target {target_name} is being propagated for request {request_id} by another worker; try later"
            )
        status, key_id, nonce, ciphertext, subject_hash = row
        if status == "acknowledged":
            return "already acknowledged"
        identifier = keys.decrypt(
            key_id, bytes(nonce), bytes(ciphertext), outbox_aad(request_id, target_name, key_id)
        ).decode()
        if isinstance(target, HttpTarget):
            acknowledged, result = call_http(target, identifier)
        else:
            acknowledged, result = call_sql(target, identifier)
        del identifier
        conn.execute(
            "UPDATE gdpr.erasure_propagation SET attempts = attempts + 1, last_result = %s, last_attempt_at = now()"
            " WHERE request_id = %s AND target = %s",
            (result, request_id, target_name),
        )
        audit.record(conn, ctx, action="propagate", outcome="acknowledged" if acknowledged else "failed",
                     table=f"target:{target_name}", subject_hash=subject_hash,
                     details={"request_id": request_id, "target": target_name, "result": result})
        if acknowledged:
            conn.execute(
                "UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                " key_id = NULL, nonce = NULL, identifier_ciphertext = NULL"
                " WHERE request_id = %s AND target = %s",
                (request_id, target_name),
            )
            audit.record(conn, ctx, action="destroy_identifier", outcome="done",
                         table="gdpr.erasure_propagation", row_count=1, subject_hash=subject_hash,
                         details={"request_id": request_id, "target": target_name})
    if not acknowledged:
        raise TargetNotAcknowledged(f"target {target_name} did not acknowledge request {request_id}: {result}")
    log.info("Target %s acknowledged request %s: %s", target_name, request_id, result)
    return result


def complete_if_acknowledged(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> dict[str, Any] | None:
    """When every target acknowledged, mark the request completed and write its certificate."""
    with conn.transaction():
        pending = conn.execute(
            "SELECT count(*) FROM gdpr.erasure_propagation WHERE request_id = %s AND status = 'pending'", (request_id,)
        ).fetchone()[0]  # type: ignore[index]
        if pending:
            return None
        updated = conn.execute(
            "UPDATE gdpr.erasure_request SET status = 'completed', completed_at = now()"
            " WHERE request_id = %s AND status = 'pending_propagation'", (request_id,)
        ).rowcount
        if not updated:
            return None
        return write_certificate(conn, ctx, request_id)


def write_certificate(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> dict[str, Any]:
    """The erasure certificate: an audit row with dates, tables and counts, targets and acknowledgement
    times — no personal data. Called inside the caller's transaction."""
    req = conn.execute(
        "SELECT subject_hash, received_at, due_date, status, outcome, reason, created_at, completed_at, details"
        " FROM gdpr.erasure_request WHERE request_id = %s", (request_id,)
    ).fetchone()
    assert req is not None
    targets = conn.execute(
        "SELECT target, status, attempts, acknowledged_at, last_result FROM gdpr.erasure_propagation"
        " WHERE request_id = %s ORDER BY target", (request_id,)
    ).fetchall()
    certificate = {
        "request_id": request_id,
        "received_at": req[1].isoformat(),
        "due_date": req[2].isoformat(),
        "status": req[3],
        "outcome": req[4],
        "reason": req[5],
        "erased_at": req[6].isoformat(),
        "completed_at": req[7].isoformat() if req[7] else None,
        "rows_by_table": req[8].get("rows", {}),
        "holds": req[8].get("holds", []),
        "archive": req[8].get("archive", {}),
        "targets": [
            {"target": t[0], "status": t[1], "attempts": t[2],
             "acknowledged_at": t[3].isoformat() if t[3] else None, "result": t[4]}
            for t in targets
        ],
    }
    audit.record(conn, ctx, action="certificate", outcome=req[3], subject_hash=req[0], details=certificate)
    return certificate

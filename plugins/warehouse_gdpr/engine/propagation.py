"""Propagate an erasure to downstream systems through the outbox (gdpr.erasure_propagation).

One call of `propagate` tries one target once, in three steps so that no database transaction and no
row lock is held while the target is called (schema v5):

1. claim the outbox row in a short committed transaction (`claimed_until`, `claimed_by`); a second
   worker skips a row whose claim has not expired, so a target is never called twice at once, and the
   claim of a worker that died mid-call expires by itself;
2. decrypt the identifier and call the target through the transport seam (warehouse_gdpr.transport;
   the Airflow adapters are in airflow/transport.py): each call has an overall deadline;
3. record the attempt in a second short transaction. On acknowledgement the outbox row is marked
   acknowledged and its ciphertext destroyed, in the same transaction as the audit rows. Otherwise it
   raises `TargetNotAcknowledged` (`TargetMisconfigured` when retrying cannot help), and the row stays
   pending for Airflow's retries and then `gdpr_erasure_retry`.

An acknowledgement must be true:
- HTTP: a redirect is never followed nor an acknowledgement; a success code counts only with the body
  the API gives for success (the presets know theirs; a policy can declare `success_body`); a 404
  ("already gone") counts only with the API's own not-found answer where it has one, and nothing is sent
  at all to an HTTP target before `preflight` proved, in this run, its base URL and credentials right
  (an authenticated call the preset names, e.g. the account endpoint); where the API has a lookup, the
  deletion counts only when the lookup then answers 404.
- SQL: the statements run in one transaction; when together they change more than the target's
  `max_rows` (e.g. `WHERE true OR ...`), or the driver cannot count, it is rolled back.

Nothing here logs a URL, a body or an identifier: only the target name, HTTP statuses and row counts.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import psycopg

from ..transport import ConnectionNotUsable, HttpAnswer, Transport, TransportError
from . import audit, requests
from .audit import RunContext
from .crypto import Keys
from .erasure import outbox_aad
from .errors import TransientError
from .policy import HttpTarget, Policy, SqlTarget

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # https://developers.brevo.com/reference/delete-contact: 204 when deleted; 404 with the error model
    # {"code": "document_not_found", ...} when there is no such contact. https://developers.brevo.com/reference/
    # get-account: GET /v3/account needs the api-key. GET /v3/contacts/{identifier} answers 404 once deleted.
    "brevo": {
        "method": "DELETE",
        "endpoint": "/v3/contacts/{identifier}",
        "body": None,
        "success_codes": [204],
        "not_found_body": {"code": "document_not_found"},
        "preflight_endpoint": "/v3/account",
        "lookup_endpoint": "/v3/contacts/{identifier}",
        # https://developers.brevo.com/reference/get-contact-info: the contact's details (an access request).
        "access_endpoint": "/v3/contacts/{identifier}",
    },
    # https://developers.hubspot.com/docs/api-reference/crm-contacts-v3/basic/post-crm-v3-objects-contacts-gdpr-delete:
    # 204 with no body, also for an unknown email (HubSpot then blocklists it: there is no 404).
    # GET /account-info/v3/details (account details) needs the token; the contact lookup by email answers
    # 404 once the contact is gone.
    "hubspot": {
        "method": "POST",
        "endpoint": "/crm/v3/objects/contacts/gdpr-delete",
        "body": {"objectId": "{identifier}", "idProperty": "email"},
        "success_codes": [204],
        "not_found_body": None,
        "preflight_endpoint": "/account-info/v3/details",
        "lookup_endpoint": "/crm/v3/objects/contacts/{identifier}?idProperty=email",
        "access_endpoint": "/crm/v3/objects/contacts/{identifier}?idProperty=email",
    },
}
DEFAULT_SUCCESS_CODES = (200, 201, 202, 204)
ERROR_KEYS = ("error", "errors")  # a success answer whose JSON object holds one of these is not one
LEASE_MARGIN_SECONDS = 60  # a claim outlives the calls' deadlines by this much


class TargetNotAcknowledged(TransientError, RuntimeError):
    """The target did not acknowledge the erasure (yet). The message holds no personal data."""


class TargetMisconfigured(TargetNotAcknowledged):
    """Not acknowledged, and retrying will not help until someone fixes the target's policy or connection
    (a failed preflight, a redirect, a SQL statement that touches too many rows)."""


class PreflightFailed(TargetMisconfigured):
    """A target's preflight failed: nothing is sent to it in this run. The message holds no personal data."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable  # no answer, 5xx, 429: a later attempt may pass


@dataclass(frozen=True)
class HttpContract:
    """What a target's API says success, "already gone" and a right base URL look like (preset + policy)."""

    method: str
    endpoint: str
    body: Any
    success_codes: frozenset[int]
    success_body: dict[str, Any] | None
    not_found_body: dict[str, Any] | None
    preflight_endpoint: str
    lookup_endpoint: str | None
    timeout_seconds: float


def http_contract(target: HttpTarget) -> HttpContract:
    """The target's own keys, else its preset's (policy validation guarantees method, endpoint, preflight)."""
    preset = PRESETS.get(target.preset or "", {})

    def pick(key: str, default: Any = None) -> Any:
        value = getattr(target, key)
        return value if value is not None else preset.get(key, default)

    return HttpContract(
        method=pick("method"), endpoint=pick("endpoint"), body=pick("body"),
        success_codes=frozenset(pick("success_codes", DEFAULT_SUCCESS_CODES)),
        success_body=pick("success_body"), not_found_body=pick("not_found_body"),
        preflight_endpoint=pick("preflight_endpoint"), lookup_endpoint=pick("lookup_endpoint"),
        timeout_seconds=float(target.timeout_seconds),
    )


def _fill(template: Any, identifier: str) -> Any:
    if isinstance(template, str):
        return identifier if template == "{identifier}" else template
    if isinstance(template, dict):
        return {k: _fill(v, identifier) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, identifier) for v in template]
    return template


def _path(template: str, identifier: str) -> str:
    return template.replace("{identifier}", quote(identifier, safe=""))


_NOT_JSON = object()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return _NOT_JSON


def _holds(document: Any, expected: dict[str, Any]) -> bool:
    """Whether a JSON document is an object holding every expected key with its value."""
    return isinstance(document, dict) and all(k in document and document[k] == v for k, v in expected.items())


# What an access request's export (access.py) judges an answer with, the way an erasure's answer is judged.
NOT_JSON = _NOT_JSON


def endpoint_path(template: str, identifier: str) -> str:
    """A target's path template with the identifier URL-encoded into `{identifier}`."""
    return _path(template, identifier)


def json_document(body: bytes) -> Any:
    """An answer's body parsed as JSON, or NOT_JSON when it is not JSON."""
    return _json(body)


def holds_values(document: Any, expected: dict[str, Any]) -> bool:
    """Whether a JSON document is an object holding every expected key with its value."""
    return _holds(document, expected)


def _success_body_problem(answer: HttpAnswer, contract: HttpContract) -> str | None:
    """Why a success code's body is not the API's success, or None when it is."""
    if not answer.body.strip():
        return "without the expected success body" if contract.success_body else None
    document = _json(answer.body)
    if document is _NOT_JSON:
        return "with an answer that is not JSON"
    if isinstance(document, dict) and any(document.get(k) not in (None, False, "", [], {}) for k in ERROR_KEYS):
        return "with an error in the body"
    if contract.success_body and not _holds(document, contract.success_body):
        return "without the expected success body"
    return None


def judge(answer: HttpAnswer, contract: HttpContract) -> tuple[bool, str]:
    """(acknowledged, result) of the erasure call's answer. The result holds no body, only what it means."""
    status = answer.status
    if 300 <= status <= 399:
        return False, f"HTTP {status} (a redirect, not followed)"
    if status in contract.success_codes:
        problem = _success_body_problem(answer, contract)
        return (False, f"HTTP {status} {problem}") if problem else (True, f"HTTP {status}")
    if status == 404:
        if contract.not_found_body and not _holds(_json(answer.body), contract.not_found_body):
            return False, "HTTP 404 that is not the API's not-found answer (wrong endpoint?)"
        return True, "HTTP 404 (already gone)"
    return False, f"HTTP {status}"


def _confirm(call: Any, contract: HttpContract, identifier: str) -> tuple[bool, str]:
    """The lookup after the erasure call: only a 404 (the API's own, where it has one) confirms."""
    assert contract.lookup_endpoint is not None
    try:
        answer = call("GET", _path(contract.lookup_endpoint, identifier), deadline_seconds=contract.timeout_seconds)
    except TransportError as exc:
        return False, f"lookup: {exc}"
    if answer.status == 404:
        if contract.not_found_body and not _holds(_json(answer.body), contract.not_found_body):
            return False, "lookup HTTP 404 that is not the API's not-found answer (deletion not confirmed)"
        return True, "lookup 404"
    if 200 <= answer.status <= 299:
        return False, f"the lookup still finds the person (HTTP {answer.status})"
    return False, f"lookup HTTP {answer.status} (deletion not confirmed)"


def call_http(target: HttpTarget, identifier: str, transport: Transport) -> tuple[bool, str, bool]:
    """(acknowledged, result, misconfigured): the erasure call, then the lookup where there is one."""
    contract = http_contract(target)
    call = transport.http(target.connection_id)
    body = _fill(contract.body, identifier) if contract.body is not None else None
    try:
        answer = call(contract.method, _path(contract.endpoint, identifier), json_body=body,
                      deadline_seconds=contract.timeout_seconds)
    except ConnectionNotUsable as exc:
        return False, str(exc), True
    except TransportError as exc:
        return False, str(exc), False
    acknowledged, result = judge(answer, contract)
    if not acknowledged:
        return False, result, 300 <= answer.status <= 399
    if contract.lookup_endpoint:
        confirmed, lookup = _confirm(call, contract, identifier)
        return confirmed, f"{result}; {lookup}", False
    return True, result, False


def call_sql(target: SqlTarget, identifier: str, transport: Transport) -> tuple[bool, str, bool]:
    """(acknowledged, result, misconfigured): the statements in one transaction, within `max_rows`."""
    run = transport.sql(target.connection_id)
    try:
        outcome = run(target.statements, {"identifier": identifier}, max_rows=target.max_rows,
                      deadline_seconds=float(target.timeout_seconds))
    except ConnectionNotUsable as exc:
        return False, str(exc), True
    except TransportError as exc:
        return False, str(exc), False
    counts = ", ".join(str(n) for n in outcome.rowcounts)
    if outcome.committed:
        return True, f"SQL ok ({sum(outcome.rowcounts)} row(s))", False
    if any(n < 0 for n in outcome.rowcounts):
        return False, f"SQL refused: the driver gave no row count (statements so far: {counts}); rolled back", True
    return False, (f"SQL refused: the statements changed {sum(outcome.rowcounts)} row(s) (statements so far: "
                   f"{counts}), more than max_rows {target.max_rows}; rolled back"), True


# -- preflight -----------------------------------------------------------------------------------------


def _target(policy: Policy, target_name: str) -> HttpTarget | SqlTarget:
    target = next((t for t in policy.erasure.targets if t.name == target_name), None)
    if target is None:
        raise ValueError(f"target {target_name!r} is not declared in the policy's erasure.targets")
    return target


def _judge_preflight(answer: HttpAnswer) -> tuple[bool, str, bool]:
    """(passed, result, retryable) of the preflight's answer."""
    status = answer.status
    if 200 <= status <= 299:
        document = _json(answer.body)
        if not isinstance(document, dict):
            return False, f"HTTP {status} with an answer that is not the API's (not a JSON object)", False
        if any(document.get(k) not in (None, False, "", [], {}) for k in ERROR_KEYS):
            return False, f"HTTP {status} with an error in the body", False
        return True, f"HTTP {status}", False
    if 300 <= status <= 399:
        return False, f"HTTP {status} (a redirect, not followed: wrong base URL, or a login page?)", False
    if status in (401, 403):
        return False, f"HTTP {status} (credentials refused: the connection's key or token)", False
    if status == 408 or status == 429 or status >= 500:
        return False, f"HTTP {status}", True
    return False, f"HTTP {status} (wrong base URL or endpoint?)", False


def preflight(
    conn: psycopg.Connection, policy: Policy, ctx: RunContext, target_name: str, transport: Transport
) -> str:
    """Prove an HTTP target's base URL and credentials with the authenticated call its preset (or the
    policy's `preflight_endpoint`) names, and audit the result: `propagate` sends nothing to an HTTP target
    without a passed preflight in the same run. Raises PreflightFailed (no personal data) when it fails.
    A SQL target has none (its statements fail on a wrong database, and every call counts its rows)."""
    target = _target(policy, target_name)
    if isinstance(target, SqlTarget):
        return "no preflight for a SQL target (each call counts the rows it changes)"
    contract = http_contract(target)
    try:
        answer = transport.http(target.connection_id)("GET", contract.preflight_endpoint,
                                                       deadline_seconds=contract.timeout_seconds)
        passed, result, retryable = _judge_preflight(answer)
    except ConnectionNotUsable as exc:
        passed, result, retryable = False, str(exc), False
    except TransportError as exc:
        passed, result, retryable = False, str(exc), True
    with conn.transaction():
        audit.record(conn, ctx, action="preflight", outcome="passed" if passed else "failed",
                     table=f"target:{target_name}", details={"target": target_name, "result": result})
    if not passed:
        raise PreflightFailed(
            f"preflight of target {target_name} failed: GET {contract.preflight_endpoint} answered {result}. "
            "The base URL or the credentials of its connection "
            f"{target.connection_id!r} are not proven right, so nothing is sent to it and its erasures stay "
            "pending (runbook: 'A preflight fails')",
            retryable=retryable,
        )
    log.info("Preflight of target %s passed: %s", target_name, result)
    return result


def preflight_passed(conn: psycopg.Connection, ctx: RunContext, target_name: str) -> bool:
    """Whether the latest preflight of the target in this DAG run (the audit log says) passed."""
    row = conn.execute(
        "SELECT outcome FROM gdpr.audit_log WHERE dag_id = %s AND run_id = %s AND action = 'preflight'"
        " AND table_name = %s ORDER BY audit_id DESC LIMIT 1",
        (ctx.dag_id, ctx.run_id, f"target:{target_name}"),
    ).fetchone()
    conn.rollback()
    return row is not None and row[0] == "passed"


def failed_preflights(conn: psycopg.Connection, ctx: RunContext) -> list[str]:
    """The targets whose latest preflight in this DAG run failed (from the audit log), sorted."""
    rows = conn.execute(
        "SELECT DISTINCT ON (table_name) table_name, outcome FROM gdpr.audit_log WHERE dag_id = %s AND run_id = %s"
        " AND action = 'preflight' ORDER BY table_name, audit_id DESC",
        (ctx.dag_id, ctx.run_id),
    ).fetchall()
    conn.rollback()
    return sorted(name.removeprefix("target:") for name, outcome in rows if outcome != "passed")


# -- one attempt -----------------------------------------------------------------------------------------


def _lease_seconds(target: HttpTarget | SqlTarget) -> float:
    calls = 2 if isinstance(target, HttpTarget) else len(target.statements)  # erasure call and lookup
    return calls * float(target.timeout_seconds) + LEASE_MARGIN_SECONDS


def propagate(
    conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request_id: str, target_name: str,
    transport: Transport,
) -> str:
    """Try one target for one request. Returns the result; raises TargetNotAcknowledged on failure."""
    target = _target(policy, target_name)
    row = conn.execute(
        "SELECT status FROM gdpr.erasure_propagation WHERE request_id = %s AND target = %s", (request_id, target_name)
    ).fetchone()
    conn.rollback()
    if row is None:
        raise ValueError(f"no outbox row for request {request_id} and target {target_name}")
    if row[0] == "acknowledged":
        return "already acknowledged"
    if isinstance(target, HttpTarget) and not preflight_passed(conn, ctx, target_name):
        raise PreflightFailed(
            f"target {target_name} has no passed preflight in this run ({ctx.dag_id}, {ctx.run_id}): nothing was "
            f"sent for request {request_id}, which stays pending (see the preflight task's log; runbook: "
            "'A preflight fails')"
        )
    # 1. Claim, committed before the call: no transaction and no row lock is held while the target answers.
    token = f"{ctx.dag_id}/{ctx.run_id}/{ctx.task_id}/{uuid.uuid4().hex[:12]}"
    with conn.transaction():
        claimed = conn.execute(
            "UPDATE gdpr.erasure_propagation p SET claimed_until = now() + make_interval(secs => %s), claimed_by = %s"
            " FROM gdpr.request r WHERE r.request_id = p.request_id AND p.request_id = %s AND p.target = %s"
            " AND p.status = 'pending' AND (p.claimed_until IS NULL OR p.claimed_until <= now())"
            " RETURNING p.key_id, p.nonce, p.identifier_ciphertext, r.subject_hash",
            (_lease_seconds(target), token, request_id, target_name),
        ).fetchone()
    if claimed is None:
        state = conn.execute(
            "SELECT status, claimed_until FROM gdpr.erasure_propagation WHERE request_id = %s AND target = %s",
            (request_id, target_name),
        ).fetchone()
        conn.rollback()
        if state is not None and state[0] == "acknowledged":
            return "already acknowledged"
        raise TargetNotAcknowledged(
            f"target {target_name} is being propagated for request {request_id} by another worker (claimed until "
            f"{state[1]:%H:%M:%S %Z} at the latest); try later" if state and state[1] else
            f"target {target_name} is being propagated for request {request_id} by another worker; try later"
        )
    key_id, nonce, ciphertext, subject_hash = claimed
    # 2. The call, outside any transaction.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    identifier = keys.decrypt(
        key_id, bytes(nonce), bytes(ciphertext), outbox_aad(request_id, target_name, key_id)
    ).decode()
    if isinstance(target, HttpTarget):
        acknowledged, result, misconfigured = call_http(target, identifier, transport)
    else:
        acknowledged, result, misconfigured = call_sql(target, identifier, transport)
    del identifier
    # 3. Record, in a second short transaction (and release the claim if it is still ours).
    with conn.transaction():
        recorded = conn.execute(
            "UPDATE gdpr.erasure_propagation SET attempts = attempts + 1, last_result = %s, last_attempt_at = now(),"
            " claimed_until = CASE WHEN claimed_by = %s THEN NULL ELSE claimed_until END,"
            " claimed_by = CASE WHEN claimed_by = %s THEN NULL ELSE claimed_by END"
            " WHERE request_id = %s AND target = %s AND status = 'pending'",
            (result, token, token, request_id, target_name),
        ).rowcount
        audit.record(conn, ctx, action="propagate", outcome="acknowledged" if acknowledged else "failed",
                     table=f"target:{target_name}", subject_hash=subject_hash,
                     details={"request_id": request_id, "target": target_name, "result": result})
        if acknowledged and recorded:
            conn.execute(
                "UPDATE gdpr.erasure_propagation SET status = 'acknowledged', acknowledged_at = now(),"
                " key_id = NULL, nonce = NULL, identifier_ciphertext = NULL, claimed_until = NULL, claimed_by = NULL"
                " WHERE request_id = %s AND target = %s",
                (request_id, target_name),
            )
            audit.record(conn, ctx, action="destroy_identifier", outcome="done",
                         table="gdpr.erasure_propagation", row_count=1, subject_hash=subject_hash,
                         details={"request_id": request_id, "target": target_name})
    if not acknowledged:
        error = TargetMisconfigured if misconfigured else TargetNotAcknowledged
        raise error(f"target {target_name} did not acknowledge request {request_id}: {result}")
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
            "UPDATE gdpr.request SET status = 'completed', completed_at = now()"
            " WHERE request_id = %s AND status = 'pending_propagation'", (request_id,)
        ).rowcount
        if not updated:
            return None
        certificate = write_certificate(conn, ctx, request_id)
        requests.destroy_identifier(conn, ctx, request_id)  # a registered request's identifier
        return certificate


def write_certificate(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> dict[str, Any]:
    """The erasure certificate: an audit row with dates, tables and counts, targets and acknowledgement
    times — no personal data. Called inside the caller's transaction."""
    req = conn.execute(
        "SELECT subject_hash, received_at, coalesce(extended_due_date, due_date), status, outcome, reason,"
        " coalesce((details->>'run_at')::timestamptz, created_at), completed_at, details FROM gdpr.request"
        " WHERE request_id = %s", (request_id,)
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

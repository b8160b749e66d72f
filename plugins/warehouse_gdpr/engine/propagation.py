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

import dataclasses
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
from .policy import HttpTarget, Policy, SqlTarget, Webhook

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
# What a preset's API takes for the other kinds of request (a target's `rectify`, `restrict`, `lift` keys
# override each part). https://developers.brevo.com/reference/update-contact: PUT /v3/contacts/{identifier},
# 204; `attributes` (EMAIL, SMS, FIRSTNAME, ...) and `emailBlacklisted` (no campaign is sent to a blacklisted
# contact). https://developers.hubspot.com/docs/api-reference/crm-contacts-v3/basic/patch-crm-v3-objects-contacts-
# contactId: PATCH with `idProperty=email`, 200 with the contact.
ACTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "brevo": {
        "rectify": {"method": "PUT", "endpoint": "/v3/contacts/{identifier}", "body": {"attributes": "{changes}"},
                    "success_codes": [204]},
        "restrict": {"method": "PUT", "endpoint": "/v3/contacts/{identifier}", "body": {"emailBlacklisted": True},
                     "success_codes": [204]},
        "lift": {"method": "PUT", "endpoint": "/v3/contacts/{identifier}", "body": {"emailBlacklisted": False},
                 "success_codes": [204]},
    },
    "hubspot": {
        "rectify": {"method": "PATCH", "endpoint": "/crm/v3/objects/contacts/{identifier}?idProperty=email",
                    "body": {"properties": "{changes}"}, "success_codes": [200]},
    },
}
# The request kinds whose outbox rows carry a JSON payload (an erasure's carries the email alone), and the
# target's action each one calls.
ACTION_OF_KIND = {"rectification": "rectify", "restriction": "restrict", "restriction_lift": "lift"}
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


def _fill(template: Any, identifier: str, changes: dict[str, str] | None = None) -> Any:
    if isinstance(template, str):
        if template == "{changes}" and changes is not None:
            return dict(changes)
        return identifier if template == "{identifier}" else template
    if isinstance(template, dict):
        return {k: _fill(v, identifier, changes) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, identifier, changes) for v in template]
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


def action_contract(target: HttpTarget, action: str) -> HttpContract:
    """The call of a target's `rectify`, `restrict` or `lift`: its own keys, else the preset's; the target's
    not-found answer (a 404 means the target holds nothing of the person: nothing to correct or restrict)."""
    spec = getattr(target, action)
    assert spec is not None, f"target {target.name} has no {action}"
    preset = ACTIONS.get(target.preset or "", {}).get(action, {})

    def pick(key: str, default: Any = None) -> Any:
        value = getattr(spec, key)
        return value if value is not None else preset.get(key, default)

    base = http_contract(target)
    return dataclasses.replace(
        base, method=pick("method"), endpoint=pick("endpoint"), body=pick("body"),
        success_codes=frozenset(pick("success_codes", DEFAULT_SUCCESS_CODES)), success_body=pick("success_body"),
        lookup_endpoint=None)


def call_http(target: HttpTarget, identifier: str, transport: Transport, contract: HttpContract | None = None,
              changes: dict[str, str] | None = None) -> tuple[bool, str, bool]:
    """(acknowledged, result, misconfigured): the erasure call (or `contract`'s, e.g. a rectification's with its
    `changes`), then the lookup where there is one."""
    contract = contract or http_contract(target)
    call = transport.http(target.connection_id)
    body = _fill(contract.body, identifier, changes) if contract.body is not None else None
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


def call_sql(target: SqlTarget, identifier: str, transport: Transport, statements: list[str] | None = None,
             params: dict[str, Any] | None = None) -> tuple[bool, str, bool]:
    """(acknowledged, result, misconfigured): the statements (the erasure's, or `statements` with their `params`)
    in one transaction, within `max_rows`."""
    run = transport.sql(target.connection_id)
    try:
        outcome = run(statements or target.statements, {"identifier": identifier, **(params or {})},
                      max_rows=target.max_rows, deadline_seconds=float(target.timeout_seconds))
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


def _target(policy: Policy, target_name: str) -> HttpTarget | SqlTarget | Webhook:
    target = next((t for t in policy.erasure.targets if t.name == target_name), None)
    notify = policy.restriction.notify
    if target is None and notify is not None and notify.name == target_name:
        return notify
    if target is None:
        raise ValueError(f"target {target_name!r} is not declared in the policy's erasure.targets "
                         "(nor as restriction.notify)")
    return target


def declared_targets(policy: Policy) -> set[str]:
    """The names an outbox row may have: the erasure targets and the sales team's webhook."""
    notify = policy.restriction.notify
    return {t.name for t in policy.erasure.targets} | ({notify.name} if notify else set())


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
    if isinstance(target, Webhook):
        return "no preflight for a webhook (it is told internal ids only; any 2xx answer acknowledges)"
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


def _lease_seconds(target: HttpTarget | SqlTarget | Webhook) -> float:
    calls = 2 if isinstance(target, HttpTarget) else len(target.statements) if isinstance(target, SqlTarget) else 1
    if isinstance(target, SqlTarget):  # the longest statement list of any kind
        calls = max([calls, len(target.restrict_statements), *map(len, target.rectify_statements.values())])
    return calls * float(target.timeout_seconds) + LEASE_MARGIN_SECONDS


def outbox_aad_for(kind: str, request_id: str, target: str, key_id: str) -> bytes:
    """The associated data binding an outbox payload to its request, kind and target (an erasure's as before)."""
    if kind == "erasure":
        return outbox_aad(request_id, target, key_id)
    return f"{kind}|{request_id}|{target}|{key_id}".encode()


def queue(conn: psycopg.Connection, keys: Keys, request_id: str, kind: str, target: str,
          payload: dict[str, Any]) -> None:
    """One pending outbox row for a request of `kind` (rectification, restriction, restriction_lift): its
    payload (the person's email and what the target needs) encrypted under the store key, destroyed on
    acknowledgement. In the caller's transaction."""
    key_id, nonce, ciphertext = keys.encrypt(json.dumps(payload, sort_keys=True).encode(),
                                             outbox_aad_for(kind, request_id, target, keys.store_key_id))
    conn.execute(
        "INSERT INTO gdpr.erasure_propagation (request_id, target, status, key_id, nonce, identifier_ciphertext)"
        " VALUES (%s, %s, 'pending', %s, %s, %s)", (request_id, target, key_id, nonce, ciphertext))


def targets_for(policy: Policy, kind: str, changes: dict[str, str] | None = None) -> list[str]:
    """The targets told of a request of `kind`: those that hold one of the changed columns (rectification),
    those with `restrict`/`lift` and the sales team's webhook (restriction and its lift)."""
    names = []
    for target in policy.erasure.targets:
        if kind == "rectification":
            held = (target.rectify.fields if isinstance(target, HttpTarget) and target.rectify
                    else target.rectify_statements if isinstance(target, SqlTarget) else {})
            if set(held) & set(changes or {}):
                names.append(target.name)
        elif (target.restrict is not None if isinstance(target, HttpTarget) else bool(target.restrict_statements)):
            names.append(target.name)
    if kind in ("restriction", "restriction_lift") and policy.restriction.notify:
        names.append(policy.restriction.notify.name)
    return names


def _call(target: HttpTarget | SqlTarget | Webhook, kind: str, plaintext: str,
          transport: Transport) -> tuple[bool, str, bool]:
    """Send one outbox row's request to its target: (acknowledged, result, misconfigured)."""
    if kind == "erasure":
        assert not isinstance(target, Webhook)
        return call_http(target, plaintext, transport) if isinstance(target, HttpTarget) \
            else call_sql(target, plaintext, transport)
    payload = json.loads(plaintext)
    identifier = payload.get("identifier") or ""
    if isinstance(target, Webhook):
        return call_webhook(target, kind, payload, transport)
    action = ACTION_OF_KIND[kind]
    if isinstance(target, HttpTarget):
        if kind == "rectification":
            assert target.rectify is not None
            fields = {target.rectify.fields[c]: v for c, v in payload["changes"].items() if c in target.rectify.fields}
            return call_http(target, identifier, transport, action_contract(target, action), fields)
        return call_http(target, identifier, transport, action_contract(target, action))
    if kind == "rectification":
        columns = [(target.rectify_statements[c], v) for c, v in sorted(payload["changes"].items())
                   if c in target.rectify_statements]
        return call_sql_each(target, identifier, transport, columns)
    return call_sql(target, identifier, transport, target.restrict_statements if kind == "restriction"
                    else target.lift_statements)


def call_sql_each(target: SqlTarget, identifier: str, transport: Transport,
                  columns: list[tuple[list[str], str]]) -> tuple[bool, str, bool]:
    """A rectification's statements, each column's with its own `%(value)s`, in one transaction per column
    (the transport runs one parameter set per call; a retry runs them all again, which an UPDATE to a value
    allows); acknowledged when every column's call is."""
    results = []
    for statements, value in columns:
        acknowledged, result, misconfigured = call_sql(target, identifier, transport, statements, {"value": value})
        if not acknowledged:
            return False, result, misconfigured
        results.append(result)
    return True, "; ".join(results), False


def call_webhook(target: Webhook, kind: str, payload: dict[str, Any], transport: Transport) -> tuple[bool, str, bool]:
    """Tell the sales team's webhook of a restriction or its lift: internal ids only, never the email."""
    body = {"event": "restricted" if kind == "restriction" else "lifted", "request_id": payload.get("request_id"),
            "subject_table": payload.get("subject_table"), "subject_ids": payload.get("subject_ids", [])}
    try:
        answer = transport.http(target.connection_id)("POST", target.endpoint, json_body=body,
                                                      deadline_seconds=float(target.timeout_seconds))
    except ConnectionNotUsable as exc:
        return False, str(exc), True
    except TransportError as exc:
        return False, str(exc), False
    if 200 <= answer.status <= 299:
        return True, f"HTTP {answer.status}", False
    return False, f"HTTP {answer.status}", 300 <= answer.status <= 399


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
            " RETURNING p.key_id, p.nonce, p.identifier_ciphertext, r.subject_hash, r.kind",
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
    key_id, nonce, ciphertext, subject_hash, kind = claimed
    # 2. The call, outside any transaction.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    plaintext = keys.decrypt(
        key_id, bytes(nonce), bytes(ciphertext), outbox_aad_for(kind, request_id, target_name, key_id)
    ).decode()
    acknowledged, result, misconfigured = _call(target, kind, plaintext, transport)
    del plaintext
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
            " WHERE request_id = %s AND status = 'pending_propagation' RETURNING kind", (request_id,)
        ).fetchone()
        if not updated:
            return None
        certificate = (write_certificate if updated[0] == "erasure" else write_record)(conn, ctx, request_id)
        requests.destroy_identifier(conn, ctx, request_id)  # a registered request's identifier
        return certificate


def write_record(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> dict[str, Any]:
    """The record of a rectification or a restriction (or its lift), as the certificate is an erasure's: an
    audit row with the kind, dates, status, outcome, tables and counts, columns, targets and their
    acknowledgement times; no personal data (column names, never values). In the caller's transaction."""
    req = conn.execute(
        "SELECT subject_hash, kind, received_at, coalesce(extended_due_date, due_date), status, outcome, reason,"
        " completed_at, details FROM gdpr.request WHERE request_id = %s FOR SHARE", (request_id,)
    ).fetchone()
    assert req is not None
    targets = conn.execute(  # locked: the database checks the record against them when it is written
        "SELECT target, status, attempts, acknowledged_at, last_result FROM gdpr.erasure_propagation"
        " WHERE request_id = %s ORDER BY target FOR SHARE", (request_id,)
    ).fetchall()
    details = req[8]
    record = {
        "request_id": request_id, "kind": req[1], "received_at": req[2].isoformat(), "due_date": req[3].isoformat(),
        "status": req[4], "outcome": req[5], "reason": req[6],
        "completed_at": req[7].isoformat() if req[7] else None,
        "rows_by_table": details.get("rows", {}), "columns": details.get("columns", []),
        "targets": [{"target": t[0], "status": t[1], "attempts": t[2],
                     "acknowledged_at": t[3].isoformat() if t[3] else None, "result": t[4]} for t in targets],
    }
    audit.record(conn, ctx, action="request_record", outcome=req[4], subject_hash=req[0], details=record)
    return record


def write_certificate(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> dict[str, Any]:
    """The erasure certificate: an audit row with dates, tables and counts, targets and acknowledgement
    times — no personal data. Called inside the caller's transaction."""
    req = conn.execute(
        "SELECT subject_hash, received_at, coalesce(extended_due_date, due_date), status, outcome, reason,"
        " coalesce((details->>'run_at')::timestamptz, created_at), completed_at, details FROM gdpr.request"
        " WHERE request_id = %s FOR SHARE", (request_id,)
    ).fetchone()
    assert req is not None
    targets = conn.execute(  # locked: the database checks the certificate against them when it is written
        "SELECT target, status, attempts, acknowledged_at, last_result FROM gdpr.erasure_propagation"
        " WHERE request_id = %s ORDER BY target FOR SHARE", (request_id,)
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

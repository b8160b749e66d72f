"""The request store (gdpr.request): one lifecycle for every right a person exercises (GDPR art. 15-21).

Every request is one row: its kind, the subject's keyed hash, the date it was received, the date it is
due (one month later, art. 12(3)), its status and outcome, an extension if one was given, and the
evidence the article asks to keep (`details`: tables and counts, targets, holds). No personal data.

A request may be registered before it runs (`warehouse-gdpr request new`): the person's identifier
(normalised email, or ``subject_id:N``) is then stored encrypted with the store key (AES-256-GCM) and
a subject DAG triggered with ``{"request_id": ID}`` alone decrypts it in memory (`resolve_params`).
That keeps the address out of the process list and out of Airflow's ``dag_run.conf``. The ciphertext
is destroyed when the request completes (`destroy_identifier`); the keyed hash stays.

Completed requests are kept as proof for the policy's ``requests.keep_for`` (P3Y by default), then
purged by the weekly sweep with their outbox rows (`purge`).

Statuses: ``registered`` (not run yet), ``in_progress``, ``pending_propagation`` (done in the warehouse,
downstream systems pending), and the terminal ``completed``, ``refused``, ``not_found``.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg
from cryptography.exceptions import InvalidTag
from psycopg.types.json import Jsonb

from . import audit
from .audit import RunContext
from .crypto import Keys, normalise_email
from .erasure import EMAIL_MAX_LENGTH, EMAIL_PATTERN, MAX_RECEIVED_AGE_DAYS, REQUEST_ID_PATTERN
from .errors import ConfigurationError

KINDS = ("access", "portability", "rectification", "restriction", "restriction_lift", "erasure", "objection")
TERMINAL = ("completed", "refused", "not_found")
REASON_MAX_LENGTH = 500
EXTENDED_MONTHS = 3  # art. 12(3): "extended by two further months", three after receipt
SUBJECT_ID_PREFIX = "subject_id:"
# The DAG of this package that runs each kind, for the hint printed at registration.
DAG_FOR_KIND = {"erasure": "gdpr_subject_erasure", "access": "gdpr_subject_access",
                "portability": "gdpr_subject_access", "rectification": "gdpr_subject_rectification",
                "restriction": "gdpr_subject_restriction", "restriction_lift": "gdpr_subject_restriction"}


class RequestStoreError(ConfigurationError, ValueError):
    """A request cannot be registered, found, extended or run as asked. The message names the request id
    and what is wrong, never an identifier or a refused value; nothing was changed."""


def add_months(day: date, months: int) -> date:
    """The same day `months` calendar months later; the 31st falls back to the month's last day."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def due_date(received_at: date) -> date:
    """One calendar month after receipt (art. 12(3)): the rule of `erasure.ErasureRequest.due_date`."""
    return add_months(received_at, 1)


def _check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not re.fullmatch(REQUEST_ID_PATTERN, request_id):
        raise RequestStoreError("the request id must be 3-64 characters: letters, digits, '.', '_', ':' or '-'")
    return request_id


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise RequestStoreError(f"unknown request kind: give one of {', '.join(KINDS)}")
    return str(kind)


def parse_identifier(text: str) -> tuple[str | None, int | None]:
    """(normalised email, None) or (None, subject id) from what the operator typed. Never echoes it."""
    value = text.strip()
    if value.startswith(SUBJECT_ID_PREFIX):
        digits = value[len(SUBJECT_ID_PREFIX):].strip()
        if not digits.isascii() or not digits.isdigit() or not 0 < int(digits) < 2**63:
            raise RequestStoreError("`subject_id:N` needs a positive integer N")
        return None, int(digits)
    if len(value) > EMAIL_MAX_LENGTH or not re.fullmatch(EMAIL_PATTERN, value):
        raise RequestStoreError(
            "the identifier is neither a plain ASCII email address of at most 254 characters (look-alike "
            "characters are refused) nor `subject_id:N`"
        )
    return normalise_email(value), None


def identifier_aad(request_id: str, kind: str, key_id: str) -> bytes:
    """Binds a ciphertext to its request: it cannot be moved to another request or kind."""
    return f"request|{request_id}|{kind}|{key_id}".encode()


@dataclass(frozen=True, repr=False)
class Registered:
    """A registered request with its identifier decrypted, in memory only (repr hides it)."""

    request_id: str
    kind: str
    subject_hash: str
    received_at: date
    due_date: date  # the extended one when extended
    status: str
    email: str | None
    subject_id: int | None
    # A rectification's changes (column -> new value), stored encrypted with the identifier.
    changes: dict[str, str] | None = None

    def __repr__(self) -> str:
        return (f"Registered(request_id={self.request_id!r}, kind={self.kind!r}, status={self.status!r}, "
                f"by={'email' if self.email else 'subject_id'})")

    def params(self) -> dict[str, Any]:
        """What a subject DAG's params would carry for this request."""
        out: dict[str, Any] = {"email": self.email, "subject_id": self.subject_id,
                               "received_at": self.received_at.isoformat()}
        if self.changes is not None:
            out["changes"] = dict(self.changes)
        return out


def register(
    conn: psycopg.Connection,
    keys: Keys,
    ctx: RunContext,
    *,
    kind: str,
    request_id: str,
    identifier: str,
    received_at: date,
    today: date,
    strip_plus_tags: bool = False,
    changes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Store a request before it runs: the identifier encrypted, its keyed hash, the dates. Audited.

    A rectification also stores its `changes` (column -> new value, checked by the caller against the
    policy: `rectification.check_changes`), encrypted with the identifier; other kinds take none.
    Everything is checked before the one transaction that writes; an existing request id is refused."""
    _check_kind(kind)
    _check_request_id(request_id)
    if (kind == "rectification") != bool(changes):
        raise RequestStoreError("a rectification request needs its changes (column=new value: `warehouse-gdpr request "
                                "new --kind rectification` reads them on stdin after the identifier), and only a "
                                "rectification request takes changes: nothing was changed")
    email, subject_id = parse_identifier(identifier)
    if received_at > today:
        raise RequestStoreError("the date of receipt is in the future")
    if received_at < today - timedelta(days=MAX_RECEIVED_AGE_DAYS):  # the subject DAG would refuse to run it
        raise RequestStoreError(
            f"the date of receipt is more than {MAX_RECEIVED_AGE_DAYS} days before today: refused as a likely typo "
            "(a request that old is long overdue: tell the DPO; runbook: 'Trigger an erasure')"
        )
    # The hash erasure.locate gives the same person (by email), or the one it gives an id without an email.
    subject_hash = keys.subject_hash(email, strip_plus_tags) if email else keys.hash_value(f"subject-id:{subject_id}")
    plaintext = email if email else f"{SUBJECT_ID_PREFIX}{subject_id}"
    if changes:  # one line of identifier (an email never holds a newline), then the changes as JSON
        plaintext += "\n" + json.dumps(dict(changes), sort_keys=True)
    key_id, nonce, ciphertext = keys.encrypt(plaintext.encode(), identifier_aad(request_id, kind, keys.store_key_id))
    del plaintext
    due = due_date(received_at)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, details,"
            " key_id, nonce, identifier_ciphertext) VALUES (%s, %s, %s, %s, %s, 'registered', %s, %s, %s, %s)"
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            (request_id, kind, subject_hash, received_at, due,
             Jsonb({"registered_by": "email" if email else "subject_id"}), key_id, nonce, ciphertext),
        ).fetchone()
        if row is None:
            existing = conn.execute("SELECT kind, status FROM gdpr.request WHERE request_id = %s",
                                    (request_id,)).fetchone()
            raise RequestStoreError(
                f"request {request_id} already exists ({existing[0]}, {existing[1]}): nothing was changed; "  # type: ignore[index]
                "give each request its own id"
            )
        audit.record(conn, ctx, action="register_request", outcome="registered", table="gdpr.request", row_count=1,
                     subject_hash=subject_hash,
                     details={"request_id": request_id, "kind": kind, "received_at": received_at.isoformat(),
                              "due_date": due.isoformat(), "by": "email" if email else "subject_id"})
    return {"request_id": request_id, "kind": kind, "received_at": received_at.isoformat(), "due_date": due.isoformat(),
            "subject_hash": subject_hash}


def load(conn: psycopg.Connection, keys: Keys, request_id: str, kind: str) -> Registered:
    """The registered request `request_id` of kind `kind`, its identifier decrypted (in memory only)."""
    _check_request_id(request_id)
    row = conn.execute(
        "SELECT kind, subject_hash, received_at, coalesce(extended_due_date, due_date), status, completed_at,"
        " key_id, nonce, identifier_ciphertext FROM gdpr.request WHERE request_id = %s", (request_id,)
    ).fetchone()
    conn.rollback()
    if row is None:
        raise RequestStoreError(
            f"no request {request_id} is registered: register it first (warehouse-gdpr request new), "
            "or give the email or the subject id"
        )
    found_kind, subject_hash, received_at, due, status, completed_at, key_id, nonce, ciphertext = row
    if found_kind != kind:
        raise RequestStoreError(f"request {request_id} is of kind {found_kind}, not {kind}: "
                                "run it with the DAG of its kind; nothing was changed")
    if ciphertext is None:
        if completed_at is not None:
            raise RequestStoreError(
                f"request {request_id} is {status} since {completed_at.date().isoformat()}: its identifier was "
                "destroyed when it completed; nothing to run"
            )
        raise RequestStoreError(
            f"request {request_id} holds no identifier (it was triggered with the email or subject id): "
            "trigger it the same way"
        )
    try:
        plaintext = keys.decrypt(key_id, bytes(nonce), bytes(ciphertext),
                                 identifier_aad(request_id, kind, key_id)).decode()
    except InvalidTag:
        raise RequestStoreError(
            f"the encrypted identifier of request {request_id} does not decrypt (altered, or copied from another "
            "request): nothing was changed; register the request again under a new id"
        ) from None
    identifier, _, changes_json = plaintext.partition("\n")
    del plaintext
    changes = json.loads(changes_json) if changes_json else None
    email, subject_id = (None, int(identifier[len(SUBJECT_ID_PREFIX):])) if identifier.startswith(SUBJECT_ID_PREFIX) \
        else (identifier, None)
    return Registered(request_id, kind, subject_hash, received_at, due, status, email, subject_id, changes)


def resolve_params(conn: psycopg.Connection, keys: Keys, kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A subject DAG's params, completed from the registered request when they hold its id alone (see
    `resolve`)."""
    return resolve(conn, keys, kind, params)[0]


def resolve(conn: psycopg.Connection, keys: Keys, kind: str,
            params: Mapping[str, Any]) -> tuple[dict[str, Any], Registered | None]:
    """A subject DAG's params, completed from the registered request when they hold its id alone, and that
    registered request (None when the params name the person themselves). Call it outside a transaction
    (it reads, then rolls back).

    ``{"request_id": ID}`` alone: the registered request's identifier (decrypted, in memory) and date of
    receipt are filled in. An identifier with the id of a registered request, a request of another kind,
    an unknown id, or a date of receipt that differs from the registered one: RequestStoreError."""
    out = {k: params.get(k) for k in params}
    request_id = out.get("request_id")
    if not isinstance(request_id, str) or not re.fullmatch(REQUEST_ID_PATTERN, request_id):
        return out, None  # the caller's own validation names the field
    email = out.get("email")
    has_identifier = (bool(email.strip()) if isinstance(email, str) else email is not None) \
        or out.get("subject_id") is not None  # a blank email is "not given", as erasure.parse_request reads it
    has_identifier = has_identifier or out.get("changes") is not None  # a rectification's changes go with it
    if has_identifier:
        row = conn.execute(
            "SELECT kind, status = 'registered' OR identifier_ciphertext IS NOT NULL FROM gdpr.request"
            " WHERE request_id = %s", (request_id,)
        ).fetchone()
        conn.rollback()
        if row is not None and row[0] != kind:
            raise RequestStoreError(f"request {request_id} is of kind {row[0]}, not {kind}: "
                                    "give each request its own id; nothing was changed")
        if row is not None and row[1]:
            raise RequestStoreError(
                f"request {request_id} is registered with its identifier: trigger it with "
                f'{{"request_id": "{request_id}"}} alone, without the email or subject id'
                + (" or changes" if kind == "rectification" else "")
            )
        return out, None
    registered = load(conn, keys, request_id, kind)
    received = out.get("received_at")
    if received and str(received) != registered.received_at.isoformat():
        raise RequestStoreError(
            f"request {request_id} was registered as received on {registered.received_at.isoformat()}: "
            "leave `received_at` empty"
        )
    out.update(registered.params())
    return out, registered


def extend(conn: psycopg.Connection, ctx: RunContext, request_id: str, reason: str, today: date) -> dict[str, Any]:
    """Extend the due date once, to three months after receipt (art. 12(3)), before the first due date."""
    _check_request_id(request_id)
    reason = reason.strip() if isinstance(reason, str) else ""
    if not 0 < len(reason) <= REASON_MAX_LENGTH:
        raise RequestStoreError(f"the reason must be 1-{REASON_MAX_LENGTH} characters (it is {len(reason)})")
    with conn.transaction():
        row = conn.execute(
            "SELECT kind, subject_hash, received_at, due_date, status, completed_at, extended_due_date, extended_at"
            " FROM gdpr.request WHERE request_id = %s FOR UPDATE", (request_id,)
        ).fetchone()
        if row is None:
            raise RequestStoreError(f"no request {request_id}: nothing was changed")
        kind, subject_hash, received_at, first_due, status, completed_at, extended_to, extended_at = row
        if extended_to is not None:
            raise RequestStoreError(
                f"request {request_id} was already extended on {extended_at.date().isoformat()} to "
                f"{extended_to.isoformat()}: an extension is given once; nothing was changed"
            )
        if completed_at is not None:
            raise RequestStoreError(f"request {request_id} is {status}: nothing to extend; nothing was changed")
        if today > first_due:
            raise RequestStoreError(
                f"request {request_id} was due on {first_due.isoformat()}: an extension is decided, and the person "
                "told, within the first month (art. 12(3)); nothing was changed"
            )
        new_due = add_months(received_at, EXTENDED_MONTHS)
        conn.execute(
            "UPDATE gdpr.request SET extended_due_date = %s, extension_reason = %s, extended_at = now()"
            " WHERE request_id = %s", (new_due, reason, request_id),
        )
        audit.record(conn, ctx, action="extend_request", outcome="extended", table="gdpr.request", row_count=1,
                     subject_hash=subject_hash,
                     details={"request_id": request_id, "kind": kind, "due_date": first_due.isoformat(),
                              "extended_due_date": new_due.isoformat(), "reason_length": len(reason)})
    return {"request_id": request_id, "kind": kind, "due_date": first_due.isoformat(),
            "extended_due_date": new_due.isoformat()}


def destroy_identifier(conn: psycopg.Connection, ctx: RunContext, request_id: str) -> bool:
    """Destroy the encrypted identifier of a completed request (keyed hash kept), audited. In the caller's
    transaction. Returns False when there was none (never registered, or already destroyed)."""
    row = conn.execute(
        "UPDATE gdpr.request SET key_id = NULL, nonce = NULL, identifier_ciphertext = NULL"
        " WHERE request_id = %s AND completed_at IS NOT NULL AND identifier_ciphertext IS NOT NULL"
        " RETURNING subject_hash, kind", (request_id,)
    ).fetchone()
    if row is None:
        return False
    audit.record(conn, ctx, action="destroy_identifier", outcome="done", table="gdpr.request", row_count=1,
                 subject_hash=row[0], details={"request_id": request_id, "kind": row[1]})
    return True


LIST_QUERY = """
SELECT r.request_id, r.kind, r.status, r.outcome, r.received_at, r.due_date, r.extended_due_date, r.extended_at,
       coalesce(r.extended_due_date, r.due_date) AS effective_due, r.completed_at,
       r.identifier_ciphertext IS NOT NULL AS identifier_held,
       coalesce(jsonb_object_agg(p.target, p.status ORDER BY p.target) FILTER (WHERE p.target IS NOT NULL),
                '{}'::jsonb) AS targets
FROM gdpr.request r
LEFT JOIN gdpr.erasure_propagation p USING (request_id)
WHERE (NOT %(open)s OR r.completed_at IS NULL)
  AND (NOT %(overdue)s OR (r.completed_at IS NULL AND coalesce(r.extended_due_date, r.due_date) < %(today)s))
GROUP BY r.request_id
ORDER BY r.completed_at IS NOT NULL, effective_due, r.request_id
"""


def listing(conn: psycopg.Connection, today: date, *, open_only: bool = False,
            overdue_only: bool = False) -> list[dict[str, Any]]:
    """Every request (open ones first, by due date): dates, status, outcome, extension, targets. No
    personal data: no subject hash, no reason text."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(LIST_QUERY, {"open": open_only, "overdue": overdue_only, "today": today}).fetchall()
    conn.rollback()
    out = []
    for r in rows:
        open_ = r["completed_at"] is None
        out.append({
            "request_id": r["request_id"],
            "kind": r["kind"],
            "status": r["status"],
            "outcome": r["outcome"],
            "received_at": r["received_at"].isoformat(),
            "due_date": r["effective_due"].isoformat(),
            "first_due_date": r["due_date"].isoformat(),
            "extended": r["extended_due_date"] is not None,
            "extended_at": r["extended_at"].isoformat() if r["extended_at"] else None,
            "days_left": (r["effective_due"] - today).days if open_ else None,
            "overdue": open_ and r["effective_due"] < today,
            "completed_at": r["completed_at"].isoformat() if r["completed_at"] else None,
            "identifier_held": r["identifier_held"],
            "targets": dict(r["targets"]),
        })
    return out


def purge(conn: psycopg.Connection, ctx: RunContext, keep_for: str, as_of: str, batch_size: int) -> dict[str, int]:
    """Purge requests completed more than `keep_for` (ISO 8601, e.g. P3Y) before `as_of`, with their outbox
    rows, in batches (one transaction each, with its audit rows). First destroys any identifier a completed
    request still holds. A dry run counts and audits only."""
    cutoff = "completed_at < %(as_of)s::timestamptz - %(keep_for)s::interval"
    params: dict[str, Any] = {"as_of": as_of, "keep_for": keep_for}
    result = {"requests": 0, "outbox": 0, "identifiers_destroyed": 0}
    if ctx.dry_run:
        row = conn.execute(
            f"SELECT count(*), (SELECT count(*) FROM gdpr.erasure_propagation p WHERE p.request_id IN"
            f" (SELECT request_id FROM gdpr.request WHERE {cutoff})),"
            " (SELECT count(*) FROM gdpr.request WHERE completed_at IS NOT NULL AND identifier_ciphertext IS NOT NULL)"
            f" FROM gdpr.request WHERE {cutoff}", params,
        ).fetchone()
        result.update(requests=row[0], outbox=row[1], identifiers_destroyed=row[2])  # type: ignore[index]
        with conn.transaction():
            audit.record(conn, ctx, action="purge_requests", outcome="dry_run", table="gdpr.request",
                         row_count=result["requests"],
                         details={"keep_for": keep_for, "outbox": result["outbox"],
                                  "identifiers": result["identifiers_destroyed"]})
        return result
    with conn.transaction():
        destroyed = conn.execute(
            "UPDATE gdpr.request SET key_id = NULL, nonce = NULL, identifier_ciphertext = NULL"
            " WHERE completed_at IS NOT NULL AND identifier_ciphertext IS NOT NULL"
        ).rowcount
        if destroyed:
            audit.record(conn, ctx, action="destroy_identifier", outcome="done", table="gdpr.request",
                         row_count=destroyed, details={"why": "completed request still held its identifier"})
        result["identifiers_destroyed"] = destroyed
    while True:  # the database deletes and audits each batch in one statement (control schema v10)
        with conn.transaction():
            purged, outbox = conn.execute(
                "SELECT requests, outbox FROM gdpr.purge_requests(%s, %s, %s, %s, %s, %s)",
                (keep_for, as_of, batch_size, ctx.dag_id, ctx.run_id, ctx.task_id),
            ).fetchone()  # type: ignore[misc]
        result["requests"] += purged
        result["outbox"] += outbox
        if purged < batch_size:
            break
    if result["requests"] == 0:
        with conn.transaction():
            audit.record(conn, ctx, action="purge_requests", outcome="nothing_to_purge", table="gdpr.request",
                         details={"keep_for": keep_for})
    return result


# -- what every kind of request records when it runs (erasure keeps its own, with its certificate) ----------


def recorded(conn: psycopg.Connection, request_id: str, kind: str, subject_hash: str,
             *, requested_by: str | None = None, for_update: bool = False) -> dict[str, Any] | None:
    """What is recorded under `request_id` when it is this person's request of this kind: its status, outcome,
    reason, due date and details. None for a new id, and for this person's request registered but not run yet.
    The person is `subject_hash` (as located), or `requested_by` (`erasure.request_key`: the keyed hash of
    what the request named, e.g. ``subject-id:N`` for a request registered by id).

    RequestStoreError when the id belongs to a request of another kind or of another person: the recorded
    result of someone else is never reported. Reads only (FOR UPDATE with `for_update`)."""
    row = conn.execute(
        "SELECT kind, subject_hash, status, outcome, reason, coalesce(extended_due_date, due_date), details"
        " FROM gdpr.request WHERE request_id = %s" + (" FOR UPDATE" if for_update else ""), (request_id,)
    ).fetchone()
    if row is None:
        return None
    found_kind, found_hash, status, outcome, reason, due, details = row
    if found_kind != kind:
        raise RequestStoreError(f"request id {request_id} is already the id of a request of kind {found_kind}, not "
                                f"{kind}: nothing was changed; give this request its own request id")
    person = {subject_hash, requested_by or subject_hash}
    if found_hash not in person and details.get("requested_by") not in person:
        raise RequestStoreError(f"request id {request_id} was already used for another person: nothing was "
                                "changed; give this request its own request id")
    if status == "registered":
        return None
    return {"status": status, "outcome": outcome, "reason": reason or "", "due_date": due.isoformat(),
            "details": dict(details)}


def record_outcome(conn: psycopg.Connection, *, request_id: str, kind: str, subject_hash: str, received_at: date,
                   status: str, outcome: str, reason: str, details: Mapping[str, Any],
                   requested_by: str | None = None) -> None:
    """The request's row in gdpr.request once it ran: a new row, or the registered one (its receipt and first
    due date stay). `details`: the evidence (tables and counts, columns, targets; no personal data). In the
    caller's transaction, which locked the request id and read it first (`recorded`)."""
    row = conn.execute(
        "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
        " reason, completed_at, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
        " CASE WHEN %s IN ('completed', 'not_found', 'refused') THEN now() END, %s)"
        " ON CONFLICT (request_id) DO UPDATE SET status = EXCLUDED.status, outcome = EXCLUDED.outcome,"
        " reason = EXCLUDED.reason, completed_at = EXCLUDED.completed_at,"
        " details = gdpr.request.details || EXCLUDED.details || jsonb_build_object('run_at', now())"
        " WHERE gdpr.request.status = 'registered' AND gdpr.request.kind = EXCLUDED.kind"
        " RETURNING request_id",
        (request_id, kind, subject_hash, received_at, due_date(received_at), status, outcome, reason, status,
         Jsonb({**details, "requested_by": requested_by or subject_hash})),
    ).fetchone()
    if row is None:  # cannot happen: the caller locked the request id and read it first
        raise RequestStoreError(f"request id {request_id} was recorded by another run meanwhile")

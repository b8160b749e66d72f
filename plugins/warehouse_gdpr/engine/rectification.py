"""Rectification on request (GDPR art. 16): check the new values, correct them everywhere, tell downstream.

"My phone number is wrong, here is the right one." The policy lists the subject's columns a person may have
corrected (`rectification.columns`), each with a check (a pattern the whole value must match, a length), and
the mapped tables that hold a copy (a support ticket's requester email). Anything else is refused before any
change, and a refused value is never echoed: messages name the column and the rule only.

One transaction (`apply`) corrects every row of the person that holds the attribute, found as the sweep and
erasure find them (`matcher`: the person's live subject rows by key, the copies linked to them or carrying
their email), and, when the email changes, the keyed hash of it wherever the policy keeps one: hashed email
columns of pseudonymised rows (re-hashed from the new address), the suppression list (the new address is
listed as the old one was; the old entry stays, entries are permanent) and a restriction in force. It records
the request (kind `rectification`) and one outbox row per downstream target that holds a changed column, its
payload (the email the target knows the person by, and the new values of the columns it holds) encrypted
under the store key and destroyed on acknowledgement (`propagation`). Audit rows name the columns and count
the rows, never a value. A pseudonymised subject row is not rectified (it holds no personal data any more).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from . import audit, erasure, matcher, propagation, requests
from .audit import RunContext
from .candidates import qualified
from .crypto import Keys
from .erasure import EMAIL_MAX_LENGTH, EMAIL_PATTERN, SAFE_PARAM_NAME, ErasureRequest, Located
from .errors import ConfigurationError
from .policy import Policy

KIND = "rectification"
PARAMS = ("email", "subject_id", "request_id", "received_at", "changes", "dry_run")


class RectificationError(ConfigurationError, ValueError):
    """The rectification is refused before any change. The message names the column and the rule, never a value."""


@dataclass(frozen=True, repr=False)
class RectificationRequest:
    request_id: str
    email: str | None
    subject_id: int | None
    received_at: date
    changes: dict[str, str]
    dry_run: bool = False
    extended_due_date: date | None = None

    def __repr__(self) -> str:  # never the email, never a value
        return (f"RectificationRequest(request_id={self.request_id!r}, by={'email' if self.email else 'subject_id'}, "
                f"columns={sorted(self.changes)})")

    @property
    def due_date(self) -> date:
        return self.extended_due_date or requests.due_date(self.received_at)

    def as_erasure_request(self) -> ErasureRequest:
        """The same person, in the form `erasure.locate` finds people by."""
        return ErasureRequest(self.request_id, self.email, self.subject_id, self.received_at, self.dry_run)


def requested_by(keys: Keys, request: RectificationRequest, located: Located) -> str:
    """The keyed hash of what the request named (the email's, or the subject id's: `erasure.request_key`), with
    which a request registered by subject id is recognised as this person's."""
    return erasure.request_key(keys, request.as_erasure_request(), located)


def check_changes(changes: object, policy: Policy) -> dict[str, str]:
    """{column: new value}, each checked against `rectification.columns` (pattern, length; an email also as a
    plain ASCII address, lower-cased). Raises RectificationError naming the column and the rule, never the value."""
    columns = policy.rectification.columns
    if not isinstance(changes, Mapping) or not changes:
        raise RectificationError("`changes` must be an object of column -> new value, with at least one column "
                                 f"(rectifiable: {', '.join(sorted(columns)) or 'none in the policy'})")
    unknown = sorted(str(c) for c in changes if c not in columns)
    if unknown:
        shown = [f"`{c}`" for c in unknown if re.fullmatch(SAFE_PARAM_NAME, c)]
        hidden = len(unknown) - len(shown)
        raise RectificationError(
            "`changes` names column(s) the policy does not let a person rectify: "
            + ", ".join(shown + ([f"{hidden} other(s) (name not shown)"] if hidden else []))
            + f"; rectifiable: {', '.join(sorted(columns)) or 'none (rectification.columns is empty)'}; "
            "nothing was changed")
    out: dict[str, str] = {}
    for column, value in changes.items():
        spec = columns[column]
        if not isinstance(value, str):
            raise RectificationError(f"`changes.{column}` must be text; nothing was changed")
        value = value.strip()
        if not spec.min_length <= len(value) <= spec.max_length:
            raise RectificationError(f"`changes.{column}` must be {spec.min_length}-{spec.max_length} characters "
                                     f"(it is {len(value)}); nothing was changed")
        if not re.fullmatch(spec.pattern, value):
            raise RectificationError(
                f"`changes.{column}` does not match the policy's pattern for it (rectification.columns.{column}"
                ".pattern); the value is not shown; nothing was changed")
        if column == policy.subject.email_column:
            if len(value) > EMAIL_MAX_LENGTH or not re.fullmatch(EMAIL_PATTERN, value):
                raise RectificationError(f"`changes.{column}` is not a plain ASCII address of at most 254 characters "
                                         "(look-alike characters are refused); nothing was changed")
            value = value.lower()
        out[str(column)] = value
    return out


def parse_request(params: Mapping[str, Any], policy: Policy, today: date | None = None) -> RectificationRequest:
    """Check a trigger's params before anything is read or written (as `erasure.parse_request` does, with
    `changes`). Messages name the param and the rule, never a value."""
    today = today or date.today()
    erasure.refuse_unknown_params(params, PARAMS)
    email, subject_id = erasure.identity(params)
    request_id = params.get("request_id")
    if not isinstance(request_id, str) or not re.fullmatch(erasure.REQUEST_ID_PATTERN, request_id):
        raise RectificationError("`request_id` must be 3-64 characters: letters, digits, '.', '_', ':' or '-'")
    received_at = erasure.received_date(params, today)
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RectificationError("`dry_run` must be true or false")
    changes = check_changes(params.get("changes"), policy)
    return RectificationRequest(request_id, email, subject_id, received_at, changes, dry_run)


@dataclass
class RectificationResult:
    request_id: str
    subject_hash: str
    outcome: str  # rectified, not_found
    reason: str
    status: str
    due_date: str
    columns: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # "table.column" -> rows changed
    targets: list[str] = field(default_factory=list)
    already_recorded: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def live_subjects(conn: psycopg.Connection, policy: Policy, ids: list[Any]) -> list[Any]:
    """The subject rows among `ids` that are not pseudonymised (those hold personal data to correct)."""
    if not ids:
        return []
    subject = policy.subject
    return [r[0] for r in conn.execute(
        sql.SQL("SELECT {pk} FROM {t} WHERE {pk} = ANY(%s) AND {marker} IS NULL ORDER BY 1").format(
            pk=sql.Identifier(subject.primary_key), t=qualified(subject.table),
            marker=sql.Identifier(subject.pseudonymised_marker)), (ids,)).fetchall()]


def email_taken(conn: psycopg.Connection, policy: Policy, ids: list[Any], changes: Mapping[str, str]) -> list[Any]:
    """Other subjects that already hold the new email (a correction must not merge two people): their ids."""
    new = changes.get(policy.subject.email_column)
    if new is None:
        return []
    subject = policy.subject
    return [r[0] for r in conn.execute(
        sql.SQL("SELECT {pk} FROM {t} WHERE lower(btrim({e})) = %s AND NOT {pk} = ANY(%s) ORDER BY 1 LIMIT 5").format(
            pk=sql.Identifier(subject.primary_key), t=qualified(subject.table), e=sql.Identifier(subject.email_column)),
        (new, ids)).fetchall()]


def locate(conn: psycopg.Connection, policy: Policy, keys: Keys, request: RectificationRequest) -> Located:
    """The person (as erasure locates them), their rows counted. Reads only."""
    return erasure.locate(conn, policy, keys, request.as_erasure_request())


def plan(conn: psycopg.Connection, policy: Policy, located: Located, request: RectificationRequest) -> dict[str, int]:
    """{"table.column": rows of the person that would change}, without changing anything (a dry run, the log of
    validate_request). Raises RectificationError when the new email is another subject's."""
    ids = live_subjects(conn, policy, located.subject_ids)
    taken = email_taken(conn, policy, ids, request.changes)
    conn.rollback()
    if taken:
        raise RectificationError(
            f"`changes.{policy.subject.email_column}`: the new address is already the email of another subject "
            f"(id {', '.join(map(str, taken))}): a correction never merges two people; nothing was changed")
    if not ids:
        return {}
    persons = matcher.for_person(conn, policy, ids, located.email)
    counts = {f"{table}.{column}": n for (table, column), n in _count(conn, policy, persons, request.changes).items()}
    conn.rollback()
    return counts


def _locations(policy: Policy, changes: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(table, column, the changed subject column) of every place a changed value is held: copies first, the
    subject's own columns last (the lock order: the subject rows are locked first and changed last)."""
    copies = [(c.table, c.column, name) for name in changes for c in policy.rectification.columns[name].copies]
    own = [(policy.subject.table, name, name) for name in changes]
    return copies + own


def _where(policy: Policy, table: str, column: str, persons: matcher.Persons) -> sql.Composable:
    """The person's rows of `table` that hold a value in `column` (the subject's own rows whatever they hold)."""
    mapped = next(t for t in policy.tables if t.table == table)
    rows = matcher.rows(policy, mapped, persons)
    if table == policy.subject.table:
        return rows
    return sql.SQL("{rows} AND {c} IS NOT NULL").format(rows=rows, c=sql.Identifier(column))


def _count(conn: psycopg.Connection, policy: Policy, persons: matcher.Persons,
           changes: Mapping[str, str]) -> dict[tuple[str, str], int]:
    out = {}
    for table, column, name in _locations(policy, changes):
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE {w} AND {c} IS DISTINCT FROM %(value)s").format(
                t=qualified(table), w=_where(policy, table, column, persons), c=sql.Identifier(column)),
            {**persons.params, "value": changes[name]}).fetchone()
        out[(table, column)] = int(row[0]) if row else 0
    return out


def apply(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: RectificationRequest,
          located: Located) -> RectificationResult:
    """Correct every row of the person holding a changed column, re-hash the email where the policy keeps its
    keyed hash, record the request and its outbox, audit: ONE transaction. The same request id triggered again
    returns the recorded result and changes nothing; a dry run changes nothing and audits what it would do."""
    result = RectificationResult(request.request_id, located.subject_hash, "rectified", "", "completed",
                                 request.due_date.isoformat(), columns=sorted(request.changes))
    with conn.transaction():
        erasure.lock_request_id(conn, request.request_id)
        recorded = requests.recorded(conn, request.request_id, KIND, located.subject_hash,
                                     requested_by=requested_by(keys, request, located), for_update=True)
        if recorded is not None:
            audit.record(conn, ctx, action="rectify", outcome="already_recorded", subject_hash=located.subject_hash,
                         details={"request_id": request.request_id, "status": recorded["status"]})
            details = recorded["details"]
            return RectificationResult(request.request_id, located.subject_hash, recorded["outcome"],
                                       recorded["reason"], recorded["status"], recorded["due_date"],
                                       details.get("columns", []), details.get("rows", {}),
                                       details.get("targets", []), already_recorded=True)
        ids = live_subjects(conn, policy, located.subject_ids)
        if email_taken(conn, policy, ids, request.changes):
            raise RectificationError(f"`changes.{policy.subject.email_column}`: the new address is already the "
                                     "email of another subject; nothing was changed")
        if not ids:
            result.outcome, result.status = "not_found", "not_found"
            result.reason = "no live record of the person (none, or pseudonymised only): nothing to rectify"
        elif request.dry_run:
            persons = matcher.for_person(conn, policy, ids, located.email)
            result.rows = {f"{t}.{c}": n for (t, c), n in _count(conn, policy, persons, request.changes).items()}
            audit.record(conn, ctx, action="rectify", outcome="dry_run", subject_hash=located.subject_hash,
                         row_count=sum(result.rows.values()),
                         details={"request_id": request.request_id, "columns": result.columns, "rows": result.rows})
            return result
        else:
            result.rows = _correct(conn, policy, keys, ctx, request, located, ids)
            result.reason = "corrected in the warehouse" + ("" if any(result.rows.values()) else
                                                            " (every value already as requested)")
            result.targets = propagation.targets_for(policy, KIND, request.changes) if located.email else []
        if result.targets:
            result.status = "pending_propagation"
        _record(conn, policy, keys, ctx, request, located, result, ids)
    return result


def _correct(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: RectificationRequest,
             located: Located, ids: list[Any]) -> dict[str, int]:
    """The changes, in the caller's transaction: subject rows locked first, copies changed, subject rows last;
    then the email's keyed hashes. {"table.column": rows changed}, each audited (column names, never values)."""
    persons = matcher.for_person(conn, policy, ids, located.email)
    erasure.lock_subjects(conn, policy, persons)
    rows: dict[str, int] = {}
    for table, column, name in _locations(policy, request.changes):
        cur = conn.execute(
            sql.SQL("UPDATE {t} SET {c} = %(value)s WHERE {w} AND {c} IS DISTINCT FROM %(value)s").format(
                t=qualified(table), c=sql.Identifier(column), w=_where(policy, table, column, persons)),
            {**persons.params, "value": request.changes[name]})
        rows[f"{table}.{column}"] = cur.rowcount
        audit.record(conn, ctx, action="rectify", outcome="done", table=table, row_count=cur.rowcount,
                     subject_hash=located.subject_hash,
                     details={"request_id": request.request_id, "column": column, "rectified": name})
    new_email = request.changes.get(policy.subject.email_column)
    if new_email and located.email and new_email != located.email:
        rows.update(_rehash(conn, policy, keys, ctx, request, located, new_email))
    return rows


def _rehash(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: RectificationRequest,
            located: Located, new_email: str) -> dict[str, int]:
    """Where the policy keeps a keyed hash of the email: hashed email columns of the person's pseudonymised rows
    (the old address's hashes become the new one's), the suppression list (the new address is listed with the
    old entry's reason; the old entry stays, entries are permanent) and a restriction in force."""
    assert located.email is not None
    strip = policy.optout.strip_plus_tags
    old = erasure.email_hashes(policy, keys, located.email)
    new = keys.subject_hash(new_email, strip)
    rows: dict[str, int] = {}
    for mapped in policy.tables:
        for column in policy.hashed_email_columns(mapped):
            cur = conn.execute(sql.SQL("UPDATE {t} SET {c} = %s WHERE lower(btrim({c})) = ANY(%s)").format(
                t=qualified(mapped.table), c=sql.Identifier(column)), (new, old))
            if cur.rowcount:
                rows[f"{mapped.table}.{column} (keyed hash)"] = cur.rowcount
                audit.record(conn, ctx, action="rectify_hash", outcome="done", table=mapped.table,
                             row_count=cur.rowcount, subject_hash=new,
                             details={"request_id": request.request_id, "column": column})
    listed = conn.execute(
        "INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
        " SELECT %s, %s, reason, 'rectification', %s FROM gdpr.suppression_list WHERE email_hash = ANY(%s)"
        " ORDER BY reason = 'erasure' DESC LIMIT 1 ON CONFLICT (email_hash) DO NOTHING",
        (new, keys.hmac_key_id, request.request_id, old)).rowcount
    if listed:
        rows["gdpr.suppression_list (keyed hash)"] = listed
        audit.record(conn, ctx, action="suppress", outcome="rectified_email", table="gdpr.suppression_list",
                     row_count=listed, subject_hash=new, details={"request_id": request.request_id})
    restricted = conn.execute(
        "UPDATE gdpr.restriction SET subject_hash = %s, key_id = %s WHERE by_email AND subject_hash = ANY(%s)",
        (new, keys.hmac_key_id, old)).rowcount
    if restricted:
        rows["gdpr.restriction (keyed hash)"] = restricted
        audit.record(conn, ctx, action="rectify_hash", outcome="done", table="gdpr.restriction",
                     row_count=restricted, subject_hash=new, details={"request_id": request.request_id})
    return rows


def _record(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: RectificationRequest,
            located: Located, result: RectificationResult, ids: list[Any]) -> None:
    """The request's row, its outbox (each target's payload: the email it knows the person by and the new values
    of the columns it holds, encrypted) and its audit row, in the caller's transaction."""
    requests.record_outcome(
        conn, requested_by=requested_by(keys, request, located), request_id=request.request_id, kind=KIND,
        subject_hash=located.subject_hash,
        received_at=request.received_at, status=result.status, outcome=result.outcome, reason=result.reason,
        details={"columns": result.columns, "rows": result.rows, "targets": result.targets,
                 "subject_ids": [i if isinstance(i, int) else str(i) for i in ids]})
    for name in result.targets:
        propagation.queue(conn, keys, request.request_id, KIND, name,
                          {"identifier": located.email, "changes": dict(request.changes)})
    audit.record(conn, ctx, action="rectification_request", outcome=result.outcome, subject_hash=located.subject_hash,
                 row_count=sum(result.rows.values()),
                 details={"request_id": request.request_id, "status": result.status, "columns": result.columns,
                          "rows": result.rows, "received_at": request.received_at.isoformat(),
                          "due_date": result.due_date, "targets": result.targets})


def verify(conn: psycopg.Connection, policy: Policy, request_id: str, changes: Mapping[str, str]) -> dict[str, int]:
    """After `apply`: {"table.column": rows of the person still holding another value} (empty when every place
    holds the new value). The person is found by the subject ids recorded with the request and their email as
    it is now. Reads only."""
    row = conn.execute("SELECT details FROM gdpr.request WHERE request_id = %s AND kind = %s",
                       (request_id, KIND)).fetchone()
    ids = live_subjects(conn, policy, list((row[0] if row else {}).get("subject_ids", [])))
    if not ids:
        conn.rollback()
        return {}
    subject = policy.subject
    email_row = conn.execute(sql.SQL("SELECT lower(btrim({e})) FROM {t} WHERE {pk} = ANY(%s) LIMIT 1").format(
        e=sql.Identifier(subject.email_column), t=qualified(subject.table), pk=sql.Identifier(subject.primary_key)),
        (ids,)).fetchone()
    persons = matcher.for_person(conn, policy, ids, email_row[0] if email_row else None)
    left = {f"{t}.{c}": n for (t, c), n in _count(conn, policy, persons, changes).items() if n}
    conn.rollback()
    return left

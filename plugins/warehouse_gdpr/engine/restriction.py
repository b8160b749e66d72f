"""Restriction of processing on request (GDPR art. 18): restrict, and lift once resolved.

"I contest the accuracy of my data: block its use while you check." A restriction is recorded in the control
schema (`gdpr.restriction`: the person's keyed hash and subject ids), not only in a CRM column, so that it
survives an import that rewrites the contact row. While it is in force:

* the retention sweep neither deletes nor pseudonymises the person: `candidates.holds_expression` adds the
  built-in hold `processing_restricted` to every rule, so the plan and the report show it with the policy's own
  holds; an erasure request is NOT held by it (a restriction is not a legal hold: erasure follows its own rules);
  its archive purge keeps the person's archived originals past their purge date (`sweep.purge_archive`);
* the person's do-not-contact flag (`subject.restriction_column`) is set, and the opt-out sync sets it again
  when an import cleared it (`optout.enforce`, by id, and by the keyed hash of the email when the import gave
  the row a new id); the hash is part of the opt-out list shared with downstream tools and exported, so no
  campaign or share reaches the person;
* downstream targets with a `restrict` call (statements) are told, and the sales team's webhook
  (`restriction.notify`, internal ids only) is notified, through the outbox (`propagation`), as erasures are;
* with `restriction.database_guard`, a trigger on every mapped table refuses UPDATE and DELETE of the person's
  rows by any role that is not a member of gdpr_engine (`install_guard`, run as the tables' owner).

`lift` deletes the record, clears the flag it set (unless the person is on the suppression list), and tells
the same targets and the sales team. Both are requests of the one lifecycle (kinds `restriction` and
`restriction_lift`), audited; no personal data in audit rows, logs or exceptions.

Each new restriction and each lift is also a journal entry (engine/journal.py), written in the same transaction
with its dates of receipt and, for a lift, its own request id: after a restore from a backup, `gdpr_restore_replay`
records the request again and sends the person's last restriction or lift downstream again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from . import audit, erasure, journal, matcher, propagation, requests
from .audit import RunContext
from .candidates import qualified
from .crypto import Keys
from .erasure import ErasureRequest, Located
from .errors import ConfigurationError
from .policy import Policy

PARAMS = ("email", "subject_id", "request_id", "received_at", "action", "dry_run")
KIND_OF_ACTION = {"restrict": "restriction", "lift": "restriction_lift"}
ACTION_OF_KIND = {kind: action for action, kind in KIND_OF_ACTION.items()}
GUARD_TRIGGER = "gdpr_restriction_guard"


class RestrictionError(ConfigurationError, ValueError):
    """The restriction request is refused before any change. The message never holds personal data."""


@dataclass(frozen=True, repr=False)
class RestrictionRequest:
    request_id: str
    email: str | None
    subject_id: int | None
    received_at: date
    action: str  # restrict | lift
    dry_run: bool = False
    extended_due_date: date | None = None

    def __repr__(self) -> str:
        return (f"RestrictionRequest(request_id={self.request_id!r}, action={self.action!r}, "
                f"by={'email' if self.email else 'subject_id'})")

    @property
    def kind(self) -> str:
        return KIND_OF_ACTION[self.action]

    @property
    def due_date(self) -> date:
        return self.extended_due_date or requests.due_date(self.received_at)

    def as_erasure_request(self) -> ErasureRequest:
        return ErasureRequest(self.request_id, self.email, self.subject_id, self.received_at, self.dry_run)


def requested_by(keys: Keys, request: RestrictionRequest, located: Located) -> str:
    """The keyed hash of what the request named (the email's, or the subject id's: `erasure.request_key`), with
    which a request registered by subject id is recognised as this person's."""
    return erasure.request_key(keys, request.as_erasure_request(), located)


def kind_of(conn: psycopg.Connection, params: Mapping[str, Any]) -> str:
    """The kind a run of the restriction DAG is: its `action` param (restrict, lift), else the kind of the
    request registered under its id, else a restriction. Reads only."""
    action = params.get("action")
    if action is not None and action not in KIND_OF_ACTION:
        raise RestrictionError("`action` must be `restrict` or `lift`")
    if action is not None:
        return KIND_OF_ACTION[str(action)]
    request_id = params.get("request_id")
    if isinstance(request_id, str) and re.fullmatch(erasure.REQUEST_ID_PATTERN, request_id):
        row = conn.execute("SELECT kind FROM gdpr.request WHERE request_id = %s", (request_id,)).fetchone()
        conn.rollback()
        if row is not None and row[0] in ACTION_OF_KIND:
            return str(row[0])
    return "restriction"


def parse_request(params: Mapping[str, Any], today: date | None = None,
                  kind: str = "restriction") -> RestrictionRequest:
    """Check a trigger's params before anything is read or written; `kind` as `kind_of` decided it."""
    today = today or date.today()
    erasure.refuse_unknown_params(params, PARAMS)
    email, subject_id = erasure.identity(params)
    request_id = params.get("request_id")
    if not isinstance(request_id, str) or not re.fullmatch(erasure.REQUEST_ID_PATTERN, request_id):
        raise RestrictionError("`request_id` must be 3-64 characters: letters, digits, '.', '_', ':' or '-'")
    action = params.get("action") or ACTION_OF_KIND[kind]
    if action not in KIND_OF_ACTION:
        raise RestrictionError("`action` must be `restrict` or `lift`")
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RestrictionError("`dry_run` must be true or false")
    return RestrictionRequest(request_id, email, subject_id, erasure.received_date(params, today), str(action), dry_run)


@dataclass
class RestrictionResult:
    request_id: str
    kind: str
    subject_hash: str
    outcome: str  # restricted, lifted, not_found, not_restricted
    reason: str
    status: str
    due_date: str
    subject_ids: list[Any] = field(default_factory=list)
    flagged: int = 0
    targets: list[str] = field(default_factory=list)
    already_recorded: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["subject_ids"] = len(self.subject_ids)  # a count in XComs and logs
        return out


def locate(conn: psycopg.Connection, policy: Policy, keys: Keys, request: RestrictionRequest) -> Located:
    return erasure.locate(conn, policy, keys, request.as_erasure_request())


def _hashes(keys: Keys, policy: Policy, located: Located) -> list[str]:
    """Every hash a restriction of this person may be recorded under (any key id of the chain)."""
    if located.email:
        return list(keys.subject_hashes(located.email, policy.optout.strip_plus_tags).values())
    return [located.subject_hash]


def in_force(conn: psycopg.Connection, policy: Policy, keys: Keys, located: Located,
             *, for_update: bool = False) -> tuple[str, list[str], list[str], str] | None:
    """The person's restriction in force: (subject hash, subject ids, flagged ids, request id), or None."""
    row = conn.execute(
        "SELECT subject_hash, subject_ids, flagged_ids, request_id FROM gdpr.restriction"
        " WHERE subject_table = %s AND (subject_hash = ANY(%s) OR subject_ids && %s::text[])"
        " ORDER BY restricted_at LIMIT 1" + (" FOR UPDATE" if for_update else ""),
        (policy.subject.table, _hashes(keys, policy, located), [str(i) for i in located.subject_ids]),
    ).fetchone()
    return (row[0], list(row[1]), list(row[2]), row[3]) if row else None


def apply(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: RestrictionRequest,
          located: Located) -> RestrictionResult:
    """Restrict (or lift): the record in gdpr.restriction, the do-not-contact flag, the request, its outbox and
    the audit rows, in ONE transaction. The same request id triggered again returns the recorded result."""
    kind = request.kind
    result = RestrictionResult(request.request_id, kind, located.subject_hash, "", "", "completed",
                               request.due_date.isoformat(), subject_ids=list(located.subject_ids))
    with conn.transaction():
        erasure.lock_request_id(conn, request.request_id)
        recorded = requests.recorded(conn, request.request_id, kind, located.subject_hash,
                                     requested_by=requested_by(keys, request, located), for_update=True)
        if recorded is not None:
            audit.record(conn, ctx, action=ACTION_OF_KIND[kind], outcome="already_recorded",
                         subject_hash=located.subject_hash,
                         details={"request_id": request.request_id, "status": recorded["status"]})
            return RestrictionResult(request.request_id, kind, located.subject_hash, recorded["outcome"],
                                     recorded["reason"], recorded["status"], recorded["due_date"],
                                     targets=recorded["details"].get("targets", []), already_recorded=True)
        if located.subject_ids:
            erasure.lock_subjects(conn, policy, matcher.for_person(conn, policy, located.subject_ids, None))
        current = in_force(conn, policy, keys, located, for_update=True)
        if request.action == "restrict":
            _restrict(conn, policy, keys, request, located, current, result)
        else:
            _lift(conn, policy, keys, request, located, current, result)
        if request.dry_run:  # what it would do, undone; audited below
            raise psycopg.Rollback()
        if result.targets:
            result.status = "pending_propagation"
        _record(conn, policy, ctx, keys, request, located, result)
    if request.dry_run:
        with conn.transaction():
            audit.record(conn, ctx, action=request.action, outcome="dry_run", subject_hash=located.subject_hash,
                         row_count=len(result.subject_ids),
                         details={"request_id": request.request_id, "would_be": result.outcome,
                                  "targets": result.targets})
    return result


def _targets(policy: Policy, kind: str, located: Located) -> list[str]:
    """Downstream targets know the person by email: without one only the sales team is told."""
    notify = policy.restriction.notify.name if policy.restriction.notify else None
    return [t for t in propagation.targets_for(policy, kind) if located.email or t == notify]


def _restrict(conn: psycopg.Connection, policy: Policy, keys: Keys, request: RestrictionRequest, located: Located,
              current: tuple[str, list[str], list[str], str] | None, result: RestrictionResult) -> None:
    if not located.subject_ids:
        result.outcome, result.status = "not_found", "not_found"
        result.reason = "no record of the person in the subject table: nothing to restrict"
        return
    flagged = _flag(conn, policy, located.subject_ids, True)
    ids = sorted({str(i) for i in located.subject_ids} | set(current[1] if current else []))
    flagged_ids = sorted({str(i) for i in flagged} | set(current[2] if current else []))
    if current is None:
        _journal(conn, "restriction", request, located.subject_hash, keys.hmac_key_id, {
            "by_email": located.email is not None, "subject_table": policy.subject.table, "subject_ids": ids})
    conn.execute(
        "INSERT INTO gdpr.restriction (subject_hash, by_email, key_id, subject_table, subject_ids, flagged_ids,"
        " request_id) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (subject_hash) DO UPDATE"
        " SET subject_ids = EXCLUDED.subject_ids, flagged_ids = EXCLUDED.flagged_ids",
        (current[0] if current else located.subject_hash, located.email is not None, keys.hmac_key_id,
         policy.subject.table, ids, flagged_ids, current[3] if current else request.request_id))
    result.outcome, result.flagged = "restricted", len(flagged)
    result.reason = (f"already restricted (request {current[3]}): the record covers {len(ids)} subject row(s)"
                     if current else f"restricted: {len(ids)} subject row(s) held, flagged do-not-contact")
    result.targets = _targets(policy, "restriction", located)


def _lift(conn: psycopg.Connection, policy: Policy, keys: Keys, request: RestrictionRequest, located: Located,
          current: tuple[str, list[str], list[str], str] | None, result: RestrictionResult) -> None:
    if current is None:
        result.outcome, result.status = "not_restricted", "completed"
        result.reason = "no restriction of the person is in force: nothing to lift"
        return
    subject_hash, ids, flagged_ids, _ = current
    by_email, key_id = conn.execute("SELECT by_email, key_id FROM gdpr.restriction WHERE subject_hash = %s",
                                    (subject_hash,)).fetchone()  # type: ignore[misc]
    _journal(conn, "restriction_lift", request, subject_hash, key_id, {
        "by_email": by_email, "subject_table": policy.subject.table, "flagged_ids": flagged_ids, "subject_ids": ids},
        restriction_request_id=current[3])
    conn.execute("DELETE FROM gdpr.restriction WHERE subject_hash = %s", (subject_hash,))
    suppressed = located.email is not None and bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM gdpr.suppression_list WHERE email_hash = ANY(%s))",
        (_hashes(keys, policy, located),)).fetchone()[0])  # type: ignore[index]
    cleared = [] if suppressed else _flag(conn, policy, [i for i in located.subject_ids if str(i) in flagged_ids],
                                          False)
    result.subject_ids = ids
    result.outcome, result.flagged = "lifted", len(cleared)
    result.reason = (f"lifted (restricted by request {current[3]}); " + (
        "the do-not-contact flag stays: the person is on the suppression list" if suppressed
        else f"do-not-contact flag cleared on {len(cleared)} subject row(s) it had set"))
    result.targets = _targets(policy, "restriction_lift", located)


def _journal(conn: psycopg.Connection, kind: str, request: RestrictionRequest, subject_hash: str, key_id: str,
             details: dict[str, Any], restriction_request_id: str | None = None) -> None:
    """The journal row of a restriction or lift (engine/journal.py), written just before the change, with what
    a replay after a restore needs to record the request again: its date of receipt and due date, and for a
    lift its own request id (the row is keyed by the restriction it ends). The trigger's row for the same change
    (same kind, hash and request id) is then this one. Internal ids only."""
    journal.record(conn, kind, restriction_request_id or request.request_id, subject_hash, key_id, {
        **details, "received_at": request.received_at.isoformat(), "due_date": request.due_date.isoformat(),
        **({"lift_request_id": request.request_id} if restriction_request_id else {})})


def _flag(conn: psycopg.Connection, policy: Policy, ids: list[Any], value: bool) -> list[Any]:
    """Set (or clear) the do-not-contact flag of the subject rows `ids` where it is not so yet: their ids."""
    column = policy.subject.restriction_column
    if not column or not ids:
        return []
    subject = policy.subject
    return [r[0] for r in conn.execute(
        sql.SQL("UPDATE {t} SET {f} = %s WHERE {pk} = ANY(%s) AND {f} IS DISTINCT FROM %s RETURNING {pk}").format(
            t=qualified(subject.table), f=sql.Identifier(column), pk=sql.Identifier(subject.primary_key)),
        (value, list(ids), value)).fetchall()]


def _record(conn: psycopg.Connection, policy: Policy, ctx: RunContext, keys: Keys, request: RestrictionRequest,
            located: Located, result: RestrictionResult) -> None:
    requests.record_outcome(
        conn, requested_by=requested_by(keys, request, located), request_id=request.request_id,
        kind=request.kind, subject_hash=located.subject_hash,
        received_at=request.received_at, status=result.status, outcome=result.outcome, reason=result.reason,
        details={"subject_rows": len(result.subject_ids), "flagged": result.flagged, "targets": result.targets})
    payload = {"identifier": located.email, "request_id": request.request_id, "subject_table": policy.subject.table,
               "subject_ids": [str(i) for i in result.subject_ids]}
    for name in result.targets:
        propagation.queue(conn, keys, request.request_id, request.kind, name, payload)
    audit.record(conn, ctx, action=request.action, outcome=result.outcome, table="gdpr.restriction",
                 row_count=len(result.subject_ids), subject_hash=located.subject_hash,
                 details={"request_id": request.request_id, "kind": request.kind, "status": result.status,
                          "flagged": result.flagged, "targets": result.targets})


# -- the database guard ------------------------------------------------------------------------------------


def rekey(conn: psycopg.Connection, keys: Keys) -> int:
    """Bring every restriction recorded under an earlier pepper of the chain to the current key, in the caller's
    transaction: the opt-out sync adopts re-imported rows and shares the list by the current key's hash, so a
    restriction left under a retired pepper would silently stop catching imports after a key rotation. The hash
    is chained (`Keys.rekey`): no plaintext needed. Restrictions are few: the new hashes are computed here and
    written by one statement. Raises KeyConfigError (nothing changed) for a key id the keys connection does not
    list. Returns the number of restrictions re-keyed."""
    stale = conn.execute("SELECT subject_hash, key_id FROM gdpr.restriction WHERE key_id <> %s ORDER BY 1"
                         " FOR UPDATE", (keys.hmac_key_id,)).fetchall()
    if not stale:
        return 0
    old = [str(h) for h, _ in stale]
    new = [keys.rekey(str(h), str(k)) for h, k in stale]
    return conn.execute(
        "UPDATE gdpr.restriction r SET subject_hash = m.new_hash, key_id = %s"
        " FROM unnest(%s::text[], %s::text[]) AS m(old_hash, new_hash) WHERE r.subject_hash = m.old_hash",
        (keys.hmac_key_id, old, new)).rowcount


def guard_missing(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """The mapped tables without the restriction guard trigger (enabled ALWAYS). Reads only."""
    rows = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid"
        " WHERE g.tgname = %s AND g.tgenabled = 'A'", (GUARD_TRIGGER,)).fetchall()
    conn.rollback()
    have = {r[0] for r in rows}
    return [t.table for t in policy.tables if t.table not in have]


def install_guard(conn: psycopg.Connection, policy: Policy, ctx: RunContext) -> list[str]:
    """Install the guard trigger on every mapped table (as their owner: CREATE TRIGGER and ENABLE ALWAYS need
    it), audited. Idempotent; returns the tables it was installed on. Raises psycopg's InsufficientPrivilege
    for another role (nothing changed)."""
    with conn.transaction():
        for mapped in policy.tables:
            column = policy.subject.primary_key if mapped.table == policy.subject.table else mapped.subject_column
            table = qualified(mapped.table)
            conn.execute(sql.SQL(
                "CREATE OR REPLACE TRIGGER {g} BEFORE UPDATE OR DELETE ON {t} FOR EACH ROW"
                " WHEN (NOT pg_has_role(session_user, 'gdpr_engine', 'MEMBER'))"
                " EXECUTE FUNCTION gdpr.refuse_restricted_change({s}, {c})").format(
                g=sql.Identifier(GUARD_TRIGGER), t=table, s=sql.Literal(policy.subject.table), c=sql.Literal(column)))
            conn.execute(sql.SQL("ALTER TABLE {t} ENABLE ALWAYS TRIGGER {g}").format(
                t=table, g=sql.Identifier(GUARD_TRIGGER)))
        tables = [t.table for t in policy.tables]
        audit.record(conn, ctx, action="restriction_guard", outcome="installed", row_count=len(tables),
                     details={"tables": tables, "trigger": GUARD_TRIGGER})
    return tables


def require_guard(conn: psycopg.Connection, policy: Policy) -> None:
    """With `restriction.database_guard`, every mapped table has the guard: ConfigurationError otherwise,
    naming the tables and the command the owner runs."""
    if not policy.restriction.database_guard:
        return
    missing = guard_missing(conn, policy)
    if missing:
        raise RestrictionError(
            f"restriction.database_guard is on, but table(s) {', '.join(missing)} have no {GUARD_TRIGGER} trigger: "
            "the tables' owner runs `warehouse-gdpr schema install --policy POLICY` (with $WAREHOUSE_URL set to "
            "the owner's URL); nothing was changed")
